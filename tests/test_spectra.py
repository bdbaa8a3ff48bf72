"""Spectra (MATH.md §8): SLQ quadrature, extreme eigenvalues and Hutch++ of the probe's operators, against
dense float64 matrices of tests/nets.py's tiny nets and explicit matrices; the spectra callback in training."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
import nets
import tools
from common import activation, twin
from test_probe import FAST_COMPILE, dense
from tools import flat_operators, rademacher, ritz_extremes, slq

pytestmark = pytest.mark.usefixtures("x64")

CASES = [(kind, name) for kind in ("mlp", "conv") for name in ("relu", "gelu")]
OPS = ("H", "GN", "NME", "H_twin", "phi2")


@functools.cache
def case(kind, name):
    """(n, {operator: dense float64 matrix}, (params, x, y), net) for one tiny net and activation."""
    net = getattr(nets, kind)
    params, _, x, y = nets.problem(kind, None, jax.random.key(0))
    act = activation(name)
    r = jax.tree.map(np.asarray, dense(net, act, twin(act), params, x, y))
    mats = {"H": r["H"], "GN": r["GN"], "NME": r["H"] - r["GN"], "H_twin": r["H_twin"], "phi2": r["H"] - r["H_twin"]}
    return r["H"].shape[0], mats, (params, x, y), net


@functools.cache
def network_slq(kind, name, starts, steps):
    """slq of every operator as flat_operators gives it (matrix-free products through the net)."""
    n, _, (params, x, y), net = case(kind, name)

    def run(params, x, y, key):
        ops, _ = flat_operators(net, activation(name), twin(activation(name)), params, x, y)
        return {o: slq(ops[o], key, n, starts=starts, steps=steps, dtype=jnp.float64) for o in OPS}

    return jax.tree.map(np.asarray, jax.jit(run, compiler_options=FAST_COMPILE)(params, x, y, jax.random.key(3)))


def hutchinson(matvec, key, n: int, products: int, dtype=jnp.float32):
    """tr(A) ≈ the mean of vᵀAv over `products` Rademacher vectors: unbiased."""
    v = rademacher(key, (products, n), dtype)
    return jnp.mean(jax.lax.map(lambda u: jnp.vdot(u, matvec(u)), v))


def hutchpp(matvec, key, n: int, products: int, dtype=jnp.float32):
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021; MATH.md §8) with `products` ≥ 3 products of A:
    Q = orth(A S) from s = products//3 Rademacher vectors, tr(QᵀAQ) exactly (s products), and
    Hutchinson on (I − QQᵀ)A(I − QQᵀ) with the products − 2s left. Unbiased for any symmetric A; far
    below Hutchinson's variance when A is PSD with a decaying spectrum."""
    s = products // 3
    k_sketch, k_rest = jax.random.split(key)
    Q, _ = jnp.linalg.qr(jax.lax.map(matvec, rademacher(k_sketch, (s, n), dtype)).T)  # [n, s]
    exact = jnp.sum(Q.T * jax.lax.map(matvec, Q.T))
    G = rademacher(k_rest, (products - 2 * s, n), dtype)
    G = G - (G @ Q) @ Q.T
    return exact + jnp.mean(jax.lax.map(lambda u: jnp.vdot(u, matvec(u)), G))


@pytest.mark.parametrize("kind,name", CASES)
def test_quadrature_moments_of_each_start(kind, name):
    """Gauss quadrature: with m = 3 steps, Σ_j w_j θ_jᵖ = vᵀAᵖv/‖v‖² for p ≤ 2m − 1 = 5, for each start
    and every operator, to float64 rounding (relative to ‖A‖ᵖ)."""
    starts, steps = 3, 3
    n, mats, *_ = case(kind, name)
    v = np.asarray(rademacher(jax.random.key(3), (starts, n), jnp.float64)) / np.sqrt(n)
    got = network_slq(kind, name, starts, steps)
    for o in OPS:
        A = mats[o]
        scale = np.linalg.norm(A, 2)
        nodes, w = got[o]
        assert np.all(w >= 0)
        for p in range(5):
            want = np.einsum("in,nm,im->i", v, np.linalg.matrix_power(A, p), v)
            have = np.sum(w * nodes**p, axis=1)
            assert np.allclose(have, want, rtol=0, atol=1e-12 * scale**p), (o, p, have, want)


