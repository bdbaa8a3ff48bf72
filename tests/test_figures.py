"""The figure scripts end to end at --smoke scale: CSV, PNG, config and verdicts written; a rerun skips the
finished runs; a run of another setup is refused; a partial last row is repaired; a copied script that
sweeps any field resumes and plots it as its own curves; bad input is one line on stderr and exit 2.

The smoke runs go in-process (one JAX start, and the scripts share compiled steps); the copied script
and one bad-input case go through a subprocess, the honest check of `__main__` and exit codes.
"""

import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

import common
from conftest import CALLER_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("seed", *(f.name for f in dataclasses.fields(common.TrainConfig))) + common.METRICS
# script -> rows of its --smoke run: every activation and method, first and last value of each swept
# number, one seed
SMOKE = {
    "fig1_nme_landscape": 3 * 11 * 11,  # relu, β-GELU at β = 1 and 16, 11x11 grid
    "fig2_gp_relu_gelu": 2 * 2,
    "fig3_beta_gelu": 2 * 2,
    "fig4_aug_dim": 4 * 2,
    "fig5_weight_noise": 2 * 3 * 2,
    "fig6_sam_vs_psam": 2 * 2 * 2,
    "nme_ablation": 2 * (1 + 3),  # per activation: the shared sgd baseline at ρ = 0, the three rules at the last ρ
}
TRAINING = [s for s in SMOKE if s != "fig1_nme_landscape"]


