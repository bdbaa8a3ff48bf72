"""Library for the reproduction of Dauphin, Agarwala & Mobahi (2024), "Neglected Hessian component
explains mysteries in Sharpness regularization" (arXiv 2401.10809).

Sections: activations, curvature, update rules, models, data, train step, results I/O.
Quantities and paper errata are defined in SPEC.md; equation numbers are the paper's.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import gzip
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import pickle
import re
import sys
import tarfile
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
from absl import flags as absl_flags
from jax.scipy.special import erfc
from PIL import Image

PyTree = Any
Act = Callable[[jax.Array], jax.Array]


class ConfigError(Exception):
    """Bad user input; a script turns it into one line on stderr and exit code 2."""


#### Activations (Sections 4.3-4.4, SPEC section 2) ###############################################
# Each is an elementwise Callable whose value and first two AD derivatives are exactly SPEC's table
# under every AD path. The custom ones use jax.custom_jvp (a custom_vjp has no forward mode and
# would break the forward-over-reverse HVP); their JVP rules call a second custom-JVP function for
# the tangent, so that differentiating the rule once more gives the second derivative we define.

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _pdf(x):
    return _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)


def _cdf(x):
    return 0.5 * erfc(-x / _SQRT2)  # erfc keeps the left tail accurate (no 1 − 1 cancellation)


def _gelu(x):
    return x * _cdf(x)  # the exact erf form; jax.nn.gelu defaults to the tanh approximation


def _beta_gelu(beta):
    def f(x):
        return x * _cdf(beta * x)  # φ'' = β φ(βx)(2 − β²x²) by autodiff (Eq. 14 corrected)

    return f


def _relu_aug(beta):
    @jax.custom_jvp
    def step(x):
        return jnp.where(x > 0, 1.0, 0.0).astype(jnp.result_type(x))  # Θ(x), Θ(0) = 0

    @step.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return step(x), beta * _pdf(beta * x) * t  # Eq. 15: D_AD[Θ] = β φ(βx), unit integral

    @jax.custom_jvp
    def f(x):
        return jnp.maximum(x, 0)

    @f.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), step(x) * t

    return f


def _gelu_dim():
    @jax.custom_jvp
    def slope(x):
        return _cdf(x) + x * _pdf(x)  # GELU'(x)

    @slope.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return slope(x), jnp.zeros_like(t)  # Eq. 16: D_AD[GELU'] = 0

    @jax.custom_jvp
    def f(x):
        return _gelu(x)

    @f.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), slope(x) * t

    return f


ACTIVATIONS = ("relu", "gelu", "beta_gelu", "relu_aug", "gelu_dim")


@functools.cache
def activation(name: str, beta: float = 1.0) -> Callable[[jax.Array], jax.Array]:
    """The elementwise nonlinearity `name`; `beta` is the width parameter of beta_gelu and relu_aug.
    Cached: one function object per (name, beta), so compiled steps are reused across runs."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"--activation: unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
    if name in ("beta_gelu", "relu_aug") and not beta > 0:
        raise ConfigError(f"--beta must be > 0, got {beta}")
    beta = float(beta)
    return {
        "relu": lambda: jax.nn.relu,  # custom JVP in JAX: Θ(0) = 0 and a zero second derivative
        "gelu": lambda: _gelu,
        "beta_gelu": lambda: _beta_gelu(beta),
        "relu_aug": lambda: _relu_aug(beta),
        "gelu_dim": _gelu_dim,
    }[name]()


#### Curvature (Eq. 2, SPEC section 1) #############################################################
# All for the batch-mean softmax cross-entropy; vectors are parameter pytrees. Nothing materialises
# a matrix: each product costs a small constant number of forward/backward passes.


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


def nmevp(logits_fn: Callable, labels: jax.Array, params: PyTree, v: PyTree) -> PyTree:
    """Nonlinear Modeling Error product (H − GN) v = Σ ∇_z L · ∇²_θ z v (Eq. 2, second term)."""
    loss = lambda p: cross_entropy(logits_fn(p), labels)
    return jax.tree.map(jnp.subtract, hvp(loss, params, v), gnvp(logits_fn, labels, params, v))


def hessian_trace_estimate(loss_fn: Callable, params: PyTree, key: jax.Array) -> jax.Array:
    """One Hutchinson sample εᵀHε, ε ~ N(0, I): unbiased for tr(H)."""
    eps = tree_normal(key, params)
    return tree_dot(eps, hvp(loss_fn, params, eps))


def gn_trace_estimate(logits_fn: Callable, params: PyTree, key: jax.Array) -> jax.Array:
    """One sample of T̂ = B ‖∇_θ L0(θ, ŷ)‖², ŷ ~ Cat(softmax z) (Wei et al. 2020; Eq. 20).

    For the batch-mean loss, E‖∇L0(θ, ŷ)‖² = tr(GN)/B (cross terms between examples vanish), so the
    factor B makes T̂ unbiased for tr(GN) of the mean loss (SPEC erratum to Eq. 20).
    """
    z = jax.lax.stop_gradient(logits_fn(params))
    y_hat = jax.random.categorical(key, z.astype(jnp.float32))
    g = jax.grad(lambda p: cross_entropy(logits_fn(p), y_hat))(params)
    return z.shape[0] * tree_dot(g, g)


#### Update rules (SPEC section 3) #################################################################
# Every rule is rule(loss_fn, params, state, batch, key, hp) -> Step, where
#   loss_fn(params, state, batch) -> (mean cross-entropy L0, (new_state, logits))
# runs the model in training mode (BatchNorm on batch statistics), batch = (x, y), and hp is a dict
# of scalar arrays (rho, sigma2) so that a sweep compiles once. The direction is the gradient of
# the rule's objective before weight decay and momentum; `state` is the BatchNorm state to keep:
# from the pass at the unperturbed θ, except for weight_noise (SPEC section 3).


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


def gp(loss_fn, params, state, batch, key, hp, *, p: int = 1) -> Step:
    """Gradient penalty L0 + ρ‖g‖^p by exact autodiff (Eq. 7-8, 46-47).

    p=1 (penalty SAM): g + ρ H g/‖g‖;  p=2 (penalty USAM): g + 2ρ H g. The Hessian-vector product
    is forward-over-reverse (`hvp`; its primal gradient is the clean pass, merged by XLA). Double
    backprop of the penalised objective costs the same FLOPs and 2% less memory, but runs 1.6×
    slower on CPU, whose convolutions are slow in the transposed forms it needs (bench.py). A
    finite-difference HVP would turn this into SAM and remove the NME effect the paper studies.
    """
    if p not in (1, 2):
        raise ValueError(f"gp: p must be 1 or 2, got {p}")
    loss, new_state, g = _grad(loss_fn, params, state, batch)
    norm = jnp.sqrt(jnp.maximum(tree_dot(g, g), 1e-30))  # finite at g = 0
    u = jax.tree.map(lambda x: x / norm if p == 1 else 2 * x, g)  # ∂‖g‖^p/∂g
    hu = hvp(_scalar(loss_fn, state, batch), params, u)
    return Step(jax.tree.map(lambda a, b: a + hp["rho"] * b, g, hu), new_state, loss)


