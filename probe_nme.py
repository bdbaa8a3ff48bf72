"""The mechanism over training: the curvature probe (MATH.md §6) per activation, under sgd and gp.

The paper explains Figs. 2-4 by the NME: gp's update g + ρ H g/‖g‖ differs between activations only
through the NME's φ″ terms, which are 0 for relu and gelu_dim and positive for gelu, relu_aug and
β-GELU. This script trains each activation under sgd and under gp (p = 1) and, about `probes` times
per run on a fixed batch of 512 training images, measures the φ″ share ‖Hĝ − H_twin ĝ‖/‖Hĝ‖, the NME
share ‖NMEĝ‖/‖Hĝ‖, the RMS logit gradient ‖softmax(z) − onehot(y)‖ (the NME's scale), tr(GN),
tr(NME), λ_max(H) and the fraction of pre-activations within 1/β of 0 (the support of φ″).

    uv run probe_nme.py                        # the MLP regime on Fashion-MNIST, 2 seeds
    uv run probe_nme.py --activations relu gelu --label-noise 0 --out results/regimes/a_default   # a regime candidate
    uv run probe_nme.py --plot-only            # redraw the PNG and print the summary from the CSVs

Writes <out>/probe_nme.csv (a row per run: configuration, results and the last probe's values as
probe_*), probe_nme.curves.csv (a row per probe), .png (one panel per quantity, one row per method,
mean ± 1 sample sd over seeds against the epoch) and .config.json; <out> is
runs/probe_nme/<dataset>-<model>/ unless --out says.

With --spectra: the spectra of H, GN and NME = H − GN (MATH.md §8) at three points of training (5%,
50% and 100% of its steps) for relu and gelu under sgd and gp_p1 at ρ = 0.3, on the same probe batch:

    uv run probe_nme.py --spectra              # the MLP regime, 2 seeds: 8 runs
    uv run probe_nme.py --spectra --plot-only  # redraw the PNG and the eigenvalue CSV from the nodes CSV

Writes <out>/probe_nme_spectra.csv (a row per run: configuration and results), .nodes.csv (tidy: a row
per run × step × operator × start × Lanczos node, with its Ritz value `theta` and quadrature `weight`:
the whole SLQ measure, from which everything else is drawn), .eigs.csv (a row per run × step ×
operator: the 3 largest and 3 most negative Ritz values of start 0, the masses below −ε and above ε,
ε = 0.01 λ_max(GN) of the same run and step, and the SLQ trace estimate), .png (log-density per
operator and run setting at each point, seeds pooled; symmetric axis for the NME) and .config.json.

Measured numbers (the probe's means over training, and the spectra) are in results/README.md;
`--plot-only` prints them again.
"""

import dataclasses
import functools
import math
from pathlib import Path

import jax
import numpy as np

import common
import tools

@dataclasses.dataclass(frozen=True)
class Config(common.Flags):
    activations: tuple[str, ...] = ("relu", "gelu", "relu_aug", "gelu_dim", "beta_gelu")
    betas: tuple[float, ...] = (4.0, 16.0)  # of beta_gelu (β = 1 is gelu)
    methods: tuple[str, ...] = ("sgd", "gp_p1")
    rho: float = 0.1  # of gp_p1
    probes: int = 20  # per run, evenly spaced
    cpu_seeds: int = 2
    spectra: bool = False  # the spectra of H, GN and NME instead of the probe (MATH.md §8)
    spectra_activations: tuple[str, ...] = ("relu", "gelu")
    spectra_methods: tuple[str, ...] = ("sgd", "gp_p1")
    spectra_rho: float = 0.3  # of gp_p1
    spectra_at: tuple[float, ...] = (0.05, 0.5, 1.0)  # fractions of a run's steps
    spectra_operators: tuple[str, ...] = ("H", "GN", "NME")
    spectra_starts: int = 2  # SLQ starts per operator (MATH.md §8: n ≈ 2·10⁵ makes each one nearly exact)
    spectra_steps: int = 40  # Lanczos steps per start; the extremes come from start 0


