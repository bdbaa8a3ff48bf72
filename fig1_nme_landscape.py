"""Figure 1: the loss and the norm of the Nonlinear Modeling Error (NME) over two weights of one layer.

A small MLP, x -> φ(W1 x + b1) -> φ(W2 h + b2) -> v·h + c, with the MSE loss L = ½ (f − y)² on one
data point. Over a grid of two weights of its first hidden layer (W1[0,0] and W1[1,0], feeding
two different units) every other parameter is held fixed, and at each point we compute, densely
in float64 over ALL parameters,

    NME = ∇²L − Jᵀ H_z J,  J = ∂f/∂θ,  H_z = ∂²L/∂f² = 1  (so GN = JᵀJ),

and its Frobenius norm. Paper: with ReLU the network is piecewise linear in the weights of one
layer, so the loss is piecewise quadratic and the NME carries little information pointwise (the
region boundaries show only as jumps); with β-GELU the NME is large only within ~1/β of those
boundaries, an "edge detector" for switching between linear regions.

    uv run python fig1_nme_landscape.py                # relu and β-GELU at β = 1, 4, 16: 25 s
    uv run python fig1_nme_landscape.py --betas 2 8 32 --grid 201 --out /tmp/fig1
    uv run python fig1_nme_landscape.py --plot-only    # redraw the PNG from the CSV
    uv run python fig1_nme_landscape.py --smoke --out /tmp/smoke       # 11x11 grid, β = 1 and 16: ~20 s

Writes <out>/fig1_nme_landscape.csv (columns w1, w2, activation, beta, loss, nme_norm; one block of
grid points per activation, appended as it finishes; rerunning skips the activations already
there, so use a new --out for a changed grid), .png (one row per activation: loss left, ‖NME‖_F
right, log colour scale) and .config.json. No dataset, no training: --dataset etc. do not apply.

Measured (2 CPU cores; 101x101 grid, 113 parameters): 24 s. ‖NME‖_F over the
grid, median / max: relu 5.3 / 15.7, piecewise constant with jumps at the region boundaries;
β-GELU β = 1: 4.1 / 16.2, smooth; β = 4: 6.0 / 24; β = 16: 6.4 / 72, concentrated in ridges of
width ~1/β along the same boundaries, as in the paper's Figure 1.
"""

import csv
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import common

NAME = os.path.splitext(os.path.basename(__file__))[0]
USES_BETA = ("beta_gelu", "relu_aug")  # the others are drawn once, with beta = nan in the CSV


@dataclasses.dataclass(frozen=True)
class Config:
    activations: tuple[str, ...] = ("relu", "beta_gelu")
    betas: tuple[float, ...] = (1.0, 4.0, 16.0)  # of every activation in USES_BETA
    grid: int = 101  # points per axis
    extent: float = 3.0  # the two weights range over [-extent, extent]
    in_dim: int = 3
    width: int = 8  # of both hidden layers
    target: float = 1.0  # y of the one data point
    seed: int = 0  # of the data point and of every parameter held fixed
    out: str = "results"
    smoke: bool = False  # an 11x11 grid, first and last β
    plot_only: bool = False


def init(cfg: Config) -> tuple[dict, jax.Array]:
    """(parameters, data point x): Gaussian, variance 1/fan-in for weights, 0.1² for biases."""
    k = jax.random.split(jax.random.key(cfg.seed), 7)
    n, w = cfg.in_dim, cfg.width
    params = {"W1": jax.random.normal(k[0], (w, n)) / math.sqrt(n), "b1": 0.1 * jax.random.normal(k[1], (w,)),
              "W2": jax.random.normal(k[2], (w, w)) / math.sqrt(w), "b2": 0.1 * jax.random.normal(k[3], (w,)),
              "v": jax.random.normal(k[4], (1, w)) / math.sqrt(w), "c": 0.1 * jax.random.normal(k[5], (1,))}
    return params, jax.random.normal(k[6], (n,))


