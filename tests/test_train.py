"""Training engine: every rule learns and its penalty is in the step, sharding is invisible, one compile
per sweep, exact resume, any device count evaluates, bad input is one ConfigError naming the flag."""

import dataclasses
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from common import ConfigError, DatasetSpec, InMemory, RULES, TrainConfig


def separable(n, seed, classes=3, size=8):
    """uint8 images [n, size, size, classes] whose class is the brightest channel, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    x = rng.integers(0, 120, (n, size, size, classes))
    x[np.arange(n), :, :, y] += 100
    return x.astype(np.uint8), y


SPEC = DatasetSpec(3, (8, 8, 3), (110.0,) * 3, (60.0,) * 3)
DATA = InMemory(SPEC, *separable(512, 0), *separable(300, 1))
TINY = TrainConfig(model="tiny", epochs=6, batch_size=32, lr=0.1, warmup_epochs=0.5, weight_decay=5e-4,
                   rho=0.05, sigma2=1e-3)
QUIET = common.RunOptions(eval_batch_size=100, log=False)


def train(cfg, seed=0, data=DATA, opts=QUIET, **kw):
    return common.train(cfg, seed, data, opts, **kw)


@pytest.fixture(scope="module")
def sgd_params():
    return train(dataclasses.replace(TINY, method="sgd"))["params"]


@dataclasses.dataclass(frozen=True)
class WithTau(TrainConfig):
    """A copied script's configuration: its rule's own scalar, swept as an array (README, "Extending")."""

    tau: float = common.setting(0.0, common.at_least(0), flag=False, array=True, help="sign_step's weight")


def sign_step(loss_fn, params, state, batch, key, hp):
    """A rule added at run time, reading its own scalar: g + τ sign(g)."""
    step = RULES["sgd"](loss_fn, params, state, batch, key, hp)
    return step._replace(direction=jax.tree.map(lambda g: g + hp.tau * jnp.sign(g), step.direction))


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in RULES if m != "sgd"] + ["sign_step"])
def test_every_rule_learns_and_its_penalty_acts(method, sgd_params, monkeypatch):
    """Every rule of RULES, and one a copied script adds with its own scalar (τ of WithTau)."""
    cfg = dataclasses.replace(TINY, method=method)
    if method == "sign_step":
        monkeypatch.setitem(RULES, method, sign_step)
        cfg = WithTau(**dataclasses.asdict(cfg), tau=0.01)
    r = train(cfg)
    assert r["steps"] == 6 * (512 // 32) and not r["diverged"]
    assert r["test_accuracy"] > 0.95 and r["train_loss"] < 0.3, r
    # The same seed with the penalty switched on ends elsewhere than sgd: ρ and σ² reach the rule.
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in (r["params"], sgd_params))
    assert np.linalg.norm(a - b) > 1e-3 * np.linalg.norm(b), method


@pytest.mark.slow
def test_divergence_is_recorded_not_raised():
    r = train(dataclasses.replace(TINY, lr=1e30, epochs=1))
    assert r["diverged"] and r["steps"] < 512 // 32 and math.isnan(r["test_accuracy"])


def _step_inputs(method, n_devices):
    run = common.setup(dataclasses.replace(TINY, method=method, sigma2=0.01, rho=0.1, augment=True), 0, DATA)
    mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n_devices])
    rep = jax.sharding.NamedSharding(mesh, jax.P())
    return run, mesh, jax.device_put((run.params, run.opt_state, run.bn_state, run.hp), rep)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sgd", "gp_p1", "gp_gn_p1", "sam", "hessian_trace", "gn_trace"])
def test_sharded_step_equals_single_device(method):
    """Global view: BatchNorm statistics, ‖g‖, ε and ŷ cover the global batch, so 4 devices == 1 device."""
    assert jax.device_count() == 4  # conftest simulates 4 CPU devices
    x, y = separable(64, 2)
    out = {}
    for n in (1, 4):
        run, mesh, (params, opt, state, hp) = _step_inputs(method, n)
        batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
        for i in range(4):
            xs, ys = jax.device_put((x[16 * i:16 * i + 16], y[16 * i:16 * i + 16]), batch)
            params, opt, state, _ = common.train_step(run.spec, params, opt, state, xs, ys, jax.random.key(i), hp)
        assert len(jax.tree.leaves(params)[0].sharding.device_set) == n
        out[n] = jax.device_get((params, state))
    for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[4])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_a_sweep_of_every_hyper_compiles_once():
    """lr, ρ, β, weight decay, momentum and the seed are array inputs: one train and one eval compile."""
    base = dataclasses.replace(TINY, method="gp_p1", activation="beta_gelu", epochs=1)
    sizes = common.train_step._cache_size(), common.eval_step._cache_size()
    results = []
    for i, change in enumerate([{}, dict(rho=0.1), dict(lr=0.05), dict(beta=4.0), dict(weight_decay=0.0),
                                dict(momentum=0.5)]):
        params = train(dataclasses.replace(base, **change), seed=i % 2)["params"]
        results.append(float(sum(jnp.sum(x) for x in jax.tree.leaves(params))))
    assert common.train_step._cache_size() - sizes[0] == 1
    assert common.eval_step._cache_size() - sizes[1] == 1
    assert len(set(results)) == len(results)  # every value did reach the step


def test_weight_decay_and_momentum_are_the_optimizers():
    """One step from θ with gradient g = 0 (lr = 1, warm-up done): θ − s·λθ for the mask's leaves, where
    s is the schedule; momentum then carries it: the second update is d + μ(d + μ·d) (Nesterov)."""
    cfg = dataclasses.replace(TINY, warmup_epochs=0.0, weight_decay=0.01, momentum=0.5, nesterov=True)
    run = common.setup(cfg, 0, DATA)
    tx, schedule = common.make_optimizer(run.spec, common.hyper(cfg))
    zeros = jax.tree.map(jnp.zeros_like, run.params)
    upd, state = tx.update(zeros, run.opt_state, run.params)
    w = run.params.fc.weight
    np.testing.assert_allclose(upd.fc.weight, 0.01 * w * (1 + 0.5) * float(schedule(0)), rtol=1e-6)
    upd, _ = tx.update(zeros, state, run.params)
    np.testing.assert_allclose(upd.fc.weight, 0.01 * w * (1 + 0.5 * (1 + 0.5)) * float(schedule(1)), rtol=1e-6)


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, method="sam", epochs=2)
    ref = train(cfg, seed=3)
    opts = dataclasses.replace(QUIET, ckpt_dir=str(tmp_path / "ckpt"), ckpt_every_s=0.0)
    real = common.small_batches

    def killed_after(n):
        def batches(*a, **k):
            it = real(*a, **k)
            for _ in range(n):
                yield next(it)
            raise KeyboardInterrupt  # as a kill between two steps

        return batches

    monkeypatch.setattr(common, "small_batches", killed_after(11))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, seed=3, opts=opts)
    monkeypatch.setattr(common, "small_batches", real)
    resumed = train(cfg, seed=3, opts=opts)
    assert resumed["steps"] == ref["steps"]
    for a, b in zip(jax.tree.leaves((ref["params"], ref["bn_state"])),
                    jax.tree.leaves((resumed["params"], resumed["bn_state"]))):
        np.testing.assert_array_equal(a, b)
    assert resumed["test_accuracy"] == ref["test_accuracy"]
    assert resumed["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-6)
    # A finished run is not trained again; another run gets its own checkpoint folder.
    again = train(cfg, seed=3, opts=opts)
    np.testing.assert_array_equal(jax.tree.leaves(again["params"])[0], jax.tree.leaves(ref["params"])[0])
    assert len(list((tmp_path / "ckpt").iterdir())) == 1
    train(dataclasses.replace(cfg, epochs=1), seed=3, opts=opts)
    assert len(list((tmp_path / "ckpt").iterdir())) == 2


@pytest.mark.slow
def test_checkpoint_of_another_run_is_refused(tmp_path):
    opts = dataclasses.replace(QUIET, ckpt_dir=str(tmp_path), ckpt_every_s=1e9)
    cfg = dataclasses.replace(TINY, epochs=0.1)
    train(cfg, seed=0, opts=opts)
    (folder,) = tmp_path.iterdir()
    folder.rename(tmp_path / common.run_id(cfg, 1))  # as if a folder were copied under another run's name
    with pytest.raises(ConfigError, match="--ckpt-dir.*seed"):
        train(cfg, seed=1, opts=opts)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [3, 4])
def test_evaluation_pads_to_any_device_count(devices, monkeypatch):
    """The eval batch is rounded up to a multiple of the device count and the padding masked: 3 devices
    (1000 = 3·333 + 1) evaluate the same accuracy as 1 device."""
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    assert common.padded_eval_batch(1000) % devices == 0 and common.padded_eval_batch(1000) >= 1000
    net = common.NetSpec("tiny", "relu", 3, 3)
    model, state = common.make_model("tiny", 3, common.activation("relu"), jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices("cpu")[:devices] if devices <= 4 else None)
    got = common._evaluate(net, SPEC, mesh, params, state, 1.0, DATA.test(100), 100, DATA.n_test)
    ref = common._evaluate(net, SPEC, common.data_mesh(), params, state, 1.0, DATA.test(100), 100, DATA.n_test)
    assert got == pytest.approx(ref, rel=1e-6)


@pytest.mark.slow
def test_mixed_precision_keeps_fp32_state():
    r = train(dataclasses.replace(TINY, dtype="bfloat16", method="gp_p1"))
    assert r["test_accuracy"] > 0.9
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(r["params"]))
    assert all(s.dtype in (jnp.float32, jnp.int32) for s in jax.tree.leaves(r["bn_state"]))


@pytest.mark.slow
def test_log_without_a_terminal_is_one_line_per_epoch(capsys):
    """Under SLURM or nohup (stdout not a terminal): flushed epoch lines, at most one per every_s seconds,
    and always the last."""
    train(dataclasses.replace(TINY, epochs=3), opts=dataclasses.replace(QUIET, log=True, log_every_s=0.0))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("epoch")]
    assert [ln.split()[1] for ln in lines] == ["1", "2", "3"] and "img/s" in lines[-1]
    train(dataclasses.replace(TINY, epochs=3), opts=dataclasses.replace(QUIET, log=True, log_every_s=1e9))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("epoch")]
    assert [ln.split()[1] for ln in lines] == ["3"]


@pytest.mark.slow
def test_probe_callback_every_n_steps():
    seen = []
    train(dataclasses.replace(TINY, epochs=1), probe=lambda run, data: lambda r: seen.append(r.step), every=5)
    assert seen == [5, 10, 15, 16]


@pytest.mark.slow
def test_a_schedule_added_to_the_registry_drives_the_step(monkeypatch):
    """A schedule of a copied script (SCHEDULES): multiplier 1 for the first half of the steps, 0 after;
    the parameters then stop at their value of the half-way step (weight decay and momentum scale with
    it), where the built-in cosine keeps training."""
    half = lambda warmup, total: lambda step: jnp.where(step < total // 2, 1.0, 0.0)  # noqa: E731
    monkeypatch.setitem(common.SCHEDULES, "half", half)
    flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])  # noqa: E731
    seen = {}
    probe = lambda run, data: lambda r: seen.setdefault(r.cfg.schedule, []).append(flat(r.params))  # noqa: E731
    for name in ("half", "cosine"):
        train(dataclasses.replace(TINY, epochs=2, schedule=name), probe=probe, every=16)  # steps 16 and 32
    half, end = seen["half"]
    assert np.array_equal(half, end) and not np.array_equal(*seen["cosine"])
    assert np.linalg.norm(half - seen["cosine"][0]) > 1e-3 * np.linalg.norm(half)  # the multiplier reached the step


def test_setups_are_the_table_of_math_md():
    """Every setup of SETUPS field by field against the table of MATH.md §4 (the paper's two setups and
    the CPU regimes), and ImageNet's lr scaling with the batch."""
    text = (Path(__file__).resolve().parents[1] / "MATH.md").read_text()
    lines = [ln for ln in text[text.index("| setup | model |"):].splitlines()[:6] if not ln.startswith("|---")]
    head, *table = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert {r[0] for r in table} == set(common.SETUPS)
    yes = {"yes": True, "no": False}
    for r in map(lambda cells: dict(zip(head, cells)), table):
        c = common.SETUPS[r["setup"]]
        lr = common.for_dataset(r["setup"]).lr
        assert lr == (0.1 * 256 / 256 if "batch/256" in r["lr"] else float(r["lr"]))
        assert (c.model, c.batch_size, c.nesterov, c.weight_decay, c.decay_norm_and_bias, c.warmup_epochs, c.epochs,
                c.augment, c.train_subset or "all", c.label_noise, c.momentum, c.schedule) == (
            r["model"], int(r["batch"]), yes[r["Nesterov"]], float(r["weight decay"]),
            yes[r["decay on BN and biases"]], float(r["warm-up epochs"]), float(r["epochs"]),
            yes[r["augment"].split()[0]], r["training images"] if r["training images"] == "all" else
            int(r["training images"]), float(r["label noise"]), 0.9, "cosine"), r["setup"]
    assert common.for_dataset("imagenet", batch_size=1024).lr == 0.4


