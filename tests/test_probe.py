"""The curvature probe (MATH.md §6) against dense float64 references on tests/nets.py's tiny nets, Lanczos
on explicit matrices, and the probe on a model of the zoo."""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import common
import nets
import tools
from common import activation, twin
from tools import lanczos_max, lanczos_tridiagonal, probe

pytestmark = pytest.mark.usefixtures("x64")

ACTS = [("relu", 1.0), ("gelu", 1.0), ("beta_gelu", 4.0), ("relu_aug", 1.0), ("gelu_dim", 1.0)]
KINDS = ["mlp", "conv"]
SAMPLES = 4000  # trace samples: the traces' standard errors are then a few % of the traces
EXTRA_ITERS = 8  # Lanczos runs past the parameter count: exercises the breakdown padding

_erfc = np.vectorize(math.erfc)


def np_cdf(x):
    return 0.5 * _erfc(-x / math.sqrt(2))


def np_pdf(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def twin_activation(name, beta):
    return twin(activation(name, beta))


def np_activation(name, beta):
    """The forward of `name` in NumPy float64."""
    if name in ("relu", "relu_aug"):
        return lambda u: np.maximum(u, 0)
    return lambda u: u * np_cdf((beta if name == "beta_gelu" else 1.0) * u)


def mean_ce(z, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))


def dense(net, act, twin_act, params, x, y):
    """Flattened-parameter references: g, H, H_twin (jax.hessian) and GN = Σ_i J_iᵀ H_z J_i
    (jax.jacobian), with the logits, softmax and per-example Jacobians J [B, C, P]."""
    flat, unravel = ravel_pytree(params)
    z_of = lambda w: net(act, unravel(w), x)
    H = jax.hessian(lambda w: mean_ce(z_of(w), y))(flat)
    H_twin = jax.hessian(lambda w: mean_ce(net(twin_act, unravel(w), x), y))(flat)
    J = jax.jacobian(z_of)(flat)
    z = z_of(flat)
    p = jax.nn.softmax(z)
    Hz = (jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]) / p.shape[0]
    return dict(g=jax.grad(lambda w: mean_ce(z_of(w), y))(flat), H=H, H_twin=H_twin,
                GN=jnp.einsum("bcp,bcd,bdq->pq", J, Hz, J), J=J, z=z, p=p)


# Compile time dominates this file (XLA's CPU codegen): backend optimisation off, the same program.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def data(kind):
    """(params, x, y) of nets.problem(kind, ...): they do not depend on the activation."""

    def make(key):
        params, _, x, y = nets.problem(kind, None, key)
        return params, x, y

    return jax.jit(make, compiler_options=FAST_COMPILE)(jax.random.key(0))  # one compile, not one per array


def iters_for(params):
    return ravel_pytree(params)[0].size + EXTRA_ITERS


@functools.cache
def probe_and_dense(kind):
    """probe and the dense references for every activation of ACTS, in one compile per net: the
    activation is chosen by a traced index (lax.switch), so the ten cases compile twice, not ten
    times (XLA's CPU compile dominates this file). test_float32_plain_jit runs the probe as callers
    jit it, with a plain activation."""
    net = getattr(nets, kind)
    acts = [activation(name, beta) for name, beta in ACTS]
    twins = [twin_activation(name, beta) for name, beta in ACTS]

    def run(index, params, x, y, key, beta):
        act = lambda u: jax.lax.switch(index, acts, u)
        twin_act = lambda u: jax.lax.switch(index, twins, u)
        out = probe(net, act, twin_act, params, x, y, key, beta=beta, samples=SAMPLES, iters=iters_for(params))
        return out, dense(net, act, twin_act, params, x, y)

    return jax.jit(run, compiler_options=FAST_COMPILE)


@functools.cache
def case(kind, name, beta):
    """((params, x, y), probe output, dense references) for one activation; cached across tests."""
    params, x, y = data(kind)
    out, ref = probe_and_dense(kind)(ACTS.index((name, beta)), params, x, y, jax.random.key(1), beta)
    return (params, x, y), {k: float(v) for k, v in out.items()}, jax.tree.map(np.asarray, ref)