def gp1(loss_fn, params, state, batch, key, hp) -> Step:
    return gp(loss_fn, params, state, batch, key, hp, p=1)


def gp2(loss_fn, params, state, batch, key, hp) -> Step:
    return gp(loss_fn, params, state, batch, key, hp, p=2)


def _perturbed_grad(loss_fn, params, state, batch, delta):
    shifted = jax.tree.map(lambda w, d: w + d.astype(w.dtype), params, jax.lax.stop_gradient(delta))
    return jax.grad(_scalar(loss_fn, state, batch))(shifted)


def sam(loss_fn, params, state, batch, key, hp) -> Step:
    """SAM (Eq. 42): ∇L0(θ + ρ g/‖g‖); BatchNorm state from the clean pass."""
    loss, new_state, g = _grad(loss_fn, params, state, batch)
    norm = tree_norm(g)
    delta = jax.tree.map(lambda x: x * (hp["rho"] / jnp.maximum(norm, 1e-12)).astype(x.dtype), g)
    return Step(_perturbed_grad(loss_fn, params, state, batch, delta), new_state, loss)


def usam(loss_fn, params, state, batch, key, hp) -> Step:
    """Unnormalised SAM (Eq. 43): ∇L0(θ + ρ g)."""
    loss, new_state, g = _grad(loss_fn, params, state, batch)
    delta = jax.tree.map(lambda x: x * jnp.asarray(hp["rho"], x.dtype), g)
    return Step(_perturbed_grad(loss_fn, params, state, batch, delta), new_state, loss)


def weight_noise(loss_fn, params, state, batch, key, hp) -> Step:
    """One-sample gradient of E_ε L0(θ+ε), ε ~ N(0, σ²I) (Eq. 17); ≈ L0 + (σ²/2) tr(H).

    Its single pass is at θ+ε and also provides the BatchNorm statistics: a clean pass would cost a
    third of a step for nothing.
    """
    std = jnp.sqrt(hp["sigma2"])
    noisy = jax.tree.map(lambda w, e: w + (std * e).astype(w.dtype), params, tree_normal(key, params))
    loss, state, g = _grad(loss_fn, noisy, state, batch)
    return Step(g, state, loss)


def _hashable(v):
    try:
        hash(v)
        return v
    except TypeError:
        return ("id", id(v))


