"""Cost of every update rule, and of the curvature probe, as a ratio to SGD, measured side by side in
one process; and the input pipelines.

For each configuration and rule: the full jitted train step (augmentation, loss, rule, optimizer,
BatchNorm state) after compilation, on synthetic data already on the device; the median of --steps
timed steps (block_until_ready each), images/s, the ratio to sgd of the same run, the compile time,
and the step's peak device memory from XLA's memory analysis of the compiled step (arguments + outputs
+ temporaries − donated aliases). "probe" is one call of the curvature probe on a batch of the same
size. Then the input pipelines: images/s delivered by the small-image pipeline; per core (one
process, CPU time), the ImageNet decoding transforms of this repo against full-size decoding, on
photo-like 300-500 px JPEGs (or --imagenet-dir); and the ImageNet-folder pipeline with one worker
per core.

    uv run bench.py                       # CPU: wrn16_4, batch 128, 32x32x3, fp32 (over an hour on 2 cores)
    uv run bench.py --configs cnn16:128:32:float32      # the timed CPU run of results/README.md
    uv run bench.py --quick               # 5 steps per rule, a smoke run
    uv run bench.py --analyze             # FLOPs and peak memory per rule from XLA, compile only
    uv run bench.py --analyze --methods sgd hessian_trace --no-cse    # what `cse` saves on this JAX
    uv run bench.py --reencode            # ImageNet decoding per core, original vs re-encoded folders (3 min)
    uv run --extra cuda13 bench.py        # GPU: adds wrn28_10 b128 and resnet50 b256 224², fp32 and bf16
    uv run bench.py --plan                # cost of each figure's paper setup, compile only

Writes <out>/bench_<platform>.csv: platform,model,dtype,method,step_ms,images_per_s,ratio_to_sgd,
compile_s,peak_mem_mb (pipeline rows have method "pipeline:<name>" or "decode_per_core:<name>"), row
by row, so an interrupted run keeps what it measured. With --analyze it only compiles each function
and writes <out>/bench_<platform>_xla.csv: XLA's FLOP count and peak memory and their ratios to sgd,
which no other load on the machine can disturb. With --plan it prints what each figure script's
paper setup costs (runs, steps, XLA's FLOPs per step of each rule at the paper's model, batch and
resolution, accelerator-hours, peak memory per device), from the steps compiled into <out>/plan.csv.
With --reencode it only measures the ImageNet transforms per core on original and re-encoded folders
(`reencode_bench`) and writes <out>/bench_pipeline.csv.
"""

import atexit
import dataclasses
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

import common
import tools

COLUMNS = ("platform", "model", "dtype", "method", "step_ms", "images_per_s", "ratio_to_sgd", "compile_s",
           "peak_mem_mb")


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 20  # timed steps per rule (median reported)
    warmup: int = 2  # untimed steps after compilation
    methods: tuple[str, ...] = ()  # empty: every rule of the registry when the run starts, and "probe"
    configs: tuple[str, ...] = ()  # e.g. wrn16_4:128:32:float32; empty: the platform's default list
    pipeline_batches: int = 30
    imagenet_dir: str | None = None  # a real ImageNet folder for the pipeline benchmark
    out: str = "results"
    quick: bool = False  # 5 timed steps, 1 warm-up: a smoke run
    analyze: bool = False  # compile only: XLA's FLOP count and peak memory per rule, no timing
    cse: bool = True  # --no-cse: hessian_trace without `common.cse`, to measure what the merge saves
    gpu_quick: bool = False  # the GPU check (docs/running.md): WRN-28-10, ResNet-50, pipeline, a fig2 run
    # --plan: the cost of each figure script's paper setup from XLA's counts, compile only (`plan`)
    plan: bool = False
    plan_scripts: tuple[str, ...] = ("fig2_gp_relu_gelu", "fig3_beta_gelu", "fig4_aug_dim", "fig5_weight_noise",
                                     "fig6_sam_vs_psam")
    plan_datasets: tuple[str, ...] = ("imagenet", "cifar10")
    plan_dtype: str = "bfloat16"  # the dtype a launch on an accelerator would use (--dtype of the scripts)
    plan_devices: tuple[int, ...] = (1, 8)  # data-parallel devices the global batch is split over (memory)
    mfu: float = 0.4  # model FLOP utilisation assumed for the accelerator-hours
    compile_budget_s: float = 1800.0  # per compiled step; a step over budget is reported, not costed; 0: none
    reencode: bool = False  # only the re-encoded ImageNet pipeline: <out>/bench_pipeline.csv


