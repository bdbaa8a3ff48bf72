"""Tiny pure-JAX networks for the curvature and update-rule tests (float64, dict pytrees)."""

import jax
import jax.numpy as jnp


def mlp_init(key, d=3, h=4, c=3):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"w1": jax.random.normal(k1, (d, h)) / jnp.sqrt(d), "b1": 0.3 * jax.random.normal(k2, (h,)),
            "w2": jax.random.normal(k3, (h, c)) / jnp.sqrt(h), "b2": 0.1 * jax.random.normal(k4, (c,))}


def mlp(act, params, x):
    """One hidden layer: z = act(x W1 + b1) W2 + b2."""
    return act(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def conv_init(key, cin=1, ch=2, c=3):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"k1": jax.random.normal(k1, (ch, cin, 2, 2)) / 2.0, "k2": jax.random.normal(k2, (ch, ch, 2, 2)) / 2.0,
            "w": jax.random.normal(k3, (ch, c)) / jnp.sqrt(ch)}


def conv(act, params, x):
    """Two 2x2 convolutions with the activation, global average pool, linear head. x: [B, C, H, W]."""
    dn = ("NCHW", "OIHW", "NCHW")
    h = act(jax.lax.conv_general_dilated(x, params["k1"], (1, 1), "VALID", dimension_numbers=dn))
    h = act(jax.lax.conv_general_dilated(h, params["k2"], (1, 1), "VALID", dimension_numbers=dn))
    return h.mean(axis=(2, 3)) @ params["w"]


def problem(kind, act, key, batch=5):
    """(params, logits_fn, x, y) for a tiny model: kind in {'mlp', 'conv'}."""
    kp, kx, ky = jax.random.split(key, 3)
    if kind == "mlp":
        params, x = mlp_init(kp), jax.random.normal(kx, (batch, 3))
        net = mlp
    else:
        params, x = conv_init(kp), jax.random.normal(kx, (batch, 1, 4, 4))
        net = conv
    y = jax.random.randint(ky, (batch,), 0, 3)
    return params, (lambda p: net(act, p, x)), x, y