def test_schedule_and_weight_decay_mask():
    """Linear warm-up then cosine to 0; decay off BN and biases where the setup says (ImageNet)."""
    for setup, bn_decayed in (("imagenet", False), ("cifar10", True)):
        cfg = dataclasses.replace(common.for_dataset(setup, warmup_epochs=2), model="tiny", epochs=10)
        data = InMemory(SPEC, *separable(160, 0), *separable(10, 1))
        run = common.setup(dataclasses.replace(cfg, batch_size=16), 0, data)
        tx, schedule = common.make_optimizer(run.spec, common.hyper(cfg))
        assert float(schedule(0)) == 0 and float(schedule(10)) == pytest.approx(0.5)
        assert float(schedule(20)) == pytest.approx(1.0) and float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
        params = run.params
        zeros = jax.tree.map(jnp.zeros_like, params)
        _, state = tx.update(zeros, run.opt_state, params)  # count 0: schedule 0
        upd, _ = tx.update(zeros, state, params)  # zero gradient: the update is the decay term only
        wd = common.SETUPS[setup].weight_decay
        ratio = np.asarray(upd.fc.weight / params.fc.weight).ravel()
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
        assert ratio[0] == pytest.approx(wd * (1 + 0.9 + 0.81 if setup == "cifar10" else 1.9) * 0.05, rel=1e-4)
        assert bool(np.any(upd.conv.bn.weight != 0)) == bn_decayed


