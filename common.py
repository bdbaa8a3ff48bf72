"""Library for the reproduction of Dauphin, Agarwala & Mobahi (2024), "Neglected Hessian component explains mysteries
in Sharpness regularization" (arXiv 2401.10809). Sections, each using only those above: activations -> curvature ->
update rules -> models -> data -> configuration -> training -> results -> sweeps and the command line -> plots ->
verdicts -> a figure script's main. MATH.md defines every quantity and the paper's three corrections (equation numbers
are the paper's); tools.py holds the instruments around a run (curvature probe, spectra, ImageNet re-encoding)."""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import functools
import gzip
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import os
import pickle
import re
import sys
import tarfile
import tempfile
import time
import typing
import urllib.request
from pathlib import Path
from typing import Any, Callable, NamedTuple

import equinox as eqx
import grain
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from absl import flags as absl_flags
from jax.scipy.special import erfc
from jax.flatten_util import ravel_pytree
from PIL import Image

PyTree = Any


class ConfigError(Exception):
    """Bad user input; a script turns it into one line on stderr and exit code 2."""


#### Activations (Sections 4.3-4.4, MATH.md §2) ####################################################
# Elementwise f(x, beta) whose value and first two AD derivatives are MATH.md §2's table under every AD path; beta, the
# width of φ″, may be traced (a β sweep compiles once). Custom ones use jax.custom_jvp (custom_vjp has no forward mode:
# it would break the forward-over-reverse HVP); a rule's tangent is itself a custom-JVP function, so differentiating
# again gives the second derivative we define. Tangents with respect to beta are dropped.
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _pdf(x):
    return _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)


def _cdf(x):
    return 0.5 * erfc(-x / _SQRT2)  # erfc keeps the left tail accurate (no 1 − 1 cancellation)


def _gelu(x):
    return x * _cdf(x)  # the exact erf form; jax.nn.gelu defaults to the tanh approximation


def _beta_gelu(x, beta):
    return x * _cdf(beta * x)  # φ″ = β φ(βx)(2 − β²x²) by autodiff (Eq. 14 corrected)


@jax.custom_jvp
def _step(x, beta):
    return jnp.where(x > 0, 1.0, 0.0).astype(x.dtype)  # Θ(x), Θ(0) = 0


@_step.defjvp
def _step_jvp(primals, tangents):
    (x, beta), (t, _) = primals, tangents
    return _step(x, beta), beta * _pdf(beta * x) * t  # Eq. 15: D_AD[Θ] = β φ(βx), unit integral


@jax.custom_jvp
def _relu_aug(x, beta):
    return jnp.maximum(x, 0)


@_relu_aug.defjvp
def _relu_aug_jvp(primals, tangents):
    (x, beta), (t, _) = primals, tangents
    return _relu_aug(x, beta), _step(x, beta) * t


@jax.custom_jvp
def _beta_gelu_slope(x, beta):
    return _cdf(beta * x) + beta * x * _pdf(beta * x)  # β-GELU′(x)


@_beta_gelu_slope.defjvp
def _beta_gelu_slope_jvp(primals, tangents):
    (x, beta), (t, _) = primals, tangents
    return _beta_gelu_slope(x, beta), jnp.zeros_like(t)  # Eq. 16: D_AD[GELU′] = 0


@jax.custom_jvp
def _beta_gelu_dim(x, beta):
    return _beta_gelu(x, beta)


@_beta_gelu_dim.defjvp
def _beta_gelu_dim_jvp(primals, tangents):
    (x, beta), (t, _) = primals, tangents
    return _beta_gelu_dim(x, beta), _beta_gelu_slope(x, beta) * t


class ActivationDef(NamedTuple):
    fn: Callable[[jax.Array, jax.Array], jax.Array]  # f(x, beta)
    uses_beta: bool
    twin: str  # same value and first derivative, AD second derivative 0 (MATH.md §6)


ACTIVATIONS: dict[str, ActivationDef] = {
    "relu": ActivationDef(lambda x, beta: jax.nn.relu(x), False, "relu"),  # JAX's rule: Θ(0) = 0, f″ = 0
    "gelu": ActivationDef(lambda x, beta: _gelu(x), False, "gelu_dim"),
    "beta_gelu": ActivationDef(_beta_gelu, True, "beta_gelu_dim"),
    "relu_aug": ActivationDef(_relu_aug, True, "relu"),
    "gelu_dim": ActivationDef(lambda x, beta: _beta_gelu_dim(x, jnp.ones((), x.dtype)), False, "gelu_dim"),
    "beta_gelu_dim": ActivationDef(_beta_gelu_dim, True, "beta_gelu_dim"),
}


class Activation(eqx.Module):
    """The nonlinearity `name` of width `beta`, a pytree leaf (traced in the step: one compile serves a β sweep)."""
    name: str = eqx.field(static=True)
    beta: float | jax.Array = 1.0

    def __call__(self, x):
        return ACTIVATIONS[self.name].fn(x, jnp.asarray(self.beta, x.dtype))


def activation(name: str, beta: float = 1.0) -> Activation:
    """The elementwise nonlinearity `name`; `beta`: width of those with one (beta_gelu, relu_aug, beta_gelu_dim)."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"--activation: unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
    if not beta > 0:
        raise ConfigError(f"--beta must be > 0, got {beta}")
    return Activation(name, float(beta))


def twin(act: Activation) -> Activation:
    """The activation with the same value and first derivative and an AD second derivative of 0."""
    return Activation(ACTIVATIONS[act.name].twin, act.beta)


def map_acts(model, fn):
    """`model` with every Activation `a` replaced by fn(a)."""
    is_act = lambda x: isinstance(x, Activation)  # noqa: E731
    return jax.tree.map(lambda a: fn(a) if is_act(a) else a, model, is_leaf=is_act)


def with_act(model, act):
    """`model` with every Activation replaced by `act`, any elementwise callable (the probe's twin, its recorder)."""
    return map_acts(model, lambda _: act)


def with_beta(model, beta):
    """`model` with every Activation's beta replaced (by a traced array inside the step)."""
    return map_acts(model, lambda a: Activation(a.name, beta))


#### Curvature (Eq. 2, MATH.md §1) #################################################################
# For the batch-mean softmax cross-entropy; vectors are parameter pytrees; no matrix is materialised.
def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(a)))


def tree_normal(key: jax.Array, like: PyTree) -> PyTree:
    """A standard normal pytree shaped like `like`, independent across leaves."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch, accumulated in fp32 (or the logits' wider dtype)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def hvp(loss_fn: Callable, params: PyTree, v: PyTree) -> PyTree:
    """H v with H = ∇²loss_fn(params): forward-over-reverse, exact."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def gnvp(logits_fn: Callable, labels: jax.Array, params: PyTree, v: PyTree) -> PyTree:
    """Gauss-Newton product Jᵀ H_z J v of the batch-mean cross-entropy (Eq. 2, first term)."""
    z, u = jax.jvp(logits_fn, (params,), (v,))
    p = jax.nn.softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)))
    u = u.astype(p.dtype)
    w = (p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)) / z.shape[0]  # H_z u per example, mean
    _, vjp = jax.vjp(logits_fn, params)
    return vjp(w.astype(z.dtype))[0]


def _hashable(v):
    try:
        hash(v)
        return v
    except TypeError:
        return ("id", id(v))


def cse(fn: Callable) -> Callable:
    """fn with its jaxpr's repeated pure equations on the same inputs merged (CSE): the same values and derivatives.
    Nested JVPs compute the first-order stream twice (inner tangent ẋ = outer tangent x′ of the primal); XLA merges
    the forward copies, but reverse mode gives each its own backward pass: merging first leaves three streams, not four
    (FLOPs: results/README.md). Equations with effects and repeated custom-JVP calls (distinct rule objects) stay."""

    def merged(*args):
        with jax.disable_jit():  # inline jitted library functions, so that their equations can merge
            closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        alias, seen, eqns = {}, {}, []
        new = lambda v: v if isinstance(v, jax.extend.core.Literal) else alias.get(v, v)
        for eqn in closed.jaxpr.eqns:
            invars = [new(v) for v in eqn.invars]
            key = (eqn.primitive,
                   tuple((repr(v.val), v.aval) if isinstance(v, jax.extend.core.Literal) else v for v in invars),
                   tuple(sorted((k, _hashable(p)) for k, p in eqn.params.items())))
            if key in seen and not eqn.effects:
                alias.update(zip(eqn.outvars, seen[key]))
            else:
                seen[key] = eqn.outvars
                eqns.append(eqn.replace(invars=invars))
        jaxpr = closed.jaxpr.replace(eqns=eqns, outvars=[new(v) for v in closed.jaxpr.outvars])
        out = jax.extend.core.jaxpr_as_fun(closed.replace(jaxpr=jaxpr))(*jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return merged


#### Update rules (MATH.md §3) #####################################################################
# rule(loss_fn, params, state, batch, key, hp) -> Step; loss_fn(params, state, batch) -> (mean cross-entropy L0,
# (new_state, logits)) in training mode; batch = (x, y); hp: the Hyper of scalar arrays. The direction is the gradient
# of the objective before weight decay and momentum; `state` is BatchNorm's from the pass at θ (weight_noise: θ+ε).
class Step(NamedTuple):
    direction: PyTree
    state: PyTree
    loss: jax.Array  # L0 at the unperturbed θ (at θ+ε for weight_noise)


def _grad(loss_fn, params, state, batch):
    (loss, (state, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, state, batch)
    return loss, state, g


def _split(out):
    """loss_fn's (L0, (state, logits)) as (L0, state), the form jvp's has_aux takes."""
    return out[0], out[1][0]


def _scalar(loss_fn, state, batch):
    return lambda p: loss_fn(p, state, batch)[0]


def sgd(loss_fn, params, state, batch, key, hp) -> Step:
    """Plain gradient: every other rule with ρ = σ² = 0 reduces to this."""
    loss, state, g = _grad(loss_fn, params, state, batch)
    return Step(g, state, loss)


def gp(loss_fn, params, state, batch, key, hp, *, p: int = 1, part: str = "H") -> Step:
    """Gradient penalty L0 + ρ‖g‖^p by exact autodiff (Eq. 7-8, 46-47) and its ablations: direction g + ρ C u,
    u = ∂‖g‖^p/∂g (p=1, penalty SAM: g + ρ H g/‖g‖; p=2, penalty USAM: g + 2ρ H g). H u is forward-over-reverse
    (`hvp`, its primal merged by XLA with the clean pass); a finite-difference HVP would make this SAM, removing the
    NME effect studied. `part` names C (MATH.md §3), of the training-mode logits at θ: "H" (gp), "GN" (gp_gn: no NME)
    or "NME" = H − GN (gp_nme), so d_gp = d_gp_gn + d_gp_nme − g; the ablations follow no objective."""
    if p not in (1, 2) or part not in ("H", "GN", "NME"):
        raise ValueError(f"gp: p must be 1 or 2 and part H, GN or NME, got {p}, {part!r}")
    loss, new_state, g = _grad(loss_fn, params, state, batch)
    norm = jnp.sqrt(jnp.maximum(tree_dot(g, g), 1e-30))  # finite at g = 0
    u = jax.tree.map(lambda x: x / norm if p == 1 else 2 * x, g)  # ∂‖g‖^p/∂g
    if part != "GN":
        hu = hvp(_scalar(loss_fn, state, batch), params, u)
    if part != "H":
        gnu = gnvp(lambda w: loss_fn(w, state, batch)[1][1], batch[1], params, u)
    cu = hu if part == "H" else gnu if part == "GN" else jax.tree.map(jnp.subtract, hu, gnu)
    return Step(jax.tree.map(lambda a, b: a + hp.rho * b, g, cu), new_state, loss)


def _perturbed_grad(loss_fn, params, state, batch, delta):
    shifted = jax.tree.map(lambda w, d: w + d.astype(w.dtype), params, jax.lax.stop_gradient(delta))
    return jax.grad(_scalar(loss_fn, state, batch))(shifted)


def sam(loss_fn, params, state, batch, key, hp) -> Step:
    """SAM (Eq. 42): ∇L0(θ + ρ g/‖g‖); BatchNorm state from the clean pass."""
    loss, new_state, g = _grad(loss_fn, params, state, batch)
    norm = tree_norm(g)
    delta = jax.tree.map(lambda x: x * (hp.rho / jnp.maximum(norm, 1e-12)).astype(x.dtype), g)
    return Step(_perturbed_grad(loss_fn, params, state, batch, delta), new_state, loss)


def usam(loss_fn, params, state, batch, key, hp) -> Step:
    """Unnormalised SAM (Eq. 43): ∇L0(θ + ρ g)."""
    loss, new_state, g = _grad(loss_fn, params, state, batch)
    delta = jax.tree.map(lambda x: x * jnp.asarray(hp.rho, x.dtype), g)
    return Step(_perturbed_grad(loss_fn, params, state, batch, delta), new_state, loss)


def weight_noise(loss_fn, params, state, batch, key, hp) -> Step:
    """One-sample gradient of E_ε L0(θ+ε), ε ~ N(0, σ²I) (Eq. 17), ≈ L0 + (σ²/2) tr(H). Its single pass, at θ+ε, also
    gives the BatchNorm statistics: a clean pass would cost a third of a step for nothing."""
    std = jnp.sqrt(hp.sigma2)
    noisy = jax.tree.map(lambda w, e: w + (std * e).astype(w.dtype), params, tree_normal(key, params))
    loss, state, g = _grad(loss_fn, noisy, state, batch)
    return Step(g, state, loss)


def hessian_trace(loss_fn, params, state, batch, key, hp) -> Step:
    """L0 + (σ²/2) tr(H), one Hutchinson sample (Eq. 19; σ²/2: MATH.md's correction to Eq. 17): εᵀHε by forward-over-
    forward AD, then one reverse pass through the `cse`-merged nested JVPs: the clean gradient costs no extra pass."""
    eps = tree_normal(key, params)

    def along(w):  # (L0, ∂_ε L0), BatchNorm state
        loss, d1, new_state = jax.jvp(lambda q: _split(loss_fn(q, state, batch)), (w,), (eps,), has_aux=True)
        return (loss, d1), new_state

    def objective(w):
        (loss, _), (_, d2), new_state = jax.jvp(along, (w,), (eps,), has_aux=True)
        return loss + 0.5 * hp.sigma2 * d2, (loss, new_state)

    direction, (loss, new_state) = jax.grad(cse(objective), has_aux=True)(params)
    return Step(direction, new_state, loss)


def gn_trace(loss_fn, params, state, batch, key, hp) -> Step:
    """L0 + (σ²/2) tr(GN) by T̂ = B‖∇L0(θ, ŷ)‖² (Eq. 19-21), ŷ ~ Cat(softmax z) held fixed: ∇T̂ = 2B H_ŷ g_ŷ, an exact
    Hessian (GN + NME of the sampled labels, Section 5.3); the pullback reuses the clean pass's graph (one forward)."""

    def logits(w):
        loss, (new_state, z) = loss_fn(w, state, batch)
        return z, (loss, new_state)

    def objective(w):
        z, pullback, (loss, new_state) = jax.vjp(logits, w, has_aux=True)
        y_hat = jax.random.categorical(key, jax.lax.stop_gradient(z).astype(jnp.float32))
        (g_hat,) = pullback(jax.grad(cross_entropy)(z, y_hat))
        return loss + 0.5 * hp.sigma2 * z.shape[0] * tree_dot(g_hat, g_hat), (loss, new_state)

    direction, (loss, new_state) = jax.grad(objective, has_aux=True)(params)
    return Step(direction, new_state, loss)


RULES: dict[str, Callable[..., Step]] = {
    "sgd": sgd,
    "gp_p1": functools.partial(gp, p=1),
    "gp_p2": functools.partial(gp, p=2),
    "gp_gn_p1": functools.partial(gp, p=1, part="GN"),
    "gp_gn_p2": functools.partial(gp, p=2, part="GN"),
    "gp_nme_p1": functools.partial(gp, p=1, part="NME"),
    "gp_nme_p2": functools.partial(gp, p=2, part="NME"),
    "sam": sam,
    "usam": usam,
    "weight_noise": weight_noise,
    "hessian_trace": hessian_trace,
    "gn_trace": gn_trace,
}

# SCHEDULES[name](warmup, total) -> traceable lr multiplier f(step); the paper's: linear warm-up from 0, then cosine
# decay to 0 (Goyal et al.; Section 3).
SCHEDULES: dict[str, Callable] = {
    "cosine": lambda warmup, total: optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(total, warmup + 1)),
}


#### Models ########################################################################################
# model(x [C,H,W], state, *, key=None) -> (logits [num_classes], state) on ONE example; `apply` vmaps it (axis "batch",
# which BatchNorm reduces over). Every nonlinearity is `act` (bar the ResNet stem's max pooling): swapping it swaps the
# whole second-order behaviour. Convolutions: Kaiming-normal fan_out, no bias; linear heads: U(±1/√fan_in) weight, zero
# bias (torchvision, WRN reference); a zero weight would make the GN/NME split degenerate at initialisation.
class BN(eqx.Module):
    """BatchNorm with fp32 statistics and running state whatever the dtype of x or the weights (maybe bf16). Training:
    "batch"- and spatial-axis mean and biased variance, updating zero-started running averages (momentum 0.9);
    inference: their debiased values m / (1 − 0.9ⁿ) after n updates (before any: 0 and 1). Output (x − μ)·rsqrt(σ² + ε):
    Equinox's division keeps more reverse-mode residuals and defeats XLA's CSE of nested JVPs (results/README.md)."""
    weight: jax.Array
    bias: jax.Array
    index: eqx.nn.StateIndex  # (updates n, running mean, running variance)
    inference: bool
    momentum: float = eqx.field(static=True, default=0.9)
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, channels: int, *, zero: bool = False):
        self.weight = (jnp.zeros if zero else jnp.ones)((channels,), jnp.float32)
        self.bias = jnp.zeros((channels,), jnp.float32)
        zeros = lambda: jnp.zeros((channels,), jnp.float32)  # noqa: E731  (two buffers: both are donated)
        self.index = eqx.nn.StateIndex((jnp.zeros((), jnp.int32), zeros(), zeros()))
        self.inference = False

    def __call__(self, x, state):
        xf = x.astype(jnp.float32)
        axes, shape = tuple(range(1, x.ndim)), (-1,) + (1,) * (x.ndim - 1)
        n, run_mean, run_var = state.get(self.index)
        if self.inference:
            debias = jnp.where(n > 0, 1 - self.momentum**n, 1.0)
            mean, var = run_mean / debias, jnp.where(n > 0, run_var / debias, 1.0)
        else:
            mean = jax.lax.pmean(jnp.mean(xf, axes), "batch")
            var = jax.lax.pmean(jnp.mean(jnp.square(xf - mean.reshape(shape)), axes), "batch")
            mu = self.momentum
            state = state.set(self.index, (n + 1, mu * run_mean + (1 - mu) * mean, mu * run_var + (1 - mu) * var))
        scale = jax.lax.rsqrt(var + self.eps) * self.weight.astype(jnp.float32)
        y = (xf - mean.reshape(shape)) * scale.reshape(shape) + self.bias.astype(jnp.float32).reshape(shape)
        return y.astype(x.dtype), state


