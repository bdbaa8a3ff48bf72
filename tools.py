"""Instruments around a training run, used by probe_nme.py, bench.py and the command line below, not by
the figure scripts: the curvature probe (MATH.md §6) and the spectra of H, GN and the NME (MATH.md §8),
with their callbacks for `common.fit`; re-encoding an ImageNet folder for a long run; and the results
report, results/README.md, generated from the committed CSVs.

    uv run tools.py reencode /data/imagenet /data/imagenet-224      # train side 224, val side 256
    uv run tools.py report                                          # rewrite results/README.md and README's table
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from PIL import Image

from common import (DIST_TIMEOUTS, METRICS, Activation, ConfigError, ImageFolder, NetSpec, Run, _broadcast,
                    _file_digest, _global, _imagenet_eval, _Parser, _write_rows, append_rows, apply, contrast,
                    cross_entropy, eval_resize, gnvp, hvp, normalize, read_rows, row_key, run_cli, skeleton, stop_job,
                    train, tree_dot, tree_norm, twin, with_act)

PyTree = Any


#### Curvature probe (MATH.md §6) ##################################################################
# What the NME does during training: Hessian, Gauss-Newton and NME products along the gradient, the
# φ″ part of the NME (against the activation's twin), traces with standard errors, λ_max, and the
# support of φ″, on a fixed probe batch.


def lanczos_tridiagonal(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array,
                        iters: int) -> jax.Array:
    """The [iters, iters] tridiagonal matrix T = QᵀAQ of `iters` Lanczos steps on the symmetric
    operator A = `matvec` from `v0`, with full reorthogonalisation (classical Gram-Schmidt, twice)
    against the stored basis Q [iters, n].

    If the Krylov space is exhausted early (a residual at rounding level), the remaining steps are
    decoupled (zero off-diagonal) and their diagonal is T[0,0] = v0ᵀAv0/‖v0‖², a Rayleigh quotient
    that cannot exceed the largest eigenvalue of the leading block, so λ_max(T) is unchanged.
    """
    n, dtype = v0.shape[0], v0.dtype
    # After exhaustion only the matvec's rounding is left: 5-15 eps ‖A‖ on the tests' float64 nets, varying
    # with the JAX version and the CPU; genuine couplings can be as small as 1e-3 ‖A‖ (float32, n = 10⁶).
    # eps^¾ lies far from both: 1.8e-12 in float64, 6.4e-6 in float32.
    tol = jnp.finfo(dtype).eps ** 0.75

    def step(j, carry):
        Q, alpha, off, q, scale, done = carry
        Q = Q.at[j].set(q)
        w = matvec(q)
        alpha = alpha.at[j].set(jnp.vdot(q, w))
        scale = jnp.maximum(scale, jnp.linalg.norm(w))  # ≤ ‖A‖: rounding is relative to this
        for _ in range(2):  # with one pass, exhaustion goes undetected and spurious Ritz values > λ_max appear
            w = w - Q.T @ (Q @ w)
        b = jnp.linalg.norm(w)
        done = done | (b <= tol * scale)
        off = off.at[j].set(jnp.where(done, 0.0, b))
        q = jnp.where(done, 0.0, w / jnp.where(done, 1.0, b))
        return Q, alpha, off, q, scale, done

    init = (jnp.zeros((iters, n), dtype), jnp.zeros(iters, dtype), jnp.zeros(iters, dtype),
            v0 / jnp.linalg.norm(v0), jnp.zeros((), dtype), jnp.asarray(False))
    _, alpha, off, *_ = jax.lax.fori_loop(0, iters, step, init)
    live = jnp.cumprod(jnp.concatenate([jnp.ones(1, bool), off[:-1] > 0])).astype(bool)
    alpha = jnp.where(live, alpha, alpha[0])  # steps after a breakdown ran on q = 0
    return jnp.diag(alpha) + jnp.diag(off[:-1], 1) + jnp.diag(off[:-1], -1)


def lanczos_max(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, iters: int) -> jax.Array:
    """Largest (algebraic) Ritz value of the symmetric operator `matvec` after `iters` Lanczos steps
    from `v0`: a lower bound on λ_max that is exact once `iters` reaches the Krylov dimension."""
    return jnp.linalg.eigvalsh(lanczos_tridiagonal(matvec, v0, iters))[-1]


def _mean_se(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sample mean and its standard error (sample std with ddof = 1, over √k)."""
    k = samples.shape[0]
    return samples.mean(), samples.std(ddof=1) / jnp.sqrt(k)


def recorded_support(net: Callable, act: Callable, params: PyTree, x: jax.Array, beta) -> list[jax.Array]:
    """Per call of `act` in `net` (a hidden layer), the fraction of its pre-activations with |u| < 1/β:
    recorded by wrapping `act` while `net` traces (for nets that call it on the whole batch)."""
    support = []

    def recording(u):
        support.append(jnp.mean(jnp.abs(u) < 1 / beta, dtype=jnp.promote_types(u.dtype, jnp.float32)))
        return act(u)

    net(recording, params, x)
    return support


OPERATORS = ("H", "GN", "NME", "H_twin", "phi2")  # phi2 = H − H_twin, the φ″ part of the NME (§6)


def flat_operators(net: Callable, act: Callable, twin_act: Callable, params: PyTree, x: jax.Array,
                   y: jax.Array) -> tuple[dict[str, Callable], int]:
    """({name: matvec} for every name in OPERATORS, n): the probe's symmetric operators on the
    batch-mean cross-entropy of `net(act, params, x)` (MATH.md §1, §6), as products with flat
    vectors of n = number of parameters (ravel_pytree order), in float32 or wider."""
    logits_fn = lambda p: net(act, p, x)
    loss_fn = lambda p: cross_entropy(logits_fn(p), y)
    twin_loss_fn = lambda p: cross_entropy(net(twin_act, p, x), y)
    flat, unravel = ravel_pytree(params)
    ftype = jnp.promote_types(flat.dtype, jnp.float32)
    flat_op = lambda op: (lambda v: ravel_pytree(op(unravel(v.astype(flat.dtype))))[0].astype(ftype))
    h = flat_op(lambda v: hvp(loss_fn, params, v))
    gn = flat_op(lambda v: gnvp(logits_fn, y, params, v))
    h_twin = flat_op(lambda v: hvp(twin_loss_fn, params, v))
    ops = {"H": h, "GN": gn, "NME": lambda v: h(v) - gn(v), "H_twin": h_twin, "phi2": lambda v: h(v) - h_twin(v)}
    return ops, flat.shape[0]