def default_configs(platform):
    """(model, batch, image size, dtype) per platform: a CPU-sized WRN; on an accelerator the paper's models."""
    if platform == "cpu":
        return ["wrn16_4:128:32:float32"]
    return [f"{m}:{dt}" for m in ("wrn16_4:128:32", "wrn28_10:128:32", "resnet50:256:224")
            for dt in ("float32", "bfloat16")]


def time_rule(model_name, batch, size, dtype, method, cfg):
    """(median step seconds, compile seconds, peak MiB, GFLOP) of one rule's full train step, or with
    method "probe" of the curvature probe (8 trace samples per estimator, 20 Lanczos steps) on a batch
    of the same size; with cfg.analyze the function is compiled, not run (median None)."""
    classes = 1000 if size > 64 else 10
    # The engine's own run on one synthetic batch in memory: one step per epoch, so 10,000 steps with
    # 100 of warm-up, the schedule of a long run.
    train = common.for_dataset("imagenet" if size > 64 else "cifar10", model=model_name, batch_size=batch,
                               method="sgd" if method == "probe" else method, dtype=dtype, rho=0.05, sigma2=1e-4,
                               lr=0.01, activation="gelu", epochs=10_000, warmup_epochs=100)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, classes, batch).astype(np.int32)
    data = common.InMemory(common.DatasetSpec(classes, (size, size, 3), (120.0,) * 3, (60.0,) * 3), x, y, x, y)
    run = common.setup(train, 0, data)
    spec, state, hp = run.spec, (run.params, run.opt_state, run.bn_state), run.hp
    x, y = jax.device_put((x, y), jax.sharding.NamedSharding(run.mesh, jax.P("data")))
    key = jax.random.key(1)
    if method == "probe":
        lower = lambda: tools.probe_step.lower(spec.net, spec.mean, spec.std, state[0], state[2], hp.beta, x, y,
                                                key)
        call = lambda compiled, state, i: (state, compiled(state[0], state[2], hp.beta, x, y, key))
    else:
        lower = lambda: common.train_step.lower(spec, *state, x, y, key, hp)
        call = lambda compiled, state, i: (lambda out: (out[:3], out[3]))(
            compiled(*state, x, y, jax.random.fold_in(key, i), hp))

    t = time.perf_counter()
    compiled = lower().compile()
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
        state, metrics = call(compiled, state, i)
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


