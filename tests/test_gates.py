"""Properties of the ReLU, ReLU6, max-pool and Hardswish rules (jaxpull.core.rules), independent of any
architecture: each rule object called directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpull.core import gates
from jaxpull.core.rules import Hardswish, MaxPool, ReLU
from jaxpull.core.settings import PRESETS
from jaxpull_convert import torch_reference as R

PLAIN_RELU, PLAIN_POOL, PLAIN_HARDSWISH = ReLU(mode="plain"), MaxPool(mode="plain"), Hardswish(mode="plain")
relu = lambda z, rule: rule(z)
relu6 = lambda z, rule: rule(z, max_value=6)

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile


def grad_of(fn, z, g=None):
    g = jnp.ones_like(fn(z)) if g is None else g
    return jax.vjp(fn, z)[1](g)[0]


Z = jnp.array([-3.0, -0.2, -1e-30, 0.0, 1e-30, 0.2, 3.0, 5.9, 6.0, 7.0])


@pytest.mark.parametrize("gate", gates.GATE_SHAPES)
def test_relu_forward_is_unchanged_and_backward_is_the_gate(gate):
    t = 0.3
    soft = ReLU(temperature=t, gate=gate)
    np.testing.assert_array_equal(relu(Z, soft), jnp.maximum(Z, 0))
    expected = R.smooth_step(torch.tensor(np.asarray(Z)) / t, gate).numpy()
    np.testing.assert_allclose(grad_of(lambda z: relu(z, soft), Z), expected, rtol=1e-6, atol=1e-12)


def test_relu6_backward_is_the_product_of_two_gates():
    soft = ReLU(temperature=0.5, gate="sigmoid")
    np.testing.assert_array_equal(relu6(Z, soft), jnp.clip(Z, 0, 6))
    s = jax.nn.sigmoid
    np.testing.assert_allclose(grad_of(lambda z: relu6(z, soft), Z), s(Z / 0.5) * s((6 - Z) / 0.5), rtol=1e-6)
    with pytest.raises(ValueError, match="max_value must be None"):
        soft(Z, max_value=3)


def test_vanilla_is_torch_autograd_exactly():
    zt = torch.tensor(np.asarray(Z), requires_grad=True)
    torch.relu(zt).sum().backward()
    np.testing.assert_array_equal(grad_of(lambda z: relu(z, PLAIN_RELU), Z), zt.grad.numpy())
    zt.grad = None
    torch.nn.functional.relu6(zt).sum().backward()
    np.testing.assert_array_equal(grad_of(lambda z: relu6(z, PLAIN_RELU), Z), zt.grad.numpy())


def test_guided_backprop_passes_positive_gradients_at_active_units_only():
    guided = ReLU(mode="guided")
    g = jnp.asarray(np.linspace(-1, 1, Z.size), jnp.float32)
    for unit, active in ((relu, Z > 0), (relu6, (Z > 0) & (Z < 6))):
        np.testing.assert_array_equal(unit(Z, guided), unit(Z, PLAIN_RELU))
        np.testing.assert_array_equal(
            grad_of(lambda z, unit=unit: unit(z, guided), Z, g), jnp.where(active & (g > 0), g, 0.0)
        )


@pytest.mark.parametrize("gate", gates.GATE_SHAPES)
@pytest.mark.parametrize("unit", [relu, relu6])
def test_temperature_to_zero_gives_the_vanilla_gradient_and_never_nan(gate, unit):
    z = jnp.array([-2.0, -1e-3, 1e-3, 2.0, 5.0, 7.0])  # away from the kinks, where the limit is defined
    for t in (1e-5, 1e-12, 1e-30):
        g = grad_of(lambda z, t=t: unit(z, ReLU(temperature=t, gate=gate)), z)
        np.testing.assert_array_equal(g, grad_of(lambda z: unit(z, PLAIN_RELU), z))
    # at a kink the soft gate is 0.5 (sigmoid(0) = Phi(0)); no temperature gives NaN
    for t in (1e-45, 1e-30, 1.0, 1e30):
        g = grad_of(lambda z, t=t: unit(z, ReLU(temperature=t, gate=gate)), jnp.array([0.0, 6.0, -0.0]))
        assert np.all(np.isfinite(g))


def test_gated_backward_is_linear_in_the_cotangent():
    key = jax.random.key(0)
    z = jax.random.normal(key, (4, 5, 5, 3))
    soft, pool = ReLU(temperature=0.3, gate="sigmoid"), MaxPool(mode="soft", temperature=0.2)
    f = lambda z: pool(relu(z, soft), 3, 2, 1)
    _, vjp = jax.vjp(f, z)
    a, b = jax.random.normal(jax.random.key(1), (2,) + f(z).shape)
    np.testing.assert_allclose(vjp(2 * a - 3 * b)[0], 2 * vjp(a)[0] - 3 * vjp(b)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 1), (2, 2, 0), (3, 2, 0)])
@pytest.mark.parametrize("detached", [False, True])
def test_max_pool_forward_is_hard_and_backward_is_torch_softmax_pooling(window, stride, padding, detached):
    x = np.random.default_rng(0).normal(size=(2, 9, 8, 3)).astype(np.float32)
    x[0, :3, :3, 0] = 0.0  # ties
    soft = MaxPool(mode="detached" if detached else "soft", temperature=0.25)
    xt = torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_(True)
    pool = R.SurrogateMaxPool(torch.nn.MaxPool2d(window, stride, padding), 0.25, detached)
    yt = pool(xt)
    y = soft(jnp.asarray(x), window, stride, padding)
    np.testing.assert_array_equal(y, yt.detach().permute(0, 2, 3, 1).numpy().astype(np.float32))
    g = np.random.default_rng(1).normal(size=y.shape).astype(np.float32)
    yt.backward(torch.tensor(g, dtype=torch.float64).permute(0, 3, 1, 2))
    got = jax.vjp(lambda x: soft(x, window, stride, padding), jnp.asarray(x))[1](jnp.asarray(g))[0]
    want = xt.grad.permute(0, 2, 3, 1).numpy()
    # The reference runs in float64: the rule's exact value (torch's float32 run of it is up to
    # 4.8e-6 off it here, jaxpull's 6e-7). Off CPU the softmax's exponentials differ in the last
    # bits (H100, against float32 torch: one element of 432 off by 4.7e-6 of the largest value):
    # there the tolerance is relative to it.
    atol = 1e-6 if jax.default_backend() == "cpu" else 1e-5 * float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("mode", ["soft", "detached"])
def test_max_pool_temperature_to_zero_gives_the_hard_gradient_and_never_nan(mode):
    """No padding and no ties: as t -> 0 the softmax pooling gradient is the argmax one, down to
    the subnormal 1e-45 (``softmax(v / t)`` overflows from about 1e-38: the rule's derivative
    subtracts the window's maximum first); a huge t averages the window and stays finite."""
    x = jnp.asarray(np.random.default_rng(5).permutation(2 * 8 * 8 * 3).reshape(2, 8, 8, 3) / 7 - 10, jnp.float32)
    hard = grad_of(lambda x: PLAIN_POOL(x, 3, 2, 0), x)
    for t in (1e-4, 1e-30, 1e-38, 1e-45):
        soft = MaxPool(mode=mode, temperature=t)
        np.testing.assert_array_equal(grad_of(lambda x, soft=soft: soft(x, 3, 2, 0), x), hard)
    huge = MaxPool(mode=mode, temperature=1e30)
    assert np.all(np.isfinite(grad_of(lambda x: huge(x, 3, 2, 0), x)))


def test_max_pool_small_temperature_approaches_the_hard_max_gradient():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 8, 2)).astype(np.float32))
    hard = grad_of(lambda x: PLAIN_POOL(x, 2, 2, 0), x)
    soft = grad_of(lambda x: MaxPool(mode="soft", temperature=1e-4)(x, 2, 2, 0), x)
    np.testing.assert_allclose(soft, hard, atol=1e-6)