def runs(cfg: Config, base: common.TrainConfig) -> list[common.TrainConfig]:
    acts = [(a, b) for a in cfg.activations for b in (cfg.betas if a == "beta_gelu" else (1.0,))]
    return [dataclasses.replace(base, activation=a, beta=b, method=m, rho=0.0 if m == "sgd" else cfg.rho)
            for m in cfg.methods for a, b in acts]


def runner(cfg: Config, base: common.TrainConfig, out: Path):
    """Each run with the probe `cfg.probes` times, evenly spaced, its rows in probe_nme.curves.csv."""
    every = max(1, common.run_steps(base)[1] // cfg.probes)
    return functools.partial(tools.probe_row, curves=out / "probe_nme.curves.csv", every=every)


PANELS = {"phi2_share": "φ″ share ‖(H − H_twin)ĝ‖/‖Hĝ‖", "nme_share": "NME share ‖NMEĝ‖/‖Hĝ‖",
          "logit_grad_rms": "RMS ‖softmax(z) − onehot(y)‖", "tr_gn": "tr(GN)",
          "tr_nme": "tr(NME) = tr(H) − tr(GN)",
          "lam_h": "λ_max(H)", "support": "support of φ″: share of |x| < 1/β"}


def setting(r: dict) -> tuple[str, str]:
    """(method with its ρ, activation with its β): what a curve or a summary line averages over seeds."""
    method = r["method"] + (f" ρ={float(r['rho']):g}" if float(r["rho"]) else "")
    return method, r["activation"] + (f" β={float(r['beta']):g}" if r["activation"] == "beta_gelu" else "")


def curves(rows: list[dict]) -> dict:
    """{(method, label): {quantity: (epochs, mean, sd)}} over seeds; `support` is the mean over layers."""
    out: dict = {}
    for r in rows:
        r = r | {"support": np.mean([float(v) for k, v in r.items() if k.startswith("support_") and v])}
        cell = out.setdefault(setting(r), {}).setdefault(float(r["epoch"]), [])
        cell.append(r)
    return {key: {q: (np.array(sorted(by_epoch)),
                      np.array([np.mean([float(r[q]) for r in by_epoch[e]]) for e in sorted(by_epoch)]),
                      np.array([np.std([float(r[q]) for r in by_epoch[e]], ddof=1) if len(by_epoch[e]) > 1 else 0.0
                                for e in sorted(by_epoch)])) for q in PANELS}
            for key, by_epoch in out.items()}


def plot(rows: list[dict], png_path, verdicts=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(common.read_rows(Path(png_path).with_suffix(".curves.csv")))
    methods = sorted({m for m, _ in data}, key=lambda m: (m != "sgd", m))
    fig, axes = plt.subplots(len(methods), len(PANELS), figsize=(3.3 * len(PANELS), 3.0 * len(methods)),
                             squeeze=False)
    for row, method in zip(axes, methods):
        for ax, (q, title) in zip(row, PANELS.items()):
            for (m, label), c in sorted(data.items()):
                if m == method:
                    x, mean, sd = c[q]
                    (line,) = ax.plot(x, mean, label=label)
                    ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
            ax.set_title(f"{method}: {title}", fontsize=8)
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_yscale("symlog" if q.startswith("tr_") else "linear", **({"linthresh": 1.0} if q.startswith("tr_")
                                                                          else {}))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    r = rows[0]
    fig.suptitle(f"Curvature probe over training, {r['dataset']} {r['model']}, {float(r['epochs']):g} epochs, "
                 f"label noise {float(r['label_noise']):g}, seeds: {len({x['seed'] for x in rows})} "
                 "(mean ± 1 sample sd)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    summary(rows, Path(png_path).with_suffix(".curves.csv"))


def summary(rows: list[dict], curves_path) -> None:
    """Per run setting: test accuracy, and over the probes of training the mean φ″ and NME shares, RMS
    logit gradient and support; the last tr(NME) and λ_max(H); all averaged over seeds."""
    data = curves(common.read_rows(curves_path))
    acc: dict = {}
    for r in rows:
        acc.setdefault(setting(r), []).append((float(r["train_accuracy"]), float(r["test_accuracy"])))
    print(f"{'method':12} {'activation':15} {'train':>6} {'test':>6} {'φ″ share':>9} {'NME share':>9} "
          f"{'‖∇zL‖':>7} "
          f"{'support':>7} {'tr NME':>8} {'λmax H':>8}")
    for (method, label), c in sorted(data.items(), key=lambda kv: (kv[0][0] != "sgd", kv[0])):
        tr, te = np.mean(acc.get((method, label), [(math.nan, math.nan)]), axis=0)
        mean = lambda q: float(np.mean(c[q][1]))  # noqa: E731
        print(f"{method:12} {label:15} {tr:6.3f} {te:6.4f} {mean('phi2_share'):9.4f} {mean('nme_share'):9.4f} "
              f"{mean('logit_grad_rms'):7.3f} {mean('support'):7.3f} {c['tr_nme'][1][-1]:8.2f} "
              f"{c['lam_h'][1][-1]:8.2f}")


#### Spectra (--spectra) ###########################################################################
NAME = "probe_nme_spectra"
EPS = 0.01  # of λ_max(GN): the NME's masses below −ε and above ε


def spectra_paths(out: Path) -> dict[str, Path]:
    return {k: out / f"{NAME}{suffix}" for k, suffix in
            (("runs", ".csv"), ("nodes", ".nodes.csv"), ("eigs", ".eigs.csv"), ("png", ".png"))}


def spectra_points(total: int, fractions) -> list[int]:
    """The steps whose spectra are taken: the fractions of `total`, rounded."""
    return sorted({max(1, min(total, round(f * total))) for f in fractions})


def spectra_runs(cfg: Config, base: common.TrainConfig) -> list[common.TrainConfig]:
    return [dataclasses.replace(base, activation=a, method=m, rho=0.0 if m == "sgd" else cfg.spectra_rho)
            for m in cfg.spectra_methods for a in cfg.spectra_activations]


def spectra_row(cfg: Config, nodes_path, tc: common.TrainConfig, seed: int, opts: common.RunOptions) -> dict:
    """One run of `common.train` with the spectra as fit's callback at cfg.spectra_at of its steps."""
    def probe(run, data):  # asked after every step, it takes the spectra at the steps `at` alone
        return tools.SpectraProber(run, data, nodes_path, at=set(spectra_points(run.total, cfg.spectra_at)),
                                   operators=cfg.spectra_operators, starts=cfg.spectra_starts, steps=cfg.spectra_steps)

    r = common.train(tc, seed, opts=opts, probe=probe, every=1)
    return {k: r[k] for k in common.METRICS}


def spectra_main(cfg: Config) -> None:
    """--spectra: the figure scripts' flow (flags -> runs -> CSV -> plot) with the spectra callback."""
    base, opts = common.resolve(cfg)
    seeds = common.seed_count(cfg)
    common.require_accelerator(cfg)
    if seeds < 1 or cfg.first_seed < 0:
        raise common.ConfigError(f"--seeds must be >= 1 and --first-seed >= 0, got {seeds} and {cfg.first_seed}")
    checks = {"--spectra-operators": (all(o in tools.OPERATORS for o in cfg.spectra_operators),
                                      f"names among {' '.join(tools.OPERATORS)}"),
              "--spectra-starts": (cfg.spectra_starts >= 1, "an integer >= 1"),
              "--spectra-steps": (cfg.spectra_steps >= 3, "an integer >= 3"),
              "--spectra-at": (all(0 < f <= 1 for f in cfg.spectra_at), "fractions in (0, 1]")}
    for flag, (ok, accepted) in checks.items():
        if not ok:
            raise common.ConfigError(f"{flag} must be {accepted}, got {getattr(cfg, flag[2:].replace('-', '_'))}")
    common.use_compile_cache(cfg.compile_cache)
    settings = spectra_runs(cfg, base)
    if cfg.smoke:
        settings, seeds = common.smoke_runs(settings), 1
    for tc in settings:
        common.validate(tc)
    out = common.output_dir(cfg.out, common.default_out(__file__, f"{base.dataset}-{base.model}"))
    paths = spectra_paths(out)
    if not cfg.plot_only:
        common.check_setup(paths["runs"], settings)
        if jax.process_index() == 0:
            common.write_config(out, NAME, cfg, base)
        todo = [(tc, s) for s in range(cfg.first_seed, cfg.first_seed + seeds) for tc in settings]
        common.sweep(paths["runs"], todo, opts, run_one=functools.partial(spectra_row, cfg, paths["nodes"]))
    if jax.process_index() == 0:
        nodes = common.read_rows(paths["nodes"])
        if not nodes:
            raise common.ConfigError(f"--out: no spectra in {paths['nodes']}")
        eigs = eigenvalues(nodes)
        paths["eigs"].unlink(missing_ok=True)  # derived from the nodes: rewritten whole
        common.append_rows(paths["eigs"], eigs)
        plot_spectra(nodes, paths["png"])
        spectra_summary(eigs)
        print(f"{NAME}: plotted {paths['png']}")


def measures(nodes: list[dict]) -> dict:
    """{(method, activation, step, operator): (epoch, {(seed, start): (theta [m], weight [m])})}."""
    out: dict = {}
    for r in nodes:
        method, act = setting(r)
        cell = out.setdefault((method, act, int(r["step"]), r["operator"]), (float(r["epoch"]), {}))[1]
        th, w = cell.setdefault((int(r["seed"]), int(r["start"])), ([], []))
        th.append(float(r["theta"]))
        w.append(float(r["weight"]))
    return {k: (e, {s: (np.array(t), np.array(w)) for s, (t, w) in cell.items()}) for k, (e, cell) in out.items()}


def eigenvalues(nodes: list[dict], k: int = 3) -> list[dict]:
    """A row per run setting × seed × step × operator: the k largest and k most negative live Ritz
    values of start 0, the SLQ masses μ((−∞, −ε)) and μ((ε, ∞)) with ε = EPS · λ_max(GN) of the same
    run and step, and the SLQ estimate of tr(A)/n (means over starts)."""
    m = measures(nodes)
    rows = []
    for (method, act, step, op), (epoch, by_start) in sorted(m.items()):
        for seed in sorted({s for s, _ in by_start}):
            gn = m.get((method, act, step, "GN"), (0, {}))[1].get((seed, 0))
            lam_gn = float(tools.ritz_extremes(*gn, 1)[0][0]) if gn else math.nan
            eps = EPS * lam_gn
            starts = [v for (s, _), v in sorted(by_start.items()) if s == seed]
            top, bottom = tools.ritz_extremes(*by_start[seed, 0], k)
            row = {"method": method, "activation": act, "seed": seed, "step": step, "epoch": epoch, "operator": op,
                   "lam_gn_max": lam_gn, "eps": eps,
                   "mass_below_eps": float(np.mean([w[t < -eps].sum() for t, w in starts])),
                   "mass_above_eps": float(np.mean([w[t > eps].sum() for t, w in starts])),
                   "trace_over_n": float(np.mean([(w * t).sum() for t, w in starts]))}
            row |= {f"top_{i + 1}": float(top[-1 - i]) for i in range(k)}
            row |= {f"bottom_{i + 1}": float(bottom[i]) for i in range(k)}
            rows.append(row)
    return rows


def density(by_start: dict, grid: np.ndarray, sigma: float) -> np.ndarray:
    """The SLQ density (tools.slq_density) pooled over seeds and starts."""
    nodes = np.stack([t for t, _ in by_start.values()])
    weights = np.stack([w for _, w in by_start.values()])
    return np.asarray(tools.slq_density(nodes, weights, grid, sigma))


SIGMA = 0.01  # smoothing width, as a fraction of the plotted range (MATH.md §8)


def plot_spectra(nodes: list[dict], png_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = measures(nodes)
    ops = [o for o in tools.OPERATORS if any(k[3] == o for k in m)]
    settings = sorted({k[:2] for k in m}, key=lambda s: (s[0] != "sgd", s[0], s[1] != "relu", s[1]))
    steps = sorted({k[2] for k in m})
    fig, axes = plt.subplots(len(ops), len(settings), figsize=(3.6 * len(settings), 2.8 * len(ops)), squeeze=False)
    for row, op in zip(axes, ops):
        theta = np.concatenate([t for k, (_, c) in m.items() if k[3] == op for t, w in c.values()])
        lo, hi = theta.min(), theta.max()
        if op in ("NME", "phi2"):
            lo, hi = -max(-lo, hi), max(-lo, hi)  # symmetric: the negative side against the positive
        pad = 0.05 * (hi - lo)
        grid = np.linspace(lo - pad, hi + pad, 801)
        sigma = SIGMA * (hi - lo)
        for ax, (method, act) in zip(row, settings):
            for step in steps:
                if (method, act, step, op) in m:
                    epoch, by_start = m[method, act, step, op]
                    ax.plot(grid, np.maximum(density(by_start, grid, sigma), 1e-12), lw=1, label=f"epoch {epoch:g}")
            ax.set_yscale("log")
            ax.set_ylim(1e-8 / (hi - lo), None)
            ax.set_title(f"{op}: {method}, {act}", fontsize=9)
            ax.set_xlabel("λ", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("SLQ density (log)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    r = nodes[0]
    fig.suptitle(f"Spectra of H, GN and NME = H − GN over training, {r['dataset']} {r['model']}, "
                 f"label noise {float(r['label_noise']):g}, seeds {len({x['seed'] for x in nodes})} pooled "
                 f"(SLQ, σ = {SIGMA:g} of the range)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def spectra_summary(eigs: list[dict]) -> None:
    """Per setting, step and operator, means over seeds: λ_max, λ_min, both over λ_max(GN), and the
    masses beyond ±ε."""
    groups: dict = {}
    for r in eigs:
        groups.setdefault((r["method"], r["activation"], r["operator"], r["step"]), []).append(r)
    print(f"{'method':12} {'act':5} {'op':4} {'epoch':>6} {'λmax':>9} {'λmin':>9} {'λmax/λGN':>9} "
          f"{'λmin/λGN':>9} {'μ(<-ε)':>8} {'μ(>ε)':>8}")
    for (method, act, op, step), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "sgd", kv[0])):
        mean = lambda q: float(np.mean([r[q] for r in rs]))  # noqa: E731
        ratio = lambda q: float(np.mean([r[q] / r["lam_gn_max"] for r in rs]))  # noqa: E731
        print(f"{method:12} {act:5} {op:4} {rs[0]['epoch']:6.2f} {mean('top_1'):9.4g} {mean('bottom_1'):9.4g} "
              f"{ratio('top_1'):9.3f} {ratio('bottom_1'):9.3f} {mean('mass_below_eps'):8.4f} "
              f"{mean('mass_above_eps'):8.4f}")


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__)
    if cfg.spectra:
        spectra_main(cfg)
    else:
        common.run_script(__file__, Config, runs, plot, __doc__, argv, runner=runner)


if __name__ == "__main__":
    common.run_cli(main)