def cse(fn: Callable) -> Callable:
    """fn traced to a jaxpr, equations that repeat a pure computation on the same inputs merged
    (common-subexpression elimination), and evaluated: the same values and derivatives as fn.

    Nested JVPs compute the first-order stream twice: the inner JVP's tangent ẋ and the outer JVP's
    tangent x′ of the primal are the same numbers. XLA merges the two forward copies, but reverse
    mode through the nested JVPs gives each copy its own cotangent and its own backward pass;
    merging them in the jaxpr first leaves three streams for reverse mode instead of four
    (hessian_trace: 5.3× → 4.3× sgd FLOPs, bench.py --analyze). Equations with effects stay, and so
    do repeated custom-JVP calls, whose rules are distinct objects on each call.
    """

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
        out = jax.core.eval_jaxpr(jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return merged


def hessian_trace(loss_fn, params, state, batch, key, hp) -> Step:
    """L0 + (σ²/2) tr(H) with one Hutchinson sample (Eq. 19; σ²/2 per SPEC erratum to Eq. 17).

    εᵀH(θ)ε is the second directional derivative of L0 along ε (forward-over-forward); one reverse
    pass through the nested JVPs, their repeated first-order stream merged (`cse`), differentiates
    L0 + (σ²/2) εᵀHε (third order in L0), so the clean gradient costs no pass of its own.
    """
    eps = tree_normal(key, params)

    def along(w):  # (L0, ∂_ε L0), BatchNorm state
        loss, d1, new_state = jax.jvp(lambda q: _split(loss_fn(q, state, batch)), (w,), (eps,), has_aux=True)
        return (loss, d1), new_state

    def objective(w):
        (loss, _), (_, d2), new_state = jax.jvp(along, (w,), (eps,), has_aux=True)
        return loss + 0.5 * hp["sigma2"] * d2, (loss, new_state)

    direction, (loss, new_state) = jax.grad(cse(objective), has_aux=True)(params)
    return Step(direction, new_state, loss)


def gn_trace(loss_fn, params, state, batch, key, hp) -> Step:
    """L0 + (σ²/2) tr(GN) with the sampled-label estimator T̂ = B‖∇L0(θ, ŷ)‖² (Eq. 19-21).

    ŷ ~ Cat(softmax z) from the clean pass, held fixed (stop_gradient). Double backprop through T̂
    gives ∇T̂ = 2B H_ŷ g_ŷ, an exact Hessian (GN + NME of the sampled labels, Section 5.3). The
    sampled-label gradient is pulled back through the clean pass's own graph, so that the outer
    reverse pass runs through one forward pass, not two (3.6× → 3.0× sgd FLOPs, bench.py --analyze).
    """

    def logits(w):
        loss, (new_state, z) = loss_fn(w, state, batch)
        return z, (loss, new_state)

    def objective(w):
        z, pullback, (loss, new_state) = jax.vjp(logits, w, has_aux=True)
        y_hat = jax.random.categorical(key, jax.lax.stop_gradient(z).astype(jnp.float32))
        (g_hat,) = pullback(jax.grad(cross_entropy)(z, y_hat))
        return loss + 0.5 * hp["sigma2"] * z.shape[0] * tree_dot(g_hat, g_hat), (loss, new_state)

    direction, (loss, new_state) = jax.grad(objective, has_aux=True)(params)
    return Step(direction, new_state, loss)


RULES: dict[str, Callable[..., Step]] = {
    "sgd": sgd,
    "gp_p1": gp1,
    "gp_p2": gp2,
    "sam": sam,
    "usam": usam,
    "weight_noise": weight_noise,
    "hessian_trace": hessian_trace,
    "gn_trace": gn_trace,
}


def rule(name: str) -> Callable[..., Step]:
    if name not in RULES:
        raise ConfigError(f"--method: unknown method {name!r}; accepted: {', '.join(RULES)}")
    return RULES[name]


#### Models ########################################################################################
# Every model is called on ONE channel-first example: model(x [C,H,W], state, *, key=None) ->
# (logits [num_classes], state); `apply` vmaps it over the batch with axis_name="batch", which is
# the axis BatchNorm reduces over. Every nonlinearity is the `act` passed in (max pooling in the
# ResNet stem excepted, as the architecture prescribes), so that swapping the activation swaps the
# network's whole second-order behaviour. Convolutions: Kaiming-normal fan_out (torchvision, and the
# WRN reference), no bias. Linear heads: Equinox's default U(±1/√fan_in) weight (PyTorch's default,
# which torchvision keeps), zero bias (WRN reference); a zero weight would make the
# Gauss-Newton/NME split degenerate at initialisation.


class BN(eqx.Module):
    """BatchNorm whose statistics and running state are fp32 whatever the dtype of x or of the affine
    parameters (the train step may cast weights to bf16; the running state must not follow).

    Training mode normalises by the mean and biased variance over the batch (the vmapped "batch"
    axis) and the spatial axes, and updates zero-initialised running averages (momentum 0.9).
    Inference mode (eqx.nn.inference_mode) uses their debiased values m / (1 − 0.9ⁿ) after n
    updates; before any update, mean 0 and variance 1.

    The output is (x − μ)·rsqrt(σ² + ε), not Equinox's (x − μ)/√(σ² + ε): reverse mode through the
    division keeps more residuals (wrn16_4 at batch 32: sgd peak 456 → 398 MiB, gp 2.10× → 2.00× of
    sgd), and XLA's CSE does not merge the repeated first-order stream of nested JVPs through it.
    """

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


# Eagerly, each distinct shape passed to jax.random costs an XLA compile of the generator (~3 s on
# CPU; dozens per network), and so does each Equinox layer's own default init. So weights are cut
# from fixed-size draws of one compiled generator, and layers are built abstractly (eval_shape, no
# compute) before their weights are set.
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
    act: Act = eqx.field(static=True)
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
    act: Act = eqx.field(static=True)
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
    act: Act = eqx.field(static=True)

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
    """WRN block: BN-act-conv3x3-BN-act-conv3x3; a 1x1 conv on the activated input where the shape
    changes (as in the reference implementation), else the identity."""

    bn1: BN
    conv1: eqx.nn.Conv2d
    bn2: BN
    conv2: eqx.nn.Conv2d
    short: eqx.nn.Conv2d | None
    act: Act = eqx.field(static=True)

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
    act: Act = eqx.field(static=True)

    def __init__(self, depth, width, num_classes, act, key, in_channels=3):
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise ConfigError(f"--model: WRN needs depth = 6n+4 >= 10 (10, 16, 22, 28, 40, ...) and width >= 1, got "
                             f"depth {depth}, width {width}")
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
    """(conv3x3-BN-act) x2 at `width`, 2x2 pool, (conv3x3-BN-act) x2 at 2*width, 2x2 pool, global
    pool, linear. Average pooling keeps the activation the network's only nonlinearity."""

    convs: tuple
    pool: eqx.nn.AvgPool2d
    fc: eqx.nn.Linear
    act: Act = eqx.field(static=True)

    def __init__(self, width, num_classes, act, key, in_channels=3):
        if width < 1:
            raise ConfigError(f"--model: cnn width must be >= 1, got {width}")
        k = _keys(key, 5)
        w2 = 2 * width
        self.convs = (ConvBN(in_channels, width, 3, 1, k[0]), ConvBN(width, width, 3, 1, k[1]),
                      ConvBN(width, w2, 3, 1, k[2]), ConvBN(w2, w2, 3, 1, k[3]))
        self.pool = eqx.nn.AvgPool2d(2, 2)
        self.fc = _linear(w2, num_classes, k[4])
        self.act = act

    def __call__(self, x, state, *, key=None):
        for i, c in enumerate(self.convs):
            x, state = c(x, state)
            x = self.act(x)
            if i % 2:
                x = self.pool(x)
        return self.fc(_pool(x)), state


class Tiny(eqx.Module):
    """conv3x3(8)-BN-act, global pool, linear: for fast tests."""

    conv: ConvBN
    fc: eqx.nn.Linear
    act: Act = eqx.field(static=True)

    def __init__(self, num_classes, act, key, in_channels=3):
        k1, k2 = _keys(key, 2)
        self.conv = ConvBN(in_channels, 8, 3, 1, k1)
        self.fc = _linear(8, num_classes, k2)
        self.act = act

    def __call__(self, x, state, *, key=None):
        x, state = self.conv(x, state)
        return self.fc(_pool(self.act(x))), state


class MLP(eqx.Module):
    """Image resized to 14x14 (any input size), flattened, then (linear-BN-act) x2 at `width`, linear.

    The CPU-scale model of the figure scripts: matrix products are far cheaper than convolutions on
    a CPU, and the activation is still the network's only nonlinearity.
    """

    hidden: tuple
    norms: tuple
    fc: eqx.nn.Linear
    act: Act = eqx.field(static=True)

    def __init__(self, width, num_classes, act, key, in_channels=3):
        if width < 1:
            raise ConfigError(f"--model: mlp width must be >= 1, got {width}")
        k = _keys(key, 3)
        # BN follows each hidden layer, so their biases would be redundant: weights only.
        lin = lambda cin, cout, kk: eqx.tree_at(lambda m: m.bias, _linear(cin, cout, kk), None,
                                                is_leaf=lambda x: x is None)
        self.hidden = (lin(in_channels * 14 * 14, width, k[0]), lin(width, width, k[1]))
        self.norms = (BN(width), BN(width))
        self.fc = _linear(width, num_classes, k[2])
        self.act = act

    def __call__(self, x, state, *, key=None):
        x = jax.image.resize(x, (x.shape[0], 14, 14), "linear", antialias=True).reshape(-1)
        for lin, bn in zip(self.hidden, self.norms):
            x, state = bn(lin.weight @ x, state)
            x = self.act(x)
        return self.fc(x), state


def _build(name: str, num_classes: int, act: Act, key, in_channels: int):
    if name == "resnet50":
        return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, act, key, in_channels)
    if name == "resnet18":
        return ResNet(Basic, (2, 2, 2, 2), num_classes, act, key, in_channels)
    if name == "tiny":
        return Tiny(num_classes, act, key, in_channels)
    if m := re.fullmatch(r"wrn(\d+)_(\d+)", name):
        return WRN(int(m[1]), int(m[2]), num_classes, act, key, in_channels)
    if m := re.fullmatch(r"cnn(\d+)", name):
        return CNN(int(m[1]), num_classes, act, key, in_channels)
    if m := re.fullmatch(r"mlp(\d+)", name):
        return MLP(int(m[1]), num_classes, act, key, in_channels)
    raise ConfigError(f"--model: unknown model {name!r}; accepted: resnet50, resnet18, "
                      "wrn<depth>_<width> (e.g. wrn28_10), cnn<width>, mlp<width>, tiny")


def make_model(name: str, num_classes: int, activation: Act, key, *, in_channels: int = 3):
    """(model, state): `state` holds the BatchNorm running statistics (fp32)."""
    return eqx.nn.make_with_state(_build)(name, num_classes, activation, key, in_channels)


def apply(model, state, x):
    """Logits [B, num_classes] and the new state for a batch x [B, C, H, W]; BatchNorm reduces over
    the batch in training mode (use eqx.nn.inference_mode(model) for running statistics)."""
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)


def _is_param(x) -> bool:
    # Abstract leaves count too, so that both helpers work on eqx.filter_eval_shape output.
    return eqx.is_inexact_array(x) or (isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact))