def load(name, path=None):
    spec = importlib.util.spec_from_file_location(name, path or ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cli(module, argv):
    """Run a script's main as its __main__ does; the exit code (0 if it returned)."""
    try:
        common.run_cli(lambda: module.main(argv))
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    """Each script's --smoke run, once: {script: out dir}."""
    out, done = tmp_path_factory.mktemp("smoke"), {}

    def get(name):
        if name not in done:
            assert cli(load(name), ["--smoke", "--out", str(out / name)]) == 0
            done[name] = out / name
        return done[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_writes_csv_png_config_and_rerun_skips(name, smoke_out, capsys):
    out = smoke_out(name)
    got = rows(out / f"{name}.csv")
    assert len(got) == SMOKE[name]
    assert (out / f"{name}.png").stat().st_size > 10_000
    calls = json.loads((out / f"{name}.config.json").read_text())["calls"]
    assert len(calls) == 1 and calls[0]["flags"]["smoke"] is True
    if name != "fig1_nme_landscape":
        assert tuple(got[0]) == COLUMNS
        assert {r["seed"] for r in got} == {"0"} and all(r["diverged"] == "False" for r in got)
        assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in got)
        assert rows(out / f"{name}.verdict.csv")  # at least one claim judged
    capsys.readouterr()
    assert cli(load(name), ["--smoke", "--out", str(out)]) == 0
    assert len(rows(out / f"{name}.csv")) == SMOKE[name]  # nothing appended
    if name != "fig1_nme_landscape":
        assert f"0 of {SMOKE[name]} runs to do" in capsys.readouterr().out
        assert len(json.loads((out / f"{name}.config.json").read_text())["calls"]) == 2
    (out / f"{name}.png").unlink()
    assert cli(load(name), ["--plot-only", "--smoke", "--out", str(out)]) == 0 and (out / f"{name}.png").exists()


@pytest.mark.slow
def test_partial_last_row_is_dropped_and_redone(smoke_out, tmp_path, capsys, caplog):
    out = smoke_out("fig2_gp_relu_gelu")
    text = (out / "fig2_gp_relu_gelu.csv").read_text()
    (tmp_path / "fig2_gp_relu_gelu.csv").write_text(text[: len(text) - 40])  # killed while writing the last row
    capsys.readouterr()
    assert cli(load("fig2_gp_relu_gelu"), ["--smoke", "--out", str(tmp_path)]) == 0
    assert "1 of 4 runs to do" in capsys.readouterr().out
    assert any("partial last row" in r.getMessage() for r in caplog.records)
    got = rows(tmp_path / "fig2_gp_relu_gelu.csv")
    assert len(got) == 4 and len({(r["rho"], r["activation"]) for r in got}) == 4
    assert (tmp_path / "fig2_gp_relu_gelu.png").exists()


@pytest.mark.slow
def test_another_setup_is_refused_with_one_line(smoke_out, capsys):
    out = smoke_out("fig2_gp_relu_gelu")
    before = (out / "fig2_gp_relu_gelu.csv").read_text()
    assert cli(load("fig2_gp_relu_gelu"), ["--smoke", "--epochs", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "epochs" in err and "--out" in err
    assert cli(load("fig2_gp_relu_gelu"), ["--smoke", "--dataset", "imagenet", "--data-dir", str(out),
                                           "--out", str(out)]) == 2
    assert (out / "fig2_gp_relu_gelu.csv").read_text() == before


@pytest.mark.slow
def test_default_output_folder_is_per_setup_and_untracked(tmp_path, capsys):
    """A copy of fig2 with another ρ sweep, run without --out: its runs go to runs/<copy>/<dataset>-<model>/
    beside it (not fig2's folder), a rerun resumes them there, another model gets its own folder, and git
    ignores runs/ (results/ alone is tracked)."""
    src = (ROOT / "fig2_gp_relu_gelu.py").read_text()
    old = "    rhos: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)\n"
    assert old in src
    (tmp_path / "fig2_copy.py").write_text(src.replace(old, "    rhos: tuple[float, ...] = (0.0, 0.5)\n"))
    copy = load("fig2_copy", tmp_path / "fig2_copy.py")
    folder = lambda model: tmp_path / "runs" / "fig2_copy" / f"fashion_mnist-{model}"  # noqa: E731
    argv = ["--smoke", "--activations", "gelu"]  # mlp16, 1 epoch, 1 seed: 2 runs
    assert cli(copy, argv) == 0
    got = rows(folder("mlp16") / "fig2_copy.csv")
    assert sorted(float(r["rho"]) for r in got) == [0.0, 0.5]  # the copy's own field reached its runs
    capsys.readouterr()
    assert cli(copy, argv) == 0
    assert "0 of 2 runs to do" in capsys.readouterr().out and rows(folder("mlp16") / "fig2_copy.csv") == got
    assert cli(copy, argv + ["--model", "mlp8"]) == 0
    assert len(rows(folder("mlp8") / "fig2_copy.csv")) == 2 and rows(folder("mlp16") / "fig2_copy.csv") == got
    assert {p.name for p in tmp_path.iterdir()} - {"__pycache__"} == {"fig2_copy.py", "runs"}  # nothing elsewhere
    # Beside a script in the repository, runs/ is ignored by git.
    git = shutil.which("git") and subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", "runs/fig2_copy/fashion_mnist-mlp16/fig2_copy.csv"],
        cwd=ROOT, capture_output=True)
    if git and git.returncode != 128:
        assert git.returncode == 0, "runs/ is not ignored by git"
    else:  # no git, or not a checkout (an unpacked archive): the rule itself
        assert "/runs/" in (ROOT / ".gitignore").read_text()


@pytest.mark.slow
def test_copied_script_sweeping_weight_decay_resumes_and_plots_one_curve_per_value(tmp_path):
    """An ablation starts as a copy: fig4 with a weight-decay sweep, run twice from another folder."""
    src = (ROOT / "fig4_aug_dim.py").read_text()
    old = "    return [dataclasses.replace(base, method=cfg.method, activation=act, beta=cfg.beta, rho=rho)\n"
    new = ("    return [dataclasses.replace(base, method=cfg.method, activation=act, beta=cfg.beta, rho=rho, "
           "weight_decay=wd)\n            for wd in (0.0, 5e-4)\n")
    assert old in src
    (tmp_path / "my_ablation.py").write_text(src.replace(old, new))
    env = os.environ | {"XLA_FLAGS": CALLER_XLA_FLAGS, "PYTHONPATH": str(ROOT)}  # one device, the caller's ISA
    argv = [sys.executable, str(tmp_path / "my_ablation.py"), "--smoke", "--activations", "relu", "relu_aug",
            "--rhos", "0", "0.1"]
    first = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "runs" / "my_ablation" / "fashion_mnist-mlp16"
    got = rows(out / "my_ablation.csv")
    keys = [(r["activation"], r["rho"], r["weight_decay"]) for r in got]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 of 8 runs to do" in again.stdout, again.stderr
    assert rows(out / "my_ablation.csv") == got
    labels = common.plot_sweep(got, tmp_path / "p.png", x="rho", title="t")
    assert sorted(labels) == sorted(f"{a}, weight_decay={wd}" for a in ("relu", "relu_aug") for wd in ("0.0", "0.0005"))
    verdicts = rows(out / "my_ablation.verdict.csv")  # judged once per weight decay
    assert sorted(v["at"] for v in verdicts) == ["rho=0.1, weight_decay=0.0", "rho=0.1, weight_decay=0.0005"]


@pytest.mark.slow
def test_the_readmes_copied_script_with_its_own_rule_sweeps_its_scalar_in_one_compile(tmp_path):
    """README.md's example: a copy of fig2 whose Config and runs are the README's code block, a rule reading
    its own scalar τ (a TrainConfig subclass) swept with ρ: one compiled step per activation whatever the
    number of τ and ρ values, a CSV column τ that reaches the step, a rerun that trains nothing, one
    plotted curve per τ, and the claims judged once per τ."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```python\n")[1].split("```")[0]
    src = (ROOT / "fig2_gp_relu_gelu.py").read_text()
    start, end = src.index("@dataclasses.dataclass(frozen=True)\nclass Config"), src.index("def plot(")
    src = src[:start] + block + "\n\n" + src[end:]
    src = src.replace("    common.run_cli(main)\n", '    common.run_cli(main)\n    print("train steps compiled:", '
                                                   "common.train_step._cache_size())\n")
    (tmp_path / "my_rule.py").write_text(src)
    env = os.environ | {"XLA_FLAGS": CALLER_XLA_FLAGS, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(tmp_path / "my_rule.py"), "--model", "mlp16", "--train-subset", "256", "--epochs", "1",
            "--batch-size", "64", "--test-subset", "500", "--seeds", "2", "--out", "out"]
    first = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "train steps compiled: 2" in first.stdout  # relu and gelu; τ and ρ are array inputs
    got = rows(tmp_path / "out" / "my_rule.csv")
    assert len(got) == 2 * 3 * 3 * 2 and {r["tau"] for r in got} == {"0.0", "0.003", "0.01"}
    by_tau = {t: [r["test_accuracy"] for r in got if r["tau"] == t and r["rho"] == "0.1"] for t in ("0.0", "0.01")}
    assert by_tau["0.0"] != by_tau["0.01"]  # τ reached the step
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 of 36 runs to do" in again.stdout, again.stderr
    labels = common.plot_sweep(got, tmp_path / "p.png", x="rho", title="t")
    assert sorted(labels) == sorted(f"{a}, tau={t}" for a in ("relu", "gelu") for t in ("0.0", "0.003", "0.01"))
    verdicts = rows(tmp_path / "out" / "my_rule.verdict.csv")
    assert sorted(v["at"] for v in verdicts) == sorted(f"rho={r}, tau={t}" for r in ("0.1", "0.3")
                                                       for t in ("0.0", "0.003", "0.01"))


def test_a_flag_beats_a_scripts_change_which_beats_the_setup():
    """resolve(): the dataset's setup, then the script's `overrides` for that setup, then --smoke, then
    every flag given; ImageNet's lr follows a batch size given by flag."""

    @dataclasses.dataclass(frozen=True)
    class Config(common.Flags):
        overrides: ClassVar[dict] = {"fashion_mnist": {"epochs": 3, "lr": 0.2}}

    setup = lambda **kw: common.resolve(Config(**kw))[0]  # noqa: E731
    assert setup() == dataclasses.replace(common.SETUPS["fashion_mnist"], epochs=3, lr=0.2)
    assert (setup(epochs=7).epochs, setup(epochs=7).lr) == (7, 0.2)
    assert setup(dataset="cifar10") == common.SETUPS["cifar10"]  # overrides are per setup
    assert setup(dataset="fashion_mnist_cnn") == common.SETUPS["fashion_mnist_cnn"]
    assert setup(dataset="imagenet", batch_size=1024).lr == 0.4
    assert setup(smoke=True, epochs=2) == dataclasses.replace(common.SETUPS["fashion_mnist"], lr=0.2,
                                                              **common.SMOKE | {"epochs": 2})


def test_every_configuration_field_with_a_flag_is_a_flag(capsys):
    """Flags are generated from TrainConfig and RunOptions, checks and help from each field's metadata."""
    flagged = [f.name for c in (common.TrainConfig, common.RunOptions) for f in dataclasses.fields(c)
               if f.metadata["flag"]]
    flags = {f.name: f for f in dataclasses.fields(common.Flags)}
    assert set(flagged) <= set(flags) and "rho" not in flags and "curves" not in flags
    assert all(flags[k].default is None for k in flagged if k != "dataset")
    parsed = common.parse_config(common.Flags, ["--warmup-epochs", "2", "--no-nesterov", "--ckpt-every-s", "9"])
    base, opts = common.resolve(parsed)
    assert (base.warmup_epochs, base.nesterov, opts.ckpt_every_s) == (2.0, False, 9.0)
    with pytest.raises(common.ConfigError, match=r"^--warmup-epochs: got -1.0; accepted: >= 0$"):
        common.resolve(common.parse_config(common.Flags, ["--warmup-epochs", "-1"]))
    with pytest.raises(SystemExit):
        common.parse_config(common.Flags, ["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "fashion_mnist 1024, fashion_mnist_cnn 1024, cifar10 None, imagenet None" in shown

    @dataclasses.dataclass(frozen=True)
    class Extended:  # a new field is one line: its flag and its check follow
        tau: float = common.setting(0.5, common.in_range(0, 1), help="a new rule's scalar")

    assert common.parse_config(Extended, ["--tau", "0.25"]).tau == 0.25
    with pytest.raises(common.ConfigError, match=r"^--tau: got 1.0; accepted: in \[0, 1\)$"):
        common.validate(common.parse_config(Extended, ["--tau", "1"]))


BAD = [(name, ["--dataset", "foo"]) for name in TRAINING] + [
    ("fig1_nme_landscape", ["--dataset", "cifar10"]),  # fig1 trains nothing: no such flag
    ("fig1_nme_landscape", ["--activations", "swish"]),
    ("fig1_nme_landscape", ["--grid", "1"]),
    ("fig2_gp_relu_gelu", ["--rhos", "-0.1"]),
    ("fig2_gp_relu_gelu", ["--seeds", "two"]),
    ("fig2_gp_relu_gelu", ["--seeds", "0"]),
    ("fig2_gp_relu_gelu", ["--weight-decay", "-1"]),
    ("fig3_beta_gelu", ["--betas", "0"]),
    ("fig4_aug_dim", ["--activations", "relu", "swish"]),
    ("fig5_weight_noise", ["--methods", "adam"]),
    ("fig5_weight_noise", ["--sigma2s", "-1"]),
    ("fig6_sam_vs_psam", ["--batch-size", "0"]),
    ("fig6_sam_vs_psam", ["--eval-batch-size", "0"]),
    ("fig4_aug_dim", ["--dataset", "cifar10"]),  # a paper setup on a CPU-only JAX: names the extras
    ("probe_nme", ["--spectra", "--dataset", "imagenet"]),  # the same guard on probe_nme's own flow
    ("nme_ablation", ["--rhos", "0.3", "1"]),  # no ρ = 0: no baseline for any gain
    ("nme_ablation", ["--methods", "gp_p1"]),
    ("nme_ablation", ["--methods", "gp_p1", "adam"]),
]


@pytest.mark.parametrize("name,argv", BAD, ids=[f"{n}:{' '.join(a)}" for n, a in BAD])
def test_bad_input_is_one_line_and_exit_2(name, argv, tmp_path, capsys):
    assert cli(load(name), argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # failed before writing anything
    if argv[-2:] in (["--dataset", "cifar10"], ["--dataset", "imagenet"]) and name != "fig1_nme_landscape":
        assert "--extra cuda13" in err and "--allow-cpu" in err


@pytest.mark.parametrize("name", ["fig2_gp_relu_gelu", "fig1_nme_landscape"])
def test_unusable_out_is_one_line_and_exit_2(name, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):  # a file; a folder that cannot be made
        assert cli(load(name), ["--smoke", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--out" in err, err


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_the_rows(smoke_out, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    text = (smoke_out("fig2_gp_relu_gelu") / "fig2_gp_relu_gelu.csv").read_text()
    kept = "".join(text.splitlines(keepends=True)[:3])
    (out / "fig2_gp_relu_gelu.csv").write_text(kept)

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.os, "write", full)
    assert cli(load("fig2_gp_relu_gelu"), ["--smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "No space left" in err
    assert (out / "fig2_gp_relu_gelu.csv").read_text() == kept


@pytest.mark.slow
def test_bad_dataset_through_the_command_line(tmp_path):
    env = os.environ | {"XLA_FLAGS": CALLER_XLA_FLAGS}
    p = subprocess.run([sys.executable, str(ROOT / "fig4_aug_dim.py"), "--dataset", "foo", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "foo" in p.stderr and "Traceback" not in p.stderr and not list(tmp_path.iterdir())


def test_compile_cache_folder_and_off_switch(tmp_path, monkeypatch):
    import jax
    from conftest import use_compile_cache as real  # the scripts' own (tests patch it out)

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        real(None)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "neglected-hessian" / "jax")
        real(str(tmp_path / "mine"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
        jax.config.update("jax_compilation_cache_dir", before)
        real("")
        assert jax.config.jax_compilation_cache_dir == before
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