def test_vmap_over_temperatures():
    """A rule whose temperature is an array maps over it (``jax.vmap`` with the rule as argument)."""
    ts = np.array([0.1, 0.3, 1.0], np.float32)
    many = jax.vmap(lambda rule: grad_of(lambda z: relu(z, rule), Z))(ReLU(temperature=ts))
    for i, t in enumerate(ts):
        np.testing.assert_array_equal(many[i], grad_of(lambda z, t=t: relu(z, ReLU(temperature=t)), Z))


def test_bad_rule_values_are_errors_when_the_rule_is_built():
    """Never later, inside a trace: the field and its range are named."""
    with pytest.raises(ValueError, match="unknown ReLU.gate 'relu': use one of sigmoid, normal_cdf"):
        ReLU(gate="relu")
    with pytest.raises(ValueError, match="unknown MaxPool.mode 'hard': use one of soft, detached, plain"):
        MaxPool(mode="hard")
    with pytest.raises(ValueError, match=r"ReLU.temperature must be a positive number up to 3.4e\+38, got -1"):
        ReLU(temperature=-1)


# --------------------------------------------------------------------------------------
# Hardswish: forward z * hardsigmoid(z); backward g * hardsigmoid(z / t)
# --------------------------------------------------------------------------------------

ZH = jnp.array([-5.0, -3.0, -2.999, -1.0, -1e-30, 0.0, 1e-30, 0.5, 2.999, 3.0, 3.001, 8.0])