CASES = [(kind, name, beta) for kind in KINDS for name, beta in ACTS]


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.slow
@pytest.mark.parametrize("kind,name,beta", CASES)
def test_products_norms_shares_match_dense(kind, name, beta):
    (params, x, y), out, r = case(kind, name, beta)
    g, H, GN = r["g"], r["H"], r["GN"]
    g_hat = g / np.linalg.norm(g)
    hg, gng = H @ g_hat, GN @ g_hat
    resid = r["p"] - np.eye(3)[np.asarray(y)]
    want = {
        "loss": float(mean_ce(jnp.asarray(r["z"]), y)), "grad_norm": np.linalg.norm(g),
        "logit_grad_rms": np.sqrt(np.mean(np.sum(resid**2, axis=1))),
        "hg_norm": np.linalg.norm(hg), "gng_norm": np.linalg.norm(gng), "nmeg_norm": np.linalg.norm(hg - gng),
        "nme_share": np.linalg.norm(hg - gng) / np.linalg.norm(hg),
        "cos_h_gn": hg @ gng / (np.linalg.norm(hg) * np.linalg.norm(gng)),
    }
    for key, value in want.items():
        assert rel(out[key], value) < 1e-10, (key, out[key], value)
    assert 0.0 < want["nme_share"] and want["cos_h_gn"] < 1 - 1e-6  # the NME is not negligible here


@pytest.mark.slow
@pytest.mark.parametrize("kind,name,beta", CASES)
def test_phi2_share_is_the_activation_second_derivative_part(kind, name, beta):
    """‖(H − H_twin) ĝ‖/‖Hĝ‖ from dense Hessians; exactly 0 where the activation is its own twin."""
    _, out, r = case(kind, name, beta)
    g_hat = r["g"] / np.linalg.norm(r["g"])
    if name in ("relu", "gelu_dim"):
        assert out["phi2_share"] <= 1e-12
        np.testing.assert_array_equal(r["H"], r["H_twin"])
    else:
        want = np.linalg.norm((r["H"] - r["H_twin"]) @ g_hat) / np.linalg.norm(r["H"] @ g_hat)
        assert want > 1e-3
        assert rel(out["phi2_share"], want) < 1e-10, (out["phi2_share"], want)


@pytest.mark.slow
@pytest.mark.parametrize("kind,name,beta", CASES)
def test_lambda_max_by_lanczos(kind, name, beta):
    """iters > parameter count: the Krylov space is exhausted and the largest Ritz value exact."""
    _, out, r = case(kind, name, beta)
    for key, M in (("lam_h", r["H"]), ("lam_gn", r["GN"])):
        eig = np.linalg.eigvalsh(M)
        assert abs(out[key] - eig[-1]) < 1e-9 * np.abs(eig).max(), (key, out[key], eig[-1])


def gn_estimator_moments(r):
    """Exact mean, variance and kurtosis of T̂ = B‖Σ_i J_iᵀ(p_i − e_ŷi)/B‖², by enumerating all C^B
    label vectors ŷ with their probabilities Π_i p_i(ŷ_i)."""
    J, p = r["J"], r["p"]
    B, C = p.shape
    labels = np.array(list(itertools.product(range(C), repeat=B)))  # [C^B, B]
    prob = np.prod(p[np.arange(B), labels], axis=1)
    resid = (p[None] - np.eye(C)[labels]) / B  # [C^B, B, C]
    T = B * np.sum(np.einsum("mbc,bcp->mp", resid, J) ** 2, axis=1)
    mean = prob @ T
    var = prob @ (T - mean) ** 2
    return mean, var, prob @ (T - mean) ** 4 / var**2


@pytest.mark.slow
@pytest.mark.parametrize("kind,name,beta", CASES)
def test_trace_estimates(kind, name, beta):
    """Means within 5 exact standard errors of the exact traces; reported SEs within 5 of their own
    standard deviations (from the kurtosis) of the exact SE. Exact moments: Hutchinson with Gaussian
    ε has variance 2 tr H² and kurtosis 3 + 12 tr H⁴/(tr H²)²; T̂'s by enumeration."""
    _, out, r = case(kind, name, beta)
    H, GN = r["H"], r["GN"]
    gn_mean, gn_var, gn_kurt = gn_estimator_moments(r)
    assert rel(gn_mean, np.trace(GN)) < 1e-10  # the reference: T̂ is unbiased with the factor B
    h_var = 2 * np.trace(H @ H)
    h_kurt = 3 + 12 * np.trace(np.linalg.matrix_power(H, 4)) / np.trace(H @ H) ** 2
    k = SAMPLES
    for key, exact, var, kurt in (("tr_h", np.trace(H), h_var, h_kurt), ("tr_gn", np.trace(GN), gn_var, gn_kurt)):
        se = math.sqrt(var / k)
        assert se < 0.1 * abs(exact), (key, se, exact)  # power: a factor B or 2 off would fail
        assert abs(out[key] - exact) < 5 * se, (key, out[key], exact, se)
        assert rel(out[key + "_se"], se) < 5 * math.sqrt((kurt - 1) / (4 * k)), (key, out[key + "_se"], se)
    assert abs(out["tr_nme"] - (out["tr_h"] - out["tr_gn"])) < 1e-12 * abs(out["tr_h"])
    assert rel(out["tr_nme_se"], math.hypot(out["tr_h_se"], out["tr_gn_se"])) < 1e-12
    assert abs(out["tr_nme"] - np.trace(H - GN)) < 5 * math.sqrt((h_var + gn_var) / k)


