"""The semantic version's rules (jaxpull.core.rules: GELU, SiLU, LayerNorm, attention), on small arrays.

Each rule: the forward pass is the plain operation (and torch's), the backward pass is
docs/method.md's formula, linear in the cotangent, and the temperatures are traced (vmap, one
compile). Attention is checked against ``jaxpull_convert.torch_reference``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.scipy.special import ndtr

from jaxpull.core import gates, settings
from jaxpull.core.rules import GELU, Attention, LayerNorm, Rules, SiLU
from jaxpull.core.rules.attention import ATTENTION_MODES
from jaxpull_convert import torch_reference as R

# less codegen effort: each function runs once or twice, on small inputs (conftest.py)
pytestmark = pytest.mark.quick_compile

RNG = np.random.default_rng(0)
Z = jnp.asarray(np.concatenate([[-6.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 6.0], RNG.normal(0, 2, 25)]), jnp.float32)
G = jnp.asarray(RNG.normal(size=Z.shape), jnp.float32)  # a cotangent


def vjp_of(fn, z, g):
    return jax.vjp(fn, z)[1](g)[0]


def torch_of(a, dtype=torch.float32):
    return torch.tensor(np.asarray(a), dtype=dtype)


# --------------------------------------------------------------------------------------
# GELU and SiLU: forward exact, backward g * s(z / t)
# --------------------------------------------------------------------------------------

ACTIVATIONS = {  # name: (apply(z, rule), rule class, plain jax forward, torch module, the gate s of z * s(z))
    "gelu": (lambda z, r: r(z), GELU, lambda z: jax.nn.gelu(z, approximate=False), torch.nn.GELU(), ndtr),
    "gelu_tanh": (
        lambda z, r: r(z, approximate=True),
        GELU,
        lambda z: jax.nn.gelu(z, approximate=True),
        torch.nn.GELU(approximate="tanh"),
        ndtr,
    ),
    "silu": (lambda z, r: r(z), SiLU, jax.nn.silu, torch.nn.SiLU(), jax.nn.sigmoid),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("t", [0.5, 1.0, 1.6])
def test_activation_forward_is_exact_and_backward_is_the_tempered_gate(name, t):
    rule, cls, plain, torch_module, s = ACTIVATIONS[name]
    gating = cls(temperature=t)
    y = rule(Z, gating)
    np.testing.assert_array_equal(y, plain(Z))  # the rule never changes the forward pass
    # torch's forward to float rounding: jax's GELU is 0.5 z erfc(-z / sqrt 2), torch's 0.5 z (1 + erf(z / sqrt 2));
    # they differ by up to 2.2e-7 on Z (at z = -2.65, value -0.0144), and over z in [-8, 8] by up to 1.2e-6
    # (at |z| near 8), where jax's is within 3.8e-7 of the float64 value and torch's within 1.1e-6.
    np.testing.assert_allclose(y, torch_module(torch_of(Z)).numpy(), rtol=2e-7, atol=5e-7)
    np.testing.assert_allclose(vjp_of(lambda z: rule(z, gating), Z, G), G * s(Z / t), rtol=1e-6, atol=1e-7)
    # the vanilla rule is the exact derivative, as torch autograd computes it
    zt = torch_of(Z).requires_grad_(True)
    torch_module(zt).backward(torch_of(G))
    np.testing.assert_allclose(
        vjp_of(lambda z: rule(z, cls(mode="plain")), Z, G), zt.grad.numpy(), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(vjp_of(lambda z: rule(z, gating), Z, G), zt.grad.numpy(), atol=1e-3)  # the rule acts


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_backward_matches_the_torch_reference(name):
    rule, cls, _, torch_module, _ = ACTIVATIONS[name]
    ref = R.GatedSiLU(0.7) if name == "silu" else R.GatedGELU(0.7, torch_module.approximate)
    zt = torch_of(Z).requires_grad_(True)
    ref(zt).backward(torch_of(G))
    got = vjp_of(lambda z: rule(z, cls(temperature=0.7)), Z, G)
    np.testing.assert_allclose(got, zt.grad.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_backward_is_linear_in_the_cotangent(name):
    rule, cls, _, _, _ = ACTIVATIONS[name]
    gating = cls(temperature=0.8)
    _, vjp = jax.vjp(lambda z: rule(z, gating), Z)
    g2 = jnp.asarray(RNG.normal(size=Z.shape), jnp.float32)
    np.testing.assert_allclose(vjp(2.0 * G - 3.0 * g2)[0], 2.0 * vjp(G)[0] - 3.0 * vjp(g2)[0], rtol=1e-5, atol=1e-6)


def test_temperatures_are_traced_vmap_and_one_compile():
    traces = []

    @jax.jit
    def grads(tg, ts):
        traces.append(1)
        rules = Rules().replace(gelu_temperature=tg, silu_temperature=ts)  # tracers pass the checks
        return vjp_of(lambda z: rules.gelu(z) + rules.silu(z), Z, G)

    pairs = [(0.5, 1.6), (1.0, 0.3), (2.0, 1.0)]
    per_t = [grads(jnp.float32(a), jnp.float32(b)) for a, b in pairs]
    assert len(traces) == 1  # three temperatures, one trace (and one compile)
    for (a, b), got in zip(pairs, per_t, strict=True):
        np.testing.assert_allclose(got, G * ndtr(Z / a) + G * jax.nn.sigmoid(Z / b), rtol=1e-6, atol=1e-6)
    batched = jax.vmap(grads)(*(jnp.asarray(v, jnp.float32) for v in zip(*pairs, strict=True)))
    np.testing.assert_allclose(batched, jnp.stack(per_t), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------

X = jnp.asarray(RNG.normal(1.0, 2.0, (3, 4, 8)), jnp.float32)
GAMMA = jnp.asarray(RNG.uniform(0.5, 1.5, 8), jnp.float32)
BETA = jnp.asarray(RNG.normal(0, 0.3, 8), jnp.float32)
GX = jnp.asarray(RNG.normal(size=X.shape), jnp.float32)
EPS = 1e-6


def test_layer_norm_forward_is_torch_layer_norm():
    tm = torch.nn.LayerNorm(8, eps=EPS)
    with torch.no_grad():
        tm.weight.copy_(torch_of(GAMMA))
        tm.bias.copy_(torch_of(BETA))
    expected = tm(torch_of(X)).detach().numpy()
    for mode in ("detached", "plain"):
        np.testing.assert_allclose(LayerNorm(mode=mode)(X, GAMMA, BETA, EPS), expected, rtol=1e-5, atol=2e-6)
    # without affine parameters, too
    plain = torch.nn.functional.layer_norm(torch_of(X), (8,), eps=EPS).numpy()
    np.testing.assert_allclose(LayerNorm(mode="plain")(X, None, None, EPS), plain, rtol=1e-5, atol=2e-6)


def test_layer_norm_backward_detached_and_plain():
    sd = np.sqrt(np.var(np.asarray(X, np.float64), axis=-1, keepdims=True) + EPS)
    detached = vjp_of(lambda x: LayerNorm(mode="detached")(x, GAMMA, BETA, EPS), X, GX)
    np.testing.assert_allclose(detached, GX * GAMMA / sd, rtol=1e-5, atol=1e-6)  # g * gamma / sqrt(var + eps)
    # plain: the exact derivative, (1 / sd) * (h - mean(h) - y * mean(h * y)), h = g * gamma, y normalised
    x64 = np.asarray(X, np.float64)
    y = (x64 - x64.mean(-1, keepdims=True)) / sd
    h = np.asarray(GX, np.float64) * np.asarray(GAMMA, np.float64)
    exact = (h - h.mean(-1, keepdims=True) - y * (h * y).mean(-1, keepdims=True)) / sd
    plain = vjp_of(lambda x: LayerNorm(mode="plain")(x, GAMMA, BETA, EPS), X, GX)
    np.testing.assert_allclose(plain, exact, rtol=1e-4, atol=1e-5)
    xt = torch_of(X, torch.float64).requires_grad_(True)
    torch.nn.functional.layer_norm(
        xt, (8,), torch_of(GAMMA, torch.float64), torch_of(BETA, torch.float64), EPS
    ).backward(torch_of(GX, torch.float64))
    np.testing.assert_allclose(exact, xt.grad.numpy(), rtol=1e-9, atol=1e-12)  # the formula is torch's
    # the reference's detached LayerNorm
    xt = torch_of(X).requires_grad_(True)
    R.layer_norm(xt, torch_of(GAMMA), torch_of(BETA), EPS, detached=True).backward(torch_of(GX))
    np.testing.assert_allclose(detached, xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(detached, plain, atol=1e-3)


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


def test_attention_probs_and_straight_through_scale():
    scores = jnp.asarray(RNG.normal(size=(2, 3, 5)), jnp.float32)
    g = jnp.asarray(RNG.normal(size=scores.shape), jnp.float32)
    for mode in ATTENTION_MODES:
        np.testing.assert_array_equal(Attention(mode=mode).probs(scores), jax.nn.softmax(scores, axis=-1))
    plain = vjp_of(lambda s: Attention(mode="plain").probs(s), scores, g)
    np.testing.assert_allclose(plain, vjp_of(lambda s: jax.nn.softmax(s, axis=-1), scores, g), rtol=1e-6)
    assert float(jnp.abs(plain).max()) > 1e-3
    held = vjp_of(lambda s: Attention(mode="value_only").probs(s), scores, g)
    np.testing.assert_array_equal(held, jnp.zeros_like(scores))
    # straight through: forward x / t, backward the identity
    t = jnp.float32(0.25)
    np.testing.assert_allclose(gates.straight_through_scale(scores, t), scores / t, rtol=1e-6)
    np.testing.assert_array_equal(vjp_of(lambda s: gates.straight_through_scale(s, t), scores, g), g)


E, HEADS, L = 8, 2, 5


@pytest.fixture(scope="module")
def mha():
    """A small batch_first ``nn.MultiheadAttention`` with random (non-zero) biases, float64."""
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(E, HEADS, batch_first=True).double().eval()
    with torch.no_grad():
        m.in_proj_bias.normal_(0, 0.5)
        m.out_proj.bias.normal_(0, 0.5)
        m.in_proj_weight.mul_(3.0)  # sharper attention, so that the temperature matters
    return m


def jax_attention(m, rule: Attention):
    """``m`` in JAX under the attention rule: in-projection, per-head scaled dot-product with
    ``rule.probs``, ``rule`` around it, out_proj; ``(query, key, value) -> out``."""
    w_in = jnp.asarray(m.in_proj_weight.detach().numpy(), jnp.float32)
    b_in = jnp.asarray(m.in_proj_bias.detach().numpy(), jnp.float32)
    w_out = jnp.asarray(m.out_proj.weight.detach().numpy(), jnp.float32)
    b_out = jnp.asarray(m.out_proj.bias.detach().numpy(), jnp.float32)
    (wq, wk, wv), (bq, bk, bv) = jnp.split(w_in, 3), jnp.split(b_in, 3)

    def core(q, k, v):  # (B, L, E) each
        split = lambda a: a.reshape(a.shape[0], a.shape[1], HEADS, E // HEADS).transpose(0, 2, 1, 3)
        q, k, v = split(q), split(k), split(v)
        probs = rule.probs(q @ k.transpose(0, 1, 3, 2) / np.sqrt(E // HEADS))
        return (probs @ v).transpose(0, 2, 1, 3).reshape(q.shape[0], -1, E)

    def layer(query, key, value):
        out = rule(core, query @ wq.T, key @ wk.T, value @ wv.T + bv, bq, bk)
        return out @ w_out.T + b_out

    return layer


QKV = [jnp.asarray(RNG.normal(size=(2, L, E)), jnp.float32) for _ in range(3)]
GOUT = jnp.asarray(RNG.normal(size=(2, L, E)), jnp.float32)


def attention_grads(m, gating, self_attention=False):
    """Forward output and the VJP w.r.t. (query, key, value) of the ruled attention."""
    layer = jax_attention(m, gating)
    if self_attention:
        out, vjp = jax.vjp(lambda x: layer(x, x, x), QKV[0])
    else:
        out, vjp = jax.vjp(layer, *QKV)
    return out, vjp(GOUT)


def test_tempered_attention_at_t1_is_the_plain_gradient_and_value_only_stops_query_and_key(mha):
    plain_out, plain = attention_grads(mha, Attention(mode="plain"))
    out, tempered = attention_grads(mha, Attention(mode="tempered", temperature=1.0))
    np.testing.assert_array_equal(out, plain_out)
    for a, b in zip(tempered, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    out, held = attention_grads(mha, Attention(mode="value_only"))
    np.testing.assert_array_equal(out, plain_out)
    np.testing.assert_array_equal(held[0], 0.0)  # query
    np.testing.assert_array_equal(held[1], 0.0)  # key
    np.testing.assert_allclose(held[2], plain[2], rtol=1e-5, atol=1e-6)  # value: the weights' own path is unchanged
    assert float(jnp.abs(plain[0]).max()) > 1e-2 and float(jnp.abs(plain[1]).max()) > 1e-2


@pytest.mark.parametrize("rule,t", [("tempered", 0.5), ("value_only", None), ("plain", None)])
@pytest.mark.parametrize("self_attention", [True, False])
def test_attention_rules_match_the_torch_reference(mha, rule, t, self_attention):
    out, grads = attention_grads(mha, Attention(mode=rule, temperature=1.0 if t is None else t), self_attention)
    ref = R.RuledMultiheadAttention(mha, rule, t)
    inputs = [torch_of(a, torch.float64).requires_grad_(True) for a in QKV]
    if self_attention:
        inputs = inputs[:1]
    ref_out, _ = ref(*(inputs * 3 if self_attention else inputs))
    ref_out.backward(torch_of(GOUT, torch.float64))
    with torch.no_grad():
        exact, _ = mha(*(inputs * 3 if self_attention else inputs), need_weights=False)
    np.testing.assert_allclose(out, exact.numpy(), rtol=1e-5, atol=1e-5)  # forward: torch's own module
    for a, b in zip(grads, inputs, strict=True):
        expected = np.zeros(b.shape) if b.grad is None else b.grad.numpy()  # value_only: no path to query, key
        assert np.abs(np.asarray(a) - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max()), rule
    if rule == "tempered":  # at t = 0.5 the rule acts
        _, plain = attention_grads(mha, Attention(mode="plain"), self_attention)
        assert not np.allclose(grads[0], plain[0], atol=1e-3)


# --------------------------------------------------------------------------------------
# Validation and presets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,fragment",
    [
        (lambda: LayerNorm(mode="frozen"), "unknown LayerNorm.mode 'frozen': use one of detached, plain"),
        (lambda: Attention(mode="soft"), "unknown Attention.mode 'soft': use one of tempered, value_only, plain"),
        (lambda: Attention(temperature=1e-30), "Attention.temperature must be a number in [1e-06, 3.4e+38]"),
        (lambda: settings.resolve(layer_norm="frozen"), "unknown layer_norm 'frozen': use one of detached, plain"),
        (
            lambda: settings.resolve(attention="soft"),
            "unknown attention 'soft': use one of tempered, value_only, plain",
        ),
        (lambda: settings.resolve(gelu_temperature=-1.0), "gelu_temperature must be a positive number"),
        (lambda: settings.resolve(gelu_temperature=None), "gelu_temperature must be a positive number up to"),
        (lambda: settings.resolve(gelu_temperature="none"), "(for the exact derivative use gelu='plain')"),
        (lambda: settings.resolve(silu_temperature=0.0), "silu_temperature must be a positive number"),
        (lambda: settings.resolve(attention_temperature=float("nan")), "attention_temperature must be a number in"),
        (lambda: settings.resolve(attention_temperature=1e-30), "attention_temperature must be a number in [1e-06"),
        (lambda: settings.resolve(sr_attention="tempered", sr_attention_temperature=0), "sr_attention_temperature"),
        (lambda: Rules(gelu=SiLU()), "Rules.gelu"),
    ],
)
def test_bad_settings_are_one_line_errors(build, fragment):
    with pytest.raises((ValueError, TypeError)) as e:
        build()
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("rules", ["excitation", "semantic"])
def test_presets_carry_the_semantic_rules_and_vanilla_is_every_rule_plain(rules):
    r = settings.resolve(rules)
    assert r.gelu == GELU(temperature=1.0) and r.silu == SiLU(temperature=1.6)
    assert r.layer_norm.mode == "detached" and r.attention == Attention(mode="tempered", temperature=1.0)
    assert r.sr_attention.mode == "value_only"  # the paper's PVT rule: one preset, two attention kinds
    vanilla = settings.resolve("vanilla")
    assert {getattr(vanilla, f).mode for f in ("relu", "max_pool", "hardswish", "gelu", "silu")} == {"plain"}
    assert vanilla.layer_norm.mode == vanilla.attention.mode == vanilla.sr_attention.mode == "plain"
    np.testing.assert_allclose(
        vjp_of(vanilla.gelu, Z, G), vjp_of(lambda z: jax.nn.gelu(z, approximate=False), Z, G), rtol=1e-6
    )
    explicit = settings.resolve(rules, gelu="plain", silu="plain", layer_norm="plain", attention="value_only")
    assert explicit.gelu.mode == "plain" and explicit.layer_norm.mode == "plain"
    assert explicit.attention.mode == "value_only" and explicit.relu.mode == "gate"


@pytest.mark.parametrize("rule", ["plain", "detached"])
def test_layer_norm_backward_vmapped_over_cotangents_at_many_rows(rule):
    """pullback_core vmaps the VJP over the K target cotangents. XLA:CPU (jax 0.10) miscompiled
    autodiff's LayerNorm derivative under that vmap from about 2048 rows on (every cotangent but
    the first got a wrong map: relative error 0.5-1.0 at 4096 rows), so the rule's backward is
    written out; here the vmapped VJP must equal one VJP per cotangent at 4096 rows."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4096, 16)).astype(np.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 16).astype(np.float32))
    bias = jnp.asarray(rng.standard_normal(16).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((16, 3)).astype(np.float32))
    norm = LayerNorm(mode=rule)
    _, vjp = jax.vjp(lambda x: jnp.mean(norm(x, scale, bias, 1e-5), axis=0) @ w, x)
    cts = jnp.eye(3)
    batched = jax.jit(jax.vmap(vjp))(cts)[0]
    for k in range(3):
        one = jax.jit(vjp)(cts[k])[0]
        np.testing.assert_allclose(batched[k], one, rtol=0, atol=1e-6 * float(jnp.abs(one).max()))