def count_params(model) -> int:
    """Number of scalars in inexact-array leaves."""
    return sum(math.prod(a.shape) for a in jax.tree.leaves(model) if _is_param(a))


def decay_mask(model) -> PyTree:
    """Weight-decay mask, structured like eqx.filter(model, eqx.is_inexact_array): True on conv and
    linear weights, False on every other inexact array (BN gamma/beta, biases), None elsewhere.
    Accepts the full model or its filtered parameters (e.g. as an optax mask callable)."""
    is_layer = lambda x: isinstance(x, (eqx.nn.Conv, eqx.nn.Linear))  # noqa: E731

    def leaf(x):
        return False if _is_param(x) else None

    def node(x):
        if is_layer(x):
            return eqx.tree_at(lambda m: m.weight, jax.tree.map(leaf, x), True)
        return leaf(x)

    return jax.tree.map(node, model, is_leaf=is_layer)


#### Data ##########################################################################################
# Host side: Grain only shuffles, shards (by JAX process) and batches uint8 images (plus JPEG
# decoding for ImageNet); the small-image augmentation and normalisation run on the device inside
# the jitted step (`augment_small`, `normalize`).

DATASETS = ("fashion_mnist", "cifar10", "imagenet")


class DatasetSpec(NamedTuple):
    num_classes: int
    shape: tuple[int, int, int]  # H, W, C of the model input
    mean: tuple[float, ...]  # per channel, in 0..255 pixel units
    std: tuple[float, ...]  # per channel, in 0..255 pixel units


# Statistics of the training sets (ImageNet: the usual torchvision values).
DATASET_SPECS = {
    "fashion_mnist": DatasetSpec(10, (28, 28, 1), (72.940,), (90.021,)),
    "cifar10": DatasetSpec(
        10, (32, 32, 3), (125.307, 122.950, 113.865), (62.993, 62.089, 66.705)
    ),
    "imagenet": DatasetSpec(
        1000, (224, 224, 3), (123.675, 116.280, 103.530), (58.395, 57.120, 57.375)
    ),
}

FMNIST_DIR = Path(__file__).parent / "data" / "fashion-mnist"
# SHA-256 of the gz files as shipped in Debian's dataset-fashion-mnist package.
FMNIST_SHA256 = {
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
    # idx header: two zero bytes, dtype code 0x08 (uint8), ndim, then big-endian dims.
    if raw[:4] != bytes((0, 0, 8, ndim)):
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
            raise ConfigError(
                f"Fashion-MNIST file {path} is missing; restore data/fashion-mnist/ "
                "from the repo or point --data-dir at a folder with the four official gz files"
            )
        if _file_digest(path, "sha256") != want:
            raise ConfigError(
                f"Fashion-MNIST file {path} fails its SHA-256 check; restore it from "
                "the repo (see data/fashion-mnist/README.md) or fix --data-dir"
            )
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
            raise ConfigError(
                f"CIFAR-10 not found under {root} and the download failed ({e}); "
                f"download {CIFAR10_URL} (md5 {CIFAR10_MD5}), extract it and pass "
                "--data-dir pointing at the folder containing cifar-10-batches-py/"
            ) from None
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
        raise ConfigError("--dataset imagenet is streamed from disk; use imagenet_batches")
    raise ConfigError(f"--dataset {name!r} is unknown; choose one of {', '.join(DATASETS)}")


def _process_shard(batch_size):
    """(index, count, per-process batch size) of this JAX process."""
    count = jax.process_count()
    if batch_size <= 0 or batch_size % count:
        raise ConfigError(
            f"--batch-size {batch_size} must be a positive multiple of the "
            f"number of JAX processes ({count})"
        )
    return jax.process_index(), count, batch_size // count


# In-memory data: worker threads would only contend for the GIL.
_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def small_batches(x, y, batch_size, *, seed, num_epochs, start_step=0, shuffle=True):
    """Training batches (uint8 [b,H,W,C], int32 [b]), b = batch_size / processes.

    Every epoch is a fresh permutation (from seed and the epoch number, so the
    seed must be the same on every process) split across processes, its
    remainder dropped; num_epochs=None repeats forever.
    Starting at start_step yields exactly the tail of the stream started at 0,
    so a resumed run sees the batches it would have seen.
    """
    index, count, b = _process_shard(batch_size)
    n = len(x) - len(x) % count  # equal shards, so all processes take the same number of steps
    steps = n // count // b
    if steps == 0:
        raise ConfigError(f"--batch-size {batch_size} exceeds the {len(x)} training examples")

    # One vectorised permutation per epoch instead of Grain's per-element
    # shuffle, which costs ~5 ms per 128-example batch in Python.
    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(len(x)) if shuffle else np.arange(len(x))
        return order[:n][index::count]

    def get(step, _):
        epoch, i = divmod(step, steps)
        idx = epoch_order(epoch)[i * b : (i + 1) * b]
        return x[idx], y[idx]

    # The index seen by map_with_index is the global step, so slicing after it
    # resumes mid-epoch with the same permutation.
    ds = grain.MapDataset.range(steps).repeat(num_epochs).map_with_index(get)[start_step:]
    return iter(ds.to_iter_dataset(_NO_THREADS))


def eval_batches(x, y, batch_size):
    """Batches of this process's shard in order; the last one may be smaller.

    Shards are strided (process i gets examples i, i+P, ...) and cover every
    example exactly once; processes may differ by one example (and, rarely,
    one batch), so sum correct counts rather than averaging batch accuracies.
    """
    index, count, b = _process_shard(batch_size)
    idx = np.arange(index, len(x), count)

    def get(i):
        return x[idx[i * b : (i + 1) * b]], y[idx[i * b : (i + 1) * b]]

    ds = grain.MapDataset.range(-(-len(idx) // b)).map(get)
    return iter(ds.to_iter_dataset(_NO_THREADS))


def augment_small(key, x):
    """Per-example reflect-pad-4 random crop and horizontal flip of uint8 [B,H,W,C].

    Reflect padding as in common CIFAR trainers (the WRN code pads by reflection).
    """
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
    """Random-access (path, label) source; paths stored as one bytes array so
    the source pickles cheaply into each Grain worker."""

    def __init__(self, root, classes):
        rel, labels = [], []
        for label, wnid in enumerate(classes):
            d = root / wnid
            names = sorted(e.name for e in os.scandir(d) if e.is_file()) if d.is_dir() else []
            rel += [f"{wnid}/{n}" for n in names]
            labels += [label] * len(names)
        self.root = str(root)
        self.rel = np.array(rel, dtype=np.bytes_)
        self.labels = np.array(labels, np.int32)

    def __len__(self):
        return len(self.rel)

    def __getitem__(self, i):
        return os.path.join(self.root, self.rel[i].decode()), self.labels[i]


_logged_bad_images = set()  # per process: warn once per file, not once per epoch


def _open_rgb(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # forces the full decode inside the try
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
    # Fallback (as torchvision): the centred crop with the ratio clamped into range.
    if w / h < 3 / 4:
        cw, ch = w, min(h, round(w * 4 / 3))
    elif w / h > 4 / 3:
        cw, ch = min(w, round(h * 4 / 3)), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _imagenet_train(record, rng):
    path, label = record
    im = _open_rgb(path)
    if im is None:
        return None
    box = _random_resized_crop(im.width, im.height, rng)
    x = np.asarray(im.resize((224, 224), Image.BILINEAR, box=box))
    if rng.random() < 0.5:
        x = x[:, ::-1]
    return np.ascontiguousarray(x), np.int32(label)


def _imagenet_eval(record):
    path, label = record
    im = _open_rgb(path)
    if im is None:
        return None
    s = 256 / min(im.width, im.height)
    w, h = max(224, round(im.width * s)), max(224, round(im.height * s))
    im = im.resize((w, h), Image.BILINEAR)
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224))), np.int32(label)


def imagenet_batches(data_dir, split, batch_size, *, seed, num_epochs, start_step=0, workers=None):
    """Batches (uint8 [b,224,224,3], int32 [b]) from data_dir/{train,val}/<wnid>/*.JPEG.

    split "train": reshuffled each epoch, random-resized-crop + flip with
    randomness fixed by (seed, position in the stream), batches run across
    epoch boundaries. split "val": in order, one pass, resize-256 + centre
    crop, last batch may be smaller, num_epochs ignored. The seed must be the
    same on every JAX process. Unreadable images are logged and skipped;
    resuming at start_step is exact only if none was skipped before it, and
    only with the same number of workers.
    """
    layout = "--data-dir must contain train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
    if data_dir is None:
        raise ConfigError(f"--dataset imagenet needs --data-dir; {layout}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(data_dir)
    for d in (root / "train", root / "val"):
        if not d.is_dir():
            raise ConfigError(f"{d} does not exist; {layout}")
    classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
    source = _ImageFolder(root / split, classes)
    if len(source) == 0:
        raise ConfigError(f"no images under {root / split}; {layout}")
    index, count, b = _process_shard(batch_size)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(cpus or 1, 32)

    if workers > 0 and not absl_flags.FLAGS.is_parsed():
        # Grain 0.2.x reads an absl flag when starting workers and fails in
        # programs that never parse absl flags (google/grain#1355).
        absl_flags.FLAGS.mark_as_parsed()
    # PIL releases the GIL while decoding, so two threads per worker help;
    # to_iter_dataset drops the None of unreadable images.
    threads = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    ds = grain.MapDataset.source(source)
    if split == "train":
        n = len(source) - len(source) % count
        ds = ds.seed(seed).shuffle()[:n][index::count].repeat(num_epochs)
        # After the shard/repeat so each process and epoch draws new crops, and
        # before the resume slice so a resumed run draws the same ones.
        ds = ds.random_map(_imagenet_train)
        # Workers batch in shared memory, worker w from elements w, w+W, ...,
        # and take turns; so skip whole rounds of W batches by slicing and the
        # remaining batches by consuming them.
        rounds, rest = divmod(start_step, max(workers, 1))
        ds = ds[rounds * max(workers, 1) * b :].to_iter_dataset(threads)
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    else:
        # Batching after the workers keeps the order and leaves one short
        # batch instead of one per worker (each short shape is a recompile).
        rest = 0
        ds = ds[index::count].map(_imagenet_eval)[start_step * b :].to_iter_dataset(threads)
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=16))
        ds = ds.batch(b)
    it = iter(ds)
    for _ in range(rest):
        next(it, None)
    return it


