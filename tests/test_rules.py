"""Update rules (MATH.md §3) against their formulas computed independently from dense matrices."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import common
from common import BN, RULES, Hyper, activation, cross_entropy, tree_normal
from conftest import EPS32
from nets import conv, mlp, problem

RHO, SIGMA2 = 0.05, 0.01


def setup(name="gelu", beta=1.0, kind="mlp", batch=6, seed=0):
    """A tiny model as the rules see it, plus its flat dense view."""
    act = activation(name, beta)
    params, _, x, y = problem(kind, act, jax.random.key(seed), batch)
    f = mlp if kind == "mlp" else conv

    def loss_fn(p, state, b):
        z = f(act, p, b[0])
        return cross_entropy(z, b[1]), (state, z)

    flat, unravel = ravel_pytree(params)
    L = lambda w: cross_entropy(f(act, unravel(w), x), y)
    return params, loss_fn, (x, y), flat, unravel, L


def hp(rho=RHO, sigma2=SIGMA2):
    return Hyper(rho=jnp.asarray(rho), sigma2=jnp.asarray(sigma2))


def run(name, loss_fn, params, batch, key=jax.random.key(7), **kw):
    return jax.jit(lambda p, k: RULES[name](loss_fn, p, None, batch, k, hp(**kw)))(params, key)


def run_all(names, loss_fn, params, batch, key=jax.random.key(7), **kw):
    """Several rules in one compiled function (one compile instead of one per rule)."""
    return jax.jit(lambda p, k: {n: RULES[n](loss_fn, p, None, batch, k, hp(**kw)) for n in names})(params, key)


def flat_of(tree):
    return ravel_pytree(tree)[0]


def dense_gn(Z, w):
    """GN = (1/B) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i from jax.jacobian of the batch's logits Z(w) [B, C]
    (MATH.md §1), independent of common's gnvp."""
    J, p = jax.jacobian(Z)(w), jax.nn.softmax(Z(w))
    Hz = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    return jnp.einsum("bcp,bcd,bdq->pq", J, Hz, J) / p.shape[0]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("act", ["gelu", "relu", "relu_aug"])
