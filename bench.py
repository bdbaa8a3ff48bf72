"""Cost of every update rule as a ratio to SGD, measured side by side in one process.

For each configuration and rule: the full jitted train step (augmentation, loss, rule, optimizer,
BatchNorm state) after compilation, on synthetic data already on the device; the median of --steps
timed steps (block_until_ready each), images/s, the ratio to sgd of the same run, the compile time,
and the step's peak device memory from XLA's memory analysis of the compiled step (arguments + outputs
+ temporaries − donated aliases). Then the input pipelines alone: images/s delivered by the
small-image pipeline and by the ImageNet-folder pipeline (on a generated JPEG folder unless
--imagenet-dir is given), with the worker count chosen for the machine.

    uv run bench.py                       # CPU: wrn16_4, batch 128, 32x32x3, fp32 (over an hour on 2 cores)
    uv run bench.py --quick               # 5 steps per rule, a smoke run
    uv run bench.py --analyze             # FLOPs and peak memory per rule from XLA, compile only (~3 min)
    python bench.py                       # on a GPU host: adds wrn28_10 b128 and resnet50 b256 224², fp32 and bf16

Writes results/bench_<platform>.csv: platform,model,dtype,method,step_ms,images_per_s,ratio_to_sgd,
compile_s,peak_mem_mb (pipeline rows have method "pipeline:<name>"). With --analyze it only compiles
each step and writes results/bench_<platform>_xla.csv: XLA's FLOP count and peak memory per rule and
their ratios to sgd, which no other load on the machine can disturb.
"""

import atexit
import dataclasses
import os
import shutil
import statistics
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import common

METHODS = ("sgd", "gp_p1", "gp_p2", "sam", "usam", "weight_noise", "hessian_trace", "gn_trace")
COLUMNS = ("platform", "model", "dtype", "method", "step_ms", "images_per_s", "ratio_to_sgd", "compile_s",
           "peak_mem_mb")


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 20  # timed steps per rule (median reported)
    warmup: int = 2  # untimed steps after compilation
    methods: tuple[str, ...] = METHODS
    configs: tuple[str, ...] = ()  # e.g. wrn16_4:128:32:float32; empty: the platform's default list
    pipeline_batches: int = 30
    imagenet_dir: str | None = None  # a real ImageNet folder for the pipeline benchmark
    out: str = "results"
    quick: bool = False  # 5 timed steps, 1 warm-up: a smoke run
    analyze: bool = False  # compile only: XLA's FLOP count and peak memory per rule, no timing


def default_configs(platform):
    """(model, batch, image size, dtype) per platform, as the benchmark issue lists them."""
    if platform == "cpu":
        return ["wrn16_4:128:32:float32"]
    return [f"{m}:{dt}" for m in ("wrn16_4:128:32", "wrn28_10:128:32", "resnet50:256:224")
            for dt in ("float32", "bfloat16")]


def time_rule(model_name, batch, size, dtype, method, cfg):
    """(median step seconds, compile seconds, peak MiB, GFLOP) of one rule's full train step; with
    cfg.analyze the step is compiled, not run (median None)."""
    classes = 1000 if size > 64 else 10
    setup = common.for_dataset("imagenet" if size > 64 else "cifar10", model=model_name, batch_size=batch)
    model, bn = common.make_model(model_name, classes, common.activation("gelu"), jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tx, _ = common.make_optimizer(setup, total_steps=10_000, steps_per_epoch=100)
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    step = common.make_train_step(static, common.rule(method), tx, dt, size <= 64, (120.0,) * 3, (60.0,) * 3)
    mesh = common.data_mesh()
    rep = jax.sharding.NamedSharding(mesh, jax.P())
    rng = np.random.default_rng(0)
    x, y = common._global(mesh, rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                          rng.integers(0, classes, batch).astype(np.int32))
    hp = jax.device_put({"lr": jnp.float32(0.01), "rho": jnp.float32(0.05), "sigma2": jnp.float32(1e-4)}, rep)
    state = jax.device_put((params, tx.init(params), bn), rep)
    key = jax.random.key(1)

    t = time.perf_counter()
    compiled = step.lower(*state, x, y, key, hp).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes) / 2**20

    gflop = (compiled.cost_analysis() or {}).get("flops", float("nan")) / 1e9
    if cfg.analyze:
        return None, compile_s, peak, gflop
    times = []
    for i in range(cfg.warmup + cfg.steps):
        t = time.perf_counter()
        *state, metrics = compiled(*state, x, y, jax.random.fold_in(key, i), hp)
        jax.block_until_ready((state, metrics))
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t)
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"{model_name} {method}: non-finite loss in the benchmark")
    return statistics.median(times), compile_s, peak, gflop