def imagenet_size(data_dir, split) -> int:
    """Number of images listed under data_dir/split (unreadable ones included)."""
    root = Path(data_dir or "")
    if not (root / "train").is_dir():
        raise ConfigError(f"--data-dir {data_dir}: expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
    return len(_ImageFolder(root / split, classes))


#### Train step and runs ############################################################################
# One jitted step over a mesh of all devices: the batch is sharded on the "data" axis, parameters,
# optimizer and BatchNorm state are replicated, so BatchNorm statistics and ‖g‖ cover the global
# batch (global view: XLA inserts the all-reduces). Swept scalars (lr, ρ, σ²) are array inputs.

SETUPS = {
    # Paper setups (SPEC section 4). Cosine decay for both, as in the paper.
    "imagenet": dict(model="resnet50", batch_size=256, epochs=300, lr=0.1, momentum=0.9, nesterov=False,
                     weight_decay=1e-4, decay_norm_and_bias=False, warmup_epochs=5.0, augment=False),
    "cifar10": dict(model="wrn28_10", batch_size=128, epochs=200, lr=0.1, momentum=0.9, nesterov=True,
                    weight_decay=5e-4, decay_norm_and_bias=True, warmup_epochs=0.0, augment=True),
    # CPU scale (SPEC section 5): a small BN conv net trained to near-interpolation on a subset.
    # mlp256 on 1024 images for 50 epochs reaches train accuracy 1.0 in ~20 s on 2 cores.
    "fashion_mnist": dict(model="mlp256", batch_size=128, epochs=50, lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4, decay_norm_and_bias=True, warmup_epochs=1.0, augment=False,
                          train_subset=1024),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. `for_dataset` fills the paper's setup; every field can be overridden."""

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    model: str = "mlp256"
    activation: str = "relu"
    beta: float = 1.0
    method: str = "sgd"
    rho: float = 0.0
    sigma2: float = 0.0
    epochs: float = 50
    batch_size: int = 128
    lr: float = 0.05  # for batch 256 on ImageNet (Goyal et al.: 0.1 × batch/256 is applied by for_dataset)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = True
    warmup_epochs: float = 1.0
    augment: bool = False
    train_subset: int | None = None  # first N training images (a fixed subset, for CPU-scale runs)
    test_subset: int | None = None
    eval_batch_size: int = 1000
    dtype: str = "float32"  # or "bfloat16": bf16 compute, fp32 parameters/optimizer/BN/loss/norms
    ckpt_dir: str | None = None  # resumable runs: rerunning the same command continues from here
    ckpt_every_s: float = 300.0
    workers: int | None = None  # ImageNet decoding processes (None: sized to the machine)
    progress: bool = True


def for_dataset(dataset: str, **overrides) -> TrainConfig:
    """The paper's setup for `dataset` (SPEC section 4), with overrides."""
    if dataset not in SETUPS:
        raise ConfigError(f"--dataset: unknown dataset {dataset!r}; accepted: {', '.join(SETUPS)}")
    setup = dict(SETUPS[dataset])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if dataset == "imagenet" and "lr" not in overrides:
        setup["lr"] = 0.1 * overrides.get("batch_size", setup["batch_size"]) / 256  # Goyal et al. 2018
    setup.update(overrides)
    return TrainConfig(dataset=dataset, **setup)


def validate(cfg: TrainConfig) -> None:
    """Every bad input as one ConfigError naming the flag."""
    if cfg.dataset not in SETUPS:
        raise ConfigError(f"--dataset: unknown dataset {cfg.dataset!r}; accepted: {', '.join(SETUPS)}")
    activation(cfg.activation, cfg.beta)
    rule(cfg.method)
    if not re.fullmatch(r"resnet50|resnet18|tiny|wrn\d+_\d+|cnn\d+|mlp\d+", cfg.model):
        raise ConfigError(f"--model: unknown model {cfg.model!r}; accepted: resnet50, resnet18, "
                          "wrn<depth>_<width> (e.g. wrn28_10), cnn<width>, mlp<width>, tiny")
    if cfg.rho < 0:
        raise ConfigError(f"--rho must be >= 0, got {cfg.rho}")
    if cfg.sigma2 < 0:
        raise ConfigError(f"--sigma2 must be >= 0, got {cfg.sigma2}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype: unknown dtype {cfg.dtype!r}; accepted: float32, bfloat16")
    n = jax.device_count()
    if cfg.batch_size <= 0 or cfg.batch_size % n:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a positive multiple of the device count ({n})")
    if not cfg.epochs > 0:
        raise ConfigError(f"--epochs must be > 0, got {cfg.epochs}")


def make_optimizer(cfg: TrainConfig, total_steps: int, steps_per_epoch: int):
    """SGD with (Nesterov) momentum, coupled weight decay and unit warm-up + cosine schedule.

    The learning rate itself multiplies the update inside the step, as an array, so that a learning
    rate sweep compiles once. Order as PyTorch SGD: d = g + λθ; m = μm + d; θ -= lr (d + μm | m).
    """
    mask = None if cfg.decay_norm_and_bias else decay_mask
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(warmup, 0), max(total_steps, warmup + 1))
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask),
        optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov),
        optax.scale_by_schedule(schedule),
    ), schedule