def photo(rng, h, w):
    """A photo-like RGB image: 1/f-spectrum luminance and colour fields plus mild noise (white noise
    would decode unrealistically slowly); at quality 90 about 0.55 bytes per pixel, as ImageNet."""

    def field(alpha):
        f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
        f[0, 0] = 1
        spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**alpha
        spec[0, 0] = 0
        x = np.fft.irfft2(spec, s=(h, w))
        return x / x.std()

    mix = np.array([[1, 0.5, 0.2], [1, -0.3, 0.1], [1, 0.1, -0.5]])
    x = rng.uniform(80, 170, 3) + 40 * np.stack([field(1.0), 0.4 * field(1.3), 0.4 * field(1.3)], -1) @ mix.T
    return np.clip(x + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg_folder(root, classes=4, per_class=64, sides=(300, 501)):
    """An ImageNet-layout folder of photo-like JPEGs with each side uniform in `sides`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                h, w = rng.integers(*sides, 2)
                Image.fromarray(photo(rng, h, w)).save(os.path.join(d, f"{i}.JPEG"), quality=90)
    return root


def full_decode_train(record, rng):
    """The reference transform: decode at full size, random-resized-crop, flip (before reduced decoding)."""
    from PIL import Image

    path, label = record
    with Image.open(path) as im:
        im = im.convert("RGB")
    box = common._random_resized_crop(im.width, im.height, rng)
    x = np.asarray(im.resize((224, 224), Image.BILINEAR, box=box))
    return np.ascontiguousarray(x[:, ::-1] if rng.random() < 0.5 else x), np.int32(label)


def full_decode_eval(record):
    from PIL import Image

    path, label = record
    with Image.open(path) as im:
        im = im.convert("RGB")
    s = 256 / min(im.width, im.height)
    w, h = max(224, round(im.width * s)), max(224, round(im.height * s))
    im = im.resize((w, h), Image.BILINEAR)
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224))), np.int32(label)


def decode_rates(source, repeats=3):
    """Images per CPU-second of one process, reference vs this repo's transforms, interleaved image by
    image (so machine load hits both alike); the median of `repeats` passes."""
    fns = {"train_full_decode": lambda r: full_decode_train(r, np.random.default_rng(0)),
           "train": lambda r: common._imagenet_train(r, np.random.default_rng(0)),
           "eval_full_decode": full_decode_eval, "eval": common._imagenet_eval}
    rates = {k: [] for k in fns}
    for _ in range(repeats):
        spent = dict.fromkeys(fns, 0.0)
        for i in range(len(source)):
            for k, f in fns.items():
                t = time.process_time()
                f(source[i])
                spent[k] += time.process_time() - t
        for k in fns:
            rates[k].append(len(source) / spent[k])
    return {k: statistics.median(v) for k, v in rates.items()}


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
        root = jpeg_folder(tempfile.mkdtemp(prefix="bench_jpegs_"), per_class=4 if cfg.quick else 64)
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    data = common.ImageFolder(root)
    for name, rate in decode_rates(data.sources["train"], repeats=1 if cfg.quick else 3).items():
        rows.append(dict(platform=platform, model="-", dtype="uint8", method=f"decode_per_core:{name}",
                         images_per_s=rate))
    rate = pipeline_rate(data.train(64, seed=0), cfg.pipeline_batches, 64)
    rows.append(dict(platform=platform, model="-", dtype="uint8", method=f"pipeline:imagenet_folder_b64_"
                     f"{data.workers or os.cpu_count()}workers", images_per_s=rate))
    return rows


#### The re-encoded ImageNet pipeline (docs/running.md) ##########################################

REENCODE_SIDES = (160, 192, 224, 256, 320)
PIPELINE_COLUMNS = ("platform", "folder", "split", "transform", "images_per_s_per_core", "ratio_to_full_decode",
                    "crop_resolution", "crop_not_upsampled")


def crop_view(w, h, size=224, n=20_000):
    """What the train crop of a w x h image sees, over n random-resized crops resized to size x size:
    the mean fraction of the output's resolution backed by source pixels, min(1, cw/size) min(1, ch/size),
    and the fraction of crops not upsampled in either axis."""
    rng = np.random.default_rng(0)
    boxes = np.array([common._random_resized_crop(w, h, rng) for _ in range(n)])
    cw, ch = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (float(np.mean(np.minimum(1, cw / size) * np.minimum(1, ch / size))),
            float(np.mean((cw >= size) & (ch >= size))))


def reencode_bench(cfg):
    """Images/s per core (one process, CPU time, the median of 5 passes with every transform interleaved
    image by image) of the ImageNet train and eval transforms on photo-like 500 x 375 JPEGs: full-size
    decoding (the reference), this repo's transforms on the original files, and on copies re-encoded by
    tools.reencode at each shorter side of REENCODE_SIDES; the re-encode's own rate per core; and what
    the 224 train crop still sees at each side (crop_view)."""
    from PIL import Image

    platform = jax.default_backend()
    tmp = tempfile.mkdtemp(prefix="bench_reencode_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    rng = np.random.default_rng(0)
    n = 8 if cfg.quick else 96
    for split in ("train", "val"):
        for c in range(4):
            d = os.path.join(tmp, "original", split, f"n{c:08d}")
            os.makedirs(d)
            for i in range(n // 4):
                Image.fromarray(photo(rng, 375, 500)).save(os.path.join(d, f"{i}.JPEG"), quality=90)
    folders = {"original": os.path.join(tmp, "original")}
    rows = []
    for side in REENCODE_SIDES:
        dst = os.path.join(tmp, f"side{side}")
        files = [(os.path.join(r, f), os.path.relpath(os.path.join(r, f), folders["original"]))
                 for r, _, fs in os.walk(folders["original"]) for f in fs]
        t = time.process_time()
        for path, rel in files:
            tools._reencode_one((path, os.path.join(dst, rel), rel, side, 90))
        rows.append(dict(folder=f"side{side}", split="-", transform="reencode",
                         images_per_s_per_core=len(files) / (time.process_time() - t)))
        folders[f"side{side}"] = dst
    # Image i's train crop draws from default_rng(i) under every transform: the crops vary from image
    # to image as in training, and each folder's transform sees the same draws (paired).
    fns = {("original", "train", "full_decode"): lambda r, i: full_decode_train(r, np.random.default_rng(i)),
           ("original", "eval", "full_decode"): lambda r, i: full_decode_eval(r)}
    for name in folders:
        fns[(name, "train", "repo")] = lambda r, i: common._imagenet_train(r, np.random.default_rng(i))
        fns[(name, "eval", "repo")] = lambda r, i: common._imagenet_eval(r)
    sources = {name: common.ImageFolder(root).sources["train"] for name, root in folders.items()}
    rates = {k: [] for k in fns}
    for _ in range(1 if cfg.quick else 5):
        spent = dict.fromkeys(fns, 0.0)
        for i in range(n):
            for k, f in fns.items():
                t = time.process_time()
                f(sources[k[0]][i], i)
                spent[k] += time.process_time() - t
        for k in fns:
            rates[k].append(n / spent[k])
    for (name, split, transform), r in rates.items():
        w, h = (500, 375) if name == "original" else (round(500 * int(name[4:]) / 375), int(name[4:]))
        rate = statistics.median(r)
        view = crop_view(w, h) if split == "train" else (None, None)
        rows.append(dict(folder=name, split=split, transform=transform, images_per_s_per_core=rate,
                         ratio_to_full_decode=rate / statistics.median(rates[("original", split, "full_decode")]),
                         crop_resolution=view[0], crop_not_upsampled=view[1]))
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "bench_pipeline.csv")
    with open(path, "w") as out:
        out.write(",".join(PIPELINE_COLUMNS) + "\n")
        for row in rows:
            row["platform"] = platform
            out.write(",".join("" if row.get(c) is None else (f"{row[c]:.4g}" if isinstance(row[c], float)
                                                              else str(row[c])) for c in PIPELINE_COLUMNS) + "\n")
    for row in rows:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                       if v is not None))
    print(f"wrote {path}")
    return rows


GPU_QUICK = dict(configs=("wrn28_10:128:32:float32", "wrn28_10:128:32:bfloat16", "resnet50:256:224:bfloat16"),
                 methods=("sgd", "gp_p1", "sam", "gn_trace", "hessian_trace"), steps=10, warmup=2)


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__)
    if cfg.plan:
        return plan(cfg)
    if cfg.reencode:
        return reencode_bench(cfg)
    if cfg.quick:
        cfg = dataclasses.replace(cfg, steps=5, warmup=1, pipeline_batches=5)
    if cfg.gpu_quick:
        cfg = dataclasses.replace(cfg, **GPU_QUICK)
    if not cfg.cse:
        common.cse = lambda fn: fn  # this process only: the nested JVPs' first-order stream stays twice
    accepted = (*common.RULES, "probe")  # the registry now: a rule added later counts
    cfg = dataclasses.replace(cfg, methods=cfg.methods or accepted)
    for m in cfg.methods:
        if m not in accepted:
            raise common.ConfigError(f"--methods: unknown method {m!r}; accepted: {', '.join(accepted)}")
    specs = []
    for spec in cfg.configs or default_configs(jax.default_backend()):
        try:
            model_name, batch, size, dtype = spec.split(":")
            specs.append((model_name, int(batch), int(size), dtype))
        except ValueError:
            raise common.ConfigError(f"--configs: {spec!r} is not model:batch:image_size:dtype") from None
    platform = jax.default_backend()
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.analyze:
        path = os.path.join(cfg.out, f"bench_{platform}_xla.csv")
        columns = ("platform", "model", "dtype", "method", "gflop", "flop_ratio", "peak_mem_mb", "mem_ratio")
    else:
        path = os.path.join(cfg.out, f"bench_{platform}.csv")
        columns = COLUMNS
    rows = []
    with open(path, "w") as out:  # row by row: a run stopped by a time limit keeps what it measured
        out.write(",".join(columns) + "\n")

        def emit(row):
            rows.append(row)
            out.write(",".join("" if row.get(c) is None else (f"{row[c]:.4g}" if isinstance(row[c], float)
                                                              else str(row[c])) for c in columns) + "\n")
            out.flush()
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

        for model_name, batch, size, dtype in specs:
            base = base_flop = base_mem = None
            methods = [m for m in cfg.methods if not (cfg.gpu_quick and model_name == "resnet50")
                       or m in ("sgd", "gp_p1")]
            for method in methods:
                sec, compile_s, peak, gflop = time_rule(model_name, batch, size, dtype, method, cfg)
                if method == "sgd":
                    base, base_flop, base_mem = sec, gflop, peak
                row = dict(platform=platform, model=model_name, dtype=dtype, method=method, compile_s=compile_s,
                           peak_mem_mb=peak, gflop=gflop, flop_ratio=gflop / base_flop if base_flop else None,
                           mem_ratio=peak / base_mem if base_mem and peak else None)
                if sec is not None:
                    row |= dict(step_ms=1e3 * sec, images_per_s=batch / sec,
                                ratio_to_sgd=sec / base if base else None)
                emit(row)
        if not cfg.analyze:
            for row in pipelines(cfg, platform):
                emit(row)
        if cfg.gpu_quick:
            emit(fig2_run(cfg, platform))
    print(f"\n{'model':10} {'dtype':9} {'method':30} {'step_ms':>9} {'img/s':>9} {'ratio':>6} {'compile':>8} {'MiB':>8}"
          f" {'GFLOP':>8} {'flops':>6} {'mem':>6}")
    for r in rows:
        f = lambda k, fmt: (format(r[k], fmt) if r.get(k) is not None  # noqa: E731
                            else "-".rjust(int(fmt.split(".")[0])))
        print(f"{r['model']:10} {r['dtype']:9} {r['method']:30} {f('step_ms', '9.1f')} {f('images_per_s', '9.0f')} "
              f"{f('ratio_to_sgd', '6.2f')} {f('compile_s', '8.1f')} {f('peak_mem_mb', '8.0f')} {f('gflop', '8.1f')} "
              f"{f('flop_ratio', '6.2f')} {f('mem_ratio', '6.2f')}")
    print(f"wrote {path}")


def fig2_run(cfg, platform):
    """One short Fig. 2 sweep on Fashion-MNIST with a conv net (cnn16, 2 epochs on 4,096 images, 1 seed):
    the whole path from flags to verdict, timed."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fig2_gp_relu_gelu.py")
    spec = importlib.util.spec_from_file_location("fig2", path)
    fig2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig2)
    t = time.perf_counter()
    fig2.main(["--model", "cnn16", "--epochs", "2", "--train-subset", "4096", "--seeds", "1", "--rhos", "0", "0.1",
               "--out", os.path.join(cfg.out, "gpu_quick_fig2")])
    return dict(platform=platform, model="cnn16", dtype="float32", method="fig2_4runs_wall_s",
                step_ms=1e3 * (time.perf_counter() - t))


