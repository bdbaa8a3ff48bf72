"""bench.py runs end to end and writes its CSV (speed itself is never asserted by a test)."""

import csv
import importlib.util
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_timed_mode_writes_the_issue_columns(bench, tmp_path):
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
