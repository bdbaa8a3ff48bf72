"""Figure 1: the loss and the Nonlinear Modeling Error (NME) over two weights of one layer.

A small MLP, x -> φ(W1 x + b1) -> φ(W2 h + b2) -> v·h + c, with the MSE loss L = ½ (f − y)² on one
data point. Over a grid of two weights of its first hidden layer (w1 = W1[0,0] and w2 = W1[1,0],
feeding two different units) every other parameter is held fixed, and at each point we compute
densely, in float64,

    NME = ∇²L − Jᵀ H_z J,  J = ∂f/∂θ,  H_z = ∂²L/∂f² = 1  (so GN = JᵀJ),

and the Frobenius norm of its 2×2 block over (w1, w2), as the paper draws it. Paper: with ReLU the
network is piecewise linear in the weights of one layer, so the loss is piecewise quadratic in
(w1, w2) and that block of the NME is 0 everywhere (its second derivatives in w1, w2 vanish inside
every linear region); with β-GELU the block is large only within ~1/β of the region boundaries, an
"edge detector" for switching between linear regions. The norm over all 113 parameters is drawn as
an extra panel: it is dominated by cross-layer terms that hold no φ″ and says little about φ″.

    uv run fig1_nme_landscape.py                # relu and β-GELU at β = 1, 4, 16: 20 s
    uv run fig1_nme_landscape.py --betas 2 8 32 --grid 201
    uv run fig1_nme_landscape.py --plot-only    # redraw the PNG from the CSV
    uv run fig1_nme_landscape.py --smoke        # 11x11 grid, β = 1 and 16

Writes <out>/fig1_nme_landscape.csv (columns setup, w1, w2, activation, beta, loss, nme_block,
nme_all; one block of grid points per activation, appended as it finishes; rerunning skips the
activations already there, and a grid of another setup is refused), .png (one row per activation:
loss, ‖NME‖ of the (w1, w2) block, ‖NME‖_F over all parameters) and .config.json. <out> defaults
to runs/fig1_nme_landscape/; the committed results are in results/ (--out results), and what they
show in results/README.md, Fig. 1.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import common

NAME = os.path.splitext(os.path.basename(__file__))[0]


@dataclasses.dataclass(frozen=True)
class Config:
    activations: tuple[str, ...] = ("relu", "beta_gelu")
    betas: tuple[float, ...] = (1.0, 4.0, 16.0)  # of every activation that uses β; the others: beta nan
    grid: int = common.setting(101, common.at_least(2), help="points per axis")
    extent: float = common.setting(3.0, common.above(0), help="the two weights range over [-extent, extent]")
    in_dim: int = common.setting(3, common.at_least(2))
    width: int = common.setting(8, common.at_least(2), help="of both hidden layers")
    target: float = 1.0  # y of the one data point
    seed: int = 0  # of the data point and of every parameter held fixed
    out: str | None = None  # None: runs/fig1_nme_landscape/ beside the script
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
        act = common.activation(act_name, beta if uses_beta(act_name) else 1.0)
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
            block = nme[jnp.array([i1, i2])][:, jnp.array([i1, i2])]
            return loss(theta), jnp.linalg.norm(block), jnp.linalg.norm(nme)

        axis = np.linspace(-cfg.extent, cfg.extent, 11 if cfg.smoke else cfg.grid)
        w1, w2 = (a.ravel() for a in np.meshgrid(axis, axis, indexing="xy"))
        losses, blocks, norms = jax.lax.map(jax.jit(point), jnp.stack([w1, w2], 1), batch_size=256)
    b = beta if uses_beta(act_name) else math.nan
    return [{"setup": setup(cfg), "w1": f"{a:.6g}", "w2": f"{c:.6g}", "activation": act_name, "beta": b,
             "loss": f"{lo:.6g}", "nme_block": f"{nb:.6g}", "nme_all": f"{n:.6g}"}
            for a, c, lo, nb, n in zip(w1, w2, np.asarray(losses), np.asarray(blocks), np.asarray(norms))]


def uses_beta(act_name: str) -> bool:
    return common.ACTIVATIONS[act_name].uses_beta


def setup(cfg: Config) -> str:
    """The fields that define the grid, as one CSV column: blocks of another setup are never mixed."""
    return (f"grid={11 if cfg.smoke else cfg.grid} extent={cfg.extent:g} in_dim={cfg.in_dim} width={cfg.width} "
            f"target={cfg.target:g} seed={cfg.seed}")


def plot(rows: list[dict], png_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    panels = list(dict.fromkeys((r["activation"], r["beta"]) for r in rows))
    fig, axes = plt.subplots(len(panels), 3, figsize=(13, 3.3 * len(panels)), squeeze=False)
    for (act, beta), row_axes in zip(panels, axes):
        sub = [r for r in rows if (r["activation"], r["beta"]) == (act, beta)]
        n = int(round(math.sqrt(len(sub))))
        grid = lambda k: np.array([float(r[k]) for r in sub]).reshape(n, n)  # noqa: E731  (w2 rows, w1 columns)
        ext = [float(sub[0]["w1"]), float(sub[-1]["w1"]), float(sub[0]["w2"]), float(sub[-1]["w2"])]
        label = act if beta == "nan" else f"{act}, β = {float(beta):g}"
        panes = (("loss", grid("loss"), False), ("‖NME‖ of the (w1, w2) block", grid("nme_block"), True),
                 ("‖NME‖_F, all parameters (extra)", grid("nme_all"), True))
        for ax, (title, z, log) in zip(row_axes, panes):
            z = np.where(z > 1e-12, z, 0.0)  # rounding (relu's block is ≤ 3e-17) drawn as 0
            title += " ≡ 0" if not z.any() else ""
            positive = z[z > 0]
            norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-6), vmax=positive.max()) \
                if log and positive.size else None
            im = ax.imshow(z, origin="lower", extent=ext, aspect="auto", cmap="viridis", norm=norm)
            fig.colorbar(im, ax=ax)
            ax.set(title=f"{label}: {title}", xlabel="w1 = W1[0,0]", ylabel="w2 = W1[1,0]")
    fig.suptitle("Fig. 1: MLP, MSE on one data point; two weights of the first hidden layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__)
    common.validate(cfg)
    for a in cfg.activations:
        common.activation(a)  # bad names and β fail before any work
    betas = tuple(dict.fromkeys((cfg.betas[0], cfg.betas[-1]))) if cfg.smoke else cfg.betas
    panels = [(a, b) for a in cfg.activations for b in (betas if uses_beta(a) else (math.nan,))]
    for a, b in panels:
        common.activation(a, b if uses_beta(a) else 1.0)
    out = common.output_dir(cfg.out, common.default_out(__file__))
    csv_path, png_path = out / f"{NAME}.csv", out / f"{NAME}.png"
    if not cfg.plot_only:
        common.check_setup(csv_path, [{"setup": setup(cfg)}], fields=("setup",))
        common.write_config(out, NAME, cfg)
        for a, b in common.pending(csv_path, panels, lambda p: {"activation": p[0], "beta": p[1]},
                                   ("activation", "beta")):
            rows = run_one(cfg, a, b)
            common.append_rows(csv_path, rows)
            print(f"{NAME}: {a} beta={b:g}: {len(rows)} grid points, max ‖NME‖ of the block "
                  f"{max(float(r['nme_block']) for r in rows):.3g}, all parameters "
                  f"{max(float(r['nme_all']) for r in rows):.3g}", flush=True)
    rows = common.read_rows(csv_path)
    if not rows:
        raise common.ConfigError(f"--plot-only: no results in {csv_path}")
    plot(rows, png_path)
    print(f"{NAME}: plotted {png_path}")


if __name__ == "__main__":
    common.run_cli(main)