#### The cost plan (--plan) ########################################################################
# What a figure script's paper setup costs before it is launched: its runs (from the script's own
# Config and runs), the optimizer steps of each, and XLA's FLOP count and peak memory of each rule's
# train step, compiled for one CPU device and analysed, never run. Compiled steps are cached in
# <out>/plan.csv, keyed by (model, per-device batch, image size, rule, dtype): the table is printed
# from it, and only missing steps compile.

ACCELERATORS = {"H100": (989e12, 80), "TPU v5e": (197e12, 16)}  # dense bf16 FLOP/s, GiB of memory per chip
PLAN_COLUMNS = ("model", "batch", "image_size", "rule", "dtype", "gflop", "peak_mem_mb", "compile_s", "jax")


def load_script(name):
    """A figure script (e.g. "fig4_aug_dim") as a module."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    if not os.path.isfile(path):
        raise common.ConfigError(f"--plan-scripts: no script {name}.py beside bench.py; accepted: fig2_gp_relu_gelu, "
                                 "fig3_beta_gelu, fig4_aug_dim, fig5_weight_noise, fig6_sam_vs_psam")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paper_sweep(script, dataset, **flags):
    """(TrainConfigs of one seed, seed count) that `<script>.py --dataset <dataset>` with `flags` (Flags
    fields, e.g. dtype="bfloat16") would run, from the script's own Config and runs. The one place
    that knows how a script turns its flags into runs."""
    module = load_script(script)
    cfg = module.Config(dataset=dataset, **flags)
    base, _ = common.resolve(cfg)
    return module.runs(cfg, base), common.seed_count(cfg)


def step_key(tc, devices=1) -> tuple:
    """(model, per-device batch, image size, rule, dtype) of a run's train step on `devices` devices."""
    size = tc.image_size if tc.dataset == "imagenet" else common.DATASET_SPECS[tc.dataset].shape[0]  # --image-size
    return tc.model, tc.batch_size // devices, size, tc.method, tc.dtype