def probe(net: Callable, act: Callable, twin_act: Callable, params: PyTree, x: jax.Array, y: jax.Array,
          key: jax.Array, *, beta=1.0, samples: int = 8, iters: int = 20, support=recorded_support
          ) -> dict[str, jax.Array]:
    """Curvature diagnostics of the batch-mean cross-entropy of `net(act, params, x)` at `params`
    (MATH.md §6), as a dict of scalars in float32 (float64 for float64 parameters).

    `net(act, params, x) -> logits [B, C]` must be pure and deterministic (BatchNorm in inference
    mode); `twin_act` is `act`'s twin (see `twin`). With g = ∇L and ĝ = g/‖g‖:
      loss, grad_norm = ‖g‖, logit_grad_rms = RMS over examples of ‖softmax(z_i) − onehot(y_i)‖;
      hg_norm, gng_norm, nmeg_norm = ‖Hĝ‖, ‖GNĝ‖, ‖NMEĝ‖ with NMEĝ = Hĝ − GNĝ;
      nme_share = ‖NMEĝ‖/‖Hĝ‖, cos_h_gn = cos(Hĝ, GNĝ);
      phi2_share = ‖Hĝ − H_twin ĝ‖/‖Hĝ‖, the φ″ part of the NME (H_twin: Hessian through twin_act);
      tr_h, tr_h_se: Hutchinson εᵀHε, ε ~ N(0, I), mean and standard error of `samples` samples;
      tr_gn, tr_gn_se: the same for T̂ = B‖∇_θ L(θ, ŷ)‖², ŷ ~ Cat(softmax z), unbiased for tr(GN);
      tr_nme = tr_h − tr_gn, tr_nme_se = √(tr_h_se² + tr_gn_se²) (independent samples);
      lam_h, lam_gn: λ_max of H and GN, Lanczos with `iters` steps from a start vector fixed by `key`;
      support_0, support_1, ...: per call of `act` in `net` (hidden layer), the fraction of its
        pre-activations with |u| < 1/β, the support of φ″, from `support(net, act, params, x, beta)`
        (`recorded_support`, or the model zoo's own for per-example models). `beta` may be traced.
    """
    if samples < 2:
        raise ValueError(f"probe needs samples >= 2 for a standard error, got {samples}")
    logits_fn = lambda p: net(act, p, x)
    loss_fn = lambda p: cross_entropy(logits_fn(p), y)
    twin_loss_fn = lambda p: cross_entropy(net(twin_act, p, x), y)

    # One forward pass gives the logits and a pullback for g and the T̂ samples.
    z, pullback = jax.vjp(logits_fn, params)
    batch = z.shape[0]
    logp = jax.nn.log_softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)))
    prob = jnp.exp(logp)
    grad_at = lambda labels: pullback(((prob - jax.nn.one_hot(labels, z.shape[1], dtype=prob.dtype))
                                       / batch).astype(z.dtype))[0]  # ∇_θ L(θ, labels)
    g = grad_at(y)
    grad_norm = tree_norm(g)
    g_hat = jax.tree.map(lambda t: t / grad_norm.astype(t.dtype), g)
    residual = prob - jax.nn.one_hot(y, z.shape[1], dtype=prob.dtype)

    hg = hvp(loss_fn, params, g_hat)
    gng = gnvp(logits_fn, y, params, g_hat)
    nmeg = jax.tree.map(jnp.subtract, hg, gng)
    phi2 = jax.tree.map(jnp.subtract, hg, hvp(twin_loss_fn, params, g_hat))
    hg_norm, gng_norm = tree_norm(hg), tree_norm(gng)

    ops, n = flat_operators(net, act, twin_act, params, x, y)
    h_op, gn_op = ops["H"], ops["GN"]
    ftype = jnp.promote_types(ravel_pytree(params)[0].dtype, jnp.float32)

    # All random draws up front ((1 + samples) × n normals): three PRNG calls, each costly to compile.
    k_normal, k_labels = jax.random.split(key)
    normal = jax.random.normal(k_normal, (1 + samples, n), ftype)  # Lanczos start, then ε's
    y_hat = jax.random.categorical(k_labels, logp, shape=(samples,) + y.shape)

    def sampled_label_trace(labels):
        g_y = grad_at(labels)
        return batch * tree_dot(g_y, g_y)  # E‖∇L(ŷ)‖² = tr(GN)/B: cross-example terms vanish

    tr_h, tr_h_se = _mean_se(jax.lax.map(lambda e: jnp.vdot(e, h_op(e)), normal[1:]))
    tr_gn, tr_gn_se = _mean_se(jax.lax.map(sampled_label_trace, y_hat))
    lam_h, lam_gn = lanczos_max(h_op, normal[0], iters), lanczos_max(gn_op, normal[0], iters)

    out = {
        "loss": cross_entropy(z, y), "grad_norm": grad_norm,
        "logit_grad_rms": jnp.sqrt(jnp.mean(jnp.sum(jnp.square(residual), axis=-1))),
        "hg_norm": hg_norm, "gng_norm": gng_norm, "nmeg_norm": tree_norm(nmeg),
        "nme_share": tree_norm(nmeg) / hg_norm, "cos_h_gn": tree_dot(hg, gng) / (hg_norm * gng_norm),
        "phi2_share": tree_norm(phi2) / hg_norm,
        "tr_h": tr_h, "tr_h_se": tr_h_se, "tr_gn": tr_gn, "tr_gn_se": tr_gn_se,
        "tr_nme": tr_h - tr_gn, "tr_nme_se": jnp.sqrt(tr_h_se**2 + tr_gn_se**2),
        "lam_h": lam_h, "lam_gn": lam_gn,
    } | {f"support_{i}": s for i, s in enumerate(support(net, act, params, x, beta))}
    return {name: v.astype(ftype) for name, v in out.items()}


PROBE_VALUES = ("loss", "grad_norm", "logit_grad_rms", "hg_norm", "gng_norm", "nmeg_norm", "nme_share", "cos_h_gn",
                "phi2_share", "tr_h", "tr_h_se", "tr_gn", "tr_gn_se", "tr_nme", "tr_nme_se", "lam_h", "lam_gn")


#### Spectra (MATH.md §8) ##########################################################################
# Spectral densities (stochastic Lanczos quadrature) and extreme eigenvalues of any symmetric operator
# given as a matvec on flat vectors, and the probe's operators in that form.


