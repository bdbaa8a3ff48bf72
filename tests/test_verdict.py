"""Tests of the Verdicts section (MATH.md §7) on rows whose answers are known by construction."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from common import (VERDICT_COLUMNS, Claim, Contrast, contrast, first_seeds, format_verdict, judge, verdict,
                    write_verdicts)

REPO = Path(__file__).resolve().parents[1]
NAN = math.nan


def row(activation, rho, seed, acc, **extra):
    """A results row as csv.DictReader gives it: every value a string."""
    r = {"rho": str(rho), "method": "gp_p1", "activation": activation, "epochs": "50", "seed": str(seed),
         "test_accuracy": repr(acc), "diverged": "False", "wall_s": "1.0"}
    return r | {k: str(v) for k, v in extra.items()}


def fig2_terms(rho=0.1):
    """gain(gelu, rho) − gain(relu, rho), the Fig. 2 contrast."""
    return [(+1, {"activation": "gelu", "rho": rho}), (-1, {"activation": "gelu", "rho": 0}),
            (-1, {"activation": "relu", "rho": rho}), (+1, {"activation": "relu", "rho": 0})]


def fig2_rows(gains):
    """Rows where gain(gelu) and gain(relu) at rho = 0.1 are gains[seed] = (gelu, relu) points, with
    distractor rows at rho = 0.3 that no term may pick up."""
    rows = []
    for seed, (g, r) in gains.items():
        rows += [row("relu", 0.0, seed, 0.80), row("relu", 0.1, seed, 0.80 + r / 100),
                 row("gelu", 0.0, seed, 0.79), row("gelu", 0.1, seed, 0.79 + g / 100),
                 row("relu", 0.3, seed, 0.50), row("gelu", 0.3, seed, 0.99)]
    return rows


# Contrast per seed = gain(gelu) − gain(relu) = 1, 2, 3, 6 points.
GAINS = {0: (2, 1), 1: (3, 1), 2: (1, -2), 3: (5, -1)}


def interval(lo, hi):
    return Contrast({}, 3, (lo + hi) / 2, NAN, (hi - lo) / 2, lo, hi)


def test_contrast_hand_computed():
    c = contrast(fig2_rows(GAINS), fig2_terms())
    assert list(c.values) == [0, 1, 2, 3]
    assert list(c.values.values()) == pytest.approx([1, 2, 3, 6], abs=1e-9)
    sd = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (3 - 3) ** 2 + (6 - 3) ** 2) / 3)
    half = 3.182446305284263 * sd / math.sqrt(4)  # t_{0.975, 3}, from a table
    assert (c.n, c.missing, c.diverged) == (4, 0, 0)
    assert (c.mean, c.sd, c.half) == pytest.approx((3, sd, half), rel=1e-9)
    assert (c.lo, c.hi) == pytest.approx((3 - half, 3 + half), rel=1e-9)


def test_nme_ablation_claims_at_each_rho_and_at_each_rules_best_rho():
    """nme_ablation's claims on rows with known accuracies (points): gains against a shared sgd baseline,
    differences of two methods' gains and of those differences between activations; and each rule's
    best ρ, the largest mean gain on the selection seeds, judged on the others only."""
    import nme_ablation

    rng = np.random.default_rng(0)
    acc, rows = {}, []
    methods, rhos, seeds = ("gp_p1", "gp_gn_p1", "gp_nme_p1"), (0.3, 1.0), range(10)
    for seed in seeds:
        for act in ("relu", "gelu"):
            for method, rho in [("sgd", 0.0)] + [(m, r) for m in methods for r in rhos]:
                a = acc[seed, act, method, rho] = float(rng.uniform(50, 80))
                rows.append(row(act, rho, seed, a / 100) | {"method": method})
    cfg = nme_ablation.Config(rhos=(0.0,) + rhos, select_seeds=6)
    lines = {(line["contrast"], line["at"]): line for line in judge(rows, nme_ablation.claims(cfg, rows))}
    t3 = 3.182446305284263  # t_{0.975, 3}, from a table

    def check(line, values):
        half = t3 * np.std(values, ddof=1) / 2
        assert line["n"] == 4 and line["mean"] == pytest.approx(np.mean(values), abs=1e-9)
        assert (line["lo"], line["hi"]) == pytest.approx((np.mean(values) - half, np.mean(values) + half), abs=1e-9)

    gain = lambda s, act, m, rho: acc[s, act, m, rho] - acc[s, act, "sgd", 0.0]  # noqa: E731
    assert len(lines) == 7 * 2 + 5
    for rho in rhos:
        g = lambda s, act, m: gain(s, act, m, rho)  # noqa: E731
        part = lambda s, act: g(s, act, "gp_p1") - g(s, act, "gp_gn_p1")  # noqa: E731
        expect = {"gain(gp_p1, gelu) − gain(gp_p1, relu)": lambda s: g(s, "gelu", "gp_p1") - g(s, "relu", "gp_p1"),
                  "gain(gp_p1, gelu) − gain(gp_gn_p1, gelu)": lambda s: part(s, "gelu"),
                  "[gain(gp_p1) − gain(gp_gn_p1)]_gelu − [...]_relu": lambda s: part(s, "gelu") - part(s, "relu"),
                  "gain(gp_nme_p1, relu) − gain(gp_gn_p1, relu)": lambda s: g(s, "relu", "gp_nme_p1")
                  - g(s, "relu", "gp_gn_p1"),
                  "gain(gp_nme_p1, gelu) − gain(gp_nme_p1, relu)": lambda s: g(s, "gelu", "gp_nme_p1")
                  - g(s, "relu", "gp_nme_p1")}
        for label, f in expect.items():
            values = [f(s) for s in seeds]
            line = lines[label, f"rho={rho:g}"]
            assert line["n"] == 10 and line["mean"] == pytest.approx(np.mean(values), abs=1e-9), label
    best = {(m, act): max(rhos, key=lambda r: np.mean([gain(s, act, m, r) for s in range(6)]))
            for m in methods for act in ("relu", "gelu")}
    (line,) = [v for (label, _), v in lines.items() if label == "best gain(gp_p1, gelu) − best gain(gp_gn_p1, gelu)"]
    assert f"gp_p1 gelu {best['gp_p1', 'gelu']:g}; gp_gn_p1 gelu {best['gp_gn_p1', 'gelu']:g}" in line["at"]
    assert "chosen on seeds 0-5, judged on 6-9" in line["at"]
    check(line, [gain(s, "gelu", "gp_p1", best["gp_p1", "gelu"]) - gain(s, "gelu", "gp_gn_p1", best["gp_gn_p1", "gelu"])
                 for s in range(6, 10)])


def test_seeds_sorted_whatever_the_row_order():
    rows = fig2_rows({7: (2, 1), 2: (3, 1), 10: (1, -2), 0: (5, -1)})
    assert list(contrast(rows[::-1], fig2_terms()).values) == [0, 2, 7, 10]


def test_unpaired_seeds_dropped_and_counted():
    rows = fig2_rows(GAINS)
    rows += [row("gelu", 0.0, 4, 0.79), row("gelu", 0.1, 4, 0.90)]  # seed 4: gelu only
    rows = [r for r in rows if not (r["seed"] == "1" and r["activation"] == "relu" and r["rho"] == "0.1")]
    c = contrast(rows, fig2_terms())
    assert list(c.values) == [0, 2, 3]
    assert (c.missing, c.diverged) == (2, 0)
    assert c.mean == pytest.approx((1 + 3 + 6) / 3)


def test_diverged_run_drops_its_seed():
    rows = fig2_rows(GAINS)
    for r in rows:
        if r["seed"] == "2" and r["activation"] == "relu" and r["rho"] == "0.1":
            r["diverged"] = "True"  # keeps its (finite) accuracy: the flag alone must drop it
        if r["seed"] == "3" and r["activation"] == "gelu" and r["rho"] == "0.0":
            r["test_accuracy"] = "nan"
    c = contrast(rows, fig2_terms())
    assert list(c.values) == [0, 1]
    assert (c.missing, c.diverged) == (0, 2)


def test_single_seed_has_no_interval():
    c = contrast(fig2_rows({5: (3, 1)}), fig2_terms())
    assert (c.n, c.values) == (1, {5: pytest.approx(2)})
    assert c.mean == pytest.approx(2)
    assert all(math.isnan(v) for v in (c.sd, c.half, c.lo, c.hi))
    assert {verdict(c, d) for d in (">0", "<0", "~0")} == {"inconclusive"}


def test_ambiguous_selector_names_the_differing_setup_column():
    rows = fig2_rows(GAINS) + [row("gelu", 0.1, 0, 0.95, epochs=100)]
    with pytest.raises(ValueError, match="epochs") as e:
        contrast(rows, fig2_terms())
    assert "test_accuracy" not in str(e.value) and "wall_s" not in str(e.value)
    narrowed = [(k, s | {"epochs": 50}) for k, s in fig2_terms()]
    assert contrast(rows, narrowed).values == contrast(fig2_rows(GAINS), fig2_terms()).values


def test_repeated_run_of_one_setup_is_ambiguous_too():
    with pytest.raises(ValueError, match="repeated runs"):
        contrast(fig2_rows(GAINS) + [row("gelu", 0.1, 0, 0.95)], fig2_terms())


def test_unknown_selector_column_raises():
    with pytest.raises(ValueError, match="sigma2"):
        contrast(fig2_rows(GAINS), [(1, {"sigma2": 0.1})])


def test_selector_values_match_numerically():
    rows = fig2_rows(GAINS)
    for r in rows:
        r["rho"] = {"0.0": "0", "0.1": "1e-1"}.get(r["rho"], r["rho"])
    expected = contrast(fig2_rows(GAINS), fig2_terms()).values
    for rho in (0.1, "0.1", "1e-1", "0.10"):
        terms = [(k, s | {"rho": rho if s["rho"] else "0.0"}) for k, s in fig2_terms()]
        assert contrast(rows, terms).values == expected
    # strings match whole: "gelu" must not pick up "gelu_dim"
    extra = [row("gelu_dim", 0.1, 0, 0.1), row("gelu_dim", 0.0, 0, 0.9)]
    assert contrast(rows + extra, fig2_terms("0.1")).values == expected


@pytest.mark.parametrize("direction, lo, hi, expected", [
    (">0", 0.1, 1.0, "reproduced"), (">0", -1.0, -0.1, "contradicted"), (">0", -0.1, 0.1, "inconclusive"),
    (">0", 0.0, 1.0, "inconclusive"),
    ("<0", -1.0, -0.1, "reproduced"), ("<0", 0.1, 1.0, "contradicted"), ("<0", -0.1, 0.1, "inconclusive"),
    ("~0", -0.4, 0.4, "reproduced"), ("~0", -0.5, 0.5, "reproduced"), ("~0", 0.6, 1.0, "contradicted"),
    ("~0", -1.0, -0.6, "contradicted"), ("~0", -0.2, 0.7, "inconclusive"), ("~0", 0.4, 0.6, "inconclusive"),
    ("~0", -1.0, 1.0, "inconclusive"), ("~0", 0.5, 0.9, "inconclusive"),
])
def test_verdict_branches(direction, lo, hi, expected):
    assert verdict(interval(lo, hi), direction) == expected


def test_verdict_rejects_unknown_direction():
    with pytest.raises(ValueError):
        verdict(interval(0.1, 1.0), ">=0")
    with pytest.raises(ValueError):
        Claim("Fig. 2", "x", "", (), "> 0")


def test_first_seeds_is_the_contrast_over_the_lowest_seeds():
    gains = {9: (1, 0), 4: (0, 2), 1: (4, 0), 6: (3, 1), 2: (2, 2)}
    rows = fig2_rows(gains) + [row("gelu", 0.0, 3, 0.8)]  # seed 3 unpaired
    c = contrast(rows, fig2_terms())
    head = first_seeds(c, 3)
    assert list(head.values) == [1, 2, 4]
    direct = contrast(fig2_rows({s: gains[s] for s in (1, 2, 4)}), fig2_terms())
    assert (head.n, head.mean, head.sd, head.lo, head.hi) == pytest.approx(
        (direct.n, direct.mean, direct.sd, direct.lo, direct.hi), rel=1e-12)
    assert (head.missing, head.diverged) == (1, 0)
    assert first_seeds(c, 99) == c
    assert first_seeds(c, 1).n == 1 and math.isnan(first_seeds(c, 1).lo)


def claims():
    step = ((1, {"activation": "gelu", "rho": 0.3}), (-1, {"activation": "gelu", "rho": 0.1}))
    return [Claim("Fig. 2", "gain(gelu) − gain(relu)", "rho=0.1", tuple(fig2_terms()), ">0"),
            Claim("Fig. 2", "gain(gelu) at rho=0.3 − 0.1", "", step, "~0")]


def test_judge_reports_n_minus_2():
    gains = {0: (2, 1), 1: (3, 1), 2: (1, -2), 3: (5, -1), 4: (2, 2)}  # contrasts 1, 2, 3, 6, 0
    line = judge(fig2_rows(gains), claims())[0]
    assert list(line) == list(VERDICT_COLUMNS)
    assert (line["n"], line["n2"], line["missing"], line["diverged"]) == (5, 3, 0, 0)
    assert line["mean"] == pytest.approx(12 / 5) and line["mean2"] == pytest.approx(2)
    half2 = 4.302652729749464 * 1.0 / math.sqrt(3)  # values 1, 2, 3: sd = 1
    assert (line["lo2"], line["hi2"]) == pytest.approx((2 - half2, 2 + half2))
    short = judge(fig2_rows({0: (2, 1), 1: (3, 1), 2: (1, -2)}), claims())[0]
    assert short["n2"] == 1 and all(math.isnan(short[k]) for k in ("mean2", "lo2", "hi2"))


def test_judge_verdict_must_survive_two_more_seeds():
    # contrasts 1, 5, 3 | 3.2, 2.8: inconclusive on the first 3 seeds, reproduced on all 5
    flips = fig2_rows({0: (1, 0), 1: (5, 0), 2: (3, 0), 3: (3.2, 0), 4: (2.8, 0)})
    assert verdict(contrast(flips, fig2_terms()), ">0") == "reproduced"
    assert verdict(first_seeds(contrast(flips, fig2_terms()), 3), ">0") == "inconclusive"
    assert judge(flips, claims())[0]["verdict"] == "inconclusive"
    steady = fig2_rows({0: (2, 0), 1: (2.1, 0), 2: (1.9, 0), 3: (2.05, 0), 4: (1.95, 0)})
    assert judge(steady, claims())[0]["verdict"] == "reproduced"
    negative = fig2_rows({0: (-2, 0), 1: (-2.1, 0), 2: (-1.9, 0), 3: (-2.05, 0), 4: (-1.95, 0)})
    assert judge(negative, claims())[0]["verdict"] == "contradicted"
    # three seeds leave one at n − 2, which has no interval: never a verdict
    assert judge(fig2_rows({0: (2, 0), 1: (2.1, 0), 2: (1.9, 0)}), claims())[0]["verdict"] == "inconclusive"


def test_write_verdicts_round_trip(tmp_path):
    lines = judge(fig2_rows(GAINS), claims()) + judge(fig2_rows({0: (1, 0)}), claims())
    path = tmp_path / "verdicts.csv"
    write_verdicts(path, lines)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
        f.seek(0)
        assert next(csv.reader(f)) == list(VERDICT_COLUMNS)
    assert len(back) == len(lines)
    for line, got in zip(lines, back):
        for k in VERDICT_COLUMNS:
            if isinstance(line[k], float):
                assert got[k] == f"{line[k]:.4g}"
                assert float(got[k]) == pytest.approx(line[k], rel=5e-4, nan_ok=True)
            else:
                assert got[k] == str(line[k])
        assert format_verdict(got) == format_verdict(line)
    assert back[2]["lo"] == "nan" and back[2]["verdict"] == "inconclusive"


def test_format_verdict_line():
    line = {"claim": "Fig. 2", "contrast": "gain(gelu) − gain(relu)", "at": "rho=0.1", "direction": ">0",
            "n": 5, "mean": 0.19, "lo": -0.11, "hi": 0.49, "missing": 0, "diverged": 0, "n2": 3,
            "mean2": 0.37, "lo2": 0.33, "hi2": 0.41, "verdict": "inconclusive"}
    assert format_verdict(line) == ("Fig. 2 gain(gelu) − gain(relu) at rho=0.1: +0.19 pt [−0.11, +0.49], "
                                    "n = 5 (n − 2: +0.37 [+0.33, +0.41]) -> inconclusive")
    short = line | {"n": 3, "missing": 1, "diverged": 2, "n2": 1, "mean2": NAN, "lo2": NAN, "hi2": NAN}
    assert format_verdict(short).endswith("n = 3, dropped 1 unpaired + 2 diverged (n − 2: too few seeds)"
                                          " -> inconclusive")
