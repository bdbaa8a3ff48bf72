"""The mechanism over training: the curvature probe (MATH.md §6) per activation, under sgd and gp.

The paper explains Figs. 2-4 by the NME: gp's update g + ρ H g/‖g‖ differs between activations only
through the NME's φ″ terms, which are 0 for relu and gelu_dim and positive for gelu, relu_aug and
β-GELU. This script trains each activation under sgd and under gp (p = 1) and, about `probes` times
per run on a fixed batch of 512 training images, measures the φ″ share ‖Hĝ − H_twin ĝ‖/‖Hĝ‖, the NME
share ‖NMEĝ‖/‖Hĝ‖, the RMS logit gradient ‖softmax(z) − onehot(y)‖ (the NME's scale), tr(GN),
tr(NME), λ_max(H) and the fraction of pre-activations within 1/β of 0 (the support of φ″).

    uv run probe_nme.py                        # Fashion-MNIST, CPU regime (README), 2 seeds: 4 min
    uv run probe_nme.py --activations relu gelu --label-noise 0 --out results/regimes/a_default   # a regime candidate
    uv run probe_nme.py --plot-only            # redraw the PNG and print the summary from the CSVs

Writes <out>/probe_nme.csv (a row per run: configuration, results and the last probe's values as
probe_*), probe_nme.curves.csv (a row per probe), .png (one panel per quantity, one row per method,
mean ± 1 sample sd over seeds against the epoch) and .config.json; <out> is
runs/probe_nme/<dataset>-<model>/ unless --out says.

CPU-regime result (results/; mlp256 on 1,024 Fashion-MNIST images with 30% label noise, 50 epochs,
2 seeds, 20 probes per run on the first 512 training images; 234 s on 2 CPU cores). Means over the
probes of training (`--plot-only` prints them):

    method  activation   φ″ share  NME share  RMS ‖∇_z L‖  support
    sgd     relu         0          0.038      0.29         0.68
    sgd     relu_aug     0.061      0.075      0.30         0.68
    sgd     gelu_dim     0          0.040      0.29         0.68
    sgd     gelu         0.100      0.110      0.29         0.68
    sgd     β-GELU β=4   0.140      0.146      0.27         0.195
    sgd     β-GELU β=16  0.207      0.212      0.29         0.049
    gp_p1   relu         0          0.054      0.40         0.69
    gp_p1   gelu         0.121      0.139      0.40         0.69

As MATH.md §6 predicts: the φ″ share is exactly 0 for relu and gelu_dim at every probe (they are
their own twins), and positive for gelu, relu_aug and β-GELU. The support of φ″ falls like 1/β
(0.68, 0.195, 0.049 at β = 1, 4, 16: ratios 3.5 and 4.0), while the φ″ share grows with β: the
NME becomes sparse and spiky. The φ″ share is most of the NME share for the smooth activations;
what remains (relu's 0.04) is the cross-layer second derivatives. Under sgd the RMS logit gradient
falls from 0.77 to 0.05 as the noisy labels are memorised, and gelu's φ″ share from 0.13 to 0.05;
gp keeps the logit gradient at 0.15-0.18 at the end, and with it gelu's φ″ share at 0.09. relu_aug
and gelu_dim train exactly as relu and gelu under sgd (identical test accuracies), since SGD uses
first derivatives only.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np

import common


@dataclasses.dataclass(frozen=True)
class Config(common.Flags):
    activations: tuple[str, ...] = ("relu", "gelu", "relu_aug", "gelu_dim", "beta_gelu")
    betas: tuple[float, ...] = (4.0, 16.0)  # of beta_gelu (β = 1 is gelu)
    methods: tuple[str, ...] = ("sgd", "gp_p1")
    rho: float = 0.1  # of gp_p1
    probes: int = 20  # per run, evenly spaced
    cpu_seeds: int = 2


def runs(cfg: Config, base: common.TrainConfig) -> list[common.TrainConfig]:
    n_train = common.load_data(base, cfg.workers, cfg.data_dir).n_train
    every = max(1, round(base.epochs * (n_train // base.batch_size)) // cfg.probes)
    acts = [(a, b) for a in cfg.activations for b in (cfg.betas if a == "beta_gelu" else (1.0,))]
    return [dataclasses.replace(base, activation=a, beta=b, method=m, rho=0.0 if m == "sgd" else cfg.rho,
                                probe_every=every) for m in cfg.methods for a, b in acts]


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


def main(argv=None):
    common.run_script(__file__, Config, runs, plot, __doc__, argv)


if __name__ == "__main__":
    common.run_cli(main)
