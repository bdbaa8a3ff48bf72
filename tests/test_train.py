"""Training engine: every rule learns, sharding is invisible, one trace per sweep, exact resume,
bad input is one ConfigError naming the flag."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import common
from common import ConfigError, DatasetSpec, RULES, TrainConfig


def separable(n, seed, classes=3, size=8):
    """uint8 images [n, size, size, classes] whose class is the brightest channel, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    x = rng.integers(0, 120, (n, size, size, classes))
    x[np.arange(n), :, :, y] += 100
    return x.astype(np.uint8), y


SPEC = DatasetSpec(3, (8, 8, 3), (110.0,) * 3, (60.0,) * 3)
DATA = (SPEC, separable(512, 0), separable(300, 1))
TINY = TrainConfig(model="tiny", epochs=6, batch_size=32, lr=0.1, warmup_epochs=0.5, weight_decay=5e-4,
                   rho=0.05, sigma2=1e-3, eval_batch_size=100, progress=False)


@pytest.mark.parametrize("method", list(RULES))
def test_every_rule_learns_a_separable_task(method):
    r = common.train(dataclasses.replace(TINY, method=method), seed=0, data=DATA)
    assert r["steps"] == 6 * (512 // 32) and not r["diverged"]
    assert r["test_accuracy"] > 0.95, r
    assert r["train_loss"] < 0.3 and math.isfinite(r["images_per_s"])


def test_divergence_is_recorded_not_raised():
    r = common.train(dataclasses.replace(TINY, lr=1e30, epochs=1), seed=0, data=DATA)
    assert r["diverged"] and r["steps"] < 512 // 32 and math.isnan(r["test_accuracy"])


def _tiny_step(method):
    model, state = common.make_model("tiny", 3, common.activation("gelu"), jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tx = optax.trace(decay=0.9, nesterov=True)
    step = common.make_train_step(static, RULES[method], tx, jnp.float32, True, SPEC.mean, SPEC.std)
    return params, state, tx.init(params), step


@pytest.mark.parametrize("method", ["sgd", "gp_p1", "sam", "hessian_trace", "gn_trace"])
def test_sharded_step_equals_single_device(method):
    """Global view: BatchNorm statistics, ‖g‖, ε and ŷ cover the global batch, so 4 devices == 1 device."""
    assert jax.device_count() == 4  # conftest simulates 4 CPU devices
    x, y = separable(64, 2)
    hp = {k: jnp.float32(v) for k, v in (("lr", 0.1), ("rho", 0.1), ("sigma2", 0.01))}
    out = {}
    for n in (1, 4):
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])
        batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
        rep = jax.sharding.NamedSharding(mesh, jax.P())
        params, state, opt, step = _tiny_step(method)
        params, state, opt = jax.device_put((params, state, opt), rep)
        for i in range(4):
            xs, ys = jax.device_put((x[16 * i:16 * i + 16], y[16 * i:16 * i + 16]), batch)
            params, opt, state, _ = step(params, opt, state, xs, ys, jax.random.key(i), hp)
        assert len(jax.tree.leaves(params)[0].sharding.device_set) == n
        out[n] = jax.device_get((params, state))
    for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[4])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_sweep_traces_the_step_once(monkeypatch):
    monkeypatch.setattr(common, "_COMPILED", {})
    monkeypatch.setattr(common, "_step_body", eqx.debug.assert_max_traces(common._step_body, max_traces=1))
    for rho in (0.0, 0.03, 0.1):
        for seed in (0, 1):
            cfg = dataclasses.replace(TINY, method="gp_p1", rho=rho, epochs=1, lr=0.05 + rho)
            assert not common.train(cfg, seed, data=DATA)["diverged"]
    assert len(common._COMPILED) == 1


