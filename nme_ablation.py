"""The NME ablation: the gradient penalty with the NME taken out of its update (gp_gn), and with the NME
alone (gp_nme), ReLU vs GELU.

The paper argues (Sections 4-5) that gp's update g + ρ H g/‖g‖ helps GELU because H carries the NME,
whose φ″ part ReLU lacks. gp_gn_p1 steps along g + ρ GN g/‖g‖ (the NME, and nothing else, leaves the
update) and gp_nme_p1 along g + ρ NME g/‖g‖ (only the NME stays), so d_gp = d_gp_gn + d_gp_nme − g
(MATH.md §3). gp_gn asks whether the NME is necessary for gp's gain, gp_nme whether it is sufficient.
The claims, stated before the run (MATH.md §7, §9; gain(m, act, ρ) = a(m, act, ρ) − a(sgd, act),
paired by seed), at each ρ:
    gain(gp, gelu) − gain(gp, relu) > 0                 Fig. 2: GELU gains more from the penalty
    gain(gp, gelu) − gain(gp_gn, gelu) > 0             the NME in the update carries GELU's benefit
    [gain(gp) − gain(gp_gn)]_gelu − [...]_relu > 0      more so for GELU than for ReLU
    gain(gp_gn, gelu) − gain(gp_gn, relu) ≈ 0           without the NME the activations behave alike
    gain(gp_nme, act) − gain(gp_gn, act) > 0            the NME alone beats GN alone, for each activation
    gain(gp_nme, gelu) − gain(gp_nme, relu) > 0         GELU's edge lives in the NME part
and at each rule's best ρ, chosen per activation on seeds 0-7 and judged on seeds 8-15 (MATH.md §9):
    best gain(gp) − best gain(gp_gn) > 0, best gain(gp_nme) − best gain(gp_gn) > 0, per activation,
    and best gain(gp_nme, gelu) − best gain(gp_nme, relu) > 0.
Every rule is sgd at ρ = 0 (exactly: ρ multiplies the whole correction), so ρ = 0 is one sgd run per
activation and seed, the baseline of every gain.

    uv run nme_ablation.py                      # the MLP regime (fashion_mnist), 16 seeds: about 16 min on 2 CPU cores
    uv run nme_ablation.py --dataset fashion_mnist_cnn   # the conv regime, 16 seeds: about 2 h 10 min
    uv run nme_ablation.py --dataset imagenet --data-dir /data/imagenet   # paper setup, 5 seeds
    uv run nme_ablation.py --plot-only          # redraw the PNG and verdicts from the CSV

Writes <out>/nme_ablation.{csv,png,verdict.csv,config.json}; results/README.md reads the results.
"""

import dataclasses
import math

import common


@dataclasses.dataclass(frozen=True)
class Config(common.Flags):
    rhos: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)  # 0: the shared sgd baseline
    methods: tuple[str, ...] = ("gp_p1", "gp_gn_p1", "gp_nme_p1")  # with H; with GN; with the NME alone
    activations: tuple[str, ...] = ("relu", "gelu")
    select_seeds: int = 8  # best ρ: chosen on the first this many seeds, judged on the rest


def runs(cfg: Config, base: common.TrainConfig) -> list[common.TrainConfig]:
    if 0 not in cfg.rhos:
        raise common.ConfigError(f"--rhos: {' '.join(map(str, cfg.rhos))} lacks 0, the sgd baseline of every gain")
    if len(cfg.methods) != 3 or len(cfg.activations) != 2:
        raise common.ConfigError("--methods takes three rules (with H, with GN, with the NME) and --activations "
                                 f"two (φ″ = 0 first); got {' '.join(cfg.methods)} and {' '.join(cfg.activations)}")
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