def rademacher(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """Independent ±1 entries: start and probe vectors with E[vvᵀ] = I and a fixed norm."""
    return jax.random.rademacher(key, shape, dtype)


def slq(matvec: Callable[[jax.Array], jax.Array], key: jax.Array, n: int, *, starts: int = 4, steps: int = 40,
        dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Stochastic Lanczos quadrature of the symmetric operator A = `matvec` on R^n (MATH.md §8):
    (nodes, weights), each [starts, steps]. Row i is the Gauss rule of `steps` Lanczos steps
    (`lanczos_tridiagonal`) from the i-th Rademacher start v_i: Ritz values θ_ij and weights
    u_ij[0]², so that Σ_j w_ij θ_ijᵖ = v_iᵀAᵖv_i/‖v_i‖² for p ≤ 2·steps − 1, unbiased for tr(Aᵖ)/n.
    Steps past an exhausted Krylov space carry weight 0."""
    v = rademacher(key, (starts, n), dtype)
    T = jax.lax.map(lambda v0: lanczos_tridiagonal(matvec, v0, steps), v)
    theta, U = jnp.linalg.eigh(T)
    return theta, jnp.square(U[:, 0, :])


def slq_density(nodes: jax.Array, weights: jax.Array, grid: jax.Array, sigma) -> jax.Array:
    """The SLQ density (1/k) Σ_i Σ_j w_ij N(λ; θ_ij, σ²) on `grid`: the spectral measure of A, each
    eigenvalue of mass 1/n, smoothed by a Gaussian of width σ; integrates to 1."""
    z = (grid[None, None, :] - nodes[..., None]) / sigma
    pdf = jnp.exp(-0.5 * jnp.square(z)) / (sigma * math.sqrt(2 * math.pi))
    return jnp.mean(jnp.sum(weights[..., None] * pdf, axis=1), axis=0)


def ritz_extremes(nodes: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(k largest ascending, k smallest ascending) Ritz values of one Lanczos run (nodes, weights
    [steps]): approximations from inside of the k largest and k most negative eigenvalues. Values
    of steps past an exhausted Krylov space (weight 0) are left out; too few live ones give NaN."""
    live = np.sort(np.asarray(nodes)[np.asarray(weights) > 0])
    pad = np.full(max(k - len(live), 0), np.nan)
    return np.concatenate([pad, live[max(len(live) - k, 0):]]), np.concatenate([live[:k], pad])


def spectra(net: Callable, act: Callable, twin_act: Callable, params: PyTree, x: jax.Array, y: jax.Array,
            key: jax.Array, *, operators: tuple[str, ...] = ("H", "GN", "NME"), starts: int = 4, steps: int = 40
            ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{operator: slq(...) (nodes, weights)} of each named operator of `flat_operators`, all from
    the same `starts` Rademacher starts (paired across operators). The extreme eigenvalues are
    `ritz_extremes` of a row; the density is `slq_density`."""
    ops, n = flat_operators(net, act, twin_act, params, x, y)
    dtype = jnp.promote_types(ravel_pytree(params)[0].dtype, jnp.float32)
    return {name: slq(ops[name], key, n, starts=starts, steps=steps, dtype=dtype) for name in operators}


#### The probe and the spectra of a model of the zoo, as fit's callbacks ##########################


def inference_net(net: NetSpec, bn_state) -> Callable:
    """The model as the probe's `net(act, params, x) -> logits`: inference mode, every activation `act`."""
    static = skeleton(net)

    def zoo(act, p, xb):
        model = with_act(eqx.nn.inference_mode(eqx.combine(p, static)), act)
        return apply(model, bn_state, xb)[0].astype(jnp.float32)

    return zoo


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("samples", "iters"))
def probe_step(net: NetSpec, mean, std, params, bn_state, beta, x, y, key, *, samples=8, iters=20):
    """`probe` of the model in inference mode on the batch (x uint8 NHWC, y): a dict of scalars."""
    static = skeleton(net)
    zoo = inference_net(net, bn_state)

    def support(_, act, p, xb, beta):  # per example inside vmap, then the batch mean (no tracer escapes)
        one = lambda a, w, xi: with_act(eqx.nn.inference_mode(eqx.combine(w, static)), a)(xi, bn_state)  # noqa: E731
        return [r.mean() for r in jax.vmap(lambda xi: recorded_support(one, act, p, xi, beta))(xb)]

    act = Activation(net.activation, beta)
    return probe(zoo, act, twin(act), params, normalize(x, mean, std), y, key, beta=beta, samples=samples,
                 iters=iters, support=support)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("operators", "starts", "steps"))
def spectra_step(net: NetSpec, mean, std, params, bn_state, beta, x, y, key, *, operators=("H", "GN", "NME"),
                 starts=4, steps=40):
    """`spectra` of the model in inference mode on the batch (x uint8 NHWC, y): {operator: (nodes,
    weights)}, each [starts, steps]."""
    act = Activation(net.activation, beta)
    return spectra(inference_net(net, bn_state), act, twin(act), params, normalize(x, mean, std), y, key,
                   operators=operators, starts=starts, steps=steps)


PROBE_BATCH = 512


def probe_batch(data, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The probe's fixed batch: the first n training images and labels (noisy labels included); of an
    ImageFolder, its first n readable training images, centre-cropped as for evaluation."""
    if not isinstance(data, ImageFolder):
        return data.x_train[:n], data.y_train[:n]
    got = [r for r in (_imagenet_eval(data.sources["train"][i], data.image_size)
                       for i in range(min(2 * n, data.n_train))) if r]
    return np.stack([x for x, _ in got[:n]]), np.array([y for _, y in got[:n]], np.int32)


def _rows_upto(path, run: Run) -> list[dict]:
    """This run's rows of a per-step CSV up to the step it starts from; its rows past it (a run
    restarted without its checkpoint) are dropped from the file (process 0 writes)."""
    rows = read_rows(path)
    ident = row_key(run.identity)
    kept = [r for r in rows if row_key(r) != ident or int(r["step"]) <= run.step]
    if jax.process_index() == 0 and len(kept) < len(rows):
        _write_rows(path, kept, list(rows[0]))
    return [r for r in kept if row_key(r) == ident]


class Prober:
    """The curvature probe as fit's callback: on a fixed batch of about PROBE_BATCH training images
    (a multiple of the device count), one row per call appended to `path` (the run's identity, step,
    epoch and every probe value); `last` keeps the latest values. Rows of this run past the step it
    starts from (a run restarted without its checkpoint) are dropped; those up to it are kept. With
    `path` None it only holds the batch (for SpectraProber)."""

    def __init__(self, run: Run, data, path):
        n = jax.device_count()
        size = min(-(-PROBE_BATCH // n) * n, data.n_train // n * n)
        i, share = jax.process_index(), size // jax.process_count()  # this process's rows of the batch
        self.x, self.y = _global(run.mesh, *(a[i * share:(i + 1) * share] for a in probe_batch(data, size)))
        self.net, self.spec, self.path, self.last = run.spec.net, data.spec, path, {}
        self.key = jax.random.fold_in(jax.random.key(run.seed), 1 << 30)  # apart from the step keys
        if path is None:
            return
        ours = _rows_upto(path, run)
        if ours:  # resumed: the values of its last probe so far
            self.last = {k: float(v) for k, v in ours[-1].items() if k in PROBE_VALUES or k.startswith("support_")}

    def __call__(self, run: Run) -> None:
        got = probe_step(self.net, self.spec.mean, self.spec.std, run.params, run.bn_state, run.hp.beta,
                         self.x, self.y, jax.random.fold_in(self.key, run.step))
        self.last = {k: float(v) for k, v in got.items()}
        if jax.process_index() == 0:
            append_rows(self.path, [run.identity | {"step": run.step, "epoch": run.step / run.steps_per_epoch}
                                    | self.last])


def probe_row(cfg, seed: int, opts, *, curves, every: int, data=None) -> dict:
    """One run of `common.train` with the curvature probe every `every` steps, appending to the CSV
    `curves`: the run's CSV columns after its identity, METRICS and the last probe's values (probe_*)."""
    r = train(cfg, seed, data, opts, probe=lambda run, data: Prober(run, data, curves), every=every)
    return {k: r[k] for k in METRICS} | {f"probe_{k}": v for k, v in r["probe"].last.items()}


class SpectraProber(Prober):
    """The spectra (MATH.md §8) as fit's callback, on the Prober's fixed batch: at the steps in `at`
    (every call if None), `spectra_step` of each operator, appended to `path` as one row per
    (operator, start, node): the run's identity, step, epoch, operator, start, node, theta, weight."""

    def __init__(self, run: Run, data, path, *, at=None, operators=("H", "GN", "NME"), starts=4, steps=40):
        super().__init__(run, data, None)
        self.path, self.at, self.kw = path, at, dict(operators=tuple(operators), starts=starts, steps=steps)
        _rows_upto(path, run)

    def __call__(self, run: Run) -> None:
        if self.at is not None and run.step not in self.at:
            return
        got = spectra_step(self.net, self.spec.mean, self.spec.std, run.params, run.bn_state, run.hp.beta,
                           self.x, self.y, jax.random.fold_in(self.key, run.step), **self.kw)
        got = {name: (np.asarray(nodes, np.float64), np.asarray(w, np.float64)) for name, (nodes, w) in got.items()}
        if jax.process_index() == 0:
            head = run.identity | {"step": run.step, "epoch": run.step / run.steps_per_epoch}
            append_rows(self.path, [head | {"operator": name, "start": i, "node": j, "theta": nodes[i, j],
                                            "weight": w[i, j]}
                                    for name, (nodes, w) in got.items()
                                    for i in range(nodes.shape[0]) for j in range(nodes.shape[1])])


#### The peer watchdog of a multi-process job ######################################################


# A peer silent for PEER_TIMEOUT_S is dead: long enough for a loaded host's stalls (the beat is a thread, so tracing
# and compiling do not stop it).
PEER_TIMEOUT_S = 60.0
PEER_BEAT_S = 2.0
_DONE = b"d"  # a finished process's last byte: its peers stop watching it


class Watchdog:
    """Ends this process with one line on stderr (exit 1) when another process of the job dies or stops answering,
    instead of leaving it blocked in a collective (a host gone without closing its connections, or a collective that
    blocks instead of failing: NCCL may). Process 0 keeps a TCP connection to every other process, its address
    broadcast at start; each side writes a byte every PEER_BEAT_S, and end of stream, a socket error or PEER_TIMEOUT_S
    of silence (by this process's clock) is a dead peer. A finished process writes _DONE and is no longer watched."""
    def __init__(self, me: int, n: int):
        self.me, self.n = me, n
        if me == 0:
            server = socket.create_server(("", 0))
            address = f"{socket.gethostname()}:{server.getsockname()[1]}"
        else:
            address = ""
        address = _broadcast(np.frombuffer(address.encode().ljust(256), np.uint8)).tobytes().decode().strip()
        try:
            if me == 0:
                server.settimeout(DIST_TIMEOUTS["initialization_timeout"])
                self.peers = {}
                for _ in range(n - 1):
                    conn, _ = server.accept()
                    self.peers[conn] = int.from_bytes(conn.recv(4), "big")
                server.close()
            else:
                host, port = address.rsplit(":", 1)
                conn = socket.create_connection((host, int(port)), timeout=DIST_TIMEOUTS["initialization_timeout"])
                conn.sendall(me.to_bytes(4, "big"))
                self.peers = {conn: 0}
        except OSError as e:
            stop_job(f"the peer watchdog could not connect the processes through {address} ({e})")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="peer-watchdog", daemon=True)
        self.thread.start()

    def _dead(self, p: int, why: str):
        stop_job(f"JAX process {p} of {self.n} stopped ({why})" if p else
                 f"lost the JAX coordinator (process 0: {why})")

    def _loop(self):
        heard = {c: time.monotonic() for c in self.peers}
        while not self.stop.wait(PEER_BEAT_S):
            for c, p in list(self.peers.items()):
                try:
                    got = b""
                    while select.select([c], [], [], 0)[0] and _DONE not in got:
                        chunk = c.recv(64)
                        if not chunk:  # end of stream stays readable: without this the loop never ends
                            raise OSError("its connection closed")
                        got += chunk
                        heard[c] = time.monotonic()
                    if _DONE in got:  # answer in kind and fall silent, so that it closes with nothing unread
                        c.sendall(_DONE)
                        del self.peers[c]
                        continue
                    c.sendall(b".")
                except OSError as e:
                    if not self.stop.is_set():
                        self._dead(p, e.strerror or str(e))
                    return
                if time.monotonic() - heard[c] > PEER_TIMEOUT_S:
                    self._dead(p, f"no sign of life for {time.monotonic() - heard[c]:.0f} s")

    def done(self):
        """This process finished. Process 0, whose exit ends the coordination service, waits (watching, up to the
        shutdown timeout) until every other process has left JAX: jax.distributed.shutdown, then _DONE. Each other
        process does so and reads until process 0 answers (a socket closed with unread bytes would reset the
        connection instead of ending it)."""
        if self.me == 0:
            end = time.monotonic() + DIST_TIMEOUTS["shutdown_timeout_seconds"]
            while self.peers and self.thread.is_alive() and time.monotonic() < end:
                time.sleep(0.1)
            self.stop.set()
            return
        jax.distributed.shutdown()
        self.stop.set()
        self.thread.join()
        for c in self.peers:
            try:
                c.sendall(_DONE)
                c.settimeout(4 * PEER_BEAT_S)
                while (got := c.recv(64)) and _DONE not in got:
                    pass
                c.close()
            except OSError:  # process 0 has gone as well
                pass