def test_deterministic_rules_match_dense_formulas(act):
    params, loss_fn, batch, w, unravel, L = setup(act)
    g, H = jax.grad(L)(w), jax.hessian(L)(w)
    GN = dense_gn(lambda v: mlp(activation(act), unravel(v), batch[0]), w)
    n = jnp.linalg.norm(g)
    expect = {
        "sgd": g,
        "gp_p1": g + RHO * H @ g / n,  # Eq. 8
        "gp_p2": g + 2 * RHO * H @ g,  # Eq. 47
        "gp_gn_p1": g + RHO * GN @ g / n,  # MATH.md §3, gp_gn
        "gp_gn_p2": g + 2 * RHO * GN @ g,
        "gp_nme_p1": g + RHO * (H - GN) @ g / n,  # MATH.md §3, gp_nme
        "gp_nme_p2": g + 2 * RHO * (H - GN) @ g,
        "sam": jax.grad(L)(w + RHO * g / n),  # Eq. 42
        "usam": jax.grad(L)(w + RHO * g),  # Eq. 43
    }
    steps = run_all(list(expect), loss_fn, params, batch)
    for name, ref in expect.items():
        step = steps[name]
        np.testing.assert_allclose(flat_of(step.direction), ref, rtol=1e-10, atol=1e-13, err_msg=name)
        assert float(step.loss) == pytest.approx(float(L(w)), rel=1e-12)
    # The penalties move the direction by much more than the tolerance (the test can fail).
    for name in ("gp_p1", "gp_p2", "gp_gn_p1", "gp_gn_p2", "gp_nme_p1", "gp_nme_p2", "sam", "usam"):
        assert float(jnp.linalg.norm(expect[name] - g)) > 1e-4 * float(n), name
    # gp_gn is gp with the NME taken out of the update: they differ by ρ NME ĝ, which is not small
    # (even for relu, whose NME keeps its cross-layer terms).
    gap = flat_of(steps["gp_p1"].direction) - flat_of(steps["gp_gn_p1"].direction)
    np.testing.assert_allclose(gap, RHO * (H - GN) @ g / n, rtol=1e-9, atol=1e-13)
    assert float(jnp.linalg.norm(gap)) > 0.05 * float(jnp.linalg.norm(expect["gp_p1"] - g))
    # gp_gn and gp_nme split gp's correction: d_gp = d_gp_gn + d_gp_nme − g.
    for p in (1, 2):
        parts = [flat_of(steps[f"{r}_p{p}"].direction) for r in ("gp", "gp_gn", "gp_nme")]
        np.testing.assert_allclose(parts[1] + parts[2] - g, parts[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name,twin_name", [("relu", "relu_aug"), ("gelu", "gelu_dim")])
def test_an_activation_and_its_twin_step_alike_under_gp_gn_only(name, twin_name):
    """φ″ enters an update only through the NME (MATH.md §2-§3), and gp_gn's update g + ρ GN ĝ uses first
    derivatives alone: relu and relu_aug, gelu and gelu_dim give the same gp_gn direction to float32
    rounding, on a BatchNorm conv net of the zoo in training mode. Under gp, and under gp_nme, whose
    update is the NME alone, they differ by far more."""
    x = jax.random.uniform(jax.random.key(1), (16, 1, 12, 12))
    y = jnp.arange(16) % 10
    model, state = common.make_model("cnn4", 10, activation(name), jax.random.key(0), in_channels=1)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(rule, act):
        def loss_fn(p, st, b):
            z, st = common.apply(common.with_act(eqx.combine(p, static), act), st, b[0])
            return cross_entropy(z, b[1]), (st, z)

        out = RULES[rule](loss_fn, params, state, (x, y), jax.random.key(2), hp(rho=0.3))
        return flat_of(out.direction)

    run_ = jax.jit(lambda: {(r, a): step(r, activation(a)) for r in ("sgd", "gp_gn_p1", "gp_p1", "gp_nme_p1")
                            for a in (name, twin_name)})
    d = run_()
    g = d["sgd", name]
    size = lambda r: float(jnp.linalg.norm(d[r, name] - g))  # noqa: E731 (the correction's size)
    gap = lambda r: float(jnp.linalg.norm(d[r, name] - d[r, twin_name]))  # noqa: E731
    assert gap("gp_gn_p1") <= 1e3 * EPS32 * size("gp_gn_p1"), (gap("gp_gn_p1"), size("gp_gn_p1"))
    for r in ("gp_p1", "gp_nme_p1"):
        assert gap(r) > 1e-2 * size(r), (r, gap(r), size(r))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("p", [1, 2])
def test_gp_gn_equals_gp_where_the_nme_is_zero(p):
    """A linear model z = xW + b has ∇²_θ z = 0, so NME = 0, H = GN and gp_gn's update is gp's, to
    rounding; with a hidden layer (relu MLP) they differ, which the dense test above measures."""
    kw, kb, kx, ky = jax.random.split(jax.random.key(4), 4)
    params = {"w": jax.random.normal(kw, (3, 4)), "b": 0.3 * jax.random.normal(kb, (4,))}
    x, y = jax.random.normal(kx, (6, 3)), jax.random.randint(ky, (6,), 0, 4)

    def loss_fn(q, state, b):
        z = b[0] @ q["w"] + q["b"]
        return cross_entropy(z, b[1]), (state, z)

    steps = run_all([f"gp_p{p}", f"gp_gn_p{p}", "sgd"], loss_fn, params, (x, y), rho=0.7)
    gp, gn, g = (flat_of(steps[k].direction) for k in (f"gp_p{p}", f"gp_gn_p{p}", "sgd"))
    np.testing.assert_allclose(gn, gp, rtol=1e-12, atol=1e-15)
    assert float(jnp.linalg.norm(gp - g)) > 1e-2 * float(jnp.linalg.norm(g))  # the penalty is there


def bn_mlp(act, p, x):
    """linear-BN-act-linear in float64, BatchNorm on the batch's own statistics (training mode): every
    example's logits depend on the whole batch."""
    h = x @ p["w1"] + p["b1"]
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
    return act(h) @ p["w2"] + p["b2"]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("p", [1, 2])
def test_gp_gn_with_batchnorm_is_the_gauss_newton_of_the_whole_batch(p):
    """With BatchNorm in training mode, GN = Jᵀ H_z J with J the Jacobian of the whole batch's logits
    [B, C] in θ, the batch statistics differentiated (MATH.md §3, gp_gn). Holding the statistics fixed
    (per-example J_i) is another matrix, which the rule must not follow."""
    act = activation("gelu")
    params, _, x, y = problem("mlp", act, jax.random.key(2), batch=8)
    w, unravel = ravel_pytree(params)
    Z = lambda v: bn_mlp(act, unravel(v), x)

    def loss_fn(q, state, b):
        z = bn_mlp(act, q, b[0])
        return cross_entropy(z, b[1]), (state, z)

    g = jax.grad(lambda v: cross_entropy(Z(v), y))(w)
    u = g / jnp.linalg.norm(g) if p == 1 else 2 * g
    GN = dense_gn(Z, w)
    step = run(f"gp_gn_p{p}", loss_fn, params, (x, y))
    np.testing.assert_allclose(flat_of(step.direction), g + RHO * GN @ u, rtol=1e-10, atol=1e-13)
    # Statistics held at their values at θ: a different GN, by far more than the tolerance.
    h0 = x @ params["w1"] + params["b1"]
    mu, sd = jax.lax.stop_gradient(h0.mean(0)), jax.lax.stop_gradient(jnp.sqrt(h0.var(0) + 1e-5))
    frozen = lambda v: act((x @ unravel(v)["w1"] + unravel(v)["b1"] - mu) / sd) @ unravel(v)["w2"] + unravel(v)["b2"]
    assert float(jnp.linalg.norm((GN - dense_gn(frozen, w)) @ u)) > 1e-3 * float(jnp.linalg.norm(GN @ u))


def mc_close(samples, ref, base):
    """Per-coordinate Monte-Carlo mean within 5 standard errors of ref, and ref − base well resolved."""
    samples = np.asarray(samples)
    mean, se = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(mean - ref) < 5 * se + 1e-12), np.max(np.abs(mean - ref) / (se + 1e-300))
    assert np.linalg.norm(ref - base) > 10 * np.linalg.norm(se), "penalty not resolved: test too weak"


def directions(name, loss_fn, params, batch, n, **kw):
    keys = jax.random.split(jax.random.key(11), n)
    f = lambda k: flat_of(RULES[name](loss_fn, params, None, batch, k, hp(**kw)).direction)
    return jax.jit(jax.vmap(f))(keys)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("act", ["gelu", "relu_aug"])
def test_hessian_trace_is_unbiased_gradient_of_its_objective(act):
    """E[direction] = ∇(L0 + (σ²/2) tr H): ε is independent of θ, so the Hutchinson gradient is unbiased."""
    params, loss_fn, batch, w, unravel, L = setup(act)
    sigma2 = 0.5
    g = jax.grad(L)(w)
    ref = g + 0.5 * sigma2 * jax.grad(lambda v: jnp.trace(jax.hessian(L)(v)))(w)
    mc_close(directions("hessian_trace", loss_fn, params, batch, 20_000, sigma2=sigma2), ref, g)


def gn_trace_objective(f, act, x, unravel):
    """F(θ, θ') = B E_{ŷ~p(θ')} ‖∇L0(θ, ŷ)‖², enumerated over the classes, independent of common.

    The cross terms between examples vanish in expectation, leaving (1/B) Σ_i Σ_c p_ic(θ') ‖J_iᵀ(p_i(θ) − e_c)‖²
    at θ' = θ this is tr(GN) of the mean loss; its gradient in θ (θ' held) is what the sampled-label
    estimator with stop_gradient labels follows in expectation.
    """
    def F(w, w_sample):
        z = lambda v: f(act, unravel(v), x)
        J = jax.jacobian(z)(w)  # [B, C, P]
        p = jax.nn.softmax(z(w))
        q = jax.nn.softmax(z(w_sample))
        C = p.shape[1]
        r = p[:, None, :] - jnp.eye(C)[None]  # [B, c, C]: p_i − e_c
        sq = jnp.sum(jnp.einsum("bkc,bcp->bkp", r, J) ** 2, axis=-1)  # [B, c]
        return jnp.sum(q * sq) / x.shape[0]

    return F


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gn_trace_is_gradient_of_its_objective(act):
    params, loss_fn, batch, w, unravel, L = setup(act)
    x, y = batch
    Z = lambda v: mlp(activation(act), unravel(v), x)
    J = jax.jacobian(Z)(w)
    p = jax.nn.softmax(Z(w))
    GN = jnp.einsum("bcp,bcd,bdq->pq", J, (jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]) / x.shape[0], J)
    F = gn_trace_objective(mlp, activation(act), x, unravel)
    assert float(F(w, w)) == pytest.approx(float(jnp.trace(GN)), rel=1e-10)  # the estimator's target
    sigma2 = 0.5
    g = jax.grad(L)(w)
    ref = g + 0.5 * sigma2 * jax.grad(F)(w, w)
    mc_close(directions("gn_trace", loss_fn, params, batch, 20_000, sigma2=sigma2), ref, g)