def best_rho(rows: list[dict], method: str, act: str, rhos, seeds) -> float | None:
    """The ρ > 0 of the grid with the largest mean gain of `method` with `act` over `seeds` (ties: the
    smaller ρ; a ρ whose runs all diverged is skipped); None without any such run."""
    rows = [r for r in rows if int(r["seed"]) in seeds]
    means = {rho: common.contrast(rows, gain(method, act, rho)).mean for rho in sorted(r for r in rhos if r > 0)}
    means = {rho: m for rho, m in means.items() if math.isfinite(m)}
    return max(means, key=lambda rho: (means[rho], -rho)) if means else None


def claims(cfg: Config, rows=()) -> list[common.Claim]:
    """The claims of the docstring, at every ρ > 0 and at each rule's best ρ, for the three methods (H,
    GN, NME) and the two activations (φ″ = 0, φ″ ≠ 0)."""
    h, gn, nme = cfg.methods
    zero, smooth = cfg.activations
    out = []
    for rho in (r for r in cfg.rhos if r > 0):
        at = f"rho={rho:g}"
        g = lambda m, act: gain(m, act, rho)  # noqa: E731
        part = lambda act: g(h, act) + minus(g(gn, act))  # noqa: E731 (gp's gain over gp_gn's)
        out += [common.Claim("Fig. 2", f"gain({h}, {smooth}) − gain({h}, {zero})", at, g(h, smooth) + minus(g(h, zero)),
                             ">0"),
                common.Claim("NME ablation", f"gain({h}, {smooth}) − gain({gn}, {smooth})", at, part(smooth), ">0"),
                common.Claim("NME ablation", f"[gain({h}) − gain({gn})]_{smooth} − [...]_{zero}", at,
                             part(smooth) + minus(part(zero)), ">0"),
                common.Claim("NME ablation", f"gain({gn}, {smooth}) − gain({gn}, {zero})", at,
                             g(gn, smooth) + minus(g(gn, zero)), "~0")]
        out += [common.Claim("NME alone", f"gain({nme}, {act}) − gain({gn}, {act})", at,
                             g(nme, act) + minus(g(gn, act)), ">0") for act in (zero, smooth)]
        out.append(common.Claim("NME alone", f"gain({nme}, {smooth}) − gain({nme}, {zero})", at,
                                g(nme, smooth) + minus(g(nme, zero)), ">0"))
    seeds = sorted({int(r["seed"]) for r in rows})
    chosen, judged = seeds[:cfg.select_seeds], tuple(seeds[cfg.select_seeds:])
    if not judged:
        return out
    best = {(m, act): best_rho(rows, m, act, cfg.rhos, chosen) for m in (h, gn, nme) for act in (zero, smooth)}
    top = max(r for r in cfg.rhos)
    halves = f"chosen on seeds {chosen[0]}-{chosen[-1]}, judged on {judged[0]}-{judged[-1]}"

    def at_best(*pairs):  # the best ρ of each (rule, activation), the halves, and a peak not passed
        where = "; ".join(f"{m} {act} {best[m, act]:g}" for m, act in pairs)
        edge = [f"{m} {act}" for m, act in pairs if best[m, act] == top]
        return f"best rho: {where} ({halves})" + (f"; at the grid's end for {', '.join(edge)}" if edge else "")

    def contrast(a, b):  # gain at a's best ρ minus gain at b's best ρ
        return gain(a[0], a[1], best[a]) + minus(gain(b[0], b[1], best[b]))

    for act in (zero, smooth):
        for m in (h, nme):
            if best[m, act] is not None and best[gn, act] is not None:
                out.append(common.Claim("Best ρ", f"best gain({m}, {act}) − best gain({gn}, {act})",
                                        at_best((m, act), (gn, act)), contrast((m, act), (gn, act)), ">0", judged))
    if best[nme, smooth] is not None and best[nme, zero] is not None:
        out.append(common.Claim("Best ρ", f"best gain({nme}, {smooth}) − best gain({nme}, {zero})",
                                at_best((nme, smooth), (nme, zero)), contrast((nme, smooth), (nme, zero)), ">0",
                                judged))
    return out


def main(argv=None):
    common.run_script(__file__, Config, runs, plot, __doc__, argv, claims=claims)


if __name__ == "__main__":
    common.run_cli(main)
