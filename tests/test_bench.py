"""bench.py runs end to end and writes its CSV (speed itself is never asserted by a test)."""

import csv
import dataclasses
import importlib.util
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.optimized
def test_analysis_mode_writes_ratios(bench, tmp_path):
    bench.main(["--analyze", "--configs", "tiny:8:16:float32", "--methods", "sgd", "gp_p1", "sam", "probe",
                "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "bench_cpu_xla.csv")))
    assert [r["method"] for r in rows] == ["sgd", "gp_p1", "sam", "probe"]
    ratio = {r["method"]: float(r["flop_ratio"]) for r in rows}
    assert ratio["sgd"] == 1.0 and 1.8 < ratio["sam"] < 2.2 and ratio["gp_p1"] > 1.5  # two grads; grad + HVP
    assert ratio["probe"] > 3  # gradient, three Hessian products, and the loops (whose bodies XLA counts once)


def test_a_rule_added_to_the_registry_is_benchmarked_with_no_edit(bench, tmp_path, monkeypatch):
    """With no --methods, every rule the registry holds when the benchmark starts, a copied script's too."""
    import common

    for name in [n for n in common.RULES if n != "sgd"]:
        monkeypatch.delitem(common.RULES, name)
    monkeypatch.setitem(common.RULES, "sgd_again", common.RULES["sgd"])
    bench.main(["--analyze", "--configs", "tiny:8:16:float32", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "bench_cpu_xla.csv")))
    assert [(r["method"], float(r["flop_ratio"])) for r in rows][:2] == [("sgd", 1.0), ("sgd_again", 1.0)]
    assert [r["method"] for r in rows] == ["sgd", "sgd_again", "probe"]


@pytest.mark.slow
def test_timed_mode_writes_its_columns(bench, tmp_path):
    bench.main(["--quick", "--configs", "tiny:8:16:float32", "--methods", "sgd", "weight_noise",
                "--pipeline-batches", "2", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "bench_cpu.csv")))
    assert list(rows[0]) == ["platform", "model", "dtype", "method", "step_ms", "images_per_s", "ratio_to_sgd",
                             "compile_s", "peak_mem_mb"]
    assert [r["method"] for r in rows][:2] == ["sgd", "weight_noise"]
    assert float(rows[0]["ratio_to_sgd"]) == 1.0 and float(rows[1]["step_ms"]) > 0
    methods = [r["method"] for r in rows[2:]]
    assert methods[0] == "pipeline:small_images_b128" and methods[-1].startswith("pipeline:imagenet_folder_b64")
    assert {m.split(":")[1] for m in methods[1:5]} == {"train_full_decode", "train", "eval_full_decode", "eval"}


def test_bad_config_spec_exits_2(bench, capsys):
    import common

    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: bench.main(["--configs", "wrn16_4:128"]))
    assert e.value.code == 2 and "--configs" in capsys.readouterr().err


TINY_PLAN = dict(model="tiny", batch_size=16, epochs=2, train_subset=100)  # 6 steps per epoch


@pytest.mark.slow  # a subprocess and its compiles
def test_plan_is_runs_times_steps_times_the_analyzed_step(bench, tmp_path, monkeypatch):
    import subprocess
    import sys

    import numpy as np

    import common

    cfg = bench.Config(plan=True, plan_scripts=("fig2_gp_relu_gelu",), plan_datasets=("cifar10",), plan_devices=(1, 2),
                       out=str(tmp_path))
    (line,) = bench.plan(cfg, TINY_PLAN)
    settings, seeds = bench.paper_sweep("fig2_gp_relu_gelu", "cifar10", dtype="bfloat16", **TINY_PLAN)
    assert (seeds, len(settings), line["runs"]) == (5, 12, 60)  # 2 activations × 6 ρ, the paper's 5 seeds
    # Steps as the engine counts them, on a training set of the subset's size.
    x, y = np.zeros((100, 32, 32, 3), np.uint8), np.zeros(100, np.int32)
    data = common.InMemory(common.DATASET_SPECS["cifar10"], x, y, x[:10], y[:10])
    assert line["steps_per_run"] == [common.setup(settings[0], 0, data).total] == [12]
    # FLOPs per step: what --analyze reports for the same step, compiled in a process of the same kind.
    subprocess.run([sys.executable, str(ROOT / "bench.py"), "--analyze", "--configs", "tiny:16:32:bfloat16",
                    "--methods", "gp_p1", "--out", str(tmp_path)], env=bench.one_device_env(), cwd=ROOT, check=True)
    (row,) = csv.DictReader(open(tmp_path / "bench_cpu_xla.csv"))
    gflop = line["gflop_per_step"]["gp_p1"]
    assert gflop == pytest.approx(float(row["gflop"]), rel=5e-4)  # the CSV keeps 4 significant digits
    assert line["total_flop"] == pytest.approx(60 * 12 * gflop * 1e9, rel=1e-12)
    assert line["hours"]["TPU v5e"] == pytest.approx(line["total_flop"] / (197e12 * 0.4) / 3600, rel=1e-12)
    # Memory at the per-device batch: half the activations, the same parameters and optimizer state.
    assert line["peak_gib"][2] < line["peak_gib"][1]
    # A second plan is printed from plan.csv without compiling.
    monkeypatch.setattr(bench, "compile_in_child", lambda *a: pytest.fail("compiled a cached step"))
    assert bench.plan(cfg, TINY_PLAN) == [line]