@pytest.mark.usefixtures("x64")
def test_weight_noise_on_a_quadratic():
    """E L(θ+ε) = L(θ) + (σ²/2) tr(A) exactly for L = ½(θ−c)ᵀA(θ−c) (Eq. 17 with the σ²/2 erratum),
    the Hutchinson objective matches it in expectation, and E ∇L(θ+ε) = ∇L(θ)."""
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    M = jax.random.normal(k1, (6, 6))
    A = M @ M.T + jnp.eye(6)
    c = jax.random.normal(k2, (6,))
    params = {"a": jax.random.normal(k3, (2, 3)), "b": jnp.zeros(0)}
    w = ravel_pytree(params)[0]
    Lq = lambda v: 0.5 * (v - c) @ A @ (v - c)
    loss_fn = lambda p, state, b: (Lq(ravel_pytree(p)[0]), (state, jnp.zeros((1, 2))))
    sigma2 = 0.3
    n = 40_000
    keys = jax.random.split(jax.random.key(9), n)
    steps = jax.jit(jax.vmap(lambda k: RULES["weight_noise"](loss_fn, params, None, None, k, hp(sigma2=sigma2))))(keys)
    expected = float(Lq(w) + 0.5 * sigma2 * jnp.trace(A))
    losses = np.asarray(steps.loss)
    se = losses.std(ddof=1) / np.sqrt(n)
    assert abs(losses.mean() - expected) < 5 * se
    assert abs(losses.mean() - float(Lq(w) + sigma2 * jnp.trace(A))) > 10 * se  # the paper's σ² would fail
    f = lambda p: loss_fn(p, None, None)[0]  # noqa: E731
    sample = lambda e: common.tree_dot(e, common.hvp(f, params, e))  # noqa: E731 (Hutchinson: εᵀHε)
    hutch = jax.jit(jax.vmap(lambda k: sample(tree_normal(k, params))))(keys)
    ht = float(Lq(w)) + 0.5 * sigma2 * np.asarray(hutch)
    assert abs(ht.mean() - expected) < 5 * ht.std(ddof=1) / np.sqrt(n)
    mc_close(jax.vmap(flat_of)(steps.direction), jax.grad(Lq)(w), jnp.zeros_like(w))


