"""Curvature operators against dense float64 references (jax.hessian, jax.jacobian, analytic)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from common import activation, cross_entropy, cse, gnvp, hvp, tree_dot, tree_normal
from nets import problem

pytestmark = pytest.mark.usefixtures("x64")

ACTS = [("relu", 1.0), ("gelu", 1.0), ("beta_gelu", 3.0), ("relu_aug", 1.0), ("gelu_dim", 1.0)]


def nmevp(logits_fn, labels, params, v):
    """NME v = H v − GN v (Eq. 2, second term), from the library's two products."""
    loss = lambda p: cross_entropy(logits_fn(p), labels)
    return jax.tree.map(jnp.subtract, hvp(loss, params, v), gnvp(logits_fn, labels, params, v))


def hessian_trace_estimate(loss_fn, params, key):
    """One Hutchinson sample εᵀHε, ε ~ N(0, I), as hessian_trace and the probe draw it: unbiased for tr(H)."""
    eps = tree_normal(key, params)
    return tree_dot(eps, hvp(loss_fn, params, eps))


def gn_trace_estimate(logits_fn, params, key):
    """One sample of T̂ = B ‖∇_θ L0(θ, ŷ)‖², ŷ ~ Cat(softmax z), as gn_trace and the probe draw it
    (correction 3 of MATH.md: the factor B makes it unbiased for tr(GN) of the batch-mean loss)."""
    z = jax.lax.stop_gradient(logits_fn(params))
    y_hat = jax.random.categorical(key, z)
    g = jax.grad(lambda p: cross_entropy(logits_fn(p), y_hat))(params)
    return z.shape[0] * tree_dot(g, g)


def dense(logits_fn, y, params):
    """(H, GN) as dense matrices over the flattened parameters, from jax.hessian and jax.jacobian."""
    flat, unravel = ravel_pytree(params)
    z_of = lambda w: logits_fn(unravel(w))
    H = jax.hessian(lambda w: cross_entropy(z_of(w), y))(flat)
    J = jax.jacobian(z_of)(flat)  # [B, C, P]
    p = jax.nn.softmax(z_of(flat))
    Hz = (jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]) / p.shape[0]  # Eq. 2, per example
    GN = jnp.einsum("bcp,bcd,bdq->pq", J, Hz, J)
    return H, GN


def as_matrix(op, params):
    """Columns op(e_k) for every basis vector, from a pytree -> pytree operator."""
    flat, unravel = ravel_pytree(params)
    return jax.vmap(lambda e: ravel_pytree(op(unravel(e)))[0], out_axes=1)(jnp.eye(flat.size))


@functools.cache
def matrices(kind, name, beta, seed=0, batch=5):
    """Dense references and the operators' matrices, in one compiled function (cached: several
    tests read the same model's matrices)."""
    params, logits_fn, x, y = problem(kind, activation(name, beta), jax.random.key(seed), batch)

    @jax.jit
    def run(params):
        loss = lambda p: cross_entropy(logits_fn(p), y)
        H, GN = dense(logits_fn, y, params)
        return dict(H=H, GN=GN, Hm=as_matrix(lambda v: hvp(loss, params, v), params),
                    GNm=as_matrix(lambda v: gnvp(logits_fn, y, params, v), params),
                    NMEm=as_matrix(lambda v: nmevp(logits_fn, y, params, v), params))

    return params, logits_fn, x, y, run(params)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("name,beta", ACTS)
def test_products_match_dense(kind, name, beta):
    *_, m = matrices(kind, name, beta)
    H, GN, Hm, GNm, NMEm = m["H"], m["GN"], m["Hm"], m["GNm"], m["NMEm"]
    scale = float(jnp.abs(H).max())
    np.testing.assert_allclose(Hm, H, atol=1e-12 * scale, rtol=0)
    np.testing.assert_allclose(GNm, GN, atol=1e-12 * scale, rtol=0)
    np.testing.assert_allclose(Hm, GNm + NMEm, atol=1e-12 * scale, rtol=0)  # Eq. 2
    np.testing.assert_allclose(NMEm, H - GN, atol=1e-12 * scale, rtol=0)
    assert jnp.linalg.eigvalsh(GNm).min() > -1e-12 * scale  # GN is PSD for cross-entropy
    np.testing.assert_allclose(NMEm, NMEm.T, atol=1e-12 * scale)
    # The NME is not a rounding error: it is indefinite or non-zero for every model here.
    assert float(jnp.abs(NMEm).max()) > 1e-3 * scale