def step_cost(model, batch, size, rule, dtype) -> tuple:
    """(GFLOP, peak MiB, compile s) of the train step, from XLA's analysis of it compiled: the step
    `--analyze` measures (the paper setup of the dataset the image size implies, GELU)."""
    _, compile_s, peak, gflop = time_rule(model, batch, size, dtype, rule, Config(analyze=True))
    return gflop, peak, compile_s


def one_device_env() -> dict:
    """The environment of a child process that sees one CPU device and nothing else."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return env


def compile_in_child(key, budget_s):
    """step_cost(*key) in a child process on one CPU device (a compile cannot be interrupted in
    process), killed after budget_s: (GFLOP, peak MiB, compile s), or None when over budget."""
    import json
    import subprocess
    import sys

    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import bench; "
            f"print('PLAN', json.dumps(bench.step_cost(*{tuple(key)!r})))")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=one_device_env(), capture_output=True, text=True,
                             timeout=budget_s)
    except subprocess.TimeoutExpired:
        return None
    lines = [line for line in out.stdout.splitlines() if line.startswith("PLAN ")]
    if out.returncode or not lines:
        raise RuntimeError(f"compiling {key} failed:\n{out.stderr[-3000:]}")
    return tuple(json.loads(lines[-1][5:]))


def read_plan(path) -> dict:
    """The cached steps of plan.csv by key; the last row of a key wins."""
    import csv

    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            num = lambda k: float(r[k]) if r[k] else None  # noqa: E731
            out[(r["model"], int(r["batch"]), int(r["image_size"]), r["rule"], r["dtype"])] = dict(
                gflop=num("gflop"), peak_mem_mb=num("peak_mem_mb"), compile_s=num("compile_s"), jax=r["jax"])
    return out


def cost_steps(path, keys, budget_s) -> dict:
    """plan.csv's steps for `keys`, compiling (and appending) those it lacks; a step that ran over an
    earlier budget is tried again only with a larger one. Budget 0: plan.csv as it is."""
    table = read_plan(path)
    for key in keys if budget_s > 0 else ():
        got = table.get(key)
        if got and (got["gflop"] is not None or got["compile_s"] >= budget_s):
            continue
        print(f"plan: compiling {':'.join(map(str, key))} (budget {budget_s:.0f} s)", flush=True)
        t = time.perf_counter()
        cost = compile_in_child(key, budget_s)
        row = dict(zip(("gflop", "peak_mem_mb", "compile_s"), cost or (None, None, time.perf_counter() - t)))
        row["jax"] = jax.__version__
        new = not os.path.exists(path)
        with open(path, "a") as f:  # row by row: an interrupted plan keeps what it compiled
            if new:
                f.write(",".join(PLAN_COLUMNS) + "\n")
            f.write(",".join(map(str, key)) + "," + ",".join(
                "" if row[c] is None else (f"{row[c]:.10g}" if isinstance(row[c], float) else str(row[c]))
                for c in PLAN_COLUMNS[5:]) + "\n")
        done = "over budget" if cost is None else f"{row['gflop']:.1f} GFLOP"
        print(f"plan: {done} after {row['compile_s']:.0f} s", flush=True)
    return read_plan(path)  # the table comes from the CSV, whether compiled now or before


def sweep_cost(settings, seeds, table, devices, mfu) -> dict:
    """The cost of one sweep: runs, steps per run, GFLOP per step of each rule, total FLOPs (None if a
    step is missing), accelerator-hours at `mfu`, and the peak GiB per device on each device count."""
    get = lambda key, field: table.get(key, {}).get(field)  # noqa: E731  (None: not compiled)
    flop = {tc.method: get(step_key(tc), "gflop") for tc in settings}
    total = None
    if all(v is not None for v in flop.values()):
        total = seeds * sum(common.run_steps(tc)[1] * flop[tc.method] * 1e9 for tc in settings)
    peaks = {}
    for d in devices:
        mem = [get(step_key(tc, d), "peak_mem_mb") for tc in settings]
        peaks[d] = None if None in mem else max(mem) * 2**20 / 2**30
    tc = settings[0]
    return dict(model=tc.model, batch=tc.batch_size, image_size=step_key(tc)[2], dtype=tc.dtype,
                configs=len(settings), seeds=seeds, runs=len(settings) * seeds,
                steps_per_run=sorted({common.run_steps(t)[1] for t in settings}), gflop_per_step=flop, total_flop=total,
                hours={a: None if total is None else total / (peak * mfu) / 3600
                       for a, (peak, _) in ACCELERATORS.items()},
                peak_gib=peaks)


def plan(cfg, flags=None) -> list[dict]:
    """Print the cost of each --plan-scripts' paper setup on each --plan-datasets (flags: more
    Flags fields for every script, e.g. a smaller model for a test); returns one dict per sweep."""
    for ds in cfg.plan_datasets:
        if ds not in common.PAPER_SETUPS:
            raise common.ConfigError(f"--plan-datasets: unknown dataset {ds!r}; accepted: "
                                     f"{', '.join(common.PAPER_SETUPS)}")
    if not 0 < cfg.mfu <= 1:
        raise common.ConfigError(f"--mfu: {cfg.mfu} is not in (0, 1]")
    if cfg.compile_budget_s < 0:
        raise common.ConfigError(f"--compile-budget-s: {cfg.compile_budget_s} is not >= 0")
    sweeps = []
    for script in cfg.plan_scripts:
        for ds in cfg.plan_datasets:
            settings, seeds = paper_sweep(script, ds, **({"dtype": cfg.plan_dtype} | (flags or {})))
            for tc in settings:
                # names and ranges; the batch is checked against --plan-devices, not this machine's devices
                common.validate(dataclasses.replace(tc, batch_size=jax.device_count()))
                for d in cfg.plan_devices:
                    if d < 1 or tc.batch_size % d:
                        raise common.ConfigError(f"--plan-devices: {d} does not divide {script} {ds}'s batch "
                                                 f"{tc.batch_size}")
            sweeps.append((script, ds, settings, seeds))
    keys = dict.fromkeys(step_key(tc, d) for d in (1, *cfg.plan_devices) for _, _, settings, _ in sweeps
                         for tc in settings)  # FLOPs (the global batch on one device) first
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "plan.csv")
    table = cost_steps(path, keys, cfg.compile_budget_s)
    lines = [dict(script=script, dataset=ds) | sweep_cost(settings, seeds, table, cfg.plan_devices, cfg.mfu)
             for script, ds, settings, seeds in sweeps]
    print_plan(lines, cfg, path)
    return lines


def print_plan(lines, cfg, path) -> None:
    """The plan as a Markdown table (results/README.md has it)."""
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    devs = " / ".join(map(str, cfg.plan_devices))
    print(f"\nCost of the paper setups in {cfg.plan_dtype} at {cfg.mfu:.0%} MFU (XLA's counts of each rule's train "
          f"step compiled on CPU, from {path}; test-set passes not included; -: not compiled within the budget)\n")
    head = ["script", "dataset", "model, batch, image", "runs", "steps/run", "TFLOP/step", "total EFLOP", "H100-h",
            "v5e-h", f"peak GiB/device on {devs} devices", "device counts that fit " + " / ".join(
                f"{a} {gib} GiB" for a, (_, gib) in ACCELERATORS.items())]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for ln in lines:
        rules = ", ".join(f"{r} {fmt(None if g is None else g / 1e3, '.2f')}" for r, g in ln["gflop_per_step"].items())
        fits = "-" if None in ln["peak_gib"].values() else " / ".join(
            ", ".join(str(d) for d, p in ln["peak_gib"].items() if p <= gib) or "none"
            for _, gib in ACCELERATORS.values())
        cells = [ln["script"], ln["dataset"], f"{ln['model']}, {ln['batch']}, {ln['image_size']}²",
                 f"{ln['configs']} × {ln['seeds']} = {ln['runs']}", ", ".join(f"{n:,}" for n in ln["steps_per_run"]),
                 rules, fmt(None if ln["total_flop"] is None else ln["total_flop"] / 1e18, ".1f"),
                 fmt(ln["hours"]["H100"], ",.0f"), fmt(ln["hours"]["TPU v5e"], ",.0f"),
                 " / ".join(fmt(p, ".1f") for p in ln["peak_gib"].values()), fits]
        print("| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    common.run_cli(main)
