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
import time
from pathlib import Path
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from PIL import Image

from common import (METRICS, Activation, ConfigError, ImageFolder, NetSpec, Run, _file_digest, _global, _Parser,
                    _write_rows, append_rows, apply, cross_entropy, eval_resize, gnvp, hvp, normalize, read_rows,
                    row_key, run_cli, skeleton, train, tree_dot, tree_norm, twin, with_act)

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
        self.x, self.y = _global(run.mesh, *(a[i * share:(i + 1) * share] for a in data.probe_batch(size)))
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


#### Re-encoding ImageNet #########################################################################


# README "Re-encoding ImageNet": train at the largest side that decodes at >= 2x the originals' rate per
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
    that decode several times faster (README "Re-encoding ImageNet")."""
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


#### Command line ##################################################################################


def _main(argv=None) -> None:
    """uv run tools.py reencode SRC DST [--side N] [--val-side N] [--workers N] [--quality Q]"""
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
    a = p.parse_args(argv)
    got = reencode(a.src, a.dst, a.side, a.workers, a.quality, val_side=a.val_side)
    print(f"reencode: {got['done']} files written, {got['skipped']} already done, {got['files']} in {a.dst}")




if __name__ == "__main__":
    run_cli(_main)