def test_hardswish_forward_and_vanilla_derivative_match_torch():
    """Including torch's boundary convention: derivative 0 at z = -3 and 1 at z = 3. Equal to
    within 1 ulp (rtol 3e-7): XLA compiles ``/ 6`` and ``/ 3`` as multiplications by 1/6, 1/3."""
    zt = torch.tensor(np.asarray(ZH), requires_grad=True)
    y = torch.nn.functional.hardswish(zt)
    y.sum().backward()
    for rule in (PLAIN_HARDSWISH, PRESETS["guided"].rules.hardswish):  # Guided Backprop keeps the plain derivative
        np.testing.assert_allclose(rule(ZH), y.detach().numpy(), rtol=3e-7, atol=0)
        grad = grad_of(lambda z, rule=rule: rule(z), ZH)
        np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=3e-7, atol=0)
        np.testing.assert_array_equal(grad[:2], [0, 0])  # z = -5, -3
        np.testing.assert_array_equal(grad[-3:], [1, 1, 1])  # z = 3, 3.001, 8
    np.testing.assert_allclose(
        gates.hardsigmoid(ZH), torch.nn.functional.hardsigmoid(zt).detach().numpy(), rtol=3e-7, atol=0
    )


@pytest.mark.parametrize("th", [0.3, 0.7])
def test_hardswish_backward_is_the_tempered_gate_and_equals_the_torch_reference(th):
    soft = Hardswish(temperature=th)
    np.testing.assert_array_equal(soft(ZH), PLAIN_HARDSWISH(ZH))
    zt = torch.tensor(np.asarray(ZH), requires_grad=True)
    g = np.linspace(-2, 2, ZH.size).astype(np.float32)
    R.GatedHardswish(th)(zt).backward(torch.tensor(g))
    got = grad_of(lambda z: soft(z), ZH, jnp.asarray(g))
    np.testing.assert_allclose(got, zt.grad.numpy(), rtol=1e-6, atol=1e-12)
    expected = g * np.clip(np.asarray(ZH) / th + 3, 0, 6) / 6
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_hardswish_temperature_to_zero_is_the_step_at_zero_and_never_nan():
    """t -> 0 gives hardsigmoid(z / t) -> 1[z > 0] (0.5 at z = 0): the step function, which is
    *not* Hardswish's vanilla derivative (z / 3 + 1/2 on (-3, 3)): the gate is held constant."""
    z = jnp.array([-4.0, -2.0, -1e-3, 1e-3, 2.0, 4.0])
    for t in (1e-5, 1e-12, 1e-30):
        g = grad_of(lambda z, t=t: Hardswish(temperature=t)(z), z)
        np.testing.assert_array_equal(g, [0, 0, 0, 1, 1, 1])
    for t in (1e-45, 1e-30, 1.0, 1e30):
        g = grad_of(lambda z, t=t: Hardswish(temperature=t)(z), jnp.array([0.0, -0.0, 3.0, -3.0]))
        assert np.all(np.isfinite(g))
        assert g[0] == g[1] == 0.5


def test_hardswish_backward_is_linear_in_the_cotangent_and_vmaps_over_temperatures():
    z = jax.random.normal(jax.random.key(2), (3, 4, 5)) * 4
    _, vjp = jax.vjp(Hardswish(temperature=0.5), z)
    a, b = jax.random.normal(jax.random.key(3), (2,) + z.shape)
    np.testing.assert_allclose(vjp(2 * a - 3 * b)[0], 2 * vjp(a)[0] - 3 * vjp(b)[0], rtol=1e-5, atol=1e-5)
    gate_at = lambda rule: grad_of(rule, z)
    many = jax.jit(jax.vmap(gate_at))(Hardswish(temperature=np.array([0.1, 0.5, 2.0], np.float32)))
    np.testing.assert_allclose(many[1], gate_at(Hardswish(temperature=0.5)), rtol=1e-6)
    np.testing.assert_allclose(many[2], jnp.clip(z / 2.0 + 3, 0, 6) / 6, rtol=1e-6)
