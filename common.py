"""Library for the reproduction of Dauphin, Agarwala & Mobahi (2024), "Neglected Hessian component
explains mysteries in Sharpness regularization" (arXiv 2401.10809).

Sections: activations, curvature, update rules, (models, data, train step, results I/O).
Quantities and paper errata are defined in SPEC.md; equation numbers are the paper's.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import erfc

PyTree = Any


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


def activation(name: str, beta: float = 1.0) -> Callable[[jax.Array], jax.Array]:
    """The elementwise nonlinearity `name`; `beta` is the width parameter of beta_gelu and relu_aug."""
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


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """alpha * x + y, leafwise, keeping y's dtypes."""
    return jax.tree.map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


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
    grad_norm: jax.Array  # ‖∇L0(θ)‖ of the global batch (at θ+ε for weight_noise)


def _grad(loss_fn, params, state, batch):
    (loss, (state, _)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, state, batch)
    return loss, state, g


def _scalar(loss_fn, state, batch):
    return lambda p: loss_fn(p, state, batch)[0]


def sgd(loss_fn, params, state, batch, key, hp) -> Step:
    """Plain gradient: every other rule with ρ = σ² = 0 reduces to this."""
    loss, state, g = _grad(loss_fn, params, state, batch)
    return Step(g, state, loss, tree_norm(g))


def gp(loss_fn, params, state, batch, key, hp, *, p: int = 1) -> Step:
    """Gradient penalty L0 + ρ‖g‖^p, exact autodiff HVP (Eq. 7-8, 46-47).

    p=1 (penalty SAM): g + ρ H g/‖g‖;  p=2 (penalty USAM): g + 2ρ H g.  A finite-difference HVP
    would turn this into SAM and remove the NME effect the paper studies.
    """
    loss, new_state, g = _grad(loss_fn, params, state, batch)
    norm = tree_norm(g)
    if p == 1:
        v, coef = jax.tree.map(lambda x: x / jnp.maximum(norm, 1e-12).astype(x.dtype), g), hp["rho"]
    elif p == 2:
        v, coef = g, 2.0 * hp["rho"]
    else:
        raise ValueError(f"gp: p must be 1 or 2, got {p}")
    hv = hvp(_scalar(loss_fn, state, batch), params, jax.lax.stop_gradient(v))
    return Step(tree_axpy(coef, hv, g), new_state, loss, norm)


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
    return Step(_perturbed_grad(loss_fn, params, state, batch, delta), new_state, loss, norm)


def usam(loss_fn, params, state, batch, key, hp) -> Step:
    """Unnormalised SAM (Eq. 43): ∇L0(θ + ρ g)."""
    loss, new_state, g = _grad(loss_fn, params, state, batch)
    delta = jax.tree.map(lambda x: x * jnp.asarray(hp["rho"], x.dtype), g)
    return Step(_perturbed_grad(loss_fn, params, state, batch, delta), new_state, loss, tree_norm(g))


def weight_noise(loss_fn, params, state, batch, key, hp) -> Step:
    """One-sample gradient of E_ε L0(θ+ε), ε ~ N(0, σ²I) (Eq. 17); ≈ L0 + (σ²/2) tr(H).

    Its single pass is at θ+ε and also provides the BatchNorm statistics: a clean pass would cost a
    third of a step for nothing.
    """
    std = jnp.sqrt(hp["sigma2"])
    noisy = jax.tree.map(lambda w, e: w + (std * e).astype(w.dtype), params, tree_normal(key, params))
    loss, state, g = _grad(loss_fn, noisy, state, batch)
    return Step(g, state, loss, tree_norm(g))


def hessian_trace(loss_fn, params, state, batch, key, hp) -> Step:
    """L0 + (σ²/2) tr(H) with one Hutchinson sample (Eq. 19; σ²/2 per SPEC erratum to Eq. 17).

    εᵀH(θ)ε is the second directional derivative of L0 along ε: forward-over-forward, then one
    reverse pass for its gradient (third order in L0).
    """
    loss, new_state, g = _grad(loss_fn, params, state, batch)
    eps = tree_normal(key, params)
    f = _scalar(loss_fn, state, batch)
    quad = lambda p: jax.jvp(lambda q: jax.jvp(f, (q,), (eps,))[1], (p,), (eps,))[1]
    return Step(tree_axpy(0.5 * hp["sigma2"], jax.grad(quad)(params), g), new_state, loss, tree_norm(g))


def gn_trace(loss_fn, params, state, batch, key, hp) -> Step:
    """L0 + (σ²/2) tr(GN) with the sampled-label estimator T̂ = B‖∇L0(θ, ŷ)‖² (Eq. 19-21).

    ∇T̂ = 2B H_ŷ g_ŷ with ŷ held fixed: one exact HVP of the sampled-label loss, which is cheaper
    than double backprop and is the same derivative.
    """
    (loss, (new_state, z)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, state, batch)
    x, _ = batch
    y_hat = jax.random.categorical(key, jax.lax.stop_gradient(z).astype(jnp.float32))
    f_hat = _scalar(loss_fn, state, (x, y_hat))
    g_hat = jax.grad(f_hat)(params)
    hg = hvp(f_hat, params, jax.lax.stop_gradient(g_hat))
    coef = hp["sigma2"] * z.shape[0]  # (σ²/2) · 2B
    return Step(tree_axpy(coef, hg, g), new_state, loss, tree_norm(g))


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
