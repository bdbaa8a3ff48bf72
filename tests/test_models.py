import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import BN, ConfigError, _is_param, apply, decay_mask, make_model, model_builder
from conftest import EPS32

# Compiles dominate on CPU: shapes and activation sites are checked by tracing (eval_shape) for every
# model; real forward passes use small models, the zero-init check single ResNet blocks.

KEY = jax.random.key(0)
is_layer = lambda x: isinstance(x, (BN, eqx.nn.Conv, eqx.nn.Linear))  # noqa: E731


def _abstract(name, num_classes=10, act=jax.nn.relu, in_channels=3):
    return eqx.filter_eval_shape(make_model, name, num_classes, act, KEY, in_channels=in_channels)


def _randn(seed, shape):
    # numpy: jax.random compiles its generator anew for every shape (seconds each on CPU)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _bf16(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, tree)


@eqx.filter_jit
def _run(layer, x, state):
    """A model, block or BN layer over the batch x, as `apply` does."""
    return jax.vmap(layer, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)


def count_params(model) -> int:
    """Number of scalars in inexact-array leaves, abstract ones included."""
    return sum(math.prod(a.shape) for a in jax.tree.leaves(model) if _is_param(a))


@pytest.mark.parametrize("name,classes,published", [
    ("wrn28_10", 10, 36_479_194), ("resnet50", 1000, 25_557_032), ("resnet18", 1000, 11_689_512)])
def test_param_count_matches_published(name, classes, published):
    assert count_params(_abstract(name, classes)[0]) == published


# Nonlinearity sites: tiny 1; cnn 4; WRN 2 per block + final; ResNet stem + 2 (basic) or 3 per block.
SITES = {"tiny": 1, "cnn16": 4, "wrn10_1": 7, "wrn16_4": 13, "wrn28_10": 25, "resnet18": 17, "resnet50": 49}
CALLS = []


def _counting_act(x):
    CALLS.append(x.dtype)
    return jax.nn.relu(x)


@functools.cache
def _counted(name, in_channels):
    return _abstract(name, 7, _counting_act, in_channels)


@pytest.mark.parametrize("name,shape,dtype", [
    *[(n, (1, 28, 28), jnp.float32) for n in ("tiny", "cnn16", "wrn10_1", "wrn16_4", "resnet18")],
    *[(n, (3, 32, 32), jnp.float32) for n in ("tiny", "cnn16", "wrn10_1", "wrn16_4", "wrn28_10")],
    ("resnet18", (3, 64, 64), jnp.float32), ("resnet50", (3, 224, 224), jnp.float32),
    *[(n, (3, 32, 32), jnp.bfloat16) for n in ("tiny", "cnn16", "wrn10_1", "resnet18")]])
def test_every_nonlinearity_is_the_activation_and_shapes(name, shape, dtype):
    model, state = _counted(name, shape[0])
    if dtype == jnp.bfloat16:  # as the train step casts the floating weights
        model = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype) if isinstance(a, jax.ShapeDtypeStruct)
                             else a, model)
    CALLS.clear()
    logits, new = eqx.filter_eval_shape(apply, model, state, jax.ShapeDtypeStruct((2, *shape), dtype))
    assert logits.shape == (2, 7) and logits.dtype == dtype
    assert CALLS == [dtype] * SITES[name]
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert [a.dtype for a in jax.tree.leaves(new)] == [a.dtype for a in jax.tree.leaves(state)]


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [
    ("tiny", (1, 28, 28)), ("tiny", (3, 32, 32)), ("cnn16", (3, 32, 32)), ("wrn10_1", (1, 28, 28))])
def test_forward_runs_and_head_sees_the_activation(name, shape):
    model, state = make_model(name, 5, jnp.zeros_like, KEY, in_channels=shape[0])
    logits, _ = eqx.filter_jit(apply)(model, state, _randn(1, (3, *shape)))
    # The features reaching the head are an activation's output, so act = 0 leaves only the bias (0);
    # a hard-coded nonlinearity anywhere on the way would let the input through.
    assert logits.shape == (3, 5)
    np.testing.assert_array_equal(logits, 0.0)