@pytest.mark.parametrize("change,flag", [
    (dict(dataset="mnist"), "--dataset"), (dict(model="vgg16"), "--model"), (dict(activation="swish"), "--activation"),
    (dict(method="adam"), "--method"), (dict(rho=-0.1), "--rho"), (dict(sigma2=-1.0), "--sigma2"),
    (dict(batch_size=30), "--batch-size"), (dict(dtype="fp16"), "--dtype"), (dict(model="wrn27_10"), "--model"),
    (dict(momentum=1.0), "--momentum"), (dict(label_noise=1.0), "--label-noise"), (dict(beta=0.0), "--beta"),
])
def test_bad_input_names_the_flag(change, flag):
    with pytest.raises(ConfigError, match=flag):
        common.validate(dataclasses.replace(TINY, **change))


def test_missing_data_folders(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(common, "_download", offline)
    with pytest.raises(ConfigError, match="--data-dir"):
        common.train(common.for_dataset("cifar10"), 0, opts=common.RunOptions(data_dir=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="--data-dir"):
        common.train(common.for_dataset("imagenet"), 0, opts=common.RunOptions(data_dir=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="needs --data-dir"):
        common.train(common.for_dataset("imagenet"), 0)


def test_save_is_asked_every_100_steps_with_several_processes():
    """With several processes only every 100th step asks; process 0's answer is then broadcast
    (`_agree`, run across two processes in test_multiprocess.py)."""
    assert common.save_due(7, 400.0, 300.0, processes=1)
    assert not common.save_due(7, 400.0, 300.0, processes=2) and common.save_due(200, 400.0, 300.0, processes=2)
    assert not common.save_due(200, 10.0, 300.0, processes=2)


def test_cli_turns_config_errors_into_one_line(capsys):
    def main():
        raise ConfigError("--rho must be >= 0, got -1")

    with pytest.raises(SystemExit) as e:
        common.run_cli(main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --rho must be >= 0, got -1" and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("devices", [3, 16])
def test_a_run_on_any_device_count(devices, tmp_path):
    """A whole run on 3 and 16 simulated devices: batch 48, eval batch 1000 over 300 test images (padded
    to 1002 and 1008), every example counted once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import CALLER_XLA_FLAGS

    code = (
        "import dataclasses, common, test_train as t\n"
        "import jax; assert jax.device_count() == %d\n"
        "r = t.train(dataclasses.replace(t.TINY, batch_size=48, epochs=2))\n"
        "n = round(r['test_accuracy'] * 300); assert abs(r['test_accuracy'] * 300 - n) < 1e-9\n"
        "print(r['test_accuracy'])\n" % devices)
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"XLA_FLAGS": f"{CALLER_XLA_FLAGS} --xla_force_host_platform_device_count={devices}",
                        "JAX_PLATFORMS": "cpu",
                        "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert float(p.stdout.split()[-1]) > 0.9


@pytest.fixture
def no_reads(monkeypatch):
    """jax.transfer_guard_device_to_host("disallow"), enforced on the CPU too. XLA's CPU client keeps
    arrays in host memory and never refuses a read, so every read of an Array's value through Python
    (float, int, bool, print, tolist, item, device_get) is checked against the guard here; NumPy's
    buffer protocol (np.asarray) bypasses it on the CPU only."""
    from jax._src import config

    cls = type(jnp.zeros(()))

    def guarded(real):
        def read(self, *a):
            if config.transfer_guard_device_to_host.value == "disallow":
                raise RuntimeError("Disallowed device-to-host read")
            return real(self, *a)
        return read

    monkeypatch.setattr(cls, "_value", property(guarded(cls._value.fget)))
    monkeypatch.setattr(cls, "item", guarded(cls.item))
    with jax.transfer_guard_device_to_host("disallow"):
        yield


def test_training_reads_the_device_once_per_step(tmp_path, no_reads, monkeypatch):
    """The loop under a device-to-host transfer guard: its one allowed read per step is the loss
    (common._read); the probe callback reads only on its own
    steps, under its own allowance (so do checkpoints, but Orbax reads the CPU's buffers directly)."""
    with pytest.raises(RuntimeError, match="Disallowed"):
        float(jnp.ones(()) + 1)  # the guard refuses a read
    cfg = dataclasses.replace(TINY, epochs=0.5)
    opts = dataclasses.replace(QUIET, log=True, log_every_s=0.0, ckpt_dir=str(tmp_path))  # saves at the end
    run = common.setup(cfg, 0, DATA, opts)
    reads, probes, real = [], [], common._read
    monkeypatch.setattr(common, "_read", lambda x: reads.append(1) or real(x))
    common.fit(run, DATA, opts, callback=lambda r: probes.append(float(jnp.sum(r.params.fc.weight))), every=3)
    assert run.step == 8 and len(reads) == run.step and len(probes) == 3  # steps 3, 6 and the last
    assert sorted(int(p.name) for p in next(tmp_path.iterdir()).iterdir() if p.name.isdigit()) == [8]