def test_moments_unbiased_over_starts():
    """Over random starts the quadrature moments average to tr(Aᵖ)/n, p = 0…4, within 4 standard errors
    (the H and NME of the gelu mlp: indefinite, distinct eigenvalues)."""
    starts, steps = 400, 3
    n, mats, *_ = case("mlp", "gelu")
    for o in ("H", "NME"):
        A = jnp.asarray(mats[o])
        nodes, w = jax.jit(lambda A: slq(lambda v: A @ v, jax.random.key(7), n, starts=starts, steps=steps,
                                         dtype=jnp.float64), compiler_options=FAST_COMPILE)(A)
        nodes, w = np.asarray(nodes), np.asarray(w)
        for p in range(5):
            m = np.sum(w * nodes**p, axis=1)
            want = np.trace(np.linalg.matrix_power(mats[o], p)) / n
            se = m.std(ddof=1) / np.sqrt(starts)
            assert abs(m.mean() - want) <= 4 * se + 1e-12 * np.linalg.norm(mats[o], 2) ** p, (o, p, m.mean(), want, se)


@pytest.mark.parametrize("kind,name", CASES)
def test_extreme_eigenvalues(kind, name):
    """One run of m = n steps: the 3 largest and 3 most negative Ritz values are the eigenvalues of H and
    of the NME (eigvalsh); GN's Krylov space is exhausted early (rank r ≤ B(C − 1)), its 3 largest are
    still exact, and the padded steps (weight 0) never enter."""
    n, mats, *_ = case(kind, name)
    got = network_slq(kind, name, 1, n)
    for o in ("H", "NME", "GN"):
        eig = np.linalg.eigvalsh(mats[o])
        top, bottom = (np.asarray(a) for a in ritz_extremes(*(jnp.asarray(a[0]) for a in got[o]), 3))
        tol = 1e-9 * np.abs(eig).max()
        assert np.allclose(top, eig[-3:], rtol=0, atol=tol), (o, top, eig[-3:])
        if o != "GN":  # GN's null space is one Ritz value, not many
            assert np.allclose(bottom, eig[:3], rtol=0, atol=tol), (o, bottom, eig[:3])
    # GN of rank r: the Krylov space has dimension r + 1 (its range and one null vector); asked for r + 2,
    # ritz_extremes gives NaN for the missing one, not a padded step's value
    eig = np.linalg.eigvalsh(mats["GN"])
    r = np.linalg.matrix_rank(mats["GN"], tol=1e-10 * eig[-1])
    top, _ = (np.asarray(a) for a in ritz_extremes(*(jnp.asarray(a[0]) for a in got["GN"]), r + 2))
    assert np.isnan(top[0]) and np.allclose(top[1:], np.r_[0.0, eig[-r:]], rtol=0, atol=1e-9 * eig[-1]), (r, top)


@pytest.mark.parametrize("kind,name", CASES)
def test_gauss_newton_spectrum_nonnegative(kind, name):
    """GN = JᵀH_zJ is PSD: every Ritz value ≥ 0 to float64 rounding; H and the NME are not (a check that
    the test sees negative values where they exist)."""
    n, mats, *_ = case(kind, name)
    for steps in (3, n):
        got = network_slq(kind, name, 3, steps)
        nodes, w = got["GN"]
        assert nodes[w > 0].min() >= -1e-12 * nodes.max(), nodes.min()
    assert got["NME"][0].min() < -1e-3 * got["NME"][0].max()


def test_gauss_newton_nonnegative_float32_zoo():
    """spectra_step on a BatchNorm MLP of the zoo in float32: GN's Ritz values ≥ −1e-5 λ_max (float32
    Lanczos, 24 steps, with reorthogonalisation: rounding of a few eps32·λ_max per step), the NME's
    reach below 0."""
    with jax.enable_x64(False):
        x = np.random.default_rng(0).integers(0, 255, (64, 8, 8, 1), dtype=np.uint8)
        y = (np.arange(64) % 10).astype(np.int32)
        net = common.NetSpec("mlp16", "gelu", 10, 1)
        model, state = common.make_model("mlp16", 10, activation("gelu"), jax.random.key(0), in_channels=1)
        params = common.eqx.filter(model, common.eqx.is_inexact_array)
        got = tools.spectra_step(net, (100.0,), (60.0,), params, state, jnp.float32(1.0), x, y, jax.random.key(1),
                                 starts=2, steps=24)
        (gn, w_gn), (nme, _) = (jax.tree.map(np.asarray, got[o]) for o in ("GN", "NME"))
        assert gn.dtype == np.float32 and gn.shape == (2, 24)
        assert gn[w_gn > 0].min() >= -1e-5 * gn.max(), (gn.min(), gn.max())
        assert nme.min() < -1e-2 * nme.max()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_nme_trace_zero_for_relu(kind):
    """A ReLU net without normalisation is affine in each single parameter (one layer holds it, the masks
    are locally constant), so ∂²z/∂θ_k² = 0: diag(NME) = 0 and tr(NME) = 0 exactly (MATH.md §8). The
    trace Σ_k e_kᵀ NME e_k by matrix-free products vanishes to rounding for relu, not for gelu."""
    traces = {}
    for name in ("relu", "gelu"):
        n, mats, (params, x, y), net = case(kind, name)
        ops, _ = flat_operators(net, activation(name), twin(activation(name)), params, x, y)
        diag = jax.jit(lambda: jax.vmap(lambda e: jnp.vdot(e, ops["NME"](e)))(jnp.eye(n)))()
        traces[name] = (float(diag.sum()), np.abs(np.diag(mats["H"])).sum())
        assert np.allclose(np.asarray(diag), np.diag(mats["NME"]), atol=1e-12 * traces[name][1])
    assert abs(traces["relu"][0]) < 1e-12 * traces["relu"][1]
    assert abs(traces["gelu"][0]) > 1e-3 * traces["gelu"][1]


