"""Figure 3: test accuracy vs β of β-GELU, x Φ(βx), for SGD and for the gradient penalty (p = 1, ρ = 0.1).

Paper (5 seeds): accuracy falls with β under the gradient penalty but not under SGD. β-GELU's second
derivative β φ(βx)(2 − β²x²) keeps unit integral but concentrates within 1/β of 0 as β grows (β → ∞
is ReLU's delta function), so the NME becomes sparse and spiky: a high-variance signal for the
penalty's H g, while SGD never sees it.

    uv run fig3_beta_gelu.py                    # the MLP regime on Fashion-MNIST, 16 seeds: about 5 min on 2 CPU cores
    uv run fig3_beta_gelu.py --dataset cifar10  # paper setup: WRN-28-10, 200 epochs, 5 seeds
    uv run fig3_beta_gelu.py --plot-only        # redraw the PNG and verdicts from the CSV

Writes <out>/fig3_beta_gelu.{csv,png,verdict.csv,config.json} (docs/running.md); the committed results
(`--out results`) and their reading: results/README.md.
"""

import dataclasses
import math

import common


@dataclasses.dataclass(frozen=True)
class Config(common.Flags):
    betas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    activation: str = "beta_gelu"
    methods: tuple[str, ...] = ("sgd", "gp_p1")
    rho: float = 0.1  # of every method but sgd


def runs(cfg: Config, base: common.TrainConfig) -> list[common.TrainConfig]:
    return [dataclasses.replace(base, activation=cfg.activation, method=m, beta=beta,
                                rho=0.0 if m == "sgd" else cfg.rho) for m in cfg.methods for beta in cfg.betas]


def plot(rows: list[dict], png_path, verdicts) -> None:
    common.plot_sweep(rows, png_path, x="beta", logx=True, xlabel=f"β of {rows[0]['activation']}",
                      title="Fig. 3", verdicts=verdicts)


def claims(cfg: Config, rows=()) -> list[common.Claim]:
    """G(β) = a(gp, β) − a(sgd, β) falls with β (MATH.md §7): G(β₀) − G(β) > 0 for the smallest β₀, and
    the least-squares slope of G against ln β, a linear contrast too, < 0."""
    gp, sgd = {"method": cfg.methods[-1], "rho": cfg.rho}, {"method": cfg.methods[0], "rho": 0.0}
    betas = sorted(cfg.betas)
    logs = [math.log(b) for b in betas]
    w = [(v - sum(logs) / len(logs)) / sum((u - sum(logs) / len(logs)) ** 2 for u in logs) for v in logs]
    slope = [t for b, wb in zip(betas, w) for t in ((wb, gp | {"beta": b}), (-wb, sgd | {"beta": b}))]
    return [common.Claim("Fig. 3", f"G({betas[0]:g}) − G(β)", f"beta={b:g}",
                         [(+1, gp | {"beta": betas[0]}), (-1, sgd | {"beta": betas[0]}), (-1, gp | {"beta": b}),
                          (+1, sgd | {"beta": b})], ">0") for b in betas[1:]] + \
        [common.Claim("Fig. 3", "slope of G against ln β (pt per e-fold)", "", slope, "<0")]


def main(argv=None):
    common.run_script(__file__, Config, runs, plot, __doc__, argv, claims=claims)


if __name__ == "__main__":
    common.run_cli(main)