def _cast(params, dtype):
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _loss_fn(static, dtype):
    """loss_fn(params, state, (x, y)) -> (L0, (state, logits)): training mode, logits and loss in fp32."""

    def loss_fn(params, state, batch):
        x, y = batch
        model = eqx.combine(_cast(params, dtype), static)
        logits, state = apply(model, state, x.astype(dtype))
        logits = logits.astype(jnp.float32)
        return cross_entropy(logits, y), (state, logits)

    return loss_fn


def _step_body(static, update_rule, tx, dtype, augment, mean, std,
               params, opt_state, bn_state, x, y, key, hp):
    k_aug, k_rule = jax.random.split(key)
    if augment:
        x = augment_small(k_aug, x)
    x = normalize(x, mean, std)
    out = update_rule(_loss_fn(static, dtype), params, bn_state, (x, y), k_rule, hp)
    updates, opt_state = tx.update(out.direction, opt_state, params)
    params = jax.tree.map(lambda p, u: p - hp["lr"] * u, params, updates)
    return params, opt_state, out.state, {"loss": out.loss}


def make_train_step(static, update_rule, tx, dtype, augment, mean, std):
    """The jitted step (params, opt_state, bn_state, x uint8, y, key, hp) -> (params, opt_state,
    bn_state, metrics). Donates parameters, optimizer and BatchNorm state."""
    body = functools.partial(_step_body, static, update_rule, tx, dtype, augment, tuple(mean), tuple(std))
    return jax.jit(body, donate_argnums=(0, 1, 2))


def make_eval_step(static, mean, std):
    """Summed (correct, cross-entropy, count) of a padded batch under a 0/1 mask, with running BN
    statistics."""

    @jax.jit
    def evaluate(params, bn_state, x, y, mask):
        model = eqx.nn.inference_mode(eqx.combine(params, static))
        logits, _ = apply(model, bn_state, normalize(x, mean, std))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return jnp.sum(correct * mask), jnp.sum(nll * mask), jnp.sum(mask)

    return evaluate


_COMPILED: dict = {}


def compiled(cfg: TrainConfig, total: int, spec, build):
    """(train step, eval step) shared by every run that differs only in swept arrays (lr, ρ, σ²), the
    seed, or I/O settings, so that a sweep traces and compiles once per shape."""
    key = (dataclasses.replace(cfg, lr=0.0, rho=0.0, sigma2=0.0, data_dir=None, ckpt_dir=None, ckpt_every_s=0.0,
                               progress=False, workers=None, test_subset=None), total, spec)
    if key not in _COMPILED:
        _COMPILED[key] = build()
    return _COMPILED[key]


def data_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _global(mesh, *local):
    """Process-local numpy batches -> global arrays sharded on the batch axis."""
    sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
    return [jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in local]