def decaying_psd(n=100, seed=0):
    Q = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))[0]
    return (Q * (1.0 / np.arange(1, n + 1) ** 2)) @ Q.T


def test_hutchpp_unbiased_and_below_hutchinson():
    """2,000 estimates of each with 15 products: Hutch++'s mean is within 4 SE of tr(A) for a PSD matrix
    with a decaying spectrum (λ_i = 1/i²) and for the NME of the gelu mlp (indefinite); on the former
    its variance is below a tenth of Hutchinson's, whose mean is also within 4 SE."""
    reps, products = 2000, 15
    _, mats, *_ = case("mlp", "gelu")
    for label, A in (("decaying PSD", decaying_psd()), ("NME", mats["NME"])):
        n = A.shape[0]
        M = jnp.asarray(A)
        keys = jax.random.split(jax.random.key(11), reps)
        est = jax.jit(lambda M: {f.__name__: jax.vmap(lambda k: f(lambda v: M @ v, k, n, products, jnp.float64))(keys)
                                 for f in (hutchpp, hutchinson)}, compiler_options=FAST_COMPILE)(M)
        var = {}
        for name, e in est.items():
            e = np.asarray(e)
            se = e.std(ddof=1) / np.sqrt(reps)
            assert abs(e.mean() - np.trace(A)) < 4 * se, (label, name, e.mean(), np.trace(A), se)
            var[name] = e.var(ddof=1)
        if label == "decaying PSD":
            assert var["hutchpp"] < 0.1 * var["hutchinson"], var


@pytest.mark.slow
@pytest.mark.optimized
def test_spectra_prober_writes_rows(tmp_path):
    """The spectra callback in training: rows at the chosen steps only, one per (operator, start, node),
    each start's weights summing to 1; a rerun replaces its rows."""
    from test_train import DATA, QUIET, TINY

    with jax.enable_x64(False):
        cfg = dataclasses.replace(TINY, epochs=1, activation="gelu")
        path = tmp_path / "s.csv"
        for _ in range(2):
            run = common.setup(cfg, 0, DATA, QUIET)
            cb = tools.SpectraProber(run, DATA, path, at={8}, operators=("GN", "NME"), starts=2, steps=5)
            common.fit(run, DATA, QUIET, cb, every=4)
            rows = common.read_rows(path)
            assert len(rows) == 2 * 2 * 5 and {int(r["step"]) for r in rows} == {8}
        for o in ("GN", "NME"):
            for s in range(2):
                w = [float(r["weight"]) for r in rows if r["operator"] == o and int(r["start"]) == s]
                assert abs(sum(w) - 1) < 1e-5


#### Measurements behind the defaults (MATH.md §8): `PYTHONPATH=. uv run python tests/test_spectra.py [mlp256]`


@functools.cache
def slq_of(n, starts, steps):
    return jax.jit(lambda A, key: slq(lambda v: A @ v, key, n, starts=starts, steps=steps, dtype=jnp.float64))


