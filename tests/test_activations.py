"""Activations: values and AD derivatives against MATH.md §2's formulas, under every AD path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import ACTIVATIONS, Activation, ConfigError, activation, twin

pytestmark = pytest.mark.usefixtures("x64")

_erfc = np.vectorize(math.erfc)


def pdf(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def cdf(x):
    return 0.5 * _erfc(-x / math.sqrt(2))


def reference(name, beta, x):
    """(f, f', f'') of MATH.md §2's table, in NumPy float64."""
    step = (x > 0).astype(float)
    if name == "relu":
        return np.maximum(x, 0), step, 0 * x
    if name in ("gelu", "beta_gelu"):
        b = 1.0 if name == "gelu" else beta
        return x * cdf(b * x), cdf(b * x) + b * x * pdf(b * x), b * pdf(b * x) * (2 - b * b * x * x)
    if name == "relu_aug":
        return np.maximum(x, 0), step, beta * pdf(beta * x)
    if name in ("gelu_dim", "beta_gelu_dim"):
        b = 1.0 if name == "gelu_dim" else beta
        return x * cdf(b * x), cdf(b * x) + b * x * pdf(b * x), 0 * x
    raise AssertionError(name)


CASES = [("relu", 1.0), ("gelu", 1.0), ("beta_gelu", 1.0), ("beta_gelu", 4.0), ("beta_gelu", 0.5),
         ("relu_aug", 1.0), ("relu_aug", 4.0), ("gelu_dim", 1.0), ("beta_gelu_dim", 1.0), ("beta_gelu_dim", 4.0)]
GRID = np.array([-60.0, -9.0, -3.0, -1.0, -0.4, -1e-3, 0.0, 1e-3, 0.25, 0.7, 1.5, 4.0, 12.0, 60.0])


def first_derivatives(f):
    """f' by forward mode, reverse mode, and both under jit."""
    jvp = lambda x: jax.jvp(f, (x,), (jnp.ones_like(x),))[1]
    vjp = jax.vmap(jax.grad(f))
    return {"jvp": jvp, "vjp": vjp, "jit(jvp)": jax.jit(jvp), "jit(vjp)": jax.jit(vjp)}


def second_derivatives(f):
    """f'' by the four compositions of forward and reverse mode, under vmap and jit."""
    d = lambda g: (lambda x: jax.jvp(g, (x,), (jnp.ones_like(x),))[1])
    return {
        "fwd-over-fwd": jax.vmap(d(d(f))),
        "fwd-over-rev": jax.vmap(d(jax.grad(f))),
        "rev-over-fwd": jax.vmap(jax.grad(d(f))),
        "rev-over-rev": jax.vmap(jax.grad(jax.grad(f))),
        "jit(rev-over-rev)": jax.jit(jax.vmap(jax.grad(jax.grad(f)))),
        "hessian": jax.vmap(jax.hessian(f)),
    }


@pytest.mark.parametrize("name,beta", CASES)
def test_value_and_derivatives_match_spec(name, beta):
    f = activation(name, beta)
    x = jnp.asarray(GRID, jnp.float64)
    f0, f1, f2 = reference(name, beta, GRID)
    np.testing.assert_allclose(f(x), f0, rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(jax.jit(f)(x), f0, rtol=1e-13, atol=1e-300)
    for mode, d1 in first_derivatives(f).items():
        np.testing.assert_allclose(d1(x), f1, rtol=1e-12, atol=1e-14, err_msg=mode)
    for mode, d2 in second_derivatives(f).items():
        np.testing.assert_allclose(d2(x), f2, rtol=1e-11, atol=1e-14, err_msg=mode)


@pytest.mark.parametrize("name,beta", [("gelu", 1.0)] + [(n, b) for n in ("beta_gelu", "relu_aug")
                                                         for b in (0.5, 1.0, 4.0, 16.0)])
def test_second_derivative_integrates_to_one(name, beta):
    """∫φ'' dx = 1: the corrected Eq. 14 prefactor β/√(2π), not β²/√(2π)."""
    f = activation(name, beta)
    x = jnp.linspace(-40.0 / beta, 40.0 / beta, 40_001)
    d2 = jax.vmap(jax.grad(jax.grad(f)))(x)
    assert abs(float(jnp.trapezoid(d2, x)) - 1.0) < 1e-8


def test_beta_gelu_at_one_is_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001)
    for d in (lambda f: f, jax.grad, lambda f: jax.grad(jax.grad(f))):
        a = jax.vmap(d(activation("beta_gelu", 1.0)))(x)
        b = jax.vmap(d(activation("gelu")))(x)
        np.testing.assert_array_equal(a, b)
    # and GELU is the exact erf form, not the tanh approximation
    np.testing.assert_allclose(activation("gelu")(x), jax.nn.gelu(x, approximate=False), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("beta", [0.5, 1.0, 8.0])
def test_relu_aug_first_order_is_relu(beta):
    x = jnp.asarray(GRID)
    aug, relu = activation("relu_aug", beta), activation("relu")
    np.testing.assert_array_equal(aug(x), relu(x))
    np.testing.assert_array_equal(jax.vmap(jax.grad(aug))(x), jax.vmap(jax.grad(relu))(x))
    assert float(jax.grad(jax.grad(relu))(0.0)) == 0.0
    assert float(jax.grad(jax.grad(aug))(0.0)) == pytest.approx(beta / math.sqrt(2 * math.pi), rel=1e-14)


def test_gelu_dim_first_order_is_gelu():
    x = jnp.asarray(GRID)
    dim, gelu = activation("gelu_dim"), activation("gelu")
    np.testing.assert_array_equal(dim(x), gelu(x))
    # Identical up to rounding: the closed form Φ(x) + xφ(x) vs autodiff of xΦ(x).
    np.testing.assert_allclose(jax.vmap(jax.grad(dim))(x), jax.vmap(jax.grad(gelu))(x), rtol=1e-15, atol=1e-16)
    assert np.all(jax.vmap(jax.grad(jax.grad(dim)))(x) == 0)
    assert np.any(jax.vmap(jax.grad(jax.grad(gelu)))(x) != 0)


@pytest.mark.parametrize("name,beta", CASES)
def test_traced_beta_equals_python_beta(name, beta):
    """Inside the train step β is an array input (one compile per β sweep): same values and derivatives."""
    x = jnp.asarray(GRID, jnp.float64)
    ref = activation(name, beta)
    f = lambda b: Activation(name, b)  # noqa: E731
    for d in (lambda g: g, lambda g: jax.vmap(jax.grad(g)), lambda g: jax.vmap(jax.grad(jax.grad(g)))):
        got = jax.jit(lambda x, b: d(f(b))(x))(x, jnp.asarray(beta))
        np.testing.assert_allclose(got, d(ref)(x), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_twin_has_same_first_order_and_no_second_derivative(name):
    """The twin (MATH.md §6) keeps the value and first derivative and drops φ″ (relu_aug's twin is relu)."""
    x = jnp.asarray(GRID)
    f = activation(name, 4.0)
    t = twin(f)
    np.testing.assert_allclose(t(x), f(x), rtol=1e-15, atol=1e-300)
    np.testing.assert_allclose(jax.vmap(jax.grad(t))(x), jax.vmap(jax.grad(f))(x), rtol=1e-14, atol=1e-16)
    assert np.all(jax.vmap(jax.grad(jax.grad(t)))(x) == 0)
    assert ACTIVATIONS[t.name].twin == t.name  # a twin is its own twin


def test_dtype_preserved():
    x = jnp.linspace(-3, 3, 7, dtype=jnp.bfloat16)
    for name, beta in CASES:
        f = activation(name, beta)
        assert f(x).dtype == jnp.bfloat16
        assert jax.vmap(jax.grad(f))(x).dtype == jnp.bfloat16


def test_bad_name_and_beta():
    with pytest.raises(ConfigError, match="--activation"):
        activation("swish")
    with pytest.raises(ConfigError, match="--beta"):
        activation("beta_gelu", 0.0)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_uses_beta_says_whether_beta_changes_the_function(name):
    """The registry's uses_beta (fig1 draws one panel per β for exactly these): f, f′ or f″ depends on β."""
    x = jnp.asarray(GRID, jnp.float64)

    def derivatives(beta):
        f = activation(name, beta)
        return f(x), jax.vmap(jax.grad(f))(x), jax.vmap(jax.grad(jax.grad(f)))(x)

    changed = any(not np.allclose(a, b) for a, b in zip(derivatives(1.0), derivatives(4.0)))
    assert changed == ACTIVATIONS[name].uses_beta