def maybe_init_distributed() -> None:
    """jax.distributed.initialize() when launched by a multi-process launcher (SLURM, Open MPI,
    a TPU pod or an explicit coordinator); nothing changes on one host."""
    env = os.environ
    multi = (env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def _evaluate(evaluate, mesh, params, bn_state, batches, eval_batch, n_examples, shape):
    """Accuracy and mean cross-entropy over the examples delivered (at most n_examples; unreadable
    images are skipped). Every batch is padded to one shape under a mask, and every process runs the
    same number of batches (its shard may be one batch shorter), so the collectives stay aligned."""
    local = eval_batch // jax.process_count()
    per_process = -(-n_examples // jax.process_count())
    correct = nll = count = 0.0
    for _ in range(-(-per_process // local)):
        x, y = next(batches, (np.zeros((0, *shape), np.uint8), np.zeros(0, np.int32)))
        n = len(y)
        mask = (np.arange(local) < n).astype(np.float32)
        x = np.concatenate([x, np.zeros((local - n, *shape), x.dtype)])
        y = np.concatenate([y, np.zeros(local - n, y.dtype)])
        c, l, k = evaluate(params, bn_state, *_global(mesh, x, y, mask))
        correct, nll, count = correct + float(c), nll + float(l), count + float(k)
    return correct / count, nll / count


class _Progress:
    """One self-overwriting line: step, loss, lr, images/s. Quiet under CI or when not a terminal."""

    def __init__(self, total, enabled):
        self.total, self.t0 = total, time.perf_counter()
        self.on = enabled and not os.environ.get("CI") and sys.stderr.isatty() and jax.process_index() == 0

    def __call__(self, step, loss, lr, images_per_s):
        if self.on:
            print(f"\r step {step}/{self.total}  loss {loss:.4f}  lr {lr:.4g}  {images_per_s:,.0f} img/s",
                  end="", file=sys.stderr, flush=True)

    def close(self):
        if self.on:
            print(file=sys.stderr)


def _checkpointer(directory):
    import orbax.checkpoint as ocp  # imported lazily: only runs with --ckpt-dir pay for it

    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
    return ocp, ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _save(ckpt, step, tree, extra):
    ocp, manager = ckpt
    leaves = {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree))}
    manager.save(step, args=ocp.args.Composite(leaves=ocp.args.StandardSave(leaves),
                                               extra=ocp.args.JsonSave(extra)))
    manager.wait_until_finished()


def _restore(ckpt, tree):
    """(step, tree, extra) of the latest checkpoint, or None."""
    ocp, manager = ckpt
    step = manager.latest_step()
    if step is None:
        return None
    leaves, treedef = jax.tree.flatten(tree)
    target = {str(i): leaf for i, leaf in enumerate(leaves)}
    got = manager.restore(step, args=ocp.args.Composite(leaves=ocp.args.StandardRestore(target),
                                                        extra=ocp.args.JsonRestore()))
    return step, treedef.unflatten([got.leaves[str(i)] for i in range(len(leaves))]), dict(got.extra)


def load_data(cfg: TrainConfig):
    """(spec, (x_train, y_train), (x_test, y_test)) of an in-memory dataset, or (spec, None, None) for
    ImageNet, which streams from its folder."""
    spec = DATASET_SPECS[cfg.dataset]
    if cfg.dataset == "imagenet":
        return spec, None, None
    x_tr, y_tr, x_te, y_te = _load_small_cached(cfg.dataset, cfg.data_dir)
    if cfg.train_subset:
        x_tr, y_tr = x_tr[: cfg.train_subset], y_tr[: cfg.train_subset]
    if cfg.test_subset:
        x_te, y_te = x_te[: cfg.test_subset], y_te[: cfg.test_subset]
    return spec, (x_tr, y_tr), (x_te, y_te)


_load_small_cached = functools.lru_cache(maxsize=2)(load_small)  # a sweep decodes the files once


def train(cfg: TrainConfig, seed: int, data=None) -> dict:
    """Train one model; returns final test accuracy and loss, train loss and accuracy, images/s, wall
    time and `diverged`. A non-finite loss ends the run early and is recorded, never raised.

    `data`, if given, replaces the dataset: (DatasetSpec, (x_train, y_train), (x_test, y_test)) with
    uint8 NHWC images, as load_data returns.
    """
    validate(cfg)
    t_start = time.perf_counter()
    spec, train_set, test_set = data if data is not None else load_data(cfg)
    mesh = data_mesh()
    n_train = len(train_set[0]) if train_set else imagenet_size(cfg.data_dir, "train")
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training images")
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))

    key = jax.random.key(seed)
    k_init, k_steps = jax.random.split(key)
    act = activation(cfg.activation, cfg.beta)
    model, bn_state = make_model(cfg.model, spec.num_classes, act, k_init, in_channels=spec.shape[2])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tx, schedule = make_optimizer(cfg, total, steps_per_epoch)
    opt_state = tx.init(params)
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    step_fn, evaluate = compiled(cfg, total, spec, lambda: (
        make_train_step(static, rule(cfg.method), tx, dtype, cfg.augment, spec.mean, spec.std),
        make_eval_step(static, spec.mean, spec.std)))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    params, opt_state, bn_state = jax.device_put((params, opt_state, bn_state), replicated)
    hp = jax.device_put({"lr": jnp.float32(cfg.lr), "rho": jnp.float32(cfg.rho),
                         "sigma2": jnp.float32(cfg.sigma2)}, replicated)

    start, done = 0, {"diverged": False, "losses": []}
    ckpt = _checkpointer(cfg.ckpt_dir) if cfg.ckpt_dir else None
    if ckpt and (got := _restore(ckpt, (params, opt_state, bn_state))):
        start, (params, opt_state, bn_state), done = got
        params, opt_state, bn_state = jax.device_put((params, opt_state, bn_state), replicated)

    if train_set:
        batches = small_batches(*train_set, cfg.batch_size, seed=seed, num_epochs=None, start_step=start)
    else:
        batches = imagenet_batches(cfg.data_dir, "train", cfg.batch_size, seed=seed, num_epochs=None,
                                   start_step=start, workers=cfg.workers)
    progress = _Progress(total, cfg.progress)
    losses, diverged = list(done["losses"]), done["diverged"]  # training losses of the last epoch

    def record(pending):
        step, metrics = pending
        loss = float(metrics["loss"])
        if step >= total - steps_per_epoch:
            losses.append(loss)
        return loss

    step, pending, images, t_loop = start, None, 0, None
    last_save = time.perf_counter()
    while step < total and not diverged:
        x, y = _global(mesh, *next(batches))
        params, opt_state, bn_state, metrics = step_fn(params, opt_state, bn_state, x, y,
                                                       jax.random.fold_in(k_steps, step), hp)
        # Read the previous step's metrics, so the host never waits on the step just launched.
        if pending is not None:
            loss = record(pending)
            diverged = not math.isfinite(loss)
            if t_loop is None:  # throughput from the end of the first (compiling) step
                t_loop, images = time.perf_counter(), 0
            elif pending[0] % 25 == 0:
                progress(pending[0], loss, cfg.lr * float(schedule(pending[0])),
                         images / (time.perf_counter() - t_loop))
        pending, step, images = (step, metrics), step + 1, images + cfg.batch_size
        if ckpt and time.perf_counter() - last_save > cfg.ckpt_every_s and not diverged:
            diverged, pending = not math.isfinite(record(pending)), None
            if not diverged:
                _save(ckpt, step, (params, opt_state, bn_state), {"diverged": False, "losses": losses})
            last_save = time.perf_counter()
    if pending is not None and not diverged:
        diverged = not math.isfinite(record(pending))
    jax.block_until_ready(params)
    t_train = time.perf_counter() - t_loop if t_loop else math.nan
    progress.close()
    if ckpt:
        _save(ckpt, step, (params, opt_state, bn_state), {"diverged": diverged, "losses": losses})

    result = {"steps": step, "diverged": diverged, "train_loss": float(np.mean(losses)) if losses else math.nan,
              "images_per_s": images / t_train if t_loop else math.nan}
    nan = (math.nan, math.nan)
    if cfg.dataset == "imagenet":
        test_batches = imagenet_batches(cfg.data_dir, "val", cfg.eval_batch_size, seed=0, num_epochs=1,
                                        workers=cfg.workers)
    else:
        test_batches = eval_batches(*test_set, cfg.eval_batch_size)
    n_test = len(test_set[1]) if test_set else imagenet_size(cfg.data_dir, "val")
    acc, nll = nan if diverged else _evaluate(evaluate, mesh, params, bn_state, test_batches, cfg.eval_batch_size,
                                              n_test, spec.shape)
    if train_set and not diverged:  # on up to 10,000 training images, in eval mode: is it interpolating?
        n = min(len(train_set[0]), 10_000)
        train_acc, _ = _evaluate(evaluate, mesh, params, bn_state,
                                 eval_batches(train_set[0][:n], train_set[1][:n], cfg.eval_batch_size),
                                 cfg.eval_batch_size, n, spec.shape)
    else:
        train_acc = math.nan
    result |= {"test_accuracy": acc, "test_loss": nll, "train_accuracy": train_acc,
               "wall_s": time.perf_counter() - t_start}
    result["params"] = params  # for tests and ablations; scripts drop it before writing the CSV
    result["bn_state"] = bn_state
    return result