def test_kill_and_resume_is_exact(tmp_path, monkeypatch):
    cfg = dataclasses.replace(TINY, method="sam", epochs=2)
    ref = common.train(cfg, seed=3, data=DATA)

    ckpt = dataclasses.replace(cfg, ckpt_dir=str(tmp_path / "ckpt"), ckpt_every_s=0.0)
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
        common.train(ckpt, seed=3, data=DATA)
    monkeypatch.setattr(common, "small_batches", real)
    resumed = common.train(ckpt, seed=3, data=DATA)
    assert resumed["steps"] == ref["steps"]
    for a, b in zip(jax.tree.leaves((ref["params"], ref["bn_state"])),
                    jax.tree.leaves((resumed["params"], resumed["bn_state"]))):
        np.testing.assert_array_equal(a, b)
    assert resumed["test_accuracy"] == ref["test_accuracy"]
    assert resumed["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-6)
    # A finished run is not trained again.
    again = common.train(ckpt, seed=3, data=DATA)
    np.testing.assert_array_equal(jax.tree.leaves(again["params"])[0], jax.tree.leaves(ref["params"])[0])


def test_mixed_precision_keeps_fp32_state():
    r = common.train(dataclasses.replace(TINY, dtype="bfloat16", method="gp_p1"), seed=0, data=DATA)
    assert r["test_accuracy"] > 0.9
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(r["params"]))
    assert all(s.dtype in (jnp.float32, jnp.int32) for s in jax.tree.leaves(r["bn_state"]))


def test_paper_setups():
    c = common.for_dataset("cifar10")
    assert (c.model, c.batch_size, c.lr, c.nesterov, c.weight_decay, c.epochs, c.augment) == \
        ("wrn28_10", 128, 0.1, True, 5e-4, 200, True)
    i = common.for_dataset("imagenet", batch_size=1024)
    assert (i.model, i.lr, i.weight_decay, i.warmup_epochs, i.decay_norm_and_bias, i.epochs) == \
        ("resnet50", 0.4, 1e-4, 5, False, 300)


def test_schedule_and_weight_decay_mask():
    """Linear warm-up then cosine to 0; decay off BN and biases where the setup says (ImageNet)."""
    model, _ = common.make_model("tiny", 3, common.activation("relu"), jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    cfg = common.for_dataset("imagenet", warmup_epochs=2)
    tx, schedule = common.make_optimizer(cfg, total_steps=100, steps_per_epoch=10)
    assert float(schedule(0)) == 0 and float(schedule(10)) == pytest.approx(0.5)
    assert float(schedule(20)) == pytest.approx(1.0) and float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for setup, bn_decayed in (("imagenet", False), ("cifar10", True)):
        tx, _ = common.make_optimizer(common.for_dataset(setup, warmup_epochs=2), 100, 10)
        state = tx.init(params)
        _, state = tx.update(zeros, state, params)  # count 0: schedule 0
        upd, _ = tx.update(zeros, state, params)  # zero gradient: the update is the decay term only
        wd = common.SETUPS[setup]["weight_decay"]
        ratio = np.asarray(upd.fc.weight / params.fc.weight).ravel()
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
        assert ratio[0] == pytest.approx(wd * (1 + 0.9 + 0.81 if setup == "cifar10" else 1.9) * 0.05, rel=1e-4)
        assert bool(np.any(upd.conv.bn.weight != 0)) == bn_decayed


@pytest.mark.parametrize("change,flag", [
    (dict(dataset="mnist"), "--dataset"), (dict(model="vgg16"), "--model"), (dict(activation="swish"), "--activation"),
    (dict(method="adam"), "--method"), (dict(rho=-0.1), "--rho"), (dict(sigma2=-1.0), "--sigma2"),
    (dict(batch_size=30), "--batch-size"), (dict(dtype="fp16"), "--dtype"), (dict(model="wrn27_10"), "--model"),
])
def test_bad_input_names_the_flag(change, flag):
    with pytest.raises(ConfigError, match=flag):
        common.train(dataclasses.replace(TINY, **change), seed=0, data=DATA if "dataset" not in change else None)


def test_missing_data_folders(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(common, "_download", offline)
    with pytest.raises(ConfigError, match="--data-dir"):
        common.train(common.for_dataset("cifar10", data_dir=str(tmp_path / "none")), seed=0)
    with pytest.raises(ConfigError, match="--data-dir"):
        common.train(common.for_dataset("imagenet", data_dir=str(tmp_path / "none")), seed=0)


def test_cli_turns_config_errors_into_one_line(capsys):
    def main():
        raise ConfigError("--rho must be >= 0, got -1")

    with pytest.raises(SystemExit) as e:
        common.run_cli(main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --rho must be >= 0, got -1" and "Traceback" not in err