def run_one(cfg: Config, act_name: str, beta: float) -> list[dict]:
    """The grid of (w1, w2, loss, ‖NME‖_F) for one activation: its CSV rows."""
    with jax.enable_x64(True):
        act = common.activation(act_name, beta if act_name in USES_BETA else 1.0)
        params, x = jax.tree.map(lambda a: a.astype(jnp.float64), init(cfg))
        theta0, unravel = ravel_pytree(params)
        marker = jax.tree.map(jnp.zeros_like, params)
        marker["W1"] = marker["W1"].at[0, 0].set(1.0).at[1, 0].set(2.0)
        i1, i2 = (int(jnp.argmax(ravel_pytree(marker)[0] == m)) for m in (1.0, 2.0))

        def f(theta):
            p = unravel(theta)
            h = act(p["W1"] @ x + p["b1"])
            h = act(p["W2"] @ h + p["b2"])
            return p["v"] @ h + p["c"]  # shape (1,)

        loss = lambda theta: 0.5 * jnp.sum((f(theta) - cfg.target) ** 2)

        def point(w):
            theta = theta0.at[i1].set(w[0]).at[i2].set(w[1])
            jac = jax.jacobian(f)(theta)  # (1, P); H_z = 1 for ½(f − y)²
            nme = jax.hessian(loss)(theta) - jac.T @ jac
            return loss(theta), jnp.linalg.norm(nme)

        axis = np.linspace(-cfg.extent, cfg.extent, 11 if cfg.smoke else cfg.grid)
        w1, w2 = (a.ravel() for a in np.meshgrid(axis, axis, indexing="xy"))
        losses, norms = jax.lax.map(jax.jit(point), jnp.stack([w1, w2], 1), batch_size=256)
    b = beta if act_name in USES_BETA else math.nan
    return [{"w1": f"{a:.6g}", "w2": f"{c:.6g}", "activation": act_name, "beta": b, "loss": f"{lo:.6g}",
             "nme_norm": f"{n:.6g}"} for a, c, lo, n in zip(w1, w2, np.asarray(losses), np.asarray(norms))]


def append_rows(path: str, rows: list[dict]) -> None:
    """common.append_row for a whole block: one write and one fsync instead of one per grid point."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())


def plot(csv_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    rows = common.read_rows(csv_path)
    if not rows:
        raise common.ConfigError(f"no results in {csv_path} to plot")
    panels = list(dict.fromkeys((r["activation"], r["beta"]) for r in rows))
    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 3.3 * len(panels)), squeeze=False)
    for (act, beta), (ax_l, ax_n) in zip(panels, axes):
        sub = [r for r in rows if (r["activation"], r["beta"]) == (act, beta)]
        n = int(round(math.sqrt(len(sub))))
        grid = lambda k: np.array([float(r[k]) for r in sub]).reshape(n, n)  # noqa: E731  (w2 rows, w1 columns)
        ext = [float(sub[0]["w1"]), float(sub[-1]["w1"]), float(sub[0]["w2"]), float(sub[-1]["w2"])]
        label = act if beta == "nan" else f"{act}, β = {float(beta):g}"
        nme = grid("nme_norm")
        positive = nme[nme > 0]
        norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-6), vmax=positive.max()) if positive.size else None
        for ax, z, title, kw in ((ax_l, grid("loss"), "loss", {}), (ax_n, nme, "‖NME‖_F", {"norm": norm})):
            im = ax.imshow(z, origin="lower", extent=ext, aspect="auto", cmap="viridis", **kw)
            fig.colorbar(im, ax=ax)
            ax.set(title=f"{label}: {title}", xlabel="w1 = W1[0,0]", ylabel="w2 = W1[1,0]")
    fig.suptitle("Fig. 1: MLP, MSE on one data point; two weights of the first hidden layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__)
    if cfg.grid < 2 or not cfg.extent > 0 or cfg.in_dim < 2 or cfg.width < 2:
        raise common.ConfigError("need --grid >= 2, --extent > 0, --in-dim >= 2 and --width >= 2")
    csv_path, png_path = (os.path.join(cfg.out, NAME + ext) for ext in (".csv", ".png"))
    if not cfg.plot_only:
        betas = tuple(dict.fromkeys((cfg.betas[0], cfg.betas[-1]))) if cfg.smoke else cfg.betas
        panels = [(a, b) for a in cfg.activations for b in (betas if a in USES_BETA else (math.nan,))]
        for a, b in panels:
            common.activation(a, b if a in USES_BETA else 1.0)  # bad names or β fail before any work
        os.makedirs(cfg.out, exist_ok=True)
        common.write_config(cfg.out, cfg, NAME)
        done = {common.row_key(r, ("activation", "beta")) for r in common.read_rows(csv_path)}
        for a, b in panels:
            if common.row_key({"activation": a, "beta": b}, ("activation", "beta")) in done:
                continue
            rows = run_one(cfg, a, b)
            append_rows(csv_path, rows)
            print(f"{NAME}: {a} beta={b:g}: {len(rows)} grid points, max ‖NME‖_F "
                  f"{max(float(r['nme_norm']) for r in rows):.3g}", flush=True)
    plot(csv_path, png_path)
    print(f"{NAME}: plotted {png_path}")


if __name__ == "__main__":
    common.run_cli(main)
