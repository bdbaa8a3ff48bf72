"""The six figure scripts end to end at --smoke scale: CSV and PNG written, a rerun skips the finished
rows, a copied script with an edited sweep runs unchanged, --dataset selects the paper's setup, and
bad input is one line on stderr with exit code 2.

The smoke runs go in-process (one JAX start, and the scripts share compiled steps); the copied
script and one bad-input case go through a subprocess, the honest check of `__main__` and exit codes.
"""

import csv
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]
RESULT = ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "diverged", "wall_s")
# script -> (CSV columns, rows of its --smoke run)
SMOKE = {
    "fig1_nme_landscape": (("w1", "w2", "activation", "beta", "loss", "nme_norm"), 3 * 11 * 11),  # relu, β 1 and 16
    "fig2_gp_relu_gelu": (("rho",) + common.RUN_KEY + RESULT, 2 * 2),
    "fig3_beta_gelu": (("beta", "rho") + common.RUN_KEY + RESULT, 2 * 2),
    "fig4_aug_dim": (("rho", "beta") + common.RUN_KEY + RESULT, 2 * 4),
    "fig5_weight_noise": (("sigma2",) + common.RUN_KEY + RESULT, 2 * 3),
    "fig6_sam_vs_psam": (("rho",) + common.RUN_KEY + RESULT, 2 * 2 * 2),
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
    """Each script's --smoke run, once: {script: (out dir, seconds)}."""
    out, done = tmp_path_factory.mktemp("smoke"), {}

    def get(name):
        if name not in done:
            t = time.perf_counter()
            assert cli(load(name), ["--smoke", "--out", str(out)]) == 0
            done[name] = out, time.perf_counter() - t
        return done[name]

    return get


@pytest.mark.parametrize("name", list(SMOKE))
def test_smoke_writes_csv_png_config_and_rerun_skips(name, smoke_out, capsys):
    out, first_s = smoke_out(name)
    columns, n = SMOKE[name]
    got = rows(out / f"{name}.csv")
    assert tuple(got[0]) == columns and len(got) == n
    assert (out / f"{name}.png").stat().st_size > 10_000
    assert (out / f"{name}.config.json").exists() and not (out / "config.json").exists()
    if name != "fig1_nme_landscape":
        assert {r["seed"] for r in got} == {"0"} and all(r["diverged"] == "False" for r in got)
        assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in got)

    capsys.readouterr()
    t = time.perf_counter()
    assert cli(load(name), ["--smoke", "--out", str(out)]) == 0
    rerun_s = time.perf_counter() - t
    assert len(rows(out / f"{name}.csv")) == n  # nothing appended
    if name != "fig1_nme_landscape":
        assert f"0 of {n} runs to do" in capsys.readouterr().out
    assert rerun_s < 10, (rerun_s, first_s)  # plotting only

    (out / f"{name}.png").unlink()
    assert cli(load(name), ["--plot-only", "--out", str(out)]) == 0 and (out / f"{name}.png").exists()


def test_interrupted_sweep_resumes_with_the_missing_run(smoke_out, capsys):
    out, _ = smoke_out("fig2_gp_relu_gelu")
    resumed = out.parent / "resumed"
    resumed.mkdir()
    lines = (out / "fig2_gp_relu_gelu.csv").read_text().splitlines(keepends=True)
    (resumed / "fig2_gp_relu_gelu.csv").write_text("".join(lines[:-1]))  # as if killed during the last run
    capsys.readouterr()
    assert cli(load("fig2_gp_relu_gelu"), ["--smoke", "--out", str(resumed)]) == 0
    assert "1 of 4 runs to do" in capsys.readouterr().out
    got = rows(resumed / "fig2_gp_relu_gelu.csv")
    assert len(got) == 4 and len({(r["rho"], r["activation"]) for r in got}) == 4


def test_copied_script_with_an_edited_sweep_runs_unchanged(tmp_path):
    """An ablation starts as a copy: edit the Config default, run it from anywhere with the repo on the path."""
    src = (ROOT / "fig2_gp_relu_gelu.py").read_text()
    old = "rhos: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3)"
    assert old in src
    (tmp_path / "my_ablation.py").write_text(src.replace(old, "rhos: tuple[float, ...] = (0.05, 0.2)"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(tmp_path / "my_ablation.py"), "--smoke", "--activations", "gelu",
                        "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    got = rows(tmp_path / "out" / "my_ablation.csv")
    assert sorted(float(r["rho"]) for r in got) == [0.05, 0.2] and {r["activation"] for r in got} == {"gelu"}
    assert (tmp_path / "out" / "my_ablation.png").exists()


@pytest.mark.parametrize("name", TRAINING)
def test_dataset_flag_alone_selects_the_papers_setup(name):
    module = load(name)
    setup = lambda **kw: common.script_setup(module.Config(**kw), module.CPU_SCALE, module.SMOKE)
    cifar = setup(dataset="cifar10")
    assert (cifar.model, cifar.epochs, cifar.batch_size, cifar.augment, cifar.train_subset) == (
        "wrn28_10", 200, 128, True, None)
    imagenet = setup(dataset="imagenet", data_dir="/data/imagenet")
    assert (imagenet.model, imagenet.epochs, imagenet.batch_size, imagenet.lr) == ("resnet50", 300, 256, 0.1)
    cpu = setup()
    assert cpu.dataset == "fashion_mnist" and cpu.model.startswith("mlp") and cpu.train_subset
    assert setup(epochs=7, model="tiny").epochs == 7
    assert setup(dataset="imagenet", batch_size=1024).lr == 0.4  # linear scaling survives other flags


BAD = [(name, ["--dataset", "foo"]) for name in TRAINING] + [
    ("fig1_nme_landscape", ["--dataset", "cifar10"]),  # fig1 trains nothing: no such flag
    ("fig1_nme_landscape", ["--activations", "swish"]),
    ("fig1_nme_landscape", ["--grid", "1"]),
    ("fig2_gp_relu_gelu", ["--rhos", "-0.1"]),
    ("fig2_gp_relu_gelu", ["--seeds", "two"]),
    ("fig2_gp_relu_gelu", ["--seeds", "0"]),
    ("fig3_beta_gelu", ["--betas", "0"]),
    ("fig4_aug_dim", ["--activations", "relu", "swish"]),
    ("fig5_weight_noise", ["--methods", "adam"]),
    ("fig5_weight_noise", ["--sigma2s", "-1"]),
    ("fig6_sam_vs_psam", ["--batch-size", "0"]),
]


@pytest.mark.parametrize("name,argv", BAD, ids=[f"{n}:{' '.join(a)}" for n, a in BAD])
def test_bad_input_is_one_line_and_exit_2(name, argv, tmp_path, capsys):
    assert cli(load(name), argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # failed before writing anything


def test_bad_dataset_through_the_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, str(ROOT / "fig4_aug_dim.py"), "--dataset", "foo", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "foo" in p.stderr and "Traceback" not in p.stderr and not list(tmp_path.iterdir())