#### Re-encoding ImageNet #########################################################################


# docs/running.md, "Re-encoding ImageNet": train at the largest side that decodes at >= 2x the originals' rate per
# core (what the 224 crop still sees against images/s); val at the evaluation's own first resize, 256.
REENCODE_SIDE = 224
REENCODE_VAL_SIDE = eval_resize(224)  # 256


REENCODE_MANIFEST = "reencode_manifest.csv"


_MANIFEST_COLUMNS = ("path", "size", "mtime_ns", "sha256", "width", "height", "out_width", "out_height")


def _reencode_one(task):
    """Re-encode one file (worker process): shorter side down to `side` (never up), RGB, JPEG at
    `quality`; a file already small enough and RGB JPEG is copied byte for byte, and an unreadable one
    too (the pipeline logs and skips it, as it would the original). Written to a temporary name and
    renamed, so a kill leaves no partial image. Returns its manifest row."""
    src, dst, rel, side, quality = task
    st = os.stat(src)
    with open(src, "rb") as f:
        raw = f.read()
    row = {"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashlib.sha256(raw).hexdigest(),
           "width": 0, "height": 0, "out_width": 0, "out_height": 0}
    out = raw
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            tw, th = (w, h) if min(w, h) <= side else (max(1, round(w * side / min(w, h))),
                                                       max(1, round(h * side / min(w, h))))
            if (tw, th) != (w, h) or im.format != "JPEG" or im.mode != "RGB":
                im.draft("RGB", (tw, th))  # DCT-domain reduction to no less than the target
                im = im.convert("RGB")
                if im.size != (tw, th):
                    im = im.resize((tw, th), Image.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=quality)
                out = buf.getvalue()
            row.update(width=w, height=h, out_width=tw, out_height=th)
    except Exception as e:  # PIL raises many types on corrupt files; copied as is
        logging.warning("reencode: copying unreadable image %s unchanged: %s", src, e)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.part{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, dst)
    return row