def test_plan_reports_a_step_over_its_compile_budget(bench, tmp_path, monkeypatch, capsys):
    cfg = bench.Config(plan=True, plan_scripts=("fig3_beta_gelu",), plan_datasets=("imagenet",), plan_devices=(1,),
                       compile_budget_s=0.01, out=str(tmp_path))
    (line,) = bench.plan(cfg, TINY_PLAN)
    assert line["gflop_per_step"] == {"sgd": None, "gp_p1": None} and line["total_flop"] is None
    assert "| - | - | - |" in capsys.readouterr().out  # total, H100-h, v5e-h
    monkeypatch.setattr(bench, "compile_in_child", lambda *a: pytest.fail("retried within the same budget"))
    bench.plan(cfg, TINY_PLAN)
    (line,) = bench.plan(dataclasses.replace(cfg, plan_scripts=("fig6_sam_vs_psam",), compile_budget_s=0), TINY_PLAN)
    assert line["gflop_per_step"] == {"sam": None, "gp_p1": None}  # budget 0: plan.csv as it is, sam never compiled
    with pytest.raises(pytest.fail.Exception, match="retried"):
        bench.plan(dataclasses.replace(cfg, compile_budget_s=1.0), TINY_PLAN)


def test_plan_bad_flags_exit_2(bench, capsys):
    import common

    for argv, flag in ((["--plan", "--plan-datasets", "mnist"], "--plan-datasets"), (["--plan", "--mfu", "2"], "--mfu"),
                       (["--plan", "--compile-budget-s", "-1"], "--compile-budget-s"),
                       (["--plan", "--plan-devices", "3"], "--plan-devices")):
        with pytest.raises(SystemExit) as e:
            common.run_cli(lambda: bench.main(argv))
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_reencode_bench_writes_its_rows(bench, tmp_path):
    rows = bench.main(["--reencode", "--quick", "--out", str(tmp_path)])
    got = list(csv.DictReader(open(tmp_path / "bench_pipeline.csv")))
    assert list(got[0]) == list(bench.PIPELINE_COLUMNS) and len(got) == len(rows)
    sides = [f"side{s}" for s in bench.REENCODE_SIDES]
    assert [r["folder"] for r in got if r["transform"] == "reencode"] == sides
    timed = {(r["folder"], r["split"], r["transform"]): r for r in got if r["transform"] != "reencode"}
    assert set(timed) == {("original", s, t) for s in ("train", "eval") for t in ("full_decode", "repo")} | {
        (f, s, "repo") for f in sides for s in ("train", "eval")}
    assert all(float(r["images_per_s_per_core"]) > 0 for r in got)
    assert float(timed[("original", "train", "full_decode")]["ratio_to_full_decode"]) == 1.0
    kept = [float(timed[(f, "train", "repo")]["crop_resolution"]) for f in sides]
    assert kept == sorted(kept) and kept[-1] < float(timed[("original", "train", "repo")]["crop_resolution"])


def test_crop_view(bench):
    assert bench.crop_view(5000, 3750, n=2000) == (1.0, 1.0)  # every crop is at least 224 px on each side
    resolution, full = bench.crop_view(112, 112, n=2000)
    assert full == 0.0 and resolution <= 0.25 + 1e-9  # every crop at most half the output on each side


def test_plan_keys_a_step_by_its_image_size(bench):
    """Downsampled ImageNet (--image-size) is planned at its own resolution; CIFAR-10 at its 32."""
    imagenet, cifar = common.SETUPS["imagenet"], common.SETUPS["cifar10"]
    assert bench.step_key(imagenet)[2] == 224
    assert bench.step_key(dataclasses.replace(imagenet, image_size=64), devices=8) == (
        "resnet50", 32, 64, imagenet.method, imagenet.dtype)
    assert bench.step_key(cifar)[2] == 32