# Eagerly, each distinct jax.random shape and each Equinox default init compiles (~3 s on CPU, dozens per network):
# weights are cut from fixed-size draws of one compiled generator, layers built abstractly (eval_shape).
_CHUNK = 1 << 16
_draw = jax.jit(lambda key: jax.random.normal(key, (_CHUNK,)))


def _normal(key, shape) -> jax.Array:
    n = math.prod(shape)
    parts = [_draw(jax.random.fold_in(key, i)) for i in range(-(-n // _CHUNK))]
    return (parts[0] if len(parts) == 1 else jnp.concatenate(parts))[:n].reshape(shape)


def _keys(key, n: int) -> list:
    return [jax.random.fold_in(key, i) for i in range(n)]  # split(key, n) compiles once per n


def _uniform(key, shape, lim) -> jax.Array:
    return lim * jax.scipy.special.erf(_normal(key, shape) / math.sqrt(2.0))  # Φ-transform: U(±lim)


def _conv(cin: int, cout: int, k: int, stride: int, key) -> eqx.nn.Conv2d:
    conv = eqx.filter_eval_shape(eqx.nn.Conv2d, cin, cout, k, stride, padding=k // 2, use_bias=False, key=key)
    std = math.sqrt(2.0 / (cout * k * k))  # Kaiming normal, fan_out, gain √2
    return eqx.tree_at(lambda c: c.weight, conv, std * _normal(key, conv.weight.shape))


def _linear(cin: int, cout: int, key) -> eqx.nn.Linear:
    fc = eqx.filter_eval_shape(eqx.nn.Linear, cin, cout, key=key)
    w = _uniform(key, fc.weight.shape, 1 / math.sqrt(cin))
    return eqx.tree_at(lambda m: (m.weight, m.bias), fc, (w, jnp.zeros((cout,))))


def _pool(x):
    return jnp.mean(x, axis=(1, 2))  # global average: any input size works


class ConvBN(eqx.Module):
    conv: eqx.nn.Conv2d
    bn: BN

    def __init__(self, cin, cout, k, stride, key, *, zero=False):
        self.conv = _conv(cin, cout, k, stride, key)
        self.bn = BN(cout, zero=zero)

    def __call__(self, x, state):
        return self.bn(self.conv(x), state)


class Basic(eqx.Module):
    """ResNet-18/34 block; the last BN's gamma starts at 0 so the block starts as its shortcut."""
    c1: ConvBN
    c2: ConvBN
    short: ConvBN | None
    act: Activation  # a pytree node: its beta is a leaf (see Activation)
    expansion = 1

    def __init__(self, cin, width, stride, act, key):
        k1, k2, k3 = _keys(key, 3)
        self.c1 = ConvBN(cin, width, 3, stride, k1)
        self.c2 = ConvBN(width, width, 3, 1, k2, zero=True)
        self.short = ConvBN(cin, width, 1, stride, k3) if stride != 1 or cin != width else None
        self.act = act

    def __call__(self, x, state):
        y, state = self.c1(x, state)
        y, state = self.c2(self.act(y), state)
        if self.short is not None:
            x, state = self.short(x, state)
        return self.act(y + x), state


class Bottleneck(eqx.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv; the last BN's gamma starts at 0."""
    c1: ConvBN
    c2: ConvBN
    c3: ConvBN
    short: ConvBN | None
    act: Activation  # a pytree node: its beta is a leaf (see Activation)
    expansion = 4

    def __init__(self, cin, width, stride, act, key):
        k1, k2, k3, k4 = _keys(key, 4)
        cout = 4 * width
        self.c1 = ConvBN(cin, width, 1, 1, k1)
        self.c2 = ConvBN(width, width, 3, stride, k2)
        self.c3 = ConvBN(width, cout, 1, 1, k3, zero=True)
        self.short = ConvBN(cin, cout, 1, stride, k4) if stride != 1 or cin != cout else None
        self.act = act

    def __call__(self, x, state):
        y, state = self.c1(x, state)
        y, state = self.c2(self.act(y), state)
        y, state = self.c3(self.act(y), state)
        if self.short is not None:
            x, state = self.short(x, state)
        return self.act(y + x), state


class ResNet(eqx.Module):
    stem: ConvBN
    pool: eqx.nn.MaxPool2d
    blocks: tuple
    fc: eqx.nn.Linear
    act: Activation  # a pytree node: its beta is a leaf (see Activation)

    def __init__(self, block, layers, num_classes, act, key, in_channels=3):
        keys = _keys(key, sum(layers) + 2)
        self.stem = ConvBN(in_channels, 64, 7, 2, keys[0])
        self.pool = eqx.nn.MaxPool2d(3, 2, padding=1)
        blocks, cin, i = [], 64, 1
        for stage, n in enumerate(layers):
            width = 64 * 2**stage
            for b in range(n):
                blocks.append(block(cin, width, 2 if stage > 0 and b == 0 else 1, act, keys[i]))
                cin, i = width * block.expansion, i + 1
        self.blocks = tuple(blocks)
        self.fc = _linear(cin, num_classes, keys[-1])
        self.act = act

    def __call__(self, x, state, *, key=None):
        x, state = self.stem(x, state)
        x = self.pool(self.act(x))
        for blk in self.blocks:
            x, state = blk(x, state)
        return self.fc(_pool(x)), state


class PreAct(eqx.Module):
    """WRN block BN-act-conv3x3-BN-act-conv3x3; a reshaping shortcut: 1x1 conv of the activated input (reference)."""
    bn1: BN
    conv1: eqx.nn.Conv2d
    bn2: BN
    conv2: eqx.nn.Conv2d
    short: eqx.nn.Conv2d | None
    act: Activation  # a pytree node: its beta is a leaf (see Activation)

    def __init__(self, cin, cout, stride, act, key):
        k1, k2, k3 = _keys(key, 3)
        self.bn1 = BN(cin)
        self.conv1 = _conv(cin, cout, 3, stride, k1)
        self.bn2 = BN(cout)
        self.conv2 = _conv(cout, cout, 3, 1, k2)
        self.short = _conv(cin, cout, 1, stride, k3) if stride != 1 or cin != cout else None
        self.act = act

    def __call__(self, x, state):
        o, state = self.bn1(x, state)
        o = self.act(o)
        y, state = self.bn2(self.conv1(o), state)
        y = self.conv2(self.act(y))
        return y + (x if self.short is None else self.short(o)), state


class WRN(eqx.Module):
    """Pre-activation WideResNet-depth-width (Zagoruyko & Komodakis 2016), without dropout."""
    stem: eqx.nn.Conv2d
    blocks: tuple
    bn: BN
    fc: eqx.nn.Linear
    act: Activation  # a pytree node: its beta is a leaf (see Activation)

    def __init__(self, depth, width, num_classes, act, key, in_channels=3):
        n = (depth - 4) // 6
        keys = _keys(key, 3 * n + 2)
        self.stem = _conv(in_channels, 16, 3, 1, keys[0])
        blocks, cin = [], 16
        for stage in range(3):
            cout = 16 * 2**stage * width
            for b in range(n):
                blocks.append(PreAct(cin, cout, 2 if stage > 0 and b == 0 else 1, act, keys[1 + stage * n + b]))
                cin = cout
        self.blocks = tuple(blocks)
        self.bn = BN(cin)
        self.fc = _linear(cin, num_classes, keys[-1])
        self.act = act

    def __call__(self, x, state, *, key=None):
        x = self.stem(x)
        for blk in self.blocks:
            x, state = blk(x, state)
        x, state = self.bn(x, state)
        return self.fc(_pool(self.act(x))), state


class CNN(eqx.Module):
    """(conv3x3-BN-act) x2 at `width`, 2x2 average pool (`act` stays the only nonlinearity), the same at 2*width, global
    pool, linear. With `side`: input resized to side x side, last map flattened into the head (room to over-fit)."""
    convs: tuple
    pool: eqx.nn.AvgPool2d
    fc: eqx.nn.Linear
    act: Activation  # a pytree node: its beta is a leaf (see Activation)
    side: int | None = eqx.field(static=True)

    def __init__(self, width, num_classes, act, key, in_channels=3, side=None):
        k = _keys(key, 5)
        w2 = 2 * width
        self.convs = (ConvBN(in_channels, width, 3, 1, k[0]), ConvBN(width, width, 3, 1, k[1]),
                      ConvBN(width, w2, 3, 1, k[2]), ConvBN(w2, w2, 3, 1, k[3]))
        self.pool = eqx.nn.AvgPool2d(2, 2)
        self.fc = _linear(w2 * (side // 4) ** 2 if side else w2, num_classes, k[4])
        self.act, self.side = act, side

    def __call__(self, x, state, *, key=None):
        if self.side:
            x = jax.image.resize(x, (x.shape[0], self.side, self.side), "linear", antialias=True)
        for i, c in enumerate(self.convs):
            x, state = c(x, state)
            x = self.act(x)
            if i % 2:
                x = self.pool(x)
        return self.fc(x.reshape(-1) if self.side else _pool(x)), state


class Tiny(eqx.Module):
    """conv3x3(8)-BN-act, global pool, linear: for fast tests."""
    conv: ConvBN
    fc: eqx.nn.Linear
    act: Activation  # a pytree node: its beta is a leaf (see Activation)

    def __init__(self, num_classes, act, key, in_channels=3):
        k1, k2 = _keys(key, 2)
        self.conv = ConvBN(in_channels, 8, 3, 1, k1)
        self.fc = _linear(8, num_classes, k2)
        self.act = act

    def __call__(self, x, state, *, key=None):
        x, state = self.conv(x, state)
        return self.fc(_pool(self.act(x))), state


class MLP(eqx.Module):
    """Image resized to 14x14 (any input size), flattened, (linear-BN-act) x depth at `width`, linear: the figure
    scripts' CPU-scale model (matmuls are far cheaper than convolutions on a CPU)."""
    hidden: tuple
    norms: tuple
    fc: eqx.nn.Linear
    act: Activation  # a pytree node: its beta is a leaf (see Activation)

    def __init__(self, width, num_classes, act, key, in_channels=3, depth=2):
        k = _keys(key, depth + 1)
        # BN follows each hidden layer, so their biases would be redundant: weights only.
        lin = lambda cin, cout, kk: eqx.tree_at(lambda m: m.bias, _linear(cin, cout, kk), None,  # noqa: E731
                                                is_leaf=lambda x: x is None)
        self.hidden = tuple(lin(in_channels * 14 * 14 if i == 0 else width, width, k[i]) for i in range(depth))
        self.norms = tuple(BN(width) for _ in range(depth))
        self.fc = _linear(width, num_classes, k[depth])
        self.act = act

    def __call__(self, x, state, *, key=None):
        x = jax.image.resize(x, (x.shape[0], 14, 14), "linear", antialias=True).reshape(-1)
        for lin, bn in zip(self.hidden, self.norms):
            x, state = bn(lin.weight @ x, state)
            x = self.act(x)
        return self.fc(x), state


def _wrn(depth: str, width: str):
    d, w = int(depth), int(width)
    if d < 10 or (d - 4) % 6 or w < 1:
        raise ConfigError(f"--model: WRN needs depth = 6n+4 >= 10 (10, 16, 22, 28, 40, ...) and width >= 1, got "
                          f"depth {d}, width {w}")
    return functools.partial(WRN, d, w)


def _width(cls, second="depth"):
    def make(width: str, other: str | None = None):
        if int(width) < 1 or (other is not None and int(other) < (4 if second == "side" else 1)):
            raise ConfigError(f"--model: {cls.__name__.lower()} width must be >= 1 and {second} >= "
                              f"{4 if second == 'side' else 1}, got {width}, {other}")
        build = functools.partial(cls, int(width))
        return (lambda *a: build(*a, **{second: int(other)})) if other else build

    return make


# name pattern -> (groups -> build(num_classes, act, key, in_channels)); sizes checked when the flags are read.
MODELS: dict[str, Callable] = {
    "resnet50": lambda: functools.partial(ResNet, Bottleneck, (3, 4, 6, 3)),
    "resnet18": lambda: functools.partial(ResNet, Basic, (2, 2, 2, 2)),
    r"wrn(\d+)_(\d+)": _wrn,  # e.g. wrn28_10
    r"cnn(\d+)(?:f(\d+))?": _width(CNN, "side"),  # cnn<width>[f<side>]: f14 resizes to 14x14, flattens
    r"mlp(\d+)(?:x(\d+))?": _width(MLP),  # mlp<width>[x<depth>], depth 2 by default
    "tiny": lambda: Tiny,
}


def model_builder(name: str) -> Callable:
    """build(num_classes, act, key, in_channels) for the model `name` of MODELS."""
    for pattern, make in MODELS.items():
        if m := re.fullmatch(pattern, name):
            return make(*m.groups())
    raise ConfigError(f"--model: unknown model {name!r}; accepted: resnet50, resnet18, "
                      "wrn<depth>_<width> (e.g. wrn28_10), cnn<width>[f<side>], mlp<width>[x<depth>], tiny")


def make_model(name: str, num_classes: int, act: Activation, key, *, in_channels: int = 3):
    """(model, state): `state` holds the BatchNorm running statistics (fp32)."""
    return eqx.nn.make_with_state(model_builder(name))(num_classes, act, key, in_channels)


def apply(model, state, x):
    """Logits [B, num_classes] and new state of a batch x [B, C, H, W]; training-mode BatchNorm reduces over it."""
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)


def _is_param(x) -> bool:
    # Abstract leaves count too, so that both helpers work on eqx.filter_eval_shape output.
    return eqx.is_inexact_array(x) or (isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact))


def decay_mask(model) -> PyTree:
    """Optax weight-decay mask: True on conv and linear weights, False on other inexact arrays, None elsewhere."""
    is_layer = lambda x: isinstance(x, (eqx.nn.Conv, eqx.nn.Linear))  # noqa: E731

    def leaf(x):
        return False if _is_param(x) else None

    def node(x):
        if is_layer(x):
            return eqx.tree_at(lambda m: m.weight, jax.tree.map(leaf, x), True)
        return leaf(x)

    return jax.tree.map(node, model, is_leaf=is_layer)


#### Data ##########################################################################################
# Host side: Grain only shuffles, shards (by JAX process) and batches uint8 images (and decodes ImageNet's JPEGs);
# small-image augmentation and normalisation run on the device inside the jitted step (`augment_small`, `normalize`).
DATASETS = ("fashion_mnist", "cifar10", "imagenet")


class DatasetSpec(NamedTuple):
    num_classes: int
    shape: tuple[int, int, int]  # H, W, C of the model input
    mean: tuple[float, ...]  # per channel, in 0..255 pixel units
    std: tuple[float, ...]  # per channel, in 0..255 pixel units
    n_train: int = 0  # images of the full training set


DATASET_SPECS = {  # statistics of the training sets (ImageNet: the usual torchvision values)
    "fashion_mnist": DatasetSpec(10, (28, 28, 1), (72.940,), (90.021,), 60_000),
    "cifar10": DatasetSpec(10, (32, 32, 3), (125.307, 122.950, 113.865), (62.993, 62.089, 66.705), 50_000),
    "imagenet": DatasetSpec(1000, (224, 224, 3), (123.675, 116.280, 103.530), (58.395, 57.120, 57.375), 1_281_167),
}

FMNIST_DIR = Path(__file__).parent / "data" / "fashion-mnist"
FMNIST_SHA256 = {  # SHA-256 of the gz files as shipped in Debian's dataset-fashion-mnist package
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = Path(__file__).parent / "data"  # holds cifar-10-batches-py/


def _file_digest(path, algo):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_idx(path, ndim):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:4] != bytes((0, 0, 8, ndim)):  # idx header: two zero bytes, dtype 0x08 (uint8), ndim, big-endian dims
        raise ConfigError(f"{path} is not a uint8 idx file with {ndim} dims; re-copy it")
    dims = np.frombuffer(raw, ">u4", ndim, 4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion_mnist(data_dir):
    root = Path(data_dir) if data_dir is not None else FMNIST_DIR
    if (root / "fashion-mnist").is_dir():
        root = root / "fashion-mnist"
    for name, want in FMNIST_SHA256.items():
        path = root / name
        if not path.is_file():
            raise ConfigError(f"Fashion-MNIST file {path} is missing; restore data/fashion-mnist/ from the repo or "
                              "point --data-dir at a folder with the four official gz files")
        if _file_digest(path, "sha256") != want:
            raise ConfigError(f"Fashion-MNIST file {path} fails its SHA-256 check; restore it from the repo (see "
                              "data/fashion-mnist/README.md) or fix --data-dir")
    x_train = _read_idx(root / "train-images-idx3-ubyte.gz", 3)[..., None]
    y_train = _read_idx(root / "train-labels-idx1-ubyte.gz", 1).astype(np.int32)
    x_test = _read_idx(root / "t10k-images-idx3-ubyte.gz", 3)[..., None]
    y_test = _read_idx(root / "t10k-labels-idx1-ubyte.gz", 1).astype(np.int32)
    return x_train, y_train, x_test, y_test


def _download(url, dest, md5, timeout=20.0):
    """Downloads url to dest; OSError (URLError included) if it fails or the md5 is wrong."""
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    if _file_digest(part, "md5") != md5:
        part.unlink()
        raise OSError(f"md5 mismatch for {url}")
    part.rename(dest)


def _cifar10_folder(data_dir):
    for d in (data_dir, data_dir / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file() and (d / "test_batch").is_file():
            return d
    return None


def _load_cifar10(data_dir):
    root = Path(data_dir) if data_dir is not None else CIFAR10_DIR
    folder = _cifar10_folder(root)
    if folder is None:
        archive = root / "cifar-10-python.tar.gz"
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not archive.is_file() or _file_digest(archive, "md5") != CIFAR10_MD5:
                _download(CIFAR10_URL, archive, CIFAR10_MD5)
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
        except (OSError, tarfile.TarError) as e:
            raise ConfigError(f"CIFAR-10 not found under {root} and the download failed ({e}); download "
                              f"{CIFAR10_URL} (md5 {CIFAR10_MD5}), extract it and pass --data-dir pointing at the "
                              "folder containing cifar-10-batches-py/") from None
        folder = _cifar10_folder(root)
        if folder is None:
            raise ConfigError(f"{archive} did not contain cifar-10-batches-py/; delete it and retry")

    def read(name):
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the files are Python 2 pickles
        x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x), np.asarray(d[b"labels"], np.int32)

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read("test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def load_small(name, data_dir=None):
    """(x_train, y_train, x_test, y_test): uint8 [N,H,W,C] images, int32 labels."""
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir)
    if name == "cifar10":
        return _load_cifar10(data_dir)
    if name == "imagenet":
        raise ConfigError("--dataset imagenet is streamed from its folder: use ImageFolder")
    raise ConfigError(f"--dataset {name!r} is unknown; choose one of {', '.join(DATASETS)}")


def _process_shard(batch_size):
    """(index, count, per-process batch size) of this JAX process."""
    count = jax.process_count()
    if batch_size <= 0 or batch_size % count:
        raise ConfigError(f"--batch-size {batch_size} must be a positive multiple of the number of JAX processes "
                          f"({count})")
    return jax.process_index(), count, batch_size // count


_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # in memory, threads only contend for the GIL


def small_batches(x, y, batch_size, *, seed, num_epochs, start_step=0, shuffle=True):
    """Training batches (uint8 [b,H,W,C], int32 [b]), b = batch_size / processes: per epoch a permutation of (seed,
    epoch) (same seed on all processes) split across them, remainder dropped; num_epochs=None repeats; exact resume."""
    index, count, b = _process_shard(batch_size)
    n = len(x) - len(x) % count  # equal shards, so all processes take the same number of steps
    steps = n // count // b
    if steps == 0:
        raise ConfigError(f"--batch-size {batch_size} exceeds the {len(x)} training examples")

    # One vectorised permutation per epoch, not Grain's per-element shuffle (~5 ms per 128-example batch in Python).
    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(len(x)) if shuffle else np.arange(len(x))
        return order[:n][index::count]

    def get(step, _):
        epoch, i = divmod(step, steps)
        idx = epoch_order(epoch)[i * b : (i + 1) * b]
        return x[idx], y[idx]

    # map_with_index sees the global step, so slicing after it resumes mid-epoch with the same permutation.
    ds = grain.MapDataset.range(steps).repeat(num_epochs).map_with_index(get)[start_step:]
    return iter(ds.to_iter_dataset(_NO_THREADS))


def eval_batches(x, y, batch_size):
    """This process's strided shard in batches, the last maybe smaller; shards may differ by one: sum correct counts."""
    index, count, b = _process_shard(batch_size)
    idx = np.arange(index, len(x), count)

    def get(i):
        return x[idx[i * b : (i + 1) * b]], y[idx[i * b : (i + 1) * b]]

    ds = grain.MapDataset.range(-(-len(idx) // b)).map(get)
    return iter(ds.to_iter_dataset(_NO_THREADS))


def augment_small(key, x):
    """Per-example random crop (reflect-pad 4, as CIFAR trainers and the WRN code) and flip of uint8 [B,H,W,C]."""
    b, h, w, c = x.shape
    pad = 4
    k_crop, k_flip = jax.random.split(key)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))

    def one(img, off, flip):
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def normalize(x, mean, std):
    """uint8 [B,H,W,C] -> float32 [B,C,H,W]; mean/std per channel in 0..255 units."""
    x = (x.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return jnp.transpose(x, (0, 3, 1, 2))  # the Equinox models are channel-first


class _ImageFolder:
    """Random-access (path, label) source; paths stored as one bytes array so it pickles cheaply into each worker."""
    def __init__(self, root, classes, subset=None):
        rel, labels = [], []
        for label, wnid in enumerate(classes):
            d = root / wnid
            names = sorted(e.name for e in os.scandir(d) if e.is_file()) if d.is_dir() else []
            rel += [f"{wnid}/{n}" for n in names]
            labels += [label] * len(names)
        keep = np.arange(len(rel))
        if subset and subset < len(rel):  # a fixed random subset, the same for every run and seed
            keep = np.sort(np.random.default_rng(0).choice(len(rel), subset, replace=False))
        self.root = str(root)
        self.rel = np.array(rel, dtype=np.bytes_)[keep]
        self.labels = np.array(labels, np.int32)[keep]

    def __len__(self):
        return len(self.rel)

    def __getitem__(self, i):
        return os.path.join(self.root, self.rel[i].decode()), self.labels[i]


_logged_bad_images = set()  # per process: warn once per file, not once per epoch


def _reduction(side, need):
    """Largest JPEG scale-down s in (8, 4, 2, 1) with side / s >= need."""
    for s in (8, 4, 2):
        if side >= need * s:
            return s
    return 1


def _open_rgb(path, pick=lambda w, h: 1):
    """(RGB image, r, (w, h)): the (w, h) file decoded at 1/r size, r = pick(w, h) if JPEG allows, else 1; or None."""
    try:
        with open(path, "rb") as f:  # one read: PIL's parser otherwise issues dozens of small ones
            raw = io.BytesIO(f.read())
        with Image.open(raw) as im:  # lazy: reads the header, no pixels yet
            w, h = im.size
            s, r = pick(w, h), 1.0
            if s > 1:
                # Pillow takes the largest scale s' <= min(w // (w // s), h // (h // s)) = s and returns (mode,
                # (0, 0, w / s', h / s')), or None for a non-JPEG: the exact factor (the image is ceil(w / s') wide).
                got = im.draft("RGB", (w // s, h // s))
                if got is not None:
                    r = w / got[1][2]
            im.load()  # decodes inside the try; convert copies even an RGB image
            return (im if im.mode == "RGB" else im.convert("RGB")), r, (w, h)
    except Exception as e:  # PIL raises many types on corrupt files; none may stop training
        if path not in _logged_bad_images:
            _logged_bad_images.add(path)
            logging.warning("skipping unreadable image %s: %s", path, e)
        return None


def _random_resized_crop(w, h, rng):
    """Inception-style crop box (left, top, right, bottom), scale 0.08-1, ratio 3/4-4/3."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = round(math.sqrt(target * ratio))
        ch = round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(rng.integers(0, w - cw + 1))
            top = int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    if w / h < 3 / 4:  # fallback (as torchvision): the centred crop with the ratio clamped into range
        cw, ch = w, min(h, round(w * 4 / 3))
    elif w / h > 4 / 3:
        cw, ch = min(w, round(h * 4 / 3)), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _imagenet_train(record, rng, size=224):
    """Random-resized crop to size x size and a ½ flip, decoded at the largest scale-down that never upsamples."""
    path, label = record
    box = None

    def pick(w, h):
        nonlocal box
        box = _random_resized_crop(w, h, rng)
        return _reduction(min(box[2] - box[0], box[3] - box[1]), size)

    opened = _open_rgb(path, pick)
    if opened is None:
        return None
    im, r, _ = opened
    im = im.resize((size, size), Image.BILINEAR, box=tuple(c / r for c in box))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # 5x cheaper than NumPy's strided copy
    return np.asarray(im), np.int32(label)


def eval_resize(size):
    """Eval's shorter side before its centre crop of `size`: ratio 256/224 (256 at 224, 146 at 128, 73 at 64)."""
    return round(size * 256 / 224)


def _imagenet_eval(record, size=224):
    """Shorter side to eval_resize(size), centre crop size x size (resizing only the crop region: the same samples)."""
    path, label = record
    short = eval_resize(size)
    opened = _open_rgb(path, lambda w, h: _reduction(min(w, h), short))
    if opened is None:
        return None
    im, r, (W, H) = opened
    s = short / min(W, H)
    w, h = max(size, round(W * s)), max(size, round(H * s))
    left, top = (w - size) // 2, (h - size) // 2
    sx, sy = W / w / r, H / h / r
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(im.resize((size, size), Image.BILINEAR, box=box)), np.int32(label)


def imagenet_batches(source: _ImageFolder, split, batch_size, *, seed, num_epochs, start_step=0, workers=None,
                     image_size=224):
    """Batches (uint8 [b,S,S,3], int32 [b]) of a split of an ImageFolder, S = image_size. "train": reshuffled each
    epoch, crops and flips fixed by the seed (the same on every process) and stream position; "val": one ordered pass.
    Bad images are skipped; resuming at start_step is exact only if none was skipped before, with as many workers."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    index, count, b = _process_shard(batch_size)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    if workers > 0 and not absl_flags.FLAGS.is_parsed():
        # Grain 0.2.x fails starting workers in programs that never parse absl flags (google/grain#1355).
        absl_flags.FLAGS.mark_as_parsed()
    # PIL releases the GIL while decoding, so two threads per worker help; to_iter_dataset drops a bad image's None.
    threads = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    ds = grain.MapDataset.source(source)
    if split == "train":
        n = len(source) - len(source) % count
        ds = ds.seed(seed).shuffle()[:n][index::count].repeat(num_epochs)
        # After shard/repeat (new crops per process and epoch), before the resume slice (a resumed run draws the same).
        ds = ds.random_map(functools.partial(_imagenet_train, size=image_size))
        # Workers batch in shared memory, worker w from elements w, w+W, ..., and take turns: skip whole rounds of
        # W batches by slicing, the remaining batches by consuming them.
        rounds, rest = divmod(start_step, max(workers, 1))
        ds = ds[rounds * max(workers, 1) * b :].to_iter_dataset(threads)
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    else:
        # Batching after the workers keeps the order and leaves one short batch, not one per worker (each a recompile).
        rest = 0
        ds = ds[index::count].map(functools.partial(_imagenet_eval, size=image_size))
        ds = ds[start_step * b :].to_iter_dataset(threads)
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=16))
        ds = ds.batch(b)
    it = iter(ds)
    for _ in range(rest):
        next(it, None)
    return it


class InMemory:
    """A dataset held as uint8 [N,H,W,C] arrays: Fashion-MNIST, CIFAR-10, or any arrays a test makes."""
    def __init__(self, spec: DatasetSpec, x_train, y_train, x_test, y_test):
        self.spec, self.x_train, self.y_train, self.x_test, self.y_test = spec, x_train, y_train, x_test, y_test
        self.n_train, self.n_test = len(y_train), len(y_test)

    def train(self, batch_size, *, seed, start_step=0):
        return small_batches(self.x_train, self.y_train, batch_size, seed=seed, num_epochs=None, start_step=start_step)

    def test(self, batch_size):
        return eval_batches(self.x_test, self.y_test, batch_size)

    def train_eval(self, batch_size):
        """(batches, n) of up to 10,000 training images in order: is the model interpolating?"""
        n = min(self.n_train, 10_000)
        return eval_batches(self.x_train[:n], self.y_train[:n], batch_size), n


class ImageFolder:
    """An ImageNet-style folder data_dir/{train,val}/<class>/*.JPEG (also `reencode`'s output), scanned once; classes:
    the sorted folders under train/. `workers` processes decode it to image_size x image_size (`imagenet_batches`)."""
    LAYOUT = "a folder holding train/<class>/*.JPEG and val/<class>/*.JPEG (e.g. --data-dir /data/imagenet)"

    def __init__(self, data_dir, *, train_subset=None, test_subset=None, workers=None, image_size=224):
        if data_dir is None:
            raise ConfigError(f"--dataset imagenet needs --data-dir: {self.LAYOUT}")
        root = Path(data_dir)
        for d in (root / "train", root / "val"):
            if not d.is_dir():
                raise ConfigError(f"--data-dir {data_dir}: {d} does not exist; pass {self.LAYOUT}")
        classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
        self.sources = {"train": _ImageFolder(root / "train", classes, train_subset),
                        "val": _ImageFolder(root / "val", classes, test_subset)}
        for split, source in self.sources.items():
            if len(source) == 0:
                raise ConfigError(f"--data-dir {data_dir}: no images under {root / split}; pass {self.LAYOUT}")
        self.spec = DATASET_SPECS["imagenet"]._replace(num_classes=len(classes), shape=(image_size, image_size, 3))
        self.n_train, self.n_test = len(self.sources["train"]), len(self.sources["val"])
        self.workers, self.image_size = workers, image_size

    def train(self, batch_size, *, seed, start_step=0, num_epochs=None):
        return imagenet_batches(self.sources["train"], "train", batch_size, seed=seed, num_epochs=num_epochs,
                                start_step=start_step, workers=self.workers, image_size=self.image_size)

    def test(self, batch_size):
        return imagenet_batches(self.sources["val"], "val", batch_size, seed=0, num_epochs=1, workers=self.workers,
                                image_size=self.image_size)

    def train_eval(self, batch_size):
        return None  # a pass over training images in eval mode costs an epoch's decoding: skipped


def _noisy(y, fraction, num_classes):
    """A fixed `fraction` of labels (the same for every run and seed) moved uniformly to another class: symmetric."""
    rng = np.random.default_rng(0)
    idx = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
    y = y.copy()
    y[idx] = (y[idx] + rng.integers(1, num_classes, len(idx))) % num_classes
    return y


def load_data(cfg, workers=None, data_dir=None):
    """The dataset of a TrainConfig (subsets and label noise applied) as InMemory or ImageFolder."""
    if cfg.dataset == "imagenet":
        return ImageFolder(data_dir, train_subset=cfg.train_subset, test_subset=cfg.test_subset, workers=workers,
                           image_size=cfg.image_size)
    spec = DATASET_SPECS[cfg.dataset]
    x_tr, y_tr, x_te, y_te = _load_small_cached(cfg.dataset, data_dir)
    x_tr, y_tr = x_tr[: cfg.train_subset], y_tr[: cfg.train_subset]
    x_te, y_te = x_te[: cfg.test_subset], y_te[: cfg.test_subset]
    if cfg.label_noise:
        y_tr = _noisy(y_tr, cfg.label_noise, spec.num_classes)
    return InMemory(spec, x_tr, y_tr, x_te, y_te)


_load_small_cached = functools.lru_cache(maxsize=2)(load_small)  # a sweep decodes the files once


#### Configuration (MATH.md §4-§5) #################################################################
# What a run trains: TrainConfig (each field declared by `setting`), the setups (SETUPS), and a run's identity.
def setting(default, check: Callable[[Any], str | None] | None = None, *, flag: bool = True, array: bool = False,
            help: str = ""):
    """A configuration field: default; check (None if accepted, else the accepted values as text; None is never
    checked); flag (a --flag in every script: `Flags`); array (a scalar of the step, `Hyper`: one compile per sweep)."""
    return dataclasses.field(default=default, metadata={"check": check, "flag": flag, "array": array, "help": help})


def at_least(lo):
    return lambda v: None if v >= lo else f">= {lo}"


def above(lo):
    return lambda v: None if v > lo else f"> {lo}"


def in_range(lo, hi):
    return lambda v: None if lo <= v < hi else f"in [{lo}, {hi})"


def one_of(names):
    """A name in `names`, a registry read at check time: an entry added later counts."""
    return lambda v: None if v in names else ", ".join(names)


def _device_multiple(n):
    d = jax.device_count()
    return None if n > 0 and n % d == 0 else f"a positive multiple of the device count ({d})"


def _known_model(name):
    model_builder(name)  # raises its own ConfigError, naming a bad depth or width too


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What one run trains; with the seed, every field is the run's identity (resume, CSV rows, plots, checkpoints).
    A run starts from its dataset's setup (SETUPS); a default is what an older CSV's missing column means: fixed."""
    dataset: str = setting("fashion_mnist", one_of(DATASETS))
    model: str = setting("mlp256", _known_model)
    activation: str = setting("relu", one_of(ACTIVATIONS), flag=False)
    beta: float = setting(1.0, above(0), flag=False, array=True, help="width of φ″ for beta_gelu and relu_aug")
    method: str = setting("sgd", one_of(RULES), flag=False)
    rho: float = setting(0.0, at_least(0), flag=False, array=True, help="of gp, sam, usam")
    sigma2: float = setting(0.0, at_least(0), flag=False, array=True, help="of weight_noise, hessian_trace, gn_trace")
    epochs: float = setting(50, above(0))
    batch_size: int = setting(128, _device_multiple)
    lr: float = setting(0.05, above(0), array=True, help="ImageNet: 0.1 × batch/256 unless given (Goyal et al.)")
    schedule: str = setting("cosine", one_of(SCHEDULES), help="the learning rate's multiplier over the steps "
                            "(SCHEDULES)")
    momentum: float = setting(0.9, in_range(0, 1), array=True)
    nesterov: bool = setting(True)
    weight_decay: float = setting(5e-4, at_least(0), array=True)
    decay_norm_and_bias: bool = setting(True)
    warmup_epochs: float = setting(1.0, at_least(0))
    augment: bool = setting(False, help="pad-crop + flip on the device (small images; ImageNet crops in its pipeline)")
    train_subset: int | None = setting(None, above(0), help="first N training images (ImageNet: a fixed random N)")
    test_subset: int | None = setting(None, above(0))
    label_noise: float = setting(0.0, in_range(0, 1), help="fraction of training labels moved to another class, "
                                 "fixed across runs")
    dtype: str = setting("float32", one_of(("float32", "bfloat16")), help="bfloat16: bf16 compute, fp32 "
                         "parameters/optimizer/BN/loss/norms")
    image_size: int = setting(224, at_least(32), help="ImageNet only: the train and eval crop side (224: the "
                              "paper's; 64 or 128: downsampled ImageNet); ≥ 32, ResNet-50's output stride")


@functools.cache
def hyper_class(cls: type) -> type:
    """The namedtuple of the array=True fields of `cls` (TrainConfig or a subclass), the step's scalar arrays."""
    arrays = [f for f in dataclasses.fields(cls) if f.metadata["array"]]
    return collections.namedtuple("Hyper", [f.name for f in arrays], defaults=[f.default for f in arrays])


Hyper = hyper_class(TrainConfig)


def hyper(cfg):
    """cfg's array fields as float32 scalars, in its class's Hyper."""
    cls = hyper_class(type(cfg))
    return cls(*(jnp.float32(getattr(cfg, f)) for f in cls._fields))


# Every setup, whole (MATH.md §4); a script's runs set activation, beta, method, rho and sigma2 (changes: `resolve`).
SETUPS = {
    # The CPU regimes (MATH.md §5, results/README.md): a BN MLP and a BN conv net over-fitting 1,024 Fashion-MNIST
    # images of which 30% carry a wrong label, each chosen by the curvature probe among candidates (results/regimes/).
    "fashion_mnist": TrainConfig(
        dataset="fashion_mnist", model="mlp256", epochs=50, batch_size=128, lr=0.05, momentum=0.9, nesterov=True,
        weight_decay=5e-4, decay_norm_and_bias=True, warmup_epochs=1.0, augment=False, train_subset=1024,
        test_subset=None, label_noise=0.3, dtype="float32"),
    "fashion_mnist_cnn": TrainConfig(
        dataset="fashion_mnist", model="cnn8f14", epochs=50, batch_size=128, lr=0.05, momentum=0.9, nesterov=True,
        weight_decay=5e-4, decay_norm_and_bias=True, warmup_epochs=1.0, augment=False, train_subset=1024,
        test_subset=None, label_noise=0.3, dtype="float32"),
    "cifar10": TrainConfig(  # the paper's setups, both with cosine decay as in the paper
        dataset="cifar10", model="wrn28_10", epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
        weight_decay=5e-4, decay_norm_and_bias=True, warmup_epochs=0.0, augment=True, train_subset=None,
        test_subset=None, label_noise=0.0, dtype="float32"),
    "imagenet": TrainConfig(  # lr: 0.1 × batch/256 (`for_dataset`)
        dataset="imagenet", model="resnet50", epochs=300, batch_size=256, lr=0.1, momentum=0.9, nesterov=False,
        weight_decay=1e-4, decay_norm_and_bias=False, warmup_epochs=5.0, augment=False, train_subset=None,
        test_subset=None, label_noise=0.0, dtype="float32"),
}

CPU_SETUP = "fashion_mnist"  # a script's default setup
PAPER_SETUPS = ("cifar10", "imagenet")  # the paper's, for an accelerator; the others are sized for a CPU
# --smoke on any dataset: a tiny model, one epoch (and one seed, the ends of each sweep: `run_script`).
SMOKE = dict(model="mlp16", train_subset=256, test_subset=512, batch_size=64, epochs=1)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a run is executed: nothing here changes what it computes."""
    data_dir: str | None = setting(None)
    eval_batch_size: int = setting(1000, above(0))
    ckpt_dir: str | None = setting(None, help="one subfolder per run; rerunning the same command resumes")
    ckpt_every_s: float = setting(300.0, above(0))
    workers: int | None = setting(None, at_least(0), help="ImageNet decoding processes (None: one per core; 0: "
                                  "decode in this process, two threads)")
    log: bool = setting(True)
    log_every_s: float = setting(30.0, at_least(0), help="without a terminal: at most one epoch line per this "
                                 "many seconds")
    record_batches: str | None = setting(None, flag=False, help="debug: folder where each process logs the "
                                         "examples it loads per step")


def for_dataset(dataset: str, cls: type = TrainConfig, **overrides) -> TrainConfig:
    """The setup of `dataset` (SETUPS) as a `cls` (TrainConfig or a copied script's subclass) with the `overrides`
    that are not None. ImageNet's lr follows its batch size, 0.1 × batch/256 (Goyal et al. 2018), unless given."""
    if accepted := one_of(SETUPS)(dataset):
        raise ConfigError(f"--dataset: got {dataset!r}; accepted: {accepted}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if dataset == "imagenet" and "lr" not in overrides:
        overrides["lr"] = 0.1 * overrides.get("batch_size", SETUPS[dataset].batch_size) / 256
    return cls(**dataclasses.asdict(SETUPS[dataset]) | overrides)


def validate(cfg) -> None:
    """The first value of a configuration dataclass failing its check (`setting`), as a ConfigError naming its flag."""
    for f in dataclasses.fields(cfg):
        value, check = getattr(cfg, f.name), f.metadata.get("check")
        if check and value is not None and (accepted := check(value)):
            raise ConfigError(f"--{f.name.replace('_', '-')}: got {value!r}; accepted: {accepted}")
    if isinstance(cfg, TrainConfig) and cfg.image_size != 224 and cfg.dataset != "imagenet":
        raise ConfigError(f"--image-size: applies to --dataset imagenet only, not {cfg.dataset}")


def run_steps(cfg: TrainConfig, n_train: int | None = None) -> tuple[int, int]:
    """(steps per epoch, total steps) on n_train images (None: all, capped by train_subset); partial batches dropped."""
    if n_train is None:
        n_train = min(cfg.train_subset or math.inf, DATASET_SPECS[cfg.dataset].n_train)
    per_epoch = n_train // cfg.batch_size
    return per_epoch, max(1, int(round(cfg.epochs * per_epoch)))


def identity(cfg: TrainConfig, seed: int) -> dict:
    """A run's identity, as its CSV row records it."""
    return {"seed": seed} | dataclasses.asdict(cfg)


def _classes() -> tuple[type, ...]:
    """TrainConfig and the subclasses defined in this process (a copied script's own scalars)."""
    out = [TrainConfig]
    for c in out:
        out += [s for s in c.__subclasses__() if s not in out]
    return tuple(out)


@functools.cache
def _defaults_of(classes: tuple[type, ...]) -> dict:
    out = {}
    for c in classes:
        for f in dataclasses.fields(c):
            out.setdefault(f.name, f.default)
    return out


def defaults() -> dict:
    """Every configuration field and its default, TrainConfig's first: what a column a row lacks means."""
    return _defaults_of(_classes())


def id_fields() -> tuple[str, ...]:
    """A run's identity as CSV rows, resume and plots compare it: its seed and every configuration field."""
    return ("seed", *defaults())


def _fmt(v) -> str:
    if v is None or v == "":
        return ""  # how the CSV stores None
    if isinstance(v, bool):
        return str(v)
    try:
        return repr(float(v))  # 0.1, "0.1" and 1e-1 are one value; 50 and "50.0" too
    except (TypeError, ValueError):
        return str(v)


def _cell(row: dict, f: str, d: dict) -> str:
    """Field f of a row as text; a column the row lacks, or leaves empty (a CSV whose header gained it
    later), counts as its default in d."""
    return _fmt(d.get(f) if row.get(f, "") == "" else row[f])


def row_key(row: dict, fields=None) -> tuple:
    """The identity of a row (`fields`, default `id_fields()`) as text."""
    d = defaults()
    return tuple(_cell(row, f, d) for f in fields or id_fields())


def _field(c, f: str) -> str:
    """Field f of a TrainConfig or a row, as `row_key` compares it."""
    d = defaults()
    return _fmt(getattr(c, f, d.get(f))) if isinstance(c, TrainConfig) else _cell(c, f, d)


def varying(configs, fields=None) -> list[str]:
    """The `fields` (default: every configuration field) whose values differ among `configs` (TrainConfigs or rows)."""
    return [f for f in fields or id_fields()[1:] if len({_field(c, f) for c in configs}) > 1]


def varying_field(rows: list[dict], f: str) -> set:
    return {row_key(r, (f,))[0] for r in rows}


#### Training ######################################################################################
# One jitted step over all devices: batch sharded on "data", the rest replicated, so BatchNorm statistics and ‖g‖
# cover the global batch. It compiles once per StepSpec (what its code depends on); Hyper scalars are inputs.
class NetSpec(NamedTuple):
    """What a model's structure depends on."""
    model: str
    activation: str
    num_classes: int
    in_channels: int


class StepSpec(NamedTuple):
    """What the train step's code depends on: one compile per distinct value."""
    net: NetSpec
    method: str
    dtype: str
    augment: bool
    mean: tuple
    std: tuple
    nesterov: bool
    decay_norm_and_bias: bool
    warmup_steps: int
    total_steps: int
    schedule: str


@functools.cache
def skeleton(net: NetSpec):
    """The static half of the model (structure, activation names): what a compiled step closes over."""
    model, _ = eqx.filter_eval_shape(make_model, net.model, net.num_classes, Activation(net.activation),
                                     jax.random.key(0), in_channels=net.in_channels)
    return eqx.partition(model, _is_param)[1]


def make_optimizer(spec: StepSpec, hp: Hyper):
    """(optax transform, schedule): SGD with (Nesterov) momentum, coupled weight decay and the schedule as a
    multiplier (the step applies the lr). Order as PyTorch SGD: d = g + λθ; m = μm + d; θ -= lr (d + μm | m)."""
    mask = None if spec.decay_norm_and_bias else decay_mask
    schedule = SCHEDULES[spec.schedule](spec.warmup_steps, spec.total_steps)
    return optax.chain(optax.add_decayed_weights(hp.weight_decay, mask),
                       optax.trace(decay=hp.momentum, nesterov=spec.nesterov),
                       optax.scale_by_schedule(schedule)), schedule


def _cast(params, dtype):
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def make_loss_fn(static, dtype, beta):
    """loss_fn(params, state, (x, y)) -> (L0, (state, logits)): training mode, logits and loss in fp32."""

    def loss_fn(params, state, batch):
        x, y = batch
        model = with_beta(eqx.combine(_cast(params, dtype), static), beta)
        logits, state = apply(model, state, x.astype(dtype))
        logits = logits.astype(jnp.float32)
        return cross_entropy(logits, y), (state, logits)

    return loss_fn


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2, 3))
def train_step(spec: StepSpec, params, opt_state, bn_state, x, y, key, hp: Hyper):
    """One step on uint8 NHWC x: (params, opt_state, bn_state, {"loss": L0}); donates the three states."""
    k_aug, k_rule = jax.random.split(key)
    if spec.augment:
        x = augment_small(k_aug, x)
    x = normalize(x, spec.mean, spec.std)
    loss_fn = make_loss_fn(skeleton(spec.net), jnp.dtype(spec.dtype), hp.beta)
    out = RULES[spec.method](loss_fn, params, bn_state, (x, y), k_rule, hp)
    updates, opt_state = make_optimizer(spec, hp)[0].update(out.direction, opt_state, params)
    params = jax.tree.map(lambda p, u: p - hp.lr * u, params, updates)
    return params, opt_state, out.state, {"loss": out.loss}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def eval_step(net: NetSpec, mean, std, params, bn_state, beta, x, y, mask):
    """Summed (correct, cross-entropy, count) of a padded batch under a 0/1 mask, in inference mode."""
    model = with_beta(eqx.nn.inference_mode(eqx.combine(params, skeleton(net))), beta)
    logits, _ = apply(model, bn_state, normalize(x, mean, std))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return jnp.sum(correct * mask), jnp.sum(nll * mask), jnp.sum(mask)


def data_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _global(mesh, *local):
    """Process-local numpy batches -> global arrays sharded on the batch axis."""
    sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
    return [jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in local]


# The coordination service's clocks (jax.distributed.initialize): joining waits up to initialization_timeout for every
# process to start (a large job's stragglers); a finishing process waits up to shutdown_timeout_seconds for the others.
DIST_TIMEOUTS = dict(initialization_timeout=600, heartbeat_timeout_seconds=60, shutdown_timeout_seconds=120)
_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _explicit_launch(env) -> dict:
    """jax.distributed.initialize's arguments from the three JAX_* variables, or ConfigError."""
    got = {k: env.get(k, "").strip() for k in _EXPLICIT}
    if missing := [k for k, v in got.items() if not v]:
        raise ConfigError(f"{', '.join(missing)}: unset; a local multi-process launch sets all of "
                          f"{', '.join(_EXPLICIT)} (host:port, N, 0..N-1)")
    address, n, i = got.values()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port (e.g. localhost:12356)")
    if not n.isdigit() or int(n) < 1:
        raise ConfigError(f"JAX_NUM_PROCESSES={n!r}: expected a positive integer")
    if not i.isdigit() or int(i) >= int(n):
        raise ConfigError(f"JAX_PROCESS_ID={i!r}: expected an integer in 0..{int(n) - 1} (JAX_NUM_PROCESSES={n})")
    return dict(coordinator_address=address, num_processes=int(n), process_id=int(i))


_watchdog = None  # tools.Watchdog of a multi-process job


def stop_job(why: str) -> None:
    """End this process now, one line on stderr (exit 1), skipping the shutdown barrier that would wait for the dead."""
    sys.stdout.flush()
    print(f"error: process {jax.process_index()}: {why}; stopping. Finished runs are in the CSV: rerun the "
          "same command on every process to continue", file=sys.stderr, flush=True)
    os._exit(1)


def maybe_init_distributed() -> None:
    """jax.distributed.initialize() under a multi-process launch (_EXPLICIT variables, SLURM, Open MPI, TPU pod),
    recoverable: a dead peer fails the survivors' collectives (reported by `run_cli`) instead of a C++ abort; a
    tools.Watchdog ends them where no collective fails."""
    global _watchdog
    env = os.environ
    if any(env.get(k) for k in _EXPLICIT):
        where = _explicit_launch(env)
    elif (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", "")):
        where = {}
    else:
        return
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(**where, **DIST_TIMEOUTS)
    if jax.process_count() > 1:
        from tools import Watchdog  # an instrument around the run; tools.py imports this module

        _watchdog = Watchdog(jax.process_index(), jax.process_count())


def padded_eval_batch(eval_batch_size: int) -> int:
    """The global eval batch: eval_batch_size rounded up to a multiple of the device count (padding is masked)."""
    n = jax.device_count()
    return -(-eval_batch_size // n) * n


def _evaluate(net, spec, mesh, params, bn_state, beta, batches, eval_batch, n_examples):
    """Accuracy and mean cross-entropy; padded, masked batches, as many on every process (collectives stay aligned)."""
    eval_batch = padded_eval_batch(eval_batch)
    local = eval_batch // jax.process_count()
    per_process = -(-n_examples // jax.process_count())
    correct = nll = count = 0.0
    for _ in range(-(-per_process // local)):
        x, y = next(batches, (np.zeros((0, *spec.shape), np.uint8), np.zeros(0, np.int32)))
        n = len(y)
        mask = (np.arange(local) < n).astype(np.float32)
        x = np.concatenate([x, np.zeros((local - n, *spec.shape), x.dtype)])
        y = np.concatenate([y, np.zeros(local - n, y.dtype)])
        c, l, k = eval_step(net, spec.mean, spec.std, params, bn_state, beta, *_global(mesh, x, y, mask))
        correct, nll, count = correct + float(c), nll + float(l), count + float(k)
    return correct / count, nll / count


class _Log:
    """Run progress on process 0: on a terminal a stderr line per 25 steps, else stdout per epoch (≤ 1 per every_s)."""
    def __init__(self, total, steps_per_epoch, enabled, every_s=30.0):
        self.total, self.per_epoch, self.every_s = total, steps_per_epoch, every_s
        self.on = enabled and jax.process_index() == 0
        self.tty = sys.stderr.isatty() and not os.environ.get("CI")
        self.t0 = self.last = time.perf_counter()

    def __call__(self, step, loss, images_per_s):
        if not self.on:
            return
        now = time.perf_counter()
        if self.tty and step % 25 == 0:
            print(f"\r step {step}/{self.total}  loss {loss:.4f}  {images_per_s:,.0f} img/s",
                  end="", file=sys.stderr, flush=True)
        elif not self.tty and (step + 1) % self.per_epoch == 0 and (now - self.last >= self.every_s
                                                                     or step + 1 == self.total):
            self.last = now
            print(f"  epoch {(step + 1) // self.per_epoch}  step {step + 1}/{self.total}  train loss {loss:.4f}  "
                  f"{images_per_s:,.0f} img/s  {now - self.t0:.0f}s", flush=True)

    def close(self):
        if self.on and self.tty:
            print(file=sys.stderr)


def run_id(cfg: TrainConfig, seed: int) -> str:
    """A short stable name of a run's identity (its checkpoint folder)."""
    text = json.dumps({k: _fmt(v) for k, v in identity(cfg, seed).items()}, sort_keys=True)  # 50 == 50.0
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _checkpointer(directory):
    import orbax.checkpoint as ocp  # imported lazily: only runs with --ckpt-dir pay for it

    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
    return ocp, ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _save(ckpt, step, tree, extra):
    ocp, manager = ckpt
    leaves = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree))}
    manager.save(step, args=ocp.args.Composite(leaves=ocp.args.StandardSave(leaves), extra=ocp.args.JsonSave(extra)))
    manager.wait_until_finished()


def _restore(ckpt, tree, identity):
    """(step, tree, extra) of the latest checkpoint, or None; a checkpoint of another run is refused."""
    ocp, manager = ckpt
    step = manager.latest_step()
    if step is None:
        return None
    leaves, treedef = jax.tree.flatten(tree)
    target = {str(i): leaf for i, leaf in enumerate(leaves)}
    got = manager.restore(step, args=ocp.args.Composite(leaves=ocp.args.StandardRestore(target),
                                                        extra=ocp.args.JsonRestore()))
    extra = dict(got.extra)
    if extra.get("identity") != identity:
        theirs = extra.get("identity") or {}
        diff = sorted(k for k in identity.keys() | theirs.keys() if identity.get(k) != theirs.get(k))
        raise ConfigError(f"--ckpt-dir: {manager.directory} holds a checkpoint of another run (differs in "
                          f"{', '.join(diff)}); point --ckpt-dir elsewhere or delete it")
    return step, treedef.unflatten([got.leaves[str(i)] for i in range(len(leaves))]), extra


ASK_EVERY = 100  # steps between save decisions of a multi-process run (each one a broadcast)


def save_due(step: int, seconds_since_save: float, every_s: float, processes: int) -> bool:
    """Whether to checkpoint after `step`, by this process's clock. With several processes it is asked only every
    ASK_EVERY steps and process 0's answer broadcast (`_agree`), so all reach Orbax's collective save together."""
    if processes > 1 and step % ASK_EVERY:
        return False
    return seconds_since_save > every_s


def _agree(flag: bool) -> bool:
    """Process 0's flag on every process."""
    return bool(_broadcast(np.int32(flag)))


def _broadcast(a: np.ndarray) -> np.ndarray:
    """Process 0's array on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return np.asarray(a)
    from jax.experimental import multihost_utils

    with jax.transfer_guard_device_to_host("allow"):  # a decision, read on its own steps only
        return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(a)))


@dataclasses.dataclass
class Run:
    """One run in progress: its identity, its compiled step's spec, and its training state."""
    cfg: TrainConfig
    seed: int
    spec: StepSpec
    steps_per_epoch: int
    mesh: jax.sharding.Mesh
    params: PyTree
    opt_state: PyTree
    bn_state: PyTree
    hp: Hyper
    key: jax.Array  # of the step stream: step i uses fold_in(key, i)
    step: int = 0
    losses: list = dataclasses.field(default_factory=list)  # training losses of the last epoch
    diverged: bool = False
    images_per_s: float = math.nan
    ckpt: Any = None

    @property
    def total(self) -> int:
        return self.spec.total_steps

    @property
    def identity(self) -> dict:
        return {"seed": self.seed} | dataclasses.asdict(self.cfg)


def setup(cfg: TrainConfig, seed: int, data, opts: RunOptions = RunOptions()) -> Run:
    """A run at its start, or where its checkpoint left it: model, optimizer and state on the mesh."""
    validate(cfg)
    steps_per_epoch, total = run_steps(cfg, data.n_train)
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {data.n_train} training images")
    net = NetSpec(cfg.model, cfg.activation, data.spec.num_classes, data.spec.shape[2])
    spec = StepSpec(net, cfg.method, cfg.dtype, cfg.augment, tuple(data.spec.mean), tuple(data.spec.std),
                    cfg.nesterov, cfg.decay_norm_and_bias, int(round(cfg.warmup_epochs * steps_per_epoch)), total,
                    cfg.schedule)
    k_init, k_steps = jax.random.split(jax.random.key(seed))
    model, bn_state = make_model(cfg.model, net.num_classes, Activation(cfg.activation), k_init,
                                 in_channels=net.in_channels)
    params = eqx.filter(model, eqx.is_inexact_array)
    hp = hyper(cfg)
    opt_state = make_optimizer(spec, hp)[0].init(params)
    mesh = data_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    params, opt_state, bn_state, hp = jax.device_put((params, opt_state, bn_state, hp), replicated)
    run = Run(cfg, seed, spec, steps_per_epoch, mesh, params, opt_state, bn_state, hp, k_steps)
    if opts.ckpt_dir:
        run.ckpt = _checkpointer(os.path.join(opts.ckpt_dir, run_id(cfg, seed)))
        if got := _restore(run.ckpt, (params, opt_state, bn_state), run.identity):
            run.step, state, extra = got
            run.params, run.opt_state, run.bn_state = jax.device_put(state, replicated)
            run.losses, run.diverged = list(extra["losses"]), extra["diverged"]
    return run


def _checkpoint(run: Run) -> None:
    _save(run.ckpt, run.step, (run.params, run.opt_state, run.bn_state),
          {"diverged": run.diverged, "losses": run.losses, "identity": run.identity})


def _read(x) -> float:
    """The loop's one device-to-host read per step, allowed explicitly: under a "disallow" guard, there is no other."""
    with jax.transfer_guard_device_to_host("allow"):
        return float(x)


def _examples(x, y) -> str:
    """Short digests of a batch's examples (image and label), for RunOptions.record_batches."""
    return " ".join(hashlib.sha1(a.tobytes() + b.tobytes()).hexdigest()[:12] for a, b in zip(x, y))


def fit(run: Run, data, opts: RunOptions = RunOptions(), callback: Callable[[Run], None] | None = None,
        every: int = 0) -> Run:
    """Train `run` to its last step or a non-finite loss (`run.diverged`), calling callback(run) every `every` steps
    and at the last. Each step reads one number (the previous loss, `_read`); callbacks and saves read on their own."""
    every = every if callback else 0
    batches = data.train(run.cfg.batch_size, seed=run.seed, start_step=run.step)
    log = _Log(run.total, run.steps_per_epoch, opts.log, opts.log_every_s)
    trace = None
    if opts.record_batches:
        os.makedirs(opts.record_batches, exist_ok=True)
        trace = open(os.path.join(opts.record_batches, f"{run_id(run.cfg, run.seed)}.{jax.process_index()}.txt"), "a")

    def record(pending):
        step, metrics = pending
        loss = _read(metrics["loss"])
        if step >= run.total - run.steps_per_epoch:
            run.losses.append(loss)
        run.diverged = run.diverged or not math.isfinite(loss)
        return loss

    allow = functools.partial(jax.transfer_guard_device_to_host, "allow")
    pending, images, t_loop, last_save = None, 0, None, time.perf_counter()
    while run.step < run.total and not run.diverged:
        local = next(batches)
        if trace:
            trace.write(f"{run.step} {_examples(*local)}\n")
        x, y = _global(run.mesh, *local)
        run.params, run.opt_state, run.bn_state, metrics = train_step(
            run.spec, run.params, run.opt_state, run.bn_state, x, y, jax.random.fold_in(run.key, run.step), run.hp)
        if pending is not None:  # the previous step's metrics: the host never waits on the step just launched
            loss = record(pending)
            if t_loop is None:  # throughput from the end of the first (compiling) step
                t_loop, images = time.perf_counter(), 0
            else:
                log(pending[0], loss, images / (time.perf_counter() - t_loop))
        pending, run.step, images = (run.step, metrics), run.step + 1, images + run.cfg.batch_size
        if every and (run.step % every == 0 or run.step == run.total) and not run.diverged:
            with allow():
                callback(run)
        procs = jax.process_count()
        if run.ckpt and (procs == 1 or run.step % ASK_EVERY == 0) and _agree(
                save_due(run.step, time.perf_counter() - last_save, opts.ckpt_every_s, procs)):
            record(pending)
            pending = None
            if not run.diverged:
                with allow():
                    _checkpoint(run)
            last_save = time.perf_counter()
    if trace:
        trace.close()
    if pending is not None:
        loss = record(pending)
        if t_loop:
            log(pending[0], loss, images / (time.perf_counter() - t_loop))
    jax.block_until_ready(run.params)
    if t_loop:
        run.images_per_s = images / (time.perf_counter() - t_loop)
    log.close()
    if run.ckpt:
        with allow():
            _checkpoint(run)
    return run


def evaluate(run: Run, data, opts: RunOptions = RunOptions()) -> dict:
    """Test accuracy and loss, and (in memory) training accuracy, in inference mode; NaN if diverged."""
    out = {"test_accuracy": math.nan, "test_loss": math.nan, "train_accuracy": math.nan}
    if run.diverged:
        return out
    ev = functools.partial(_evaluate, run.spec.net, data.spec, run.mesh, run.params, run.bn_state, run.hp.beta)
    out["test_accuracy"], out["test_loss"] = ev(data.test(opts.eval_batch_size), opts.eval_batch_size, data.n_test)
    if got := data.train_eval(opts.eval_batch_size):
        out["train_accuracy"], _ = ev(got[0], opts.eval_batch_size, got[1])
    return out


#### Results #######################################################################################
# A results CSV: one row per run (identity, then measurements), appended whole and fsynced; a torn row is cut, redone.
METRICS = ("test_accuracy", "test_loss", "train_accuracy", "train_loss", "diverged", "steps", "wall_s")


def row_fields(rows: list[dict]) -> list[str]:
    """Identity columns of results rows: configuration fields and any non-measurement column (never mix setups)."""
    measured = lambda c: c in METRICS or c.startswith("probe_")  # noqa: E731
    return list(dict.fromkeys([*id_fields(), *(c for c in (rows[0] if rows else ()) if not measured(c))]))


def _repair(path) -> None:
    """Cut a CSV's last line lacking its newline (a killed writer), so its run is redone; by process 0, the writer."""
    if jax.process_index() or not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
    logging.warning("%s: dropping a partial last row (a run killed while writing it); it will be redone", path)
    with open(path, "r+b") as f:
        f.truncate(keep)


def read_rows(path) -> list[dict]:
    """The rows of a results CSV, a partial last line repaired (`_repair`) or skipped."""
    _repair(path)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    return list(csv.DictReader(io.StringIO(data[: data.rfind(b"\n") + 1].decode())))


def append_rows(path, rows: list[dict]) -> None:
    """Append finished rows as one write, flushed and fsynced: a kill leaves every row or a partial last line that
    `_repair` cuts. Rows with new columns rewrite the file (atomic replace) under the union of the columns."""
    _repair(path)
    header = _header(path)
    new = list(dict.fromkeys(c for r in rows for c in r if c not in header))
    if header and new:
        _write_rows(path, read_rows(path), header + new)
    columns = header + new
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=columns)
    if not header:
        w.writeheader()
    w.writerows({c: r.get(c, "") for c in columns} for r in rows)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = text.getvalue().encode()
            while data:  # regular files take it in one write; loop in case one is short
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError(f"--out: cannot write {path} ({e.strerror}); the rows already there are kept") from None


def _header(path) -> list[str]:
    """The columns of a CSV file ([] if it is missing or empty)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _write_rows(path, rows, columns) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in columns} for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train(cfg: TrainConfig, seed: int, data=None, opts: RunOptions = RunOptions(),
          probe: Callable[[Run, Any], Callable[[Run], None]] | None = None, every: int = 0) -> dict:
    """Train one model: setup, fit, evaluate. Returns METRICS (a non-finite loss ends the run as `diverged`, never
    raised), images_per_s, and the final params, bn_state and probe; probe(run, data) gives fit's callback."""
    t_start = time.perf_counter()
    data = data if data is not None else load_data(cfg, opts.workers, opts.data_dir)
    run = setup(cfg, seed, data, opts)
    callback = probe(run, data) if probe else None
    run = fit(run, data, opts, callback, every)
    result = {"steps": run.step, "diverged": run.diverged, "images_per_s": run.images_per_s,
              "train_loss": float(np.mean(run.losses)) if run.losses else math.nan}
    result |= evaluate(run, data, opts)
    result |= {"wall_s": time.perf_counter() - t_start, "params": run.params, "bn_state": run.bn_state,
               "probe": callback}
    return result


def train_row(cfg: TrainConfig, seed: int, opts: RunOptions) -> dict:
    """One run's CSV columns after its identity: METRICS."""
    r = train(cfg, seed, opts=opts)
    return {k: r[k] for k in METRICS}


#### Sweeps and the command line ###################################################################
# A sweep: (TrainConfig, seed) runs; a rerun trains only those its CSV lacks. Flags come from the configuration fields.
@dataclasses.dataclass(frozen=True)
class _ScriptFlags:
    """The flags of every figure script besides the configuration's own (`Flags`)."""
    dataset: str = setting(CPU_SETUP, one_of(SETUPS), help="the setup (SETUPS): fashion_mnist and fashion_mnist_cnn "
                           "are the CPU regimes (mlp256, cnn8f14), cifar10 and imagenet the paper's")
    seeds: int | None = setting(None, at_least(1), help="None: --cpu-seeds in the CPU regime, else --paper-seeds")
    first_seed: int = setting(0, at_least(0), help="seeds first_seed .. first_seed + seeds − 1: split a sweep "
                              "across jobs")
    out: str | None = setting(None, help="None: runs/<script>/<dataset>-<model>/ beside the script")
    compile_cache: str | None = setting(None, help="None: <user cache>/neglected-hessian/jax; \"\": off")
    allow_cpu: bool = setting(False, help="train a paper setup (cifar10, imagenet) even when JAX only sees the CPU")
    smoke: bool = setting(False, help="tiny model, one epoch, one seed, first and last value of each swept number")
    plot_only: bool = setting(False)
    cpu_seeds: int = setting(16, at_least(1), help="16: a verdict that does not turn with the machine's rounding")
    paper_seeds: int = setting(5, at_least(1))
    overrides: typing.ClassVar[dict[str, dict]] = {}  # a script's {dataset: {field: value}}, applied before the flags
    train: typing.ClassVar[type] = TrainConfig  # its runs' class: a subclass adds a copied script's own fields


def _optional(cls, shown: Callable[[type, str], str]) -> list:
    """`cls`'s fields with a flag as optional Flags fields (None: the setup's), --help default `shown(Config, name)`."""
    hints = typing.get_type_hints(cls)
    skip = {f.name for f in dataclasses.fields(_ScriptFlags)}
    return [(f.name, hints[f.name] | None, dataclasses.field(
                default=None, metadata=dict(f.metadata) | {"default": functools.partial(shown, name=f.name)}))
            for f in dataclasses.fields(cls) if f.metadata.get("flag", True) and f.name not in skip]


# Every figure script's flags: _ScriptFlags, then one per TrainConfig and RunOptions field that has a flag.
Flags = dataclasses.make_dataclass(
    "Flags",
    _optional(TrainConfig, lambda config, name: "the setup's: " + ", ".join(
        f"{d} {config.overrides.get(d, {}).get(name, getattr(s, name))}" for d, s in SETUPS.items()))
    + _optional(RunOptions, lambda config, name: str(getattr(RunOptions, name))),
    bases=(_ScriptFlags,), frozen=True)


def resolve(flags) -> tuple[TrainConfig, RunOptions]:
    """The base TrainConfig and RunOptions of a script's flags: the dataset's setup, its Config's `overrides`, SMOKE
    under --smoke, then every value given (a flag, or a script's field named as a TrainConfig field)."""
    validate(flags)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"dataset"}
    given = {k: v for k, v in dataclasses.asdict(flags).items() if k in names and v is not None}
    changes = flags.overrides.get(flags.dataset, {}) | (SMOKE if flags.smoke else {})
    base = for_dataset(flags.dataset, flags.train, **(changes | given))
    opts = RunOptions(**{f.name: getattr(flags, f.name) for f in dataclasses.fields(RunOptions)
                         if getattr(flags, f.name, None) is not None})
    return base, opts


def seed_count(flags) -> int:
    """--seeds, else the script's cpu_seeds in the CPU regime and its paper_seeds on a paper setup."""
    if flags.seeds is not None:
        return flags.seeds
    return flags.paper_seeds if flags.dataset in PAPER_SETUPS else flags.cpu_seeds


def smoke_runs(configs: list) -> list:
    """Configs with every swept numeric field at its first or last value (every activation and method stays)."""
    swept = [f for f in varying(configs) if not isinstance(getattr(configs[0], f), str)]
    ends = {f: {_fmt(getattr(configs[0], f)), _fmt(getattr(configs[-1], f))} for f in swept}
    return [c for c in configs if all(_fmt(getattr(c, f)) in ends[f] for f in swept)]


def check_setup(path, configs, fields=None) -> None:
    """Refuse to add runs of another setup to a CSV: a field constant among both its rows and the new runs, with
    different values (a swept field may differ). `configs`: TrainConfigs, or rows of a script using other `fields`."""
    rows = read_rows(path)
    if not rows:
        return
    fields = fields or id_fields()[1:]
    new_swept, old_swept = set(varying(configs, fields)), set(varying(rows, fields))
    ours = {f: _field(configs[0], f) for f in fields}
    theirs = {f: row_key(rows[0], (f,))[0] for f in fields}
    diff = [f for f in fields if f not in new_swept | old_swept and ours[f] != theirs[f]]
    if diff:
        what = ", ".join(f"{f} {theirs[f] or 'None'} (here {ours[f] or 'None'})" for f in diff)
        raise ConfigError(f"--out: {path} holds runs of another setup: {what}; pass another --out")


def default_out(script: str, *parts: str) -> Path:
    """runs/<script name>/<parts...> beside the script: outside the tracked results/."""
    return Path(script).resolve().parent.joinpath("runs", Path(script).stem, *parts)


def output_dir(out: str | None, default: Path) -> Path:
    """The folder a script writes to (created): --out, else `default`; an unusable one is a ConfigError naming --out."""
    path = Path(out) if out else default
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: is a file; pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot write there ({e.strerror}); pass another folder") from None
    return path


def write_config(out_dir, name: str, flags, base: TrainConfig | None = None) -> None:
    """Add this call (flags, resolved base setup, versions) to <name>.config.json: all calls that wrote the folder."""
    path = Path(out_dir) / f"{name}.config.json"
    calls = json.loads(path.read_text())["calls"] if path.exists() else []
    versions = {m: importlib.metadata.version(m) for m in ("jax", "jaxlib", "equinox", "optax", "grain", "numpy")}
    calls.append({"flags": dataclasses.asdict(flags), "base": dataclasses.asdict(base) if base else None,
                  "versions": versions, "python": sys.version.split()[0], "backend": jax.default_backend(),
                  "devices": jax.device_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    path.write_text(json.dumps({"calls": calls}, indent=2, default=str))


def pending(path, items: list, identity_of: Callable[[Any], dict], fields=None) -> list:
    """The `items` whose row (its `fields` of identity_of(item)) is not yet in the CSV at `path`: a rerun's work."""
    done = {row_key(r, fields) for r in read_rows(path)}
    return [item for item in items if row_key(identity_of(item), fields) not in done]


def sweep(path, runs: list[tuple[TrainConfig, int]], opts: RunOptions, run_one=train_row) -> None:
    """Run the (TrainConfig, seed) `runs` the CSV at `path` lacks, appending each row as it finishes (process 0)."""
    lead = jax.process_index() == 0
    # Process 0's CSV decides for all: another process may see another file system, and a process that skipped a
    # run the others train would leave them waiting in its collectives.
    left = pending(path, runs, lambda run: identity(*run)) if lead else []
    todo = _broadcast(np.array([run in left for run in runs], np.int32))
    todo = [r for r, t in zip(runs, todo) if t]
    swept = varying([tc for tc, _ in runs])
    if lead:
        print(f"{Path(path).stem}: {len(todo)} of {len(runs)} runs to do -> {path}", flush=True)
    for tc, seed in todo:
        row = identity(tc, seed) | run_one(tc, seed, opts)
        if not lead:
            continue
        append_rows(path, [row])
        what = " ".join(f"{f}={getattr(tc, f)}" for f in swept)
        print(f"  {what} seed {seed}: test acc {row['test_accuracy']:.4f}  train acc {row['train_accuracy']:.4f}"
              f"  {row['wall_s']:.0f}s", flush=True)


def use_compile_cache(path: str | None) -> None:
    """JAX's persistent compilation cache in `path` (None: <user cache>/neglected-hessian/jax; "": off)."""
    if path == "":
        return
    if path is None:
        path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "neglected-hessian",
                            "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_config(config_cls, argv=None, doc: str | None = None):
    """argparse over a frozen dataclass: every field a --flag with its help (`setting`) and default; tuple fields
    take several values, bool fields are --flag / --no-flag. `validate` checks the values, after parsing."""
    p = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        base = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        shown = f.metadata.get("default", shown)
        shown = shown(config_cls) if callable(shown) else shown
        help = "; ".join(filter(None, (f.metadata.get("help"), f"default: {shown}"))).replace("%", "%%")
        if base[0] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        elif typing.get_origin(kind) is tuple:
            p.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], default=f.default, help=help)
        else:
            p.add_argument(flag, type=base[0], default=f.default, help=help)
    args = vars(p.parse_args(argv))
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main (distributed when launched so): a ConfigError becomes one stderr line and exit code 2; a
    failed collective of a multi-process job (another process died) one line and exit code 1."""
    try:
        maybe_init_distributed()
        main()
        if _watchdog:
            _watchdog.done()
    except jax.errors.JaxRuntimeError as e:
        if not jax.distributed.is_initialized():
            raise
        stop_job(f"a computation failed ({(str(e).splitlines() or [type(e).__name__])[0][:300]}); another "
                 "process probably died: see its log")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished runs are in the CSV; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


#### Plots #########################################################################################
def _curves(rows, x: str, facet: str | None):
    """{panel: {curve key: rows}}: one curve per distinct identity apart from x, facet and seed (never two setups)."""
    rest = [f for f in row_fields(rows) if f not in (x, facet, "seed")]
    panels: dict = {}
    for r in rows:
        panels.setdefault(r.get(facet) if facet else None, {}).setdefault(row_key(r, rest), []).append(r)
    return panels, rest


def plot_sweep(rows: list[dict], png_path, x: str, title: str, *, facet: str | None = None, logx=False,
               xlabel=None, y="test_accuracy", verdicts: list[dict] | None = None) -> list[str]:
    """Plots the seed mean of `y` against `x` with a ±1 sample-sd band (ddof = 1), one line per setup, one panel per
    `facet` value, diverged runs an x on the bottom axis, and `verdicts` in a last panel; returns the lines' labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, rest = _curves(rows, x, facet)
    fixed = {f: rows[0].get(f) for f in ("dataset", "model", "epochs", "train_subset", "label_noise")}
    title = (f"{title}, {fixed['dataset']} {fixed['model']}, {float(fixed['epochs']):g} epochs, "
             f"seeds: {len({r['seed'] for r in rows})}")
    extra = 1 if verdicts else 0
    fig, axes = plt.subplots(1, len(panels) + extra, figsize=(5.4 * (len(panels) + extra), 4.2), squeeze=False)
    if extra:
        plot_contrasts(axes[0][-1], verdicts, x, logx, xlabel or x)
    labels = []
    for ax, (panel, curves) in zip(axes[0], sorted(panels.items(), key=lambda kv: str(kv[0]))):
        differ = varying([r[0] for r in curves.values()], rest)
        for key, runs in curves.items():
            label = ", ".join(runs[0][f] if f in ("activation", "method") else f"{f}={runs[0][f]}" for f in differ)
            ok = lambda r: r["diverged"] != "True" and math.isfinite(float(r[y]))  # noqa: E731
            xs = sorted({float(r[x]) for r in runs})
            vals = [[float(r[y]) for r in runs if float(r[x]) == v and ok(r)] for v in xs]
            mean = np.array([np.mean(v) if v else np.nan for v in vals])
            sd = np.array([np.std(v, ddof=1) if len(v) > 1 else np.nan for v in vals])
            (line,) = ax.plot(xs, mean, marker="o", label=label or None)
            labels.append(label)
            ax.fill_between(xs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
            bad = [float(r[x]) for r in runs if not ok(r)]
            if bad:
                ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), transform=ax.get_xaxis_transform(),
                        clip_on=False, markersize=9, label=f"{label}: diverged")
        if logx:
            positive = [float(r[x]) for rs in curves.values() for r in rs if float(r[x]) > 0]
            ax.set_xscale("symlog", linthresh=min(positive or [1.0]))
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(f"{y.replace('_', ' ')} (mean ± 1 sample sd)")
        ax.set_title(title if facet is None else f"{title}\n{facet} = {panel}", fontsize=9)
        ax.grid(alpha=0.3)
        if any(ax.get_legend_handles_labels()[1]):
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return labels


def plot_contrasts(ax, verdicts: list[dict], x: str, logx: bool, xlabel: str) -> None:
    """Each claim's contrast and 95% interval against the `x` its `at` names: filled reproduced, X contradicted."""
    series: dict = {}
    for line in verdicts:
        at = dict(part.split("=", 1) for part in line["at"].split(", ") if "=" in part)
        if x in at and math.isfinite(float(line["mean"])):
            rest = ", ".join(f"{k}={v}" for k, v in at.items() if k != x)
            series.setdefault(f"{line['contrast']}" + (f" ({rest})" if rest else ""), []).append((float(at[x]), line))
    for i, (label, points) in enumerate(sorted(series.items())):
        points.sort(key=lambda p: p[0])
        xs = np.array([p[0] for p in points]) * (1 + 0.04 * (i - (len(series) - 1) / 2))  # side by side
        mean = np.array([float(p[1]["mean"]) for p in points])
        err = np.array([[m - float(p[1]["lo"]), float(p[1]["hi"]) - m] for m, p in zip(mean, points)]).T
        (line,) = ax.plot(xs, mean, label=label, lw=1)
        ax.errorbar(xs, mean, yerr=np.nan_to_num(err), fmt="none", color=line.get_color(), capsize=3)
        for xv, m, (_, v) in zip(xs, mean, points):
            style = {"reproduced": dict(marker="o"), "contradicted": dict(marker="X", markersize=9)}.get(
                v["verdict"], dict(marker="o", markerfacecolor="white"))
            ax.plot([xv], [m], color=line.get_color(), **style)
    ax.axhline(0.0, color="black", lw=0.8)
    if logx:
        ax.set_xscale("log")
    ticks = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("paired contrast, pt (95% interval)")
    ax.set_title("claims: filled reproduced, hollow inconclusive, X contradicted", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


#### Verdicts (MATH.md §7) #########################################################################
# A seed fixes initialisation and batch order, so runs sharing one are paired: a claim is a per-seed contrast (MATH.md
# §7). Rows of different setups are never averaged: a term matching two rows for one seed is an error, not a mean.
@dataclasses.dataclass(frozen=True)
class Contrast:
    """A per-seed paired contrast summarised over seeds (MATH.md §7), in accuracy points. values: seed → contrast, in
    increasing seed order; n = len(values); mean (NaN when n = 0); sd, with ddof = 1; half = t_{0.975, n−1} · sd / √n;
    [lo, hi] = mean ∓ half (NaN when n < 2). Seeds dropped: missing (a term has no row), diverged (or non-finite)."""
    values: dict[int, float]
    n: int
    mean: float
    sd: float
    half: float
    lo: float
    hi: float
    missing: int = 0
    diverged: int = 0


# Measured columns: rows differing only in these are repeated runs of one setup; naming them cannot narrow a selector.
_OUTCOME_COLUMNS = frozenset(METRICS)


def _canonical(v) -> float | str:
    """v as a float when it parses as one (so 0.1, "0.1" and "1e-1" are one value), else as a str."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _matches(row: dict, selector: dict) -> bool:
    """Whether the row has every selector value: as numbers when both sides parse as floats, else as strings."""
    return all(_canonical(row.get(k)) == _canonical(v) for k, v in selector.items())


def _value(row: dict, y: str) -> float:
    """The row's y as a float, NaN when the run diverged or y is missing, empty or non-finite."""
    if str(row.get("diverged", "False")) == "True":
        return math.nan
    v = _canonical(row.get(y))
    return v if isinstance(v, float) and math.isfinite(v) else math.nan


def _summarize(values: dict[int, float], missing: int, diverged: int) -> Contrast:
    """The Contrast of per-seed values given in increasing seed order."""
    v, n, nan = np.array(list(values.values()), dtype=float), len(values), math.nan
    mean = float(v.mean()) if n else nan
    sd = float(v.std(ddof=1)) if n >= 2 else nan
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n >= 2 else nan
    return Contrast(values, n, mean, sd, half, mean - half, mean + half, missing, diverged)


def gain_terms(a: dict, b: dict, x: str, at, base=0.0) -> list:
    """Terms of gain(a, at) − gain(b, at), where gain(s, at) = accuracy(s, x = at) − accuracy(s, x = base)."""
    return [(+1, a | {x: at}), (-1, a | {x: base}), (-1, b | {x: at}), (+1, b | {x: base})]


def contrast(rows: list[dict], terms, *, y: str = "test_accuracy") -> Contrast:
    """The paired contrast Σ coef · 100 · y(row) per seed (MATH.md §7); terms: (coef, {column: value}) pairs. A seed
    enters when every term has a finite, undiverged row for it; others count as `missing` (first) or `diverged`.
    ValueError when a selector names an absent column or matches several rows for a seed (naming their differences)."""
    if not terms:
        raise ValueError("contrast: no terms")
    columns = set().union(*(r.keys() for r in rows))
    by_term = []  # per term: seed → its matching rows
    for coef, selector in terms:
        unknown = sorted(set(selector) - columns)
        if unknown:
            raise ValueError(f"contrast: selector {selector} names columns absent from every row: {unknown}")
        seeds: dict[int, list[dict]] = {}
        for r in rows:
            if _matches(r, selector):
                seeds.setdefault(int(r["seed"]), []).append(r)
        for seed, group in seeds.items():
            if len(group) > 1:
                differ = [c for c in group[0] if c not in _OUTCOME_COLUMNS and c != y
                          and len({_canonical(r.get(c)) for r in group}) > 1]
                why = (f"they differ in {', '.join(differ)}: add those columns to the selector" if differ
                       else "they are identical in every setup column (repeated runs of one setup)")
                raise ValueError(f"contrast: selector {selector} matches {len(group)} rows for seed {seed}; " + why)
        by_term.append({s: g[0] for s, g in seeds.items()})
    values, missing, diverged = {}, 0, 0
    for seed in sorted(set().union(*by_term)):
        if any(seed not in t for t in by_term):
            missing += 1
            continue
        ys = [_value(t[seed], y) for t in by_term]
        if not all(math.isfinite(v) for v in ys):
            diverged += 1
            continue
        values[seed] = 100.0 * math.fsum(float(coef) * v for (coef, _), v in zip(terms, ys))
    return _summarize(values, missing, diverged)


def first_seeds(c: Contrast, n: int) -> Contrast:
    """c restricted to its n lowest seeds (all when n ≥ c.n), keeping c's counts of seeds dropped."""
    if n < 0:
        raise ValueError(f"first_seeds: n must be >= 0, got {n}")
    return _summarize({s: c.values[s] for s in sorted(c.values)[:n]}, c.missing, c.diverged)


DIRECTIONS = (">0", "<0", "~0")
EQUIVALENCE_BAND = 0.5  # accuracy points: a "~0" claim is reproduced when its interval lies within ±this


def verdict(c: Contrast, direction: str) -> str:
    """The verdict, "reproduced", "contradicted" or "inconclusive", on a claim that a contrast is > 0, < 0 or ~0:
    ">0" reproduced when lo > 0, contradicted when hi < 0; "<0" mirrored; "~0" reproduced when [lo, hi] lies within
    ±EQUIVALENCE_BAND, contradicted when lo > band or hi < −band. Inconclusive otherwise and when n < 2 (MATH.md §7)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"verdict: direction must be one of {DIRECTIONS}, got {direction!r}")
    lo, hi, band = c.lo, c.hi, EQUIVALENCE_BAND
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if direction == ">0":
        return "reproduced" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"
    if direction == "<0":
        return "reproduced" if hi < 0 else "contradicted" if lo > 0 else "inconclusive"
    if -band <= lo and hi <= band:
        return "reproduced"
    return "contradicted" if lo > band or hi < -band else "inconclusive"


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim of the paper as a contrast (MATH.md §7): name ("Fig. 2"), label ("gain(gelu) − gain(relu)"), at
    ("rho=0.1"), terms (as in contrast()), direction, seeds judged on (None: all; else those not used to choose it)."""
    name: str
    label: str
    at: str
    terms: tuple
    direction: str
    seeds: tuple | None = None

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"Claim {self.name}: direction must be one of {DIRECTIONS}, got {self.direction!r}")


VERDICT_COLUMNS = ("claim", "contrast", "at", "direction", "n", "mean", "lo", "hi", "missing", "diverged",
                   "n2", "mean2", "lo2", "hi2", "verdict")


def judge(rows: list[dict], claims) -> list[dict]:
    """One dict (keys VERDICT_COLUMNS) per claim and setup: the contrast over rows, the same over its n2 = max(n − 2, 0)
    lowest seeds (NaN when n2 < 2), and verdict() at n seeds if it agrees at n2, else "inconclusive": a verdict two
    more seeds change is not one (MATH.md §7). Where rows sweep a field no term names, it is judged per value (`at`)."""
    lines = []
    for claim in claims:
        named = sorted({k for _, selector in claim.terms for k in selector})
        cells: dict = {}  # rows per value of the named fields
        for r in rows:
            cells.setdefault(row_key(r, named), []).append(r)
        # fields swept apart from the named ones (not merely following them, as fig3's ρ follows the method)
        extra = [f for f in varying(rows, row_fields(rows)[1:])
                 if f not in named and any(len(varying_field(c, f)) > 1 for c in cells.values())]
        groups: dict = {}
        for r in rows:
            if claim.seeds is None or int(r["seed"]) in claim.seeds:
                groups.setdefault(tuple(r.get(f, defaults()[f]) for f in extra), []).append(r)
        for values, sub in groups.items():
            c = contrast(sub, claim.terms)
            early = first_seeds(c, max(c.n - 2, 0))
            ok = early.n >= 2
            final = verdict(c, claim.direction)
            stable = final if final == verdict(early, claim.direction) else "inconclusive"
            at = ", ".join([claim.at] * bool(claim.at) + [f"{f}={v}" for f, v in zip(extra, values)])
            lines.append({"claim": claim.name, "contrast": claim.label, "at": at,
                          "direction": claim.direction, "n": c.n, "mean": c.mean, "lo": c.lo, "hi": c.hi,
                          "missing": c.missing, "diverged": c.diverged, "n2": early.n,
                          "mean2": early.mean if ok else math.nan, "lo2": early.lo if ok else math.nan,
                          "hi2": early.hi if ok else math.nan, "verdict": stable})
    return lines


def write_verdicts(path, lines: list[dict]) -> None:
    """Writes judge()'s lines as a CSV with columns VERDICT_COLUMNS, floats to 4 significant digits (or "nan")."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(VERDICT_COLUMNS)
        w.writerows([cell(line[k]) for k in VERDICT_COLUMNS] for line in lines)


def _signed(v: float) -> str:
    """v to 2 decimals with its sign, "+" or "−" (U+2212); "nan" when undefined."""
    return "nan" if math.isnan(v) else f"{v:+.2f}".replace("-", "\u2212")


def format_verdict(line: dict) -> str:
    """One human line for a judge() line (or one read back from write_verdicts' CSV), e.g. "Fig. 2 gain(gelu) −
    gain(relu) at rho=0.1: +0.19 pt [−0.11, +0.49], n = 5 (n − 2: +0.37 [+0.33, +0.41]) -> inconclusive"."""
    f = {k: float(line[k]) for k in ("mean", "lo", "hi", "mean2", "lo2", "hi2")}
    missing, diverged = int(line["missing"]), int(line["diverged"])
    dropped = f", dropped {missing} unpaired + {diverged} diverged" if missing or diverged else ""
    early = ("n − 2: too few seeds" if math.isnan(f["mean2"]) else
             f"n − 2: {_signed(f['mean2'])} [{_signed(f['lo2'])}, {_signed(f['hi2'])}]")
    at = f" at {line['at']}" if line["at"] else ""
    interval = f"{_signed(f['mean'])} pt [{_signed(f['lo'])}, {_signed(f['hi'])}]"
    return (f"{line['claim']} {line['contrast']}{at}: {interval}, n = {line['n']}{dropped} ({early})"
            f" -> {line['verdict']}")


def report_verdicts(rows: list[dict], claims, path) -> list[dict]:
    """Judge the claims, print one line each and write them to `path` (CSV), leaving out claims absent from rows."""
    lines = [line for line in judge(rows, claims) if line["n"] or line["diverged"]]
    for line in lines:
        print(format_verdict(line), flush=True)
    write_verdicts(path, lines)
    return lines


#### A figure script's main ######################################################################
# A figure script: a Config extending Flags (the sweep's values), its runs' TrainConfigs, a plot and claims. A CSV row
# holds the run's whole identity, so a copied script sweeping any field resumes, plots and judges it as its own.
def require_accelerator(flags) -> None:
    """A ConfigError on a paper setup where JAX sees only the CPU (weeks), unless --allow-cpu, --smoke, --plot-only."""
    if (flags.dataset in PAPER_SETUPS and jax.default_backend() == "cpu"
            and not (flags.allow_cpu or flags.smoke or flags.plot_only)):
        raise ConfigError(f"--dataset {flags.dataset}: JAX sees only the CPU here, and the paper setup would take "
                          "weeks on it; install the accelerator build (uv run --extra cuda13 | cuda12 | tpu ...) "
                          "or pass --allow-cpu")


def run_script(script: str, config_cls, make_runs: Callable, plot: Callable, doc: str, argv=None, *,
               claims: Callable | None = None, runner: Callable | None = None) -> None:
    """A figure script's main: flags -> runs -> CSV -> plot -> verdicts. make_runs(cfg, base): one seed's TrainConfigs;
    plot(rows, png_path, verdicts); claims(cfg, rows): the Claims (rows: for settings the data choose), judged into
    <name>.verdict.csv; runner(flags, base, out): trains one (TrainConfig, seed, RunOptions) into a row (train_row)."""
    flags = parse_config(config_cls, argv, doc)
    base, opts = resolve(flags)
    name = Path(script).stem
    seeds = seed_count(flags)
    require_accelerator(flags)
    use_compile_cache(flags.compile_cache)
    settings = make_runs(flags, base)
    if flags.smoke:
        settings, seeds = smoke_runs(settings), 1
    for tc in dict.fromkeys(settings):
        validate(tc)  # every bad value fails now, not hours into the sweep
    lead = jax.process_index() == 0  # writes every file; the others only train
    default = default_out(script, f"{base.dataset}-{base.model}")
    out = output_dir(flags.out, default) if lead else Path(flags.out or default)
    csv_path, png_path = out / f"{name}.csv", out / f"{name}.png"
    if not flags.plot_only:
        if lead:
            check_setup(csv_path, settings)
            write_config(out, name, flags, base)
        runs = [(tc, s) for s in range(flags.first_seed, flags.first_seed + seeds) for tc in settings]
        sweep(csv_path, runs, opts, runner(flags, base, out) if runner else train_row)
    if lead:
        rows = read_rows(csv_path)
        if not rows:
            raise ConfigError(f"--out: no results in {csv_path}" + (" to plot" if flags.plot_only else ""))
        verdicts = report_verdicts(rows, claims(flags, rows), out / f"{name}.verdict.csv") if claims else []
        plot(rows, png_path, verdicts)
        print(f"{name}: plotted {png_path}")

