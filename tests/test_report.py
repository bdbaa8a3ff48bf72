"""The committed reading of the results: results/README.md and README.md's claims table are what
`uv run tools.py report` makes of the committed CSVs, so every number in them recomputes."""

import tools


def test_the_committed_reports_are_what_the_csvs_give():
    for path, text in tools.report(write=False).items():
        assert path.read_text() == text, f"{path.name} is stale: run `uv run tools.py report`"


def test_a_verdict_that_turns_with_the_environment_is_marked():
    """The claims table groups a claim's places by verdict and marks those whose verdict differs between
    environments, dropping a symbol its previous place already shows."""
    lines = [{"contrast": "c", "at": f"rho={r}", "verdict": v} for r, v in
             (("0.1", "inconclusive"), ("0.3", "reproduced"), ("1", "reproduced"), ("3", "contradicted"))]
    assert tools._cell(lines, {("c", "rho=0.1"), ("c", "rho=1")}) == (
        "**reproduced** at ρ 0.3, 1†; **contradicted** at ρ 3; inconclusive at ρ 0.1†")
    assert tools._cell([]) == "not run"