def conv_np(h, k):
    """VALID cross-correlation, NCHW input, OIHW kernel, as lax.conv_general_dilated computes it."""
    kh, kw = k.shape[2:]
    H, W = h.shape[2] - kh + 1, h.shape[3] - kw + 1
    patches = np.stack([h[:, :, i:i + H, j:j + W] for i in range(kh) for j in range(kw)], axis=-1)
    return np.einsum("bchwk,ock->bohw", patches, k.reshape(*k.shape[:2], -1))


def preactivations(kind, name, beta, params, x):
    """Every hidden layer's pre-activations in NumPy float64."""
    p, x, f = jax.tree.map(np.asarray, params), np.asarray(x), np_activation(name, beta)
    if kind == "mlp":
        return [x @ p["w1"] + p["b1"]]
    u1 = conv_np(x, p["k1"])
    return [u1, conv_np(f(u1), p["k2"])]


@pytest.mark.slow
@pytest.mark.parametrize("kind,name,beta", CASES)
def test_support_fractions(kind, name, beta):
    (params, x, _), out, _ = case(kind, name, beta)
    pre = preactivations(kind, name, beta, params, x)
    assert sorted(k for k in out if k.startswith("support_")) == [f"support_{i}" for i in range(len(pre))]
    for i, u in enumerate(pre):
        assert abs(out[f"support_{i}"] - np.mean(np.abs(u) < 1 / beta)) < 1e-15, (i, out[f"support_{i}"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_beta_is_traced(kind):
    """One compiled probe serves every β: only the support fractions change, and they match NumPy."""
    name, beta = "beta_gelu", 4.0
    (params, x, y), ref, _ = case(kind, name, beta)
    f = probe_and_dense(kind)
    for b in (0.5, 2.0):
        out, _ = f(ACTS.index((name, beta)), params, x, y, jax.random.key(1), b)
        for i, u in enumerate(preactivations(kind, name, beta, params, x)):
            assert abs(float(out[f"support_{i}"]) - np.mean(np.abs(u) < 1 / b)) < 1e-15
        assert all(float(out[k]) == v for k, v in ref.items() if not k.startswith("support_"))
    assert f._cache_size() == 1


@pytest.mark.slow
def test_float32_plain_jit():
    """The probe as callers jit it, with a plain activation and β an array, at default precision
    (x64 off): float32 outputs, close to the float64 probe."""
    (params, x, y), ref, _ = case("mlp", "gelu", 1.0)
    params, x, y = jax.tree.map(np.asarray, (params, x, y))
    with jax.enable_x64(False):
        params, x = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (params, x))
        f = jax.jit(functools.partial(probe, nets.mlp, activation("gelu"), activation("gelu_dim")),
                    static_argnames=("samples", "iters"), compiler_options=FAST_COMPILE)
        out = f(params, x, jnp.asarray(y, jnp.int32), jax.random.key(1), beta=jnp.asarray(1.0), samples=8, iters=20)
        assert all(v.dtype == jnp.float32 and v.shape == () for v in out.values())
        assert set(out) == set(ref)
        for key in ("loss", "grad_norm", "logit_grad_rms", "hg_norm", "gng_norm", "nmeg_norm", "nme_share",
                    "cos_h_gn", "phi2_share", "support_0"):
            assert rel(float(out[key]), ref[key]) < 1e-5, (key, float(out[key]), ref[key])
        # 20 Lanczos steps on 31 parameters: converged to λ_max within the float32 rounding of the Hessian
        # products (each ~10 sums deep: a Ritz value may land a few EPS32·‖H‖ above λ_max; 1.3 EPS32 seen)
        for key in ("lam_h", "lam_gn"):
            assert abs(float(out[key]) - ref[key]) < 1e-5 * ref[key], (key, float(out[key]), ref[key])


#### Lanczos on explicit matrices


def spectra(n, rng):
    A = rng.normal(size=(n, n))
    U = rng.normal(size=(n, 5))
    return {"indefinite": A + A.T, "rank 5 PSD": U @ U.T, "negative definite": -(A @ A.T) - 0.1 * np.eye(n),
            "two eigenvalues": np.diag(np.r_[np.ones(10), 2 * np.ones(n - 10)])}


def test_lanczos_max_exact_past_the_krylov_dimension():
    """Early breakdown (low rank, two eigenvalues) and iters > n: the padding never adds a Ritz value
    (a zero-padded T would report 0 > λ_max for the negative definite matrix)."""
    rng = np.random.default_rng(0)
    for iters in (31, 45):
        f = jax.jit(lambda M, v0: lanczos_max(lambda v: M @ v, v0, iters))
        for label, M in spectra(31, rng).items():
            want = np.linalg.eigvalsh(M)[-1]
            got = float(f(jnp.asarray(M), jnp.asarray(rng.normal(size=31))))
            assert abs(got - want) < 1e-12 * np.abs(M).sum(1).max(), (label, iters, got, want)


def test_lanczos_from_below():
    """Few steps: the largest Ritz value is a lower bound that increases with the step count (Cauchy
    interlacing: T of k steps is the leading k×k block of T of more steps) and converges to λ_max."""
    rng = np.random.default_rng(1)
    n = 300
    lam = np.r_[np.linspace(-1.0, 1.0, n - 1), 1.5]
    Q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    M = jnp.asarray(Q * lam @ Q.T)
    v0 = jnp.asarray(rng.normal(size=n))
    T, top = jax.jit(lambda M, v0: (lanczos_tridiagonal(lambda v: M @ v, v0, 24),
                                    lanczos_max(lambda v: M @ v, v0, 24)))(M, v0)
    ritz = [np.linalg.eigvalsh(np.asarray(T)[:k, :k])[-1] for k in range(1, 25)]
    assert np.all(np.diff(ritz) >= -1e-14) and ritz[-1] <= 1.5 + 1e-12 and ritz[0] < 1.0
    assert abs(ritz[-1] - 1.5) < 1e-8
    assert abs(float(top) - ritz[-1]) < 1e-14


#### The probe on a model of the zoo (per-example models, BatchNorm in inference mode)


@pytest.mark.slow
def test_probe_step_on_the_zoo():
    """probe_step: the φ″ share is exactly 0 for relu and positive for relu_aug (same forward, same first
    derivative); one support fraction per hidden layer, smaller for a larger β."""
    with jax.enable_x64(False):
        x = np.random.default_rng(0).integers(0, 255, (64, 8, 8, 1), dtype=np.uint8)
        y = (np.arange(64) % 10).astype(np.int32)
        mean, std = (100.0,), (60.0,)
        got = {}
        for name, beta in (("relu", 1.0), ("relu_aug", 1.0), ("relu_aug", 8.0)):  # β is traced: 2 compiles
            net = common.NetSpec("mlp16", name, 10, 1)
            model, state = common.make_model("mlp16", 10, activation(name), jax.random.key(0), in_channels=1)
            params = common.eqx.filter(model, common.eqx.is_inexact_array)
            got[name, beta] = {k: float(v) for k, v in tools.probe_step(
                net, mean, std, params, state, jnp.float32(beta), x, y, jax.random.key(1)).items()}
        assert got["relu", 1.0]["phi2_share"] == 0 and got["relu_aug", 1.0]["phi2_share"] > 1e-3
        assert [k for k in got["relu", 1.0] if k.startswith("support_")] == ["support_0", "support_1"]
        assert got["relu_aug", 8.0]["support_0"] < got["relu_aug", 1.0]["support_0"] < 1


@pytest.mark.slow
@pytest.mark.optimized  # the probe's loops run many times: XLA's optimisations pay here
def test_prober_writes_curves_and_the_final_values(tmp_path):
    from test_train import DATA, QUIET, TINY

    with jax.enable_x64(False):
        cfg = dataclasses.replace(TINY, epochs=1, activation="gelu")
        row = lambda opts: tools.probe_row(cfg, 0, opts, curves=tmp_path / "c.csv", every=8, data=DATA)  # noqa: E731
        r = row(QUIET)
        rows = common.read_rows(tmp_path / "c.csv")
        assert [int(row["step"]) for row in rows] == [8, 16] and rows[-1]["activation"] == "gelu"
        assert float(rows[-1]["phi2_share"]) == pytest.approx(r["probe_phi2_share"])
        row(QUIET)  # a rerun
        assert len(common.read_rows(tmp_path / "c.csv")) == 2  # replaces its rows, never duplicates
        # Resumed from its final checkpoint (killed before its result row was written): rows and values kept.
        opts = dataclasses.replace(QUIET, ckpt_dir=str(tmp_path / "ckpt"))
        first, again = row(opts), row(opts)
        assert len(common.read_rows(tmp_path / "c.csv")) == 2
        assert again["probe_phi2_share"] == pytest.approx(first["probe_phi2_share"], rel=1e-6)