def pipeline_rate(batches, n, batch):
    """Images/s delivered by an iterator of batches, after its first batch (start-up excluded)."""
    next(batches)
    t = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * batch / (time.perf_counter() - t)


def jpeg_folder(root, classes=4, per_class=64):
    """A small ImageNet-layout folder of random-size JPEGs, for the pipeline benchmark."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                h, w = rng.integers(300, 500, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    os.path.join(d, f"{i}.JPEG"), quality=90)
    return root


def pipelines(cfg, platform):
    rows = []
    x = np.zeros((50_000, 32, 32, 3), np.uint8)
    y = np.zeros(50_000, np.int32)
    rate = pipeline_rate(common.small_batches(x, y, 128, seed=0, num_epochs=None), cfg.pipeline_batches, 128)
    rows.append(dict(platform=platform, model="-", dtype="uint8", method="pipeline:small_images_b128",
                     images_per_s=rate))
    if cfg.imagenet_dir:
        root = cfg.imagenet_dir
    else:  # removed at exit, after Grain's own exit handler has stopped its workers
        root = jpeg_folder(tempfile.mkdtemp(prefix="bench_jpegs_"), per_class=16 if cfg.quick else 64)
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    batches = common.imagenet_batches(root, "train", 64, seed=0, num_epochs=None)
    rate = pipeline_rate(batches, cfg.pipeline_batches, 64)
    rows.append(dict(platform=platform, model="-", dtype="uint8", method="pipeline:imagenet_folder_b64",
                     images_per_s=rate))
    return rows


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__)
    if cfg.quick:
        cfg = dataclasses.replace(cfg, steps=5, warmup=1, pipeline_batches=5)
    for m in cfg.methods:
        common.rule(m)
    platform = jax.default_backend()
    rows = []
    for spec in cfg.configs or default_configs(platform):
        try:
            model_name, batch, size, dtype = spec.split(":")
            batch, size = int(batch), int(size)
        except ValueError:
            raise common.ConfigError(f"--configs: {spec!r} is not model:batch:image_size:dtype")
        base = base_flop = base_mem = None
        for method in cfg.methods:
            sec, compile_s, peak, gflop = time_rule(model_name, batch, size, dtype, method, cfg)
            if method == "sgd":
                base, base_flop, base_mem = sec, gflop, peak
            row = dict(platform=platform, model=model_name, dtype=dtype, method=method, compile_s=compile_s,
                       peak_mem_mb=peak, gflop=gflop, flop_ratio=gflop / base_flop if base_flop else None,
                       mem_ratio=peak / base_mem if base_mem and peak else None)
            if sec is not None:
                row |= dict(step_ms=1e3 * sec, images_per_s=batch / sec, ratio_to_sgd=sec / base if base else None)
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.analyze:
        path = os.path.join(cfg.out, f"bench_{platform}_xla.csv")
        columns = ("platform", "model", "dtype", "method", "gflop", "flop_ratio", "peak_mem_mb", "mem_ratio")
    else:
        rows += pipelines(cfg, platform)
        path = os.path.join(cfg.out, f"bench_{platform}.csv")
        columns = COLUMNS
    with open(path, "w") as f:
        f.write(",".join(columns) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                             for c in columns) + "\n")
    print(f"\n{'model':10} {'dtype':9} {'method':30} {'step_ms':>9} {'img/s':>9} {'ratio':>6} {'compile':>8} {'MiB':>8}"
          f" {'GFLOP':>8} {'flops':>6} {'mem':>6}")
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-".rjust(int(fmt.split(".")[0]))
        print(f"{r['model']:10} {r['dtype']:9} {r['method']:30} {f('step_ms', '9.1f')} {f('images_per_s', '9.0f')} "
              f"{f('ratio_to_sgd', '6.2f')} {f('compile_s', '8.1f')} {f('peak_mem_mb', '8.0f')} {f('gflop', '8.1f')} "
              f"{f('flop_ratio', '6.2f')} {f('mem_ratio', '6.2f')}")
    print(f"wrote {path}")


if __name__ == "__main__":
    common.run_cli(main)