def _read_manifest(path) -> dict:
    """{relative path: its last row} of a manifest; a partial last line (a kill mid-write) is cut."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return {r["path"]: r for r in csv.DictReader(io.StringIO(keep.decode()))}


def reencode(src, dst, side: int = REENCODE_SIDE, workers: int | None = None, quality: int = 90,
             log_every_s: float = 30.0, val_side: int = REENCODE_VAL_SIDE) -> dict:
    """Copy the ImageFolder `src` (train/<class>/*, val/<class>/*) to `dst` with the same layout and
    file names, every image's shorter side reduced to `side` px in train and `val_side` px in val (never
    enlarged), once, in `workers` processes (default: one per core). dst/reencode_manifest.csv records
    each source file's path, size, mtime, SHA-256 and its sizes before and after, a row appended as each
    file is done; a rerun (after an interruption, or on a grown source) skips a file whose row matches
    its size and mtime (or, if only the mtime changed, its SHA-256) and whose output exists, and redoes
    a changed one. dst made with other sides or quality is refused. Returns counts {"files", "done",
    "skipped"}.

    Point --data-dir at dst: the train random-resized crop and the eval resize run unchanged, on files
    that decode several times faster (docs/running.md, "Re-encoding ImageNet")."""
    src, dst = Path(src), Path(dst)
    for d in (src / "train", src / "val"):
        if not d.is_dir():
            raise ConfigError(f"reencode SRC {src}: {d} does not exist; pass {ImageFolder.LAYOUT}")
    if min(side, val_side) < 32 or not 1 <= quality <= 100:
        raise ConfigError(f"reencode --side {side} and --val-side {val_side} must be >= 32 and --quality {quality} "
                          "within 1..100")
    if src.resolve() == dst.resolve():
        raise ConfigError(f"reencode DST {dst}: must differ from SRC")
    dst.mkdir(parents=True, exist_ok=True)
    settings, made = {"side": side, "val_side": val_side, "quality": quality}, dst / "reencode.json"
    if made.exists() and (old := json.loads(made.read_text())) != settings:
        raise ConfigError(f"reencode DST {dst}: made with {old}, not {settings}; pass another DST")
    made.write_text(json.dumps(settings))
    manifest = dst / REENCODE_MANIFEST
    done = _read_manifest(manifest)

    refreshed = []  # rows of files whose mtime alone changed: recorded so the next run skips the hash

    def unchanged(path, rel, st):
        row = done.get(rel)
        if row is None or int(row["size"]) != st.st_size or not (dst / rel).is_file():
            return False
        if int(row["mtime_ns"]) == st.st_mtime_ns:
            return True
        if _file_digest(path, "sha256") != row["sha256"]:
            return False
        refreshed.append(row | {"mtime_ns": st.st_mtime_ns})
        return True

    tasks, files = [], 0
    for split, split_side in (("train", side), ("val", val_side)):
        for cls in sorted(e.name for e in os.scandir(src / split) if e.is_dir()):
            for e in sorted(os.scandir(src / split / cls), key=lambda e: e.name):
                if e.is_file():
                    files += 1
                    rel = f"{split}/{cls}/{e.name}"
                    if not unchanged(e.path, rel, e.stat()):
                        tasks.append((e.path, str(dst / rel), rel, split_side, quality))
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    print(f"reencode: {files - len(tasks)} of {files} files already done; {len(tasks)} to do in {workers} "
          f"processes -> {dst}", flush=True)
    fresh = not manifest.exists() or manifest.stat().st_size == 0
    t0 = last = time.perf_counter()
    with open(manifest, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_MANIFEST_COLUMNS)
        if fresh:
            w.writeheader()
        w.writerows(refreshed)
        if not tasks:
            return {"files": files, "done": 0, "skipped": files}
        # spawn, not fork: the parent has JAX's threads running
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for i, row in enumerate(pool.imap_unordered(_reencode_one, tasks, chunksize=16), 1):
                w.writerow(row)
                f.flush()
                if time.perf_counter() - last > log_every_s or i == len(tasks):
                    last = time.perf_counter()
                    os.fsync(f.fileno())
                    print(f"  {i} of {len(tasks)}  {i / (last - t0):,.0f} images/s", flush=True)
    return {"files": files, "done": len(tasks), "skipped": files - len(tasks)}


#### The results report ############################################################################
# results/README.md, and README.md's tables between their marks, generated from the committed CSVs alone
# (`uv run tools.py report`); tests/test_report.py fails when either is stale.

ROOT = Path(__file__).resolve().parent
# The reading of `_reading`'s table, written from the committed results; its numbers are the table's.
READING = (
    "Both regimes reproduce Fig. 2 at ρ = 0.3, and both show the mechanism at equal ρ: taking the NME out of "
    "gp's update (gp_gn) removes most of the gain, the NME alone (gp_nme) keeps it, and GELU's edge over ReLU "
    "comes with the NME part. Without it (gp_gn) the two activations are not shown to gain alike: the interval "
    "of GELU − ReLU reaches past the ±0.5 pt band in both regimes, so that claim is inconclusive. The regimes "
    "differ in two places. At each rule's best ρ, chosen on seeds 0-7 and judged on seeds 8-15, the conv "
    "regime still ranks gp and gp_nme above gp_gn for both activations; in the MLP, gp_gn's best ρ (3, "
    "against 1) gives it gp's gain (inconclusive) and, for GELU, more than gp_nme's (contradicted): there the "
    "NME is the quicker way to the gain, not the only one. And Fig. 4's custom-derivative twins, reproduced in "
    "the MLP, are inconclusive in the conv regime at 16 seeds, both contrasts within ±0.6 pt of 0. At equal ρ past "
    "a rule's peak (ρ ≥ 1 for gp and gp_nme in the conv regime, ρ ≥ 3 in the MLP), a contrast pits a rule in "
    "decline, or collapsed (ReLU's gains fall below −50 pt), against one near its peak; the best-ρ claims are "
    "the fair comparison there.")
CLAIMS_MARK = "<!-- claims: generated by `uv run tools.py report` -->"
VERSIONS_MARK = "<!-- versions: generated by `uv run tools.py report` -->"
FIGURES = ("fig2_gp_relu_gelu", "fig3_beta_gelu", "fig4_aug_dim", "fig5_weight_noise", "fig6_sam_vs_psam")
# Where each regime's and environment's results are (folders under results/).
REGIMES = {"": "MLP regime (mlp256)", "cnn": "conv regime (cnn8f14)"}
ENVIRONMENTS = {"": "native", "py312": "Python 3.12", "avx2": "AVX2"}
# The summary's rows: what the paper claims (or the ablation asks), and where each regime judges it:
# {regime folder: (script, contrast label)}.
SUMMARY = [
    ("GELU gains more from the gradient penalty than ReLU (Fig. 2)",
     {"": ("fig2_gp_relu_gelu", "gain(gelu) − gain(relu)"),
      "cnn": ("nme_ablation", "gain(gp_p1, gelu) − gain(gp_p1, relu)")}),
    ("The penalty's gain over SGD falls as β-GELU's φ″ sharpens (Fig. 3)", {"": ("fig3_beta_gelu", None)}),
    ("Augmented ReLU rescues the penalty (Fig. 4)",
     {r: ("fig4_aug_dim", "gain(relu_aug) − gain(relu)") for r in REGIMES}),
    ("Diminished GELU breaks it (Fig. 4)", {r: ("fig4_aug_dim", "gain(gelu_dim) − gain(gelu)") for r in REGIMES}),
    ("The GN-trace penalty beats weight noise (Fig. 5)", {"": ("fig5_weight_noise", "a(gn_trace) − a(weight_noise)")}),
    ("... and the Hessian-trace penalty (Fig. 5)", {"": ("fig5_weight_noise", "a(gn_trace) − a(hessian_trace)")}),
    ("PSAM is sensitive to the activation (Fig. 6)",
     {"": ("fig6_sam_vs_psam", "[sam − psam]_relu − [sam − psam]_gelu")}),
    ("SAM is not (Fig. 6)", {"": ("fig6_sam_vs_psam", "a(sam, relu) − a(sam, gelu)")}),
    ("gp's gain needs the NME in its update (gp − gp_gn, GELU)",
     {r: ("nme_ablation", "gain(gp_p1, gelu) − gain(gp_gn_p1, gelu)") for r in REGIMES}),
    ("... more for GELU than for ReLU",
     {r: ("nme_ablation", "[gain(gp_p1) − gain(gp_gn_p1)]_gelu − [...]_relu") for r in REGIMES}),
    ("Without the NME the activations gain alike (gp_gn, ≈ 0)",
     {r: ("nme_ablation", "gain(gp_gn_p1, gelu) − gain(gp_gn_p1, relu)") for r in REGIMES}),
    ("The NME alone beats GN alone, ReLU (gp_nme − gp_gn)",
     {r: ("nme_ablation", "gain(gp_nme_p1, relu) − gain(gp_gn_p1, relu)") for r in REGIMES}),
    ("... and GELU", {r: ("nme_ablation", "gain(gp_nme_p1, gelu) − gain(gp_gn_p1, gelu)") for r in REGIMES}),
    ("GELU's edge lives in the NME part (gp_nme)",
     {r: ("nme_ablation", "gain(gp_nme_p1, gelu) − gain(gp_nme_p1, relu)") for r in REGIMES}),
    ("At each rule's best ρ: gp beats gp_gn", {r: ("nme_ablation", "best gain(gp_p1, ") for r in REGIMES}),
    ("At each rule's best ρ: gp_nme beats gp_gn",
     {r: ("nme_ablation", tuple(f"best gain(gp_nme_p1, {a}) − best gain(gp_gn" for a in ("relu", "gelu")))
      for r in REGIMES}),
]


def _csv(path) -> list[dict]:
    return read_rows(path) if Path(path).exists() else []


def _signed(v) -> str:
    return "nan" if not math.isfinite(float(v)) else f"{float(v):+.2f}".replace("-", "−")


def _interval(line: dict) -> str:
    return f"{_signed(line['mean'])} [{_signed(line['lo'])}, {_signed(line['hi'])}]"


def _where(line: dict) -> str:
    """A verdict line's `at`, short: "ρ 0.3", "σ² 0.001 relu", "β 8", or the activation of a best-ρ claim."""
    if line["at"].startswith("best rho"):
        return line["contrast"].split(", ")[1].split(")")[0]
    parts = [p.split("=", 1) for p in line["at"].split(", ") if "=" in p]
    names = {"rho": "ρ", "sigma2": "σ²", "beta": "β", "activation": ""}
    return " ".join(f"{names.get(k, k + ' ')}{' ' if names.get(k) else ''}{v}".strip() for k, v in parts) or "slope"


def _lines(folder: str, script: str, label: str | tuple[str, ...] | None) -> list[dict]:
    """The verdict lines of results/<folder>/<script>.verdict.csv whose contrast starts with `label` (or
    with one of a tuple of them)."""
    return [v for v in _csv(ROOT / "results" / folder / f"{script}.verdict.csv")
            if label is None or v["contrast"].startswith(label)]


def _cell(lines: list[dict], turns=frozenset()) -> str:
    """Lines of one claim, grouped by verdict: "**reproduced** at ρ 0.3, 1; inconclusive at ρ 0.1†", a †
    where the verdict differs between the environments (`turns`: (contrast, at) pairs)."""
    if not lines:
        return "not run"
    by: dict = {}
    for v in lines:
        by.setdefault(v["verdict"], []).append(_where(v) + "†" * ((v["contrast"], v["at"]) in turns))
    cells = []
    for k in ("reproduced", "contradicted", "inconclusive"):
        if k in by:  # a symbol repeated from the previous place is dropped: "ρ 0.3, 1"
            places = [p if i == 0 or p.split()[0] != by[k][i - 1].split()[0] or len(p.split()) == 1
                      else p.split(" ", 1)[1] for i, p in enumerate(by[k])]
            cells.append(f"{'**' + k + '**' if k != 'inconclusive' else k} at {', '.join(places)}")
    return "; ".join(cells)


def _sensitive(script: str) -> set:
    """(contrast, at) of the claims of `script` whose verdict differs between the environments."""
    verdicts: dict = {}
    for env in ENVIRONMENTS:
        for v in _csv(ROOT / "results" / env / f"{script}.verdict.csv"):
            verdicts.setdefault((v["contrast"], v["at"]), set()).add(v["verdict"])
    return {k for k, vs in verdicts.items() if len(vs) > 1}


def claims_table() -> str:
    """README's table: each claim's verdicts in both regimes (16 seeds, native environment), a † where a
    verdict turns with the environment (results/README.md, "Three environments")."""
    out = ["| claim | " + " | ".join(REGIMES.values()) + " |", "|---|" + "---|" * len(REGIMES)]
    for name, where in SUMMARY:
        cells = []
        for regime in REGIMES:
            if regime not in where:
                cells.append("not run")
                continue
            script, label = where[regime]
            turns = _sensitive(script) if regime == "" and script in FIGURES else set()
            cells.append(_cell(_lines(regime, script, label), turns))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _verdict_table(lines: list[dict], columns: dict[str, list[dict]] | None = None) -> list[str]:
    """Markdown rows: contrast, at, predicted direction, mean [95% interval], n, the same at n − 2, verdict;
    with `columns` ({label: lines of another environment}), one "mean [interval] verdict" cell each."""
    head = "| contrast | at | predicted | mean, pt [95% interval] | n | at n − 2 | verdict |"
    out = [head + "".join(f" {c} |" for c in columns or {}), "|---" * (7 + len(columns or {})) + "|"]
    for v in lines:
        key = (v["contrast"], v["at"])
        extra = ""
        for other in (columns or {}).values():
            o = next((w for w in other if (w["contrast"], w["at"]) == key), None)
            extra += f" {_interval(o)} {o['verdict']} |" if o else " not run |"
        early = "–" if not math.isfinite(float(v["mean2"])) else _interval(
            {"mean": v["mean2"], "lo": v["lo2"], "hi": v["hi2"]})
        verdict = f"**{v['verdict']}**" if v["verdict"] != "inconclusive" else v["verdict"]
        out.append(f"| {v['contrast']} | {v['at']} | {v['direction'].replace('~0', '≈ 0')} | {_interval(v)} | "
                   f"{v['n']} | {early} | {verdict} |" + extra)
    return out


def _means(rows: list[dict], row_of, col_of) -> list[str]:
    """Mean test accuracy (%) of each (row, column) cell over seeds, finished runs only."""
    cells: dict = {}
    for r in rows:
        if r["diverged"] != "True" and math.isfinite(float(r["test_accuracy"])):
            cells.setdefault((row_of(r), col_of(r)), []).append(100 * float(r["test_accuracy"]))
    rs = list(dict.fromkeys(row_of(r) for r in rows))
    cs = sorted({col_of(r) for r in rows}, key=lambda c: (isinstance(c, str), c))
    out = ["| | " + " | ".join(f"{c:g}" if isinstance(c, float) else str(c) for c in cs) + " |",
           "|---" * (len(cs) + 1) + "|"]
    for r in rs:
        out.append(f"| {r} | " + " | ".join(f"{np.mean(cells[r, c]):.2f}" if (r, c) in cells else "–" for c in cs)
                   + " |")
    return out


def _same(a: list[dict], b: list[dict]) -> tuple[int, int, float, float]:
    """Runs in both CSVs (matched by identity): (runs, identical test accuracies, 90th percentile and
    largest |difference| in points)."""
    theirs = {row_key(r): r["test_accuracy"] for r in b}
    pairs = [(r["test_accuracy"], theirs[row_key(r)]) for r in a if row_key(r) in theirs]
    d = np.array([abs(float(x) - float(y)) * 100 for x, y in pairs]) if pairs else np.zeros(1)
    return len(pairs), sum(x == y for x, y in pairs), float(np.nanpercentile(d, 90)), float(np.nanmax(d))


def _regime_rows(folder: str) -> list[str]:
    """The regime candidates of results/regimes/<folder>/<name>/: train and test accuracy at ρ = 0, the
    paired gain of gp_p1 per activation at each ρ > 0, the probe's NME and φ″ shares of GELU under sgd
    (means over training) where a probe ran, and the seconds per run."""
    out = []
    for d in sorted(p for p in (ROOT / "results" / "regimes" / folder).iterdir() if p.is_dir()):
        csvs = list(d.glob("*.csv"))
        rows = [r for p in csvs if not p.name.endswith((".curves.csv", ".verdict.csv")) for r in _csv(p)]
        if not rows:
            continue
        base = [r for r in rows if float(r["rho"]) == 0 and r["method"] in ("sgd", "gp_p1")]
        acc = lambda k: 100 * np.mean([float(r[k]) for r in base])  # noqa: E731
        gains = []
        for rho in sorted({float(r["rho"]) for r in rows} - {0.0}):
            for act in ("relu", "gelu"):
                m = "gp_p1"
                terms = [(+1, {"method": m, "activation": act, "rho": rho}),
                         (-1, {"method": "sgd" if any(r["method"] == "sgd" for r in rows) else m, "activation": act,
                               "rho": 0.0})]
                c = contrast([r for r in rows if r["beta"] in ("1.0", "1")], terms)
                gains.append(f"{act} ρ {rho:g}: {_signed(c.mean)}")
        curves = _csv(d / "probe_nme.curves.csv")
        gelu = [c for c in curves if c["activation"] == "gelu" and c["method"] == "sgd"]
        probe = (f"{np.mean([float(c['nme_share']) for c in gelu]):.3f}, "
                 f"{np.mean([float(c['phi2_share']) for c in gelu]):.3f}, "
                 f"{np.mean([float(c['nme_share']) > 0.05 for c in gelu]):.0%}") if gelu else "–"
        r0 = rows[0]
        setup = f"{r0['model']}, {r0['train_subset']} images, {float(r0['epochs']):g} epochs, noise {r0['label_noise']}"
        out.append(f"| {d.name} | {setup} | {acc('train_accuracy'):.1f} / {acc('test_accuracy'):.1f} | "
                   f"{'; '.join(gains)} | {probe} | {np.median([float(r['wall_s']) for r in rows]):.0f} | "
                   f"{len({r['seed'] for r in rows})} |")
    return ["| candidate | setup | ρ = 0: train / test acc, % | gain of gp_p1 over ρ = 0, pt (seed-paired mean) | "
            "GELU under sgd, over training: NME share, φ″ share, probes with NME share > 5% | s per run as recorded "
            "(median; probes included, the machine shared) | seeds |", "|---|---|---|---|---|---|---|"] + out


def _gains(rows: list[dict], methods) -> list[str]:
    """gain(method, act, ρ) = a(method, act, ρ) − a(sgd, act), mean and 95% interval over seeds, per
    activation and ρ > 0."""
    out = ["| activation | ρ | " + " | ".join(f"gain({m})" for m in methods) + " |", "|---" * (2 + len(methods)) + "|"]
    for act in dict.fromkeys(r["activation"] for r in rows):
        for rho in sorted({float(r["rho"]) for r in rows} - {0.0}):
            cells = []
            for m in methods:
                c = contrast(rows, [(+1, {"method": m, "activation": act, "rho": rho}),
                                    (-1, {"method": "sgd", "activation": act, "rho": 0.0})])
                cells.append("not run" if not c.n and not c.diverged else
                             _interval(dict(mean=c.mean, lo=c.lo, hi=c.hi)) + (f" ({c.diverged} diverged)"
                                                                               if c.diverged else ""))
            out.append(f"| {act} | {rho:g} | " + " | ".join(cells) + " |")
    return out


def _v(folder: str, script: str, label: str, where: str) -> str:
    """The verdict line of a claim at a place (`_where`'s text) as "+0.81 [−0.00, +1.63], n = 8, inconclusive",
    with the chosen ρ of a best-ρ claim; "not run" when the CSV lacks it."""
    for v in _lines(folder, script, label):
        if _where(v) == where:
            best = v["at"].split(" (")[0].removeprefix("best rho: ") + ": " if v["at"].startswith("best") else ""
            return f"{best}{_interval(v)}, n = {v['n']}, {v['verdict']}"
    return "not run"


def _reading() -> list[str]:
    """What the two regimes agree on and where they differ, each statement with its contrasts."""
    both = lambda script, label, where: " | ".join(_v(r, script, label, where) for r in REGIMES)  # noqa: E731
    rows = [
        ("Fig. 2: GELU gains more than ReLU, ρ = 0.3", both("nme_ablation", "gain(gp_p1, gelu) − gain(gp_p1, relu)",
                                                            "ρ 0.3")),
        ("Fig. 4: augmented ReLU rescues the penalty, ρ = 0.3", both("fig4_aug_dim", "gain(relu_aug) − gain(relu)",
                                                                    "ρ 0.3")),
        ("Fig. 4: diminished GELU breaks it, ρ = 0.3", both("fig4_aug_dim", "gain(gelu_dim) − gain(gelu)", "ρ 0.3")),
        ("the NME carries gp's gain at equal ρ = 0.3 (GELU)",
         both("nme_ablation", "gain(gp_p1, gelu) − gain(gp_gn_p1, gelu)", "ρ 0.3")),
        ("... at each rule's best ρ, ReLU", both("nme_ablation", "best gain(gp_p1, relu)", "relu")),
        ("... at each rule's best ρ, GELU", both("nme_ablation", "best gain(gp_p1, gelu)", "gelu")),
        ("the NME alone beats GN alone at ρ = 0.3, GELU",
         both("nme_ablation", "gain(gp_nme_p1, gelu) − gain(gp_gn_p1, gelu)", "ρ 0.3")),
        ("... at each rule's best ρ, ReLU", both("nme_ablation", "best gain(gp_nme_p1, relu)", "relu")),
        ("... at each rule's best ρ, GELU", both("nme_ablation", "best gain(gp_nme_p1, gelu)", "gelu")),
        ("GELU's edge lives in the NME part, ρ = 0.3",
         both("nme_ablation", "gain(gp_nme_p1, gelu) − gain(gp_nme_p1, relu)", "ρ 0.3")),
        ("... at each activation's best ρ", both("nme_ablation", "best gain(gp_nme_p1, gelu) − best gain(gp_nme_p1, relu)",
                                                 "gelu")),
        ("without the NME the activations gain alike (≈ 0), ρ = 0.3",
         both("nme_ablation", "gain(gp_gn_p1, gelu) − gain(gp_gn_p1, relu)", "ρ 0.3")),
    ]
    return (["| claim | " + " | ".join(REGIMES.values()) + " |", "|---|" + "---|" * len(REGIMES)]
            + [f"| {name} | {cells} |" for name, cells in rows])


def results_readme() -> str:
    """results/README.md, from the CSVs under results/ alone."""
    res = ROOT / "results"
    out = ["# Results", "",
           "Generated from the CSVs of this folder by `uv run tools.py report`, which also writes README.md's claims "
           "table; `tests/test_report.py` fails when either is stale. Accuracies are on the clean Fashion-MNIST test "
           "set; both CPU regimes train 1,024 images of which 30% carry a wrong label (MATH.md §4-§5), a departure "
           "from the paper's clean setups that every result here shares. A claim is a seed-paired contrast in "
           "accuracy points with its 95% t-interval and n, and a verdict that must survive dropping two seeds "
           "(MATH.md §7).", "", "## What the two regimes agree on, and where they differ", "", READING, ""]
    out += _reading()
    out += ["", "## Provenance", "",
           "| results | commit | environment | command |", "|---|---|---|---|"]
    out += [f"| `{p['folder']}` | {p['commit']} | {p['environment']} | `{p['command']}` |"
            for p in _csv(res / "provenance.csv")]
    out += ["", "## The claims, per figure, in three environments", "",
            "The MLP regime at 16 seeds in three environments: native, the committed results (Python 3.11, jax "
            "0.10.2; seeds 0-7 and 8-15 from two commits, see Provenance); Python 3.12 with jax 0.12.0.1; and "
            "`XLA_FLAGS=--xla_cpu_max_isa=AVX2`, the float32 rounding of a CPU without AVX-512. Native seeds 8-15 "
            "ran on such a CPU and equal the AVX2 runs, so those two environments differ in seeds 0-7 only (the "
            "last table counts the identical runs). † marks a claim whose verdict differs between the environments."]
    for script in FIGURES:
        lines = _lines("", script, None)
        if not lines:
            continue
        turns = _sensitive(script)
        for v in lines:
            v["contrast"] += " †" * ((v["contrast"], v["at"]) in turns)
        others = {ENVIRONMENTS[e]: [v | {"contrast": v["contrast"] + " †" * ((v["contrast"], v["at"]) in turns)}
                                    for v in _lines(e, script, None)] for e in ENVIRONMENTS if e}
        out += ["", f"### {script}", ""] + _verdict_table(lines, others)
        rows = _csv(res / f"{script}.csv")
        x = {"fig3_beta_gelu": "beta", "fig5_weight_noise": "sigma2"}.get(script, "rho")
        label = (lambda r: f"{r['activation']} {r['method']}") if script in ("fig5_weight_noise", "fig6_sam_vs_psam") \
            else (lambda r: r["method"]) if script == "fig3_beta_gelu" else (lambda r: r["activation"])
        out += ["", f"Mean test accuracy, %, over {len({r['seed'] for r in rows})} seeds, against {x}:", ""]
        out += _means(rows, label, lambda r: float(r[x]))
    out += ["", "### How far the environments' runs differ", "",
            "| script | runs | identical test accuracy: Python 3.12 | AVX2 | 90th percentile / largest difference, pt: "
            "Python 3.12 | AVX2 |", "|---|---|---|---|---|---|"]
    for script in FIGURES:
        native = _csv(res / f"{script}.csv")
        got = [_same(native, _csv(res / e / f"{script}.csv")) for e in ENVIRONMENTS if e]
        same = [f"{k} of {n}" if n else "not run" for n, k, _, _ in got]
        far = [f"{p90:.2f} / {top:.2f}" if n else "not run" for n, _, p90, top in got]
        out.append(f"| {script} | {len(native)} | " + " | ".join(same + far) + " |")
    out += ["", "## The NME ablation in both regimes", "",
            "`nme_ablation.py` (MATH.md §3, §9): gp_p1 steps along g + ρ Hĝ, gp_gn_p1 along g + ρ GNĝ (the NME "
            "taken out), gp_nme_p1 along g + ρ NMEĝ (the NME alone); every gain is against the sgd run of the same "
            "activation and seed. The claims were stated in the script before its runs."]
    for regime, name in REGIMES.items():
        rows = _csv(res / regime / "nme_ablation.csv")
        if not rows:
            continue
        out += ["", f"### {name}", "", "Gains over sgd, pt, mean [95% interval] over "
                f"{len({r['seed'] for r in rows})} seeds:", ""]
        out += _gains(rows, ("gp_p1", "gp_gn_p1", "gp_nme_p1")) + [""]
        out += _verdict_table(_lines(regime, "nme_ablation", None))
        fig4 = _lines(regime, "fig4_aug_dim", None) if regime else []
        if fig4:
            n = len({r["seed"] for r in _csv(res / regime / "fig4_aug_dim.csv")})
            out += ["", "Fig. 4's contrasts in this regime "
                    f"(`fig4_aug_dim.py --dataset fashion_mnist_cnn --rhos 0 0.3`, {n} seeds):", ""] + _verdict_table(fig4)
    out += ["", "## The regimes and their candidates", "",
            "Chosen by measurement (MATH.md §5): the ρ = 0 baseline over-fits, the probe shows the NME alive late "
            "in training, and gp's gain over sgd is decided at 8 seeds. Candidates of the MLP regime "
            "(`results/regimes/`, `probe_nme.py`, gp_p1 at ρ = 0.1), the chosen one b:", ""] + _regime_rows("")
    if (res / "regimes" / "cnn").exists():
        out += ["", "Candidates of the conv regime (`results/regimes/cnn/`; `fig2_gp_relu_gelu.py --dataset "
                "fashion_mnist_cnn --model M --rhos 0 0.1 0.3 --seeds 2`, and the probe of the chosen cnn8f14 in "
                "`cnn8f14_probe/`):", ""] + _regime_rows("cnn")
        cost: dict = {}
        calls = json.loads((res / "cnn" / "nme_ablation.config.json").read_text())["calls"]
        chose = calls[-1]["flags"]["select_seeds"]  # the seeds that chose each rule's best ρ
        for r in _csv(res / "cnn" / "nme_ablation.csv"):
            if int(r["seed"]) < chose:
                cost.setdefault(r["method"], []).append(float(r["wall_s"]))
        if cost:
            out += ["", f"The chosen regime's cost per run, from `results/cnn/nme_ablation.csv` (seeds 0-{chose - 1}, "
                    "which ran with the 2 CPU cores to themselves; median seconds, compilation included): " + ", ".join(
                        f"{m} {np.median(v):.1f}" for m, v in cost.items()) + "."]
    out += ["", "## The probe", ""] + _probe_table(res / "probe_nme.csv", res / "probe_nme.curves.csv")
    out += ["", "## The spectra", ""] + _spectra_table(res / "probe_nme_spectra.eigs.csv")
    out += ["", "## Speed", ""] + _speed(res)
    return "\n".join(out) + "\n"


def _probe_table(runs_path, curves_path) -> list[str]:
    """Per method and activation, means over the probes of training and over seeds (MATH.md §6)."""
    curves, runs = _csv(curves_path), _csv(runs_path)
    if not curves:
        return ["Not run."]
    label = lambda r: (r["method"] + (f" ρ = {float(r['rho']):g}" if float(r["rho"]) else ""),  # noqa: E731
                       r["activation"] + (f" β = {float(r['beta']):g}" if r["activation"] == "beta_gelu" else ""))
    cells: dict = {}
    for c in curves:
        support = np.mean([float(v) for k, v in c.items() if k.startswith("support_") and v])
        cells.setdefault(label(c), []).append((float(c["phi2_share"]), float(c["nme_share"]),
                                               float(c["logit_grad_rms"]), support))
    acc = {k: np.mean([float(r["test_accuracy"]) for r in runs if label(r) == k]) for k in cells}
    out = [f"`probe_nme.py`: {len({c['seed'] for c in curves})} seeds, the probe "
           f"{len({c['step'] for c in curves})} times per run on a fixed batch of training images; means over the "
           "probes of training:", "",
           "| method | activation | φ″ share ‖(H − H_twin)ĝ‖/‖Hĝ‖ | NME share ‖NMEĝ‖/‖Hĝ‖ "
           "| RMS ‖softmax(z) − onehot(y)‖ "
           "| support of φ″ (share of \\|x\\| < 1/β) | test acc |", "|---|---|---|---|---|---|---|"]
    def order(kv):  # sgd first; β numerically
        (m, a), _ = kv
        return m != "sgd", m, a.split()[0], float(a.split()[-1]) if "β" in a else 0.0

    for (m, a), v in sorted(cells.items(), key=order):
        phi, nme, rms, sup = np.mean(v, axis=0)
        out.append(f"| {m} | {a} | {'0 (exactly)' if phi == 0 else f'{phi:.3f}'} | {nme:.3f} | {rms:.2f} | "
                   f"{sup:.3f} | {acc[m, a]:.3f} |")
    return out


def _spectra_table(path) -> list[str]:
    """Extreme eigenvalues and masses of the NME relative to λ_max(GN), per setting and point of training,
    seeds side by side (probe_nme.py --spectra)."""
    eigs = _csv(path)
    if not eigs:
        return ["Not run."]
    cells: dict = {}
    for e in eigs:
        cells.setdefault((e["method"], e["activation"], float(e["epoch"])), {})[e["seed"], e["operator"]] = e
    out = ["`probe_nme.py --spectra`: SLQ of H, GN and NME = H − GN on the probe batch (MATH.md §8); extremes of "
           "start 0, masses averaged over the starts, ε = 0.01 λ_GN; the seeds side by side.", "",
           "| method | activation | epoch | λ_GN | NME λ_max/λ_GN | NME λ_min/λ_GN | NME μ((−∞, −ε)) | NME μ((ε, ∞)) "
           "| H λ_min/λ_GN |", "|---|---|---|---|---|---|---|---|---|"]
    for (m, a, ep), by in sorted(cells.items(), key=lambda kv: (kv[0][0] != "sgd", kv[0][1] != "relu", kv[0])):
        seeds = sorted({s for s, _ in by})
        def col(op, key, over_gn=True, digits=3):  # the seeds' values, relative to λ_GN where asked
            scale = lambda s: float(by[s, "GN"]["lam_gn_max"]) if over_gn else 1.0  # noqa: E731
            return ", ".join(f"{float(by[s, op][key]) / scale(s):.{digits}f}" for s in seeds if (s, op) in by)

        out.append(f"| {m} | {a} | {ep:g} | {col('GN', 'lam_gn_max', False, 1)} | {col('NME', 'top_1')} | "
                   f"{col('NME', 'bottom_1')} | {col('NME', 'mass_below_eps', False, 4)} | "
                   f"{col('NME', 'mass_above_eps', False, 4)} | {col('H', 'bottom_1')} |")
    return out


def _speed(res: Path) -> list[str]:
    """The benchmarks' CSVs as tables: each rule's cost as a ratio to sgd (XLA's counts, and time), the
    FLOPs of hessian_trace per JAX version with and without `cse`, the probe, the input pipeline, and
    the paper setups' cost plan."""
    out = ["`bench.py` times or compiles each rule's whole train step side by side and reports the ratio to sgd; "
           "`--analyze` takes XLA's FLOP count and peak memory of the compiled step, which no other load on the "
           "machine can disturb (`uv run bench.py --analyze --out results`, wrn16_4 at batch 128, 32²; "
           "`uv run bench.py --configs cnn16:128:32:float32 --out results`, timed on 2 CPU cores).", "",
           "| rule | FLOPs / sgd | peak memory / sgd | CPU time / sgd (cnn16) |", "|---|---|---|---|"]
    timed = {r["method"]: r for r in _csv(res / "bench_cpu.csv")}
    for r in _csv(res / "bench_cpu_xla.csv"):
        t = timed.get(r["method"])
        out.append(f"| {r['method']} | {float(r['flop_ratio']):.2f} ({float(r['gflop']):.0f} GFLOP) | "
                   f"{float(r['mem_ratio']):.2f} ({float(r['peak_mem_mb']):.0f} MiB) | "
                   f"{float(t['ratio_to_sgd']):.2f} ({float(t['step_ms']):.0f} ms) |" if t else
                   f"{float(r['flop_ratio']):.2f} ({float(r['gflop']):.0f} GFLOP) | {float(r['mem_ratio']):.2f} "
                   f"({float(r['peak_mem_mb']):.0f} MiB) | – |")
    out += ["", "hessian_trace's FLOPs over sgd's on each JAX version, with and without `cse` (MATH.md §3):", ""]
    out += versions_table().splitlines()
    probe = {r["method"]: r for r in _csv(res / "bench_probe_pipeline" / "bench_cpu.csv")}
    if "probe" in probe:
        cost = float(probe["probe"]["ratio_to_sgd"])
        out += ["", f"One call of the curvature probe costs {cost:.1f} sgd steps at the "
                f"same batch (mlp256, batch 512: {float(probe['probe']['step_ms']):.0f} ms against "
                f"{float(probe['sgd']['step_ms']):.0f} ms; `bench.py --configs mlp256:512:28:float32 --methods sgd "
                "probe`)."]
    pipe = _csv(res / "bench_pipeline.csv")
    if pipe:
        out += ["", "ImageNet decoding per core (`bench.py --reencode`: 96 photo-like 500 × 375 JPEGs, the median of "
                "5 passes; images/s and the ratio to decoding the original at full size):", "",
                "| folder | train | eval | train crop: resolution kept / not upsampled |", "|---|---|---|---|"]
        by = {(r["folder"], r["split"], r["transform"]): r for r in pipe}
        for folder in dict.fromkeys(r["folder"] for r in pipe if r["split"] != "-"):
            for how in ("full_decode", "repo"):
                t, e = by.get((folder, "train", how)), by.get((folder, "eval", how))
                if t:
                    out.append(f"| {folder}{' (full decode)' if how == 'full_decode' else ''} | "
                               f"{float(t['images_per_s_per_core']):,.0f} ({float(t['ratio_to_full_decode']):.2f}×) | "
                               f"{float(e['images_per_s_per_core']):,.0f} ({float(e['ratio_to_full_decode']):.2f}×) | "
                               f"{float(t['crop_resolution']):.2f} / {float(t['crop_not_upsampled']):.0%} |")
    if (res / "plan.csv").exists():
        import contextlib

        import bench  # the plan is bench's, from results/plan.csv alone (no compile at budget 0)

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            bench.plan(bench.Config(plan=True, compile_budget_s=0, out=str(res)))
        # the path relative to the repo, so that the report is the same in every checkout
        text = buf.getvalue().replace(f"{ROOT}{os.sep}", "")
        out += [""] + [ln for ln in text.strip().splitlines() if not ln.startswith("plan:")]
    return out


def versions_table() -> str:
    """hessian_trace's FLOP ratio to sgd per JAX version, with `cse` and without (`bench.py --analyze
    --methods sgd hessian_trace [--no-cse]` into results/bench_versions/<jax>-<cse|nocse>/)."""
    got: dict = {}
    for p in sorted((ROOT / "results" / "bench_versions").glob("*/bench_cpu_xla.csv")):
        version, mode = p.parent.name.rsplit("-", 1)
        got.setdefault(version, {})[mode] = next(float(r["flop_ratio"]) for r in _csv(p)
                                                 if r["method"] == "hessian_trace")
    rows = [f"| {v} | {m.get('cse', math.nan):.2f} | {m.get('nocse', math.nan):.2f} |" for v, m in got.items()]
    return "\n".join(["| JAX | hessian_trace / sgd, FLOPs | without cse |", "|---|---|---|"] + rows)


def report(write: bool = True) -> dict[Path, str]:
    """{path: text} of results/README.md and of README.md with its claims table regenerated; written
    unless write is False (the staleness test compares them with the files)."""
    readme = (ROOT / "README.md").read_text()
    for mark, table in ((CLAIMS_MARK, claims_table), (VERSIONS_MARK, versions_table)):
        head, _, rest = readme.partition(mark + "\n")
        _, _, tail = rest.partition(mark + "\n")
        readme = f"{head}{mark}\n{table()}\n{mark}\n{tail}"
    texts = {ROOT / "results" / "README.md": results_readme(), ROOT / "README.md": readme}
    if write:
        for path, text in texts.items():
            path.write_text(text)
    return texts


#### Command line ##################################################################################


def _main(argv=None) -> None:
    """uv run tools.py reencode SRC DST [--side N] [--val-side N] [--workers N] [--quality Q] | report"""
    p = _Parser(prog="tools.py", description="The instruments' jobs.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reencode", help=reencode.__doc__.split("\n\n")[0])
    r.add_argument("src", help="ImageNet folder (train/<class>/*.JPEG, val/<class>/*.JPEG)")
    r.add_argument("dst", help="new folder, same layout; pass it as --data-dir")
    r.add_argument("--side", type=int, default=REENCODE_SIDE,
                   help=f"shorter side of train images in px (default {REENCODE_SIDE})")
    r.add_argument("--val-side", type=int, default=REENCODE_VAL_SIDE,
                   help=f"shorter side of val images in px (default {REENCODE_VAL_SIDE}, the evaluation's resize)")
    r.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    r.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    sub.add_parser("report", help=report.__doc__.split("\n")[0])
    a = p.parse_args(argv)
    if a.command == "report":
        for path in report():
            print(f"report: wrote {path.relative_to(ROOT)}")
        return
    got = reencode(a.src, a.dst, a.side, a.workers, a.quality, val_side=a.val_side)
    print(f"reencode: {got['done']} files written, {got['skipped']} already done, {got['files']} in {a.dst}")


if __name__ == "__main__":
    run_cli(_main)
