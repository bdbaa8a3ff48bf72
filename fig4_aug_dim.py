"""Figure 4: test accuracy vs ρ of the gradient penalty (p = 1) for augmented ReLU and diminished GELU.

Paper (5 seeds): switching the activation's second derivative on or off switches the penalty's
benefit. Augmented ReLU (Eq. 15) is ReLU whose AD second derivative is β φ(βx) instead of 0, and
it improves with ρ like GELU; diminished GELU (Eq. 16) is GELU whose AD second derivative is 0, and
it degrades like ReLU. The forward passes and first derivatives are unchanged, so only the NME that
the penalty's H g sees differs. ReLU and GELU are drawn as references.

    uv run fig4_aug_dim.py                      # the MLP regime on Fashion-MNIST, 16 seeds: about 7 min on 2 CPU cores
    uv run fig4_aug_dim.py --dataset imagenet --data-dir /data/imagenet    # paper setup, 5 seeds
    uv run fig4_aug_dim.py --plot-only          # redraw the PNG and verdicts from the CSV

Writes <out>/fig4_aug_dim.{csv,png,verdict.csv,config.json} (docs/running.md); the committed results
(`--out results`) and their reading: results/README.md.
"""

import dataclasses

import common


@dataclasses.dataclass(frozen=True)
class Config(common.Flags):
    rhos: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)
    activations: tuple[str, ...] = ("relu", "gelu", "relu_aug", "gelu_dim")
    beta: float = 1.0  # width of relu_aug's Gaussian second derivative (ignored by the others)
    method: str = "gp_p1"


def runs(cfg: Config, base: common.TrainConfig) -> list[common.TrainConfig]:
    return [dataclasses.replace(base, method=cfg.method, activation=act, beta=cfg.beta, rho=rho)
            for act in cfg.activations for rho in cfg.rhos]


def plot(rows: list[dict], png_path, verdicts) -> None:
    common.plot_sweep(rows, png_path, x="rho", logx=True, xlabel="ρ (gradient penalty, p = 1)",
                      title="Fig. 4", verdicts=verdicts)


def claims(cfg: Config, rows=()) -> list[common.Claim]:
    """relu_aug rescues the penalty, gelu_dim breaks it, at every ρ > 0 (MATH.md §7)."""
    act = lambda name: {"activation": name}  # noqa: E731
    return [c for rho in cfg.rhos if rho > 0 for c in (
        common.Claim("Fig. 4", "gain(relu_aug) − gain(relu)", f"rho={rho:g}",
                     common.gain_terms(act("relu_aug"), act("relu"), "rho", rho), ">0"),
        common.Claim("Fig. 4", "gain(gelu_dim) − gain(gelu)", f"rho={rho:g}",
                     common.gain_terms(act("gelu_dim"), act("gelu"), "rho", rho), "<0"))]


def main(argv=None):
    common.run_script(__file__, Config, runs, plot, __doc__, argv, claims=claims)


if __name__ == "__main__":
    common.run_cli(main)