def test_bn_training_normalises_by_batch_and_updates_running_stats():
    bn, state = eqx.nn.make_with_state(BN)(4)
    x = 3.0 + 2.0 * _randn(2, (16, 4, 5, 5))
    y, state = _run(bn, x, state)
    y = np.asarray(y)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1.0, rtol=1e-3)
    n, mean, var = state.get(bn.index)
    assert int(n) == 1
    np.testing.assert_allclose(mean, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-5)  # EMAs start at 0
    np.testing.assert_allclose(var, 0.1 * x.var(axis=(0, 2, 3)), rtol=1e-5)


@pytest.mark.slow
def test_inference_mode_uses_running_stats():
    model, state = make_model("tiny", 3, jax.nn.relu, KEY)
    x = 1.5 + _randn(3, (8, 3, 6, 6))
    for _ in range(3):
        _, state = _run(model, x, state)
    ev = eqx.nn.inference_mode(model)
    full, after = _run(ev, x, state)
    part, _ = _run(ev, x[:3], state)
    np.testing.assert_allclose(part, full[:3], rtol=1e-5, atol=1e-6)  # independent of the batch
    train, _ = _run(model, x[:3], state)
    assert not np.allclose(train, full[:3], atol=1e-3)
    assert int(after.get(model.conv.bn.index)[0]) == 3  # left alone
    # Normalised by the debiased running statistics: after 3 updates of one batch, its own statistics.
    h = _randn(6, (3, 8, 6, 6))
    pre = np.asarray(jax.vmap(model.conv.conv)(x))  # the BN layer's input on the batch seen
    mean, var = pre.mean(axis=(0, 2, 3)), pre.var(axis=(0, 2, 3))
    want = (h - mean[:, None, None]) / np.sqrt(var + 1e-5)[:, None, None]
    got, _ = _run(ev.conv.bn, h, state)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Before any update: mean 0, variance 1.
    bn, fresh_state = eqx.nn.make_with_state(BN)(8)
    fresh, _ = _run(eqx.nn.inference_mode(bn), h, fresh_state)
    np.testing.assert_allclose(fresh, h / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.slow
def test_bf16_forward_keeps_fp32_statistics_and_state():
    model, state = make_model("tiny", 4, jax.nn.gelu, KEY)
    m16 = _bf16(model)
    x = _randn(4, (4, 3, 8, 8))
    logits, new = _run(m16, x.astype(jnp.bfloat16), state)
    assert logits.dtype == jnp.bfloat16
    logits = np.asarray(logits, np.float32)
    assert {str(a.dtype) for a in jax.tree.leaves(new)} == {"float32", "int32"}
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(eqx.filter(m16, eqx.is_inexact_array)))
    ref, _ = _run(model, x, state)
    np.testing.assert_allclose(logits, ref, rtol=0.05, atol=0.05)
    # Offset 1000, where bf16's spacing is 4-8: a mean taken in bf16 would be off by ~1e-3 relative.
    bn = model.conv.bn
    h = (1000.0 + _randn(5, (8, 8, 4, 4))).astype(jnp.bfloat16)
    y, new = _run(_bf16(bn), h, state)
    _, mean, var = new.get(bn.index)
    assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    h32 = h.astype(np.float32)
    np.testing.assert_allclose(mean, 0.1 * h32.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(var, 0.1 * h32.var(axis=(0, 2, 3)), rtol=1e-5)


@eqx.filter_jit
def _block_and_shortcut(blk, x, state):
    """The block's output and act(its shortcut path), in one compile."""

    def f(x, state):
        y, state = blk(x, state)
        return y, jax.nn.gelu(x if blk.short is None else blk.short(x, state)[0])

    return jax.vmap(f, in_axes=(0, None), axis_name="batch")(x, state)


@pytest.mark.slow
@pytest.mark.parametrize("name,blocks,last,run", [("resnet18", 8, "c2", 2), ("resnet50", 16, "c3", 1)])
def test_resnet_blocks_start_as_their_shortcut(name, blocks, last, run):
    model, state = make_model(name, 10, jax.nn.gelu, KEY)
    bns = [x for x in jax.tree.leaves(model, is_leaf=is_layer) if isinstance(x, BN)]
    zero = {id(b) for b in bns if not bool(jnp.any(b.weight))}
    assert len(zero) == len(model.blocks) == blocks
    assert {id(getattr(blk, last).bn) for blk in model.blocks} == zero
    assert all(bool(jnp.all(b.weight == 1)) for b in bns if id(b) not in zero)
    assert not any(bool(jnp.any(b.bias)) for b in bns)
    blk = model.blocks[run]  # resnet18: a projection block; resnet50: an identity block
    assert (blk.short is None) == (name == "resnet50")
    y, want = _block_and_shortcut(blk, _randn(5, (2, blk.c1.conv.in_channels, 4, 4)), state)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def _check_mask(mask, params):
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    n_true = n_false = 0
    for layer in [x for x in jax.tree.leaves(mask, is_leaf=is_layer) if is_layer(x)]:
        if isinstance(layer, BN):
            assert layer.weight is False and layer.bias is False
            n_false += 2
        else:
            assert layer.weight is True and layer.bias in (False, None)
            n_true, n_false = n_true + 1, n_false + (layer.bias is False)
    flags = jax.tree.leaves(mask)
    assert all(isinstance(f, bool) for f in flags)
    assert sum(flags) == n_true and len(flags) == n_true + n_false == len(jax.tree.leaves(params))
    return flags


def test_decay_mask_excludes_exactly_bn_and_biases():
    model, _ = make_model("tiny", 10, jax.nn.relu, KEY)
    params = eqx.filter(model, eqx.is_inexact_array)
    flags = _check_mask(decay_mask(model), params)
    assert flags == [True, False, False, True, False]  # conv.weight, bn.weight, bn.bias, fc.weight, fc.bias
    _check_mask(decay_mask(params), params)
    # As an optax mask: decay reaches the conv/linear weights only.
    tx = optax.add_decayed_weights(0.5, mask=decay_mask)
    upd, _ = eqx.filter_jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for u, p, m in zip(jax.tree.leaves(upd), jax.tree.leaves(params), flags):
        np.testing.assert_array_equal(u, 0.5 * p if m else 0.0)


@pytest.mark.parametrize("name,weights", [("wrn10_1", 1 + 6 + 2 + 1), ("resnet50", 53 + 1)])
def test_decay_mask_abstract(name, weights):  # convs (+ shortcuts), linear head
    model, _ = _abstract(name, 10)
    params = eqx.filter(model, lambda a: isinstance(a, jax.ShapeDtypeStruct))
    assert sum(_check_mask(decay_mask(model), params)) == weights


@pytest.mark.parametrize("name", ["resnet", "resnet34", "vgg16", "wrn28", "cnn", "Tiny"])
def test_unknown_model_raises_config_error(name):
    with pytest.raises(ConfigError, match=r"--model: unknown model .*accepted: resnet50, resnet18"):
        model_builder(name)


@pytest.mark.parametrize("name", ["wrn27_10", "wrn8_1", "wrn28_0", "cnn0"])
def test_invalid_size_raises_config_error(name):
    with pytest.raises(ConfigError, match="--model.*(depth|width)"):
        model_builder(name)  # checked from the name alone, before anything is built


@pytest.mark.slow
def test_with_beta_reaches_every_activation_site():
    """The train step sets β on the built model (a traced array there): the same logits as a model built
    with that β, and different from β = 1."""
    from common import activation, with_beta

    x = _randn(3, (4, 3, 8, 8))
    model, state = make_model("cnn4", 3, activation("beta_gelu"), KEY)
    built, _ = make_model("cnn4", 3, activation("beta_gelu", 4.0), KEY)
    run = eqx.filter_jit(lambda m, b: apply(with_beta(m, b), state, x)[0])
    want = apply(built, state, x)[0]
    # Jitted against eager float32 through 4 conv + BN layers: a few EPS32 per layer and more where a logit
    # cancels, so relative to the logits' scale (2 EPS32 here, up to 2.3e-6 relative on an AMD EPYC). β left
    # at 1 moves them by 0.2 of their scale, β·(1 + 1e-3) by 7e-5.
    np.testing.assert_allclose(run(model, jnp.float32(4.0)), want, rtol=100 * EPS32,
                               atol=100 * EPS32 * float(np.abs(want).max()))
    assert not np.allclose(run(model, jnp.float32(4.0)), apply(model, state, x)[0])