def test_one_hidden_layer_nme_diagonal():
    """NME diagonal is exactly 0 for relu and gelu_dim (zero AD second derivative) and not for
    gelu, relu_aug and beta_gelu; and it equals the analytic formula for every activation."""
    for name, beta in ACTS:
        act = activation(name, beta)
        params, logits_fn, x, y, m = matrices("mlp", name, beta)
        diag = ravel_pytree(params)[1](jnp.diagonal(m["NMEm"]))
        # Analytic: r = ∇_z L = (softmax(z) − onehot(y)) / B.
        r = (jax.nn.softmax(logits_fn(params)) - jax.nn.one_hot(y, 3)) / x.shape[0]
        a = x @ params["w1"] + params["b1"]
        d2 = jax.vmap(jax.vmap(jax.grad(jax.grad(act))))(a)  # act'' [B, h]
        s = (r @ params["w2"].T) * d2  # Σ_c r_c W2_jc act''(a_j)   [B, h]
        np.testing.assert_allclose(diag["w1"], (x**2).T @ s, atol=1e-13)
        np.testing.assert_allclose(diag["b1"], s.sum(0), atol=1e-13)
        # "Exactly 0" up to the rounding of H − GN: 1e-14 of the Hessian's scale; non-zero is 1e-3.
        H = m["H"]
        tiny, big = 1e-14 * float(jnp.abs(H).max()), 1e-3 * float(jnp.abs(H).max())
        assert float(jnp.abs(diag["w2"]).max()) < tiny and float(jnp.abs(diag["b2"]).max()) < tiny
        nme1 = max(float(jnp.abs(diag["w1"]).max()), float(jnp.abs(diag["b1"]).max()))
        if name in ("relu", "gelu_dim"):
            assert nme1 < tiny, name
        else:
            assert nme1 > big, name


def test_nme_vanishes_for_a_linear_model():
    act = lambda u: u
    params, logits_fn, x, y = problem("mlp", act, jax.random.key(2))
    v = jax.tree.map(jnp.ones_like, params)
    # x ↦ xW1W2 is bilinear in (W1, W2): the NME is the off-diagonal W1-W2 coupling only.
    nv = nmevp(logits_fn, y, params, jax.tree.map(lambda t: t.at[...].set(0), v) | {"w1": v["w1"]})
    assert float(jnp.abs(nv["w1"]).max()) < 1e-14
    assert float(jnp.abs(nv["w2"]).max()) > 1e-2


def mc_check(samples, exact):
    """Monte-Carlo mean within 5 standard errors of the exact value, and the SE small enough that
    a biased estimator (off by a factor of B, for example) would fail."""
    samples = np.asarray(samples)
    mean, se = samples.mean(), samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(mean - exact) < 5 * se, (mean, exact, se)
    assert se < 0.1 * abs(exact), (se, exact)


@pytest.mark.parametrize("kind,name,beta", [("mlp", "gelu", 1.0), ("conv", "relu_aug", 1.0), ("conv", "relu", 1.0)])
def test_trace_estimators_unbiased(kind, name, beta):
    params, logits_fn, x, y = problem(kind, activation(name, beta), jax.random.key(3), batch=4)
    H, GN = jax.jit(dense, static_argnums=0)(logits_fn, y, params)
    loss = lambda p: cross_entropy(logits_fn(p), y)
    keys = jax.random.split(jax.random.key(4), 20_000)
    mc_check(jax.jit(jax.vmap(lambda k: hessian_trace_estimate(loss, params, k)))(keys), float(jnp.trace(H)))
    mc_check(jax.jit(jax.vmap(lambda k: gn_trace_estimate(logits_fn, params, k)))(keys), float(jnp.trace(GN)))


#### cse: the merged jaxpr computes the same function and the same derivatives (its saving: bench.py --analyze)


def test_cse_merges_repeats_only():
    def f(x):
        return jnp.sin(x) * 2.0, jnp.sin(x) * 3.0, jnp.sin(x + 1.0), jnp.sin(x)

    x = jnp.linspace(-1.0, 1.0, 5)
    for got, want in zip(cse(f)(x), f(x)):
        np.testing.assert_array_equal(got, want)  # literals 2, 3 and the shifted input kept apart
    eqns = jax.make_jaxpr(cse(f))(x).jaxpr.eqns
    assert [e.primitive.name for e in eqns].count("sin") == 2


@pytest.mark.parametrize("name", ["gelu", "relu_aug"])
def test_cse_of_nested_jvps_keeps_the_gradient(name):
    """∇(L + εᵀHε) through nested JVPs, as hessian_trace differentiates it: cse changes no derivative
    (float64, to rounding)."""
    act = activation(name)
    keys = jax.random.split(jax.random.key(0), 8)
    ws = [jax.random.normal(k, (32, 32)) / 6.0 for k in keys[:4]]
    eps = [jax.random.normal(k, (32, 32)) for k in keys[4:]]
    x, y = jax.random.normal(keys[0], (16, 32)), jnp.arange(16) % 32

    def loss(w):
        h = x
        for a in w[:-1]:
            h = act(h @ a)
        return cross_entropy(h @ w[-1], y)

    def objective(w):
        (l, _), (_, d2) = jax.jvp(lambda q: jax.jvp(loss, (q,), (eps,)), (w,), (eps,))
        return l + d2

    plain, merged = jax.jit(jax.grad(objective)), jax.jit(jax.grad(cse(objective)))
    for a, b in zip(plain(ws), merged(ws)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
