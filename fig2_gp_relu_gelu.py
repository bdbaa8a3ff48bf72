"""Figure 2: test accuracy vs the gradient-penalty strength ρ (p = 1, "penalty SAM"), ReLU vs GELU.

Paper (ImageNet ResNet-50 and CIFAR-10 WRN-28-10, 5 seeds): without the penalty both activations
reach the same accuracy (76.8% on ImageNet); with it, GELU improves up to ρ = 0.1 while ReLU
degrades. The penalty's gradient is g + ρ H g/‖g‖, and the part of H that differs between the two
is the NME: ReLU's second derivative is zero.

    uv run fig2_gp_relu_gelu.py                 # the MLP regime on Fashion-MNIST, 16 seeds: about 6 min on 2 CPU cores
    uv run fig2_gp_relu_gelu.py --dataset imagenet --data-dir /data/imagenet   # paper setup, 5 seeds
    uv run fig2_gp_relu_gelu.py --plot-only     # redraw the PNG and verdicts from the CSV

Writes <out>/fig2_gp_relu_gelu.{csv,png,verdict.csv,config.json} (docs/running.md); the committed results
(`--out results`) and their reading: results/README.md.
"""

import dataclasses

import common


@dataclasses.dataclass(frozen=True)
class Config(common.Flags):
    rhos: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)
    activations: tuple[str, ...] = ("relu", "gelu")
    method: str = "gp_p1"


def runs(cfg: Config, base: common.TrainConfig) -> list[common.TrainConfig]:
    return [dataclasses.replace(base, method=cfg.method, activation=act, rho=rho)
            for act in cfg.activations for rho in cfg.rhos]


def plot(rows: list[dict], png_path, verdicts) -> None:
    common.plot_sweep(rows, png_path, x="rho", logx=True, xlabel="ρ (gradient penalty, p = 1)",
                      title="Fig. 2", verdicts=verdicts)


def claims(cfg: Config, rows=()) -> list[common.Claim]:
    """gain(gelu, ρ) − gain(relu, ρ) > 0 at every ρ > 0 (MATH.md §7)."""
    return [common.Claim("Fig. 2", "gain(gelu) − gain(relu)", f"rho={rho:g}",
                         common.gain_terms({"activation": "gelu"}, {"activation": "relu"}, "rho", rho), ">0")
            for rho in cfg.rhos if rho > 0]


def main(argv=None):
    common.run_script(__file__, Config, runs, plot, __doc__, argv, claims=claims)


if __name__ == "__main__":
    common.run_cli(main)
