"""The NME ablation: the gradient penalty with H replaced by GN in its update (gp_gn), ReLU vs GELU.

The paper argues (Sections 4-5) that gp's update g + ρ H g/‖g‖ helps GELU because H carries the NME,
whose φ″ part ReLU lacks. gp_gn_p1 keeps everything and steps along g + ρ GN g/‖g‖ instead (MATH.md
§3, "gp_gn"): the whole NME, and nothing else, leaves the update. If the NME explains GELU's extra
gain, that gain shrinks under gp_gn and the two activations behave alike. The claims, stated before
the run (MATH.md §7; gain(m, act, ρ) = a(m, act, ρ) − a(sgd, act), paired by seed):
    gain(gp, gelu) − gain(gp_gn, gelu) > 0            the NME in the update carries GELU's benefit
    [gain(gp) − gain(gp_gn)]_gelu − [...]_relu > 0     more so for GELU than for ReLU
    gain(gp_gn, gelu) − gain(gp_gn, relu) ≈ 0          without the NME the activations behave alike
Both rules are sgd at ρ = 0 (exactly: ρ multiplies the whole correction), so ρ = 0 is one sgd run
per activation and seed, the baseline of both; separate ρ = 0 runs of each rule would differ only by
rounding, which adds noise to every gain difference and costs a penalty step for nothing.

    uv run nme_ablation.py                      # Fashion-MNIST, CPU regime (README), 16 seeds: 37 min
    uv run nme_ablation.py --dataset imagenet --data-dir /data/imagenet   # paper setup, 5 seeds
    uv run nme_ablation.py --plot-only          # redraw the PNG and verdicts from the CSV

Writes <out>/nme_ablation.{csv,png,verdict.csv,config.json}: README, "Outputs"; the results are in
the README's section "The NME ablation".
"""

import dataclasses

import common


@dataclasses.dataclass(frozen=True)
class Config(common.Flags):
    rhos: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)  # 0: the shared sgd baseline
    methods: tuple[str, ...] = ("gp_p1", "gp_gn_p1")  # with H; with GN in its place
    activations: tuple[str, ...] = ("relu", "gelu")


def runs(cfg: Config, base: common.TrainConfig) -> list[common.TrainConfig]:
    if 0 not in cfg.rhos:
        raise common.ConfigError(f"--rhos: {' '.join(map(str, cfg.rhos))} lacks 0, the sgd baseline of every gain")
    if len(cfg.methods) != 2 or len(cfg.activations) < 2:
        raise common.ConfigError("--methods takes two rules (with H, with GN) and --activations at least two "
                                 f"(φ″ = 0 first); got {' '.join(cfg.methods)} and {' '.join(cfg.activations)}")
    return [dataclasses.replace(base, activation=act, method=m if rho > 0 else "sgd", rho=rho)
            for act in cfg.activations for rho in cfg.rhos for m in (cfg.methods if rho > 0 else cfg.methods[:1])]


def plot(rows: list[dict], png_path, verdicts) -> None:
    # each rule's curve starts at the shared sgd baseline, its own value at ρ = 0
    methods = sorted({r["method"] for r in rows} - {"sgd"})
    drawn = [r for r in rows if r["method"] != "sgd"] + [
        r | {"method": m} for r in rows if r["method"] == "sgd" for m in methods]
    common.plot_sweep(drawn, png_path, x="rho", facet="activation", logx=True, xlabel="ρ (p = 1)",
                      title="NME ablation", verdicts=verdicts)


def gain(method: str, act: str, rho: float) -> list:
    """Terms of gain(method, act, ρ) = a(method, act, ρ) − a(sgd, act, ρ = 0)."""
    return [(+1, {"method": method, "activation": act, "rho": rho}),
            (-1, {"method": "sgd", "activation": act, "rho": 0.0})]


def minus(terms: list) -> list:
    return [(-coef, selector) for coef, selector in terms]


def claims(cfg: Config) -> list[common.Claim]:
    """The three contrasts of the docstring at every ρ > 0, for the first two methods (H, GN) and the
    first two activations (φ″ = 0, φ″ ≠ 0)."""
    h, gn = cfg.methods[:2]
    zero, smooth = cfg.activations[:2]
    out = []
    for rho in (r for r in cfg.rhos if r > 0):
        at = f"rho={rho:g}"
        nme = lambda act: gain(h, act, rho) + minus(gain(gn, act, rho))  # noqa: E731
        out += [common.Claim("NME ablation", f"gain({h}, {smooth}) − gain({gn}, {smooth})", at, nme(smooth), ">0"),
                common.Claim("NME ablation", f"[gain({h}) − gain({gn})]_{smooth} − [...]_{zero}", at,
                             nme(smooth) + minus(nme(zero)), ">0"),
                common.Claim("NME ablation", f"gain({gn}, {smooth}) − gain({gn}, {zero})", at,
                             gain(gn, smooth, rho) + minus(gain(gn, zero, rho)), "~0")]
    return out


def main(argv=None):
    common.run_script(__file__, Config, runs, plot, __doc__, argv, claims=claims)


if __name__ == "__main__":
    common.run_cli(main)