#### Command line and results I/O ##################################################################
# A figure script's CSV gets one row per (setting, seed), appended as soon as its run finishes, so
# an interrupted sweep loses at most the run in progress; rerunning skips the rows already there.
# Plots are drawn from the CSV alone.

CSV_COLUMNS = ("method", "activation", "dataset", "model", "seed", "test_accuracy", "test_loss", "train_loss",
               "train_accuracy", "diverged", "wall_s")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_config(config_cls, argv=None, doc: str | None = None):
    """argparse over a frozen dataclass: every field is a --flag with its default shown; tuple fields
    take several values; bool fields are --flag / --no-flag."""
    p = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif typing.get_origin(kind) is tuple:
            p.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], default=f.default,
                           help=f"default: {' '.join(map(str, f.default))}")
        else:
            base = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
            p.add_argument(flag, type=base[0], default=f.default, help=f"default: {f.default}")
    args = vars(p.parse_args(argv))
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main (after jax.distributed.initialize under a multi-process launcher): a
    ConfigError becomes one line on stderr and exit code 2."""
    try:
        maybe_init_distributed()
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished runs are in the CSV; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


def read_rows(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path, row: dict) -> None:
    """Append one finished run; the header is written with the first row. Flushed and fsynced so that
    a kill after this call never loses the row."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def row_key(row: dict, columns) -> tuple:
    """The identity of a run in the CSV, compared as text (the CSV stores text)."""
    return tuple(_fmt(row[c]) for c in columns)


def _fmt(v) -> str:
    if v is None or v == "":
        return ""  # how the CSV stores None
    try:
        return repr(float(v))  # 0.1, "0.1" and 1e-1 are one value; 50 and "50.0" too
    except (TypeError, ValueError):
        return str(v)


def write_config(out_dir, cfg, name: str = "config") -> None:
    """<name>.config.json: the resolved script config and the versions that produced the results."""
    versions = {m: importlib.metadata.version(m) for m in ("jax", "jaxlib", "equinox", "optax", "grain", "numpy")}
    info = {"config": dataclasses.asdict(cfg), "versions": versions, "python": sys.version.split()[0],
            "backend": jax.default_backend(), "devices": jax.device_count()}
    with open(os.path.join(out_dir, f"{name}.config.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)


# The TrainConfig fields a figure script exposes as flags (None: the dataset's setup), and the ones
# that, with the swept values, identify a run in its CSV.
SCRIPT_FLAGS = ("data_dir", "model", "epochs", "batch_size", "lr", "train_subset", "test_subset")
RUN_KEY = ("method", "activation", "dataset", "model", "epochs", "batch_size", "lr", "train_subset", "seed")


def script_setup(cfg, cpu_scale: dict, smoke: dict) -> TrainConfig:
    """A figure script's base TrainConfig: the dataset's setup, then the script's CPU_SCALE (for
    fashion_mnist) and SMOKE (with --smoke), then every flag that was given."""
    overrides = (cpu_scale if cfg.dataset == "fashion_mnist" else {}) | (smoke if cfg.smoke else {})
    overrides |= {k: getattr(cfg, k) for k in SCRIPT_FLAGS if getattr(cfg, k) is not None}
    return for_dataset(cfg.dataset, **overrides)


def sweep(name: str, cfg, runs: list, swept: tuple, run_one: Callable[[TrainConfig, int], dict]) -> str:
    """Run every (TrainConfig, seed) of `runs` whose row is not yet in <cfg.out>/<name>.csv, appending
    each row as soon as its run finishes. A row is identified by the `swept` TrainConfig fields and
    RUN_KEY, so a changed setup (e.g. --epochs) is a new row, never a skipped one. Returns the path."""
    key = tuple(swept) + RUN_KEY
    ident = lambda tc, seed: {k: seed if k == "seed" else getattr(tc, k) for k in key}
    for tc, _ in runs:
        validate(tc)  # every bad value fails now, not hours into the sweep
    os.makedirs(cfg.out, exist_ok=True)
    write_config(cfg.out, dataclasses.replace(cfg, **{k: getattr(runs[0][0], k) for k in SCRIPT_FLAGS}), name)
    path = os.path.join(cfg.out, f"{name}.csv")
    done = {row_key(r, key) for r in read_rows(path)}
    todo = [(tc, s) for tc, s in runs if row_key(ident(tc, s), key) not in done]
    print(f"{name}: {len(todo)} of {len(runs)} runs to do -> {path}", flush=True)
    for tc, seed in todo:
        row = ident(tc, seed) | run_one(tc, seed)
        append_row(path, row)
        what = " ".join(f"{k}={row[k]:g}" if isinstance(row[k], float) else str(row[k]) for k in swept)
        print(f"  {tc.method} {tc.activation} {what} seed {seed}: test acc {row['test_accuracy']:.4f}  "
              f"train acc {row['train_accuracy']:.4f}  {row['wall_s']:.0f}s", flush=True)
    return path


def plot_sweep(csv_path, png_path, x: str, series: str, title: str, *, logx=False, xlabel=None,
               y="test_accuracy", facet: str | None = None) -> None:
    """Mean over seeds of `y` against `x`, one line per value of `series` (one panel per value of
    `facet`), with a ±1 std band; diverged runs are marked with an x on the bottom axis. `title` and
    `xlabel` may name CSV columns ("{method}"), filled from the first row; the title ends with the
    dataset/model setups and the number of seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    if not rows:
        raise ConfigError(f"no results in {csv_path} to plot")
    setups = ", ".join(sorted({f"{r['dataset']} {r['model']}" for r in rows}))
    title = f"{title.format_map(rows[0])}, {setups}, seeds: {len({r['seed'] for r in rows})}"
    xlabel = (xlabel or x).format_map(rows[0])
    panels = sorted({r[facet] for r in rows}) if facet else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        sub = [r for r in rows if facet is None or r[facet] == panel]
        for name in sorted({r[series] for r in sub}):
            runs = [r for r in sub if r[series] == name]
            xs = sorted({float(r[x]) for r in runs})
            ok = lambda r: r["diverged"] != "True" and math.isfinite(float(r[y]))
            vals = [[float(r[y]) for r in runs if float(r[x]) == v and ok(r)] for v in xs]
            mean = np.array([np.mean(v) if v else np.nan for v in vals])
            std = np.array([np.std(v) if v else np.nan for v in vals])
            (line,) = ax.plot(xs, mean, marker="o", label=name)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            bad = [float(r[x]) for r in runs if not ok(r)]
            if bad:
                ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), transform=ax.get_xaxis_transform(),
                        clip_on=False, markersize=9, label=f"{name}: diverged")
        if logx:
            ax.set_xscale("symlog", linthresh=min([float(r[x]) for r in sub if float(r[x]) > 0] or [1.0]))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y.replace("_", " "))
        ax.set_title(title if panel is None else f"{title}\n{facet} = {panel}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