def test_weight_noise_sample_is_sigma_times_normal():
    """One sample: the direction is ∇L0 at θ + σ ε with ε = tree_normal(key); σ² = 0 is sgd."""
    params, loss_fn, batch, w, unravel, L = setup("gelu")
    key = jax.random.key(3)
    eps = flat_of(tree_normal(key, params))
    step = run("weight_noise", loss_fn, params, batch, key, sigma2=0.04)
    np.testing.assert_allclose(flat_of(step.direction), jax.grad(L)(w + 0.2 * eps), rtol=1e-5, atol=1e-6)
    for name, s in run_all(list(RULES), loss_fn, params, batch, key, rho=0.0, sigma2=0.0).items():
        # every penalty vanishes at ρ = σ² = 0
        np.testing.assert_allclose(flat_of(s.direction), jax.grad(L)(w), rtol=1e-5, atol=1e-6, err_msg=name)


#### BatchNorm: every rule runs under jit and updates the running statistics once, from the clean pass


class BNNet(eqx.Module):
    """linear-BN-gelu-linear with the repo's own BatchNorm."""

    lin1: eqx.nn.Linear
    bn: BN
    lin2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.lin1 = eqx.nn.Linear(3, 4, key=k1)
        self.bn = BN(4)
        self.lin2 = eqx.nn.Linear(4, 3, key=k2)

    def __call__(self, x, state):
        h, state = self.bn(self.lin1(x), state)
        return self.lin2(activation("gelu")(h)), state


@pytest.mark.parametrize("name", list(RULES))
def test_batchnorm_state_updated_once_from_clean_pass(name):
    model, state = eqx.nn.make_with_state(BNNet)(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    kx, ky = jax.random.split(jax.random.key(1))
    x, y = 2.0 + jax.random.normal(kx, (8, 3)), jax.random.randint(ky, (8,), 0, 3)

    def loss_fn(p, st, b):
        m = eqx.combine(p, static)
        z, st = jax.vmap(m, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(b[0], st)
        return cross_entropy(z, b[1]), (st, z)

    key = jax.random.key(2)
    step = jax.jit(lambda p, s, k: RULES[name](loss_fn, p, s, (x, y), k, hp(rho=0.5, sigma2=0.25)))(params, state, key)
    # Independent reference: pre-BN batch statistics at θ (θ+σε for weight_noise), one update of the
    # zero-initialised running averages (momentum 0.9).
    lin1 = params.lin1
    if name == "weight_noise":
        noisy = jax.tree.map(lambda w, e: w + 0.5 * e, params, tree_normal(key, params))
        lin1 = noisy.lin1
    h = x @ lin1.weight.T + lin1.bias
    n, mean, var = step.state.get(model.bn.index)
    assert int(n) == 1
    np.testing.assert_allclose(mean, 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, 0.1 * h.var(0), rtol=1e-5, atol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(d))) for d in jax.tree.leaves(step.direction))