def measure(reps=10):
    """SLQ density error and extreme-eigenvalue error against the dense spectrum of a gelu MLP (n = 754
    parameters, 64 examples, 10 classes) for starts × steps, and the variance of Hutch++ against
    Hutchinson on its GN."""
    with jax.enable_x64(True):
        kp, kx, ky = jax.random.split(jax.random.key(0), 3)
        params = nets.mlp_init(kp, d=20, h=24, c=10)
        x, y = jax.random.normal(kx, (64, 20)), jax.random.randint(ky, (64,), 0, 10)
        act = activation("gelu")
        r = dense(nets.mlp, act, twin(act), params, x, y)
        mats = {"H": np.asarray(r["H"]), "GN": np.asarray(r["GN"]), "NME": np.asarray(r["H"] - r["GN"])}
        n = mats["H"].shape[0]
        print(f"n = {n}; L1 error of the density (σ = 0.01 of the range), |error| of λ_max and λ_min of start 0 "
              f"over the spectral radius; mean of {reps} draws")
        print(f"{'op':4} {'starts':>6} {'steps':>5} {'products':>8} {'L1 density':>10} {'λmax err':>9} "
              f"{'λmin err':>9}")
        for o, A in mats.items():
            eig = np.linalg.eigvalsh(A)
            radius = np.abs(eig).max()
            lo, hi = eig[0], eig[-1]
            grid = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 2001)
            sigma = 0.01 * (hi - lo)
            exact = np.asarray(tools.slq_density(jnp.asarray(eig[None]), jnp.full((1, n), 1.0 / n), grid, sigma))
            for starts in (1, 2, 4, 8):
                for steps in (10, 20, 40, 80):
                    f = slq_of(n, starts, steps)
                    errs = []
                    for i in range(reps):
                        nodes, w = f(jnp.asarray(A), jax.random.key(100 + i))
                        d = np.asarray(tools.slq_density(nodes, w, grid, sigma))
                        top, bottom = ritz_extremes(nodes[0], w[0], 1)
                        errs.append((np.abs(d - exact).sum() * (grid[1] - grid[0]),
                                     abs(float(top[0]) - hi) / radius, abs(float(bottom[0]) - lo) / radius))
                    e = np.mean(errs, axis=0)
                    print(f"{o:4} {starts:6d} {steps:5d} {starts * steps:8d} {e[0]:10.4f} {e[1]:9.2e} {e[2]:9.2e}")
        print("Hutch++ against Hutchinson, Rademacher, 2,000 estimates each: variance ratio")
        A = jnp.asarray(mats["GN"])
        keys = jax.random.split(jax.random.key(5), 2000)
        for products in (12, 30, 60):
            v = {f.__name__: float(jnp.var(jax.vmap(lambda k: f(lambda u: A @ u, k, n, products, jnp.float64))(keys)))
                 for f in (hutchpp, hutchinson)}
            print(f"  GN of the n = {n} MLP, {products} products: Hutchinson {v['hutchinson']:.3e}, "
                  f"Hutch++ {v['hutchpp']:.3e}, ratio {v['hutchinson'] / v['hutchpp']:.1f}")


def measure_mlp256(reps=20, products=30):
    """Hutch++ against Hutchinson on the GN of mlp256 (gelu, at initialisation, seed 0) on the probe's
    512 Fashion-MNIST images, float32."""
    import time

    cfg = common.for_dataset("fashion_mnist")
    data = common.load_data(cfg)
    run = common.setup(cfg, 0, data)
    xb, yb = tools.probe_batch(data, 512)
    act = common.Activation("gelu")
    zoo = tools.inference_net(run.spec.net, run.bn_state)
    xb = common.normalize(jnp.asarray(xb), data.spec.mean, data.spec.std)
    for f in (hutchpp, hutchinson):
        est = jax.jit(lambda p, k: f(flat_operators(zoo, act, twin(act), p, xb, jnp.asarray(yb))[0]["GN"], k,
                                     common.ravel_pytree(p)[0].shape[0], products))
        t = time.perf_counter()
        e = np.array([float(est(run.params, jax.random.key(i))) for i in range(reps)])
        print(f"  GN of mlp256 (gelu, init, 512 images), {products} products, {reps} estimates: {f.__name__} "
              f"mean {e.mean():.4f} sd {e.std(ddof=1):.2e} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    import sys

    measure_mlp256() if sys.argv[1:] == ["mlp256"] else measure()


@pytest.mark.slow
@pytest.mark.optimized
def test_probe_nme_spectra_smoke(tmp_path, capsys):
    """probe_nme.py --spectra --smoke end to end: every run's row, the nodes of every run × step × operator ×
    node, the eigenvalue CSV and the PNG; a rerun trains nothing and adds no node."""
    from test_figures import cli, load

    script = load("probe_nme")
    argv = ["--spectra", "--smoke", "--spectra-steps", "5", "--out", str(tmp_path)]
    with jax.enable_x64(False):
        assert cli(script, argv) == 0
        runs, nodes = (common.read_rows(tmp_path / f"probe_nme_spectra{s}.csv") for s in ("", ".nodes"))
        # 2 methods × 2 activations; 4 smoke steps: spectra at steps 1, 2, 4; 3 operators; 2 starts × 5 nodes
        assert len(runs) == 4 and len(nodes) == 4 * 3 * 3 * 2 * 5
        assert len(common.read_rows(tmp_path / "probe_nme_spectra.eigs.csv")) == 4 * 3 * 3
        assert (tmp_path / "probe_nme_spectra.png").exists()
        capsys.readouterr()
        assert cli(script, argv) == 0
        assert "0 of 4 runs to do" in capsys.readouterr().out
        assert len(common.read_rows(tmp_path / "probe_nme_spectra.nodes.csv")) == len(nodes)
        assert cli(script, argv[:-2] + ["--spectra-at", "0", "--out", str(tmp_path)]) == 2
