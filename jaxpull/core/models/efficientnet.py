"""EfficientNet: torchvision's efficientnet_b0 ... efficientnet_b7 and efficientnet_v2_s/_m/_l, and
timm's ``timm/efficientnet_b0``.

A SiLU network: a 3x3/2 stem, stages of MBConv blocks (1x1 expand -> kxk depthwise ->
squeeze-excitation -> 1x1 linear projection, plus the input where the shape allows) and, in V2,
FusedMBConv blocks (kxk expand -> 1x1 projection, or one kxk convolution at expansion 1), a 1x1
head convolution, a global average pool and ``classifier_1`` (dropout and stochastic depth are the
identity in eval mode).

Every SiLU, the SE blocks' included, is gated (``rules.silu``: backward ``g * sigmoid(z / t)``,
as the reference swaps every ``nn.SiLU`` module); the SE scale (sigmoid) and the product keep
their plain derivatives. Each BatchNorm is folded into its convolution; its epsilon is 1e-5 for
b0-b4 and 1e-3 for b5-b7 and V2, as torchvision builds them.

Module names follow torchvision's ``features.i.j`` (stage ``i``, block ``j``): ``features_i_j``.
A ``Stage`` is one row of torchvision's ``MBConvConfig`` / ``FusedMBConvConfig`` table with the
width and depth multipliers already applied; a model of other stages (the tests' small ones) is
built with ``stages=`` (read off a torch module by ``torch_config``).

timm's ``efficientnet_b0`` (``timm.models.efficientnet.EfficientNet``) computes torchvision's
efficientnet_b0 with other names. Its padding is PyTorch's symmetric ``(k - 1) // 2`` at stride 1
and ``((s - 1) + (k - 1)) // 2`` at stride 2, which for its odd kernels is the same number (the
``tf_efficientnet_*`` models pad as TensorFlow's 'SAME' instead: refused). Its squeeze-excitation
width is ``round(mid * 0.25 / expand_ratio)`` of the expanded width ``mid`` (SE ratio taken from
the block's input, ``se_from_exp=False``), which for b0's channels (multiples of 8, ``mid = 6 *
input``) is torchvision's ``max(1, input // 4)``; ``torch_config`` checks it on every block and
refuses a model where the two differ. Its BatchNorm eps is 1e-5 and its activations are
``nn.SiLU`` (inside ``BatchNormAct2d``), the SE gate ``sigmoid``. Keys: ``conv_stem`` / ``bn1`` ->
``features_0``; the first stage's ``DepthwiseSeparableConv`` ``conv_dw`` / ``bn1``, ``se``,
``conv_pw`` / ``bn2`` -> ``depthwise``, ``se``, ``project``; an ``InvertedResidual``'s
``conv_pw`` / ``bn1``, ``conv_dw`` / ``bn2``, ``se``, ``conv_pwl`` / ``bn3`` -> ``expand``,
``depthwise``, ``se``, ``project``; ``se.conv_reduce`` / ``conv_expand`` -> ``fc1`` / ``fc2``;
``conv_head`` / ``bn2`` -> the head convolution; ``classifier`` -> ``classifier_1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Annotated, Literal, NamedTuple, get_args

import flax.linen as nn
import jax

from jaxpull.core.layers import Conv, Dense, SqueezeExcitation, global_avg_pool
from jaxpull.core.models import options
from jaxpull.core.models.family import Family, GradCamLayer
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.rules import Rules

Block = Literal["MBConv", "FusedMBConv"]  # a stage's kind (Stage.block)
BLOCKS: tuple[str, ...] = get_args(Block)


class Stage(NamedTuple):
    """One stage: torchvision's ``_MBConvConfig`` (channels and depth after the multipliers)."""

    block: str  # "MBConv" or "FusedMBConv"
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never below 90%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def mbconv(
    expand_ratio: float,
    kernel: int,
    stride: int,
    input_channels: int,
    out_channels: int,
    num_layers: int,
    width_mult: float = 1.0,
    depth_mult: float = 1.0,
) -> Stage:
    """torchvision's ``MBConvConfig``: channels scaled and made divisible by 8, depth rounded up."""
    return Stage(
        "MBConv",
        expand_ratio,
        kernel,
        stride,
        make_divisible(input_channels * width_mult),
        make_divisible(out_channels * width_mult),
        int(math.ceil(num_layers * depth_mult)),
    )


def fused(
    expand_ratio: float, kernel: int, stride: int, input_channels: int, out_channels: int, num_layers: int
) -> Stage:
    """torchvision's ``FusedMBConvConfig`` (no multipliers)."""
    return Stage("FusedMBConv", expand_ratio, kernel, stride, input_channels, out_channels, num_layers)


def _b(width_mult: float, depth_mult: float) -> tuple[Stage, ...]:
    """The stages of efficientnet_b*: torchvision's ``_efficientnet_conf`` table."""
    conf = functools.partial(mbconv, width_mult=width_mult, depth_mult=depth_mult)
    return (
        conf(1, 3, 1, 32, 16, 1),
        conf(6, 3, 2, 16, 24, 2),
        conf(6, 5, 2, 24, 40, 2),
        conf(6, 3, 2, 40, 80, 3),
        conf(6, 5, 1, 80, 112, 3),
        conf(6, 5, 2, 112, 192, 4),
        conf(6, 3, 1, 192, 320, 1),
    )


# (stages, last_channel (None: 4x the last stage's width), BatchNorm epsilon) of each model
CONFIGS = {
    "efficientnet_b0": (_b(1.0, 1.0), None, 1e-5),
    "efficientnet_b1": (_b(1.0, 1.1), None, 1e-5),
    "efficientnet_b2": (_b(1.1, 1.2), None, 1e-5),
    "efficientnet_b3": (_b(1.2, 1.4), None, 1e-5),
    "efficientnet_b4": (_b(1.4, 1.8), None, 1e-5),
    "efficientnet_b5": (_b(1.6, 2.2), None, 1e-3),
    "efficientnet_b6": (_b(1.8, 2.6), None, 1e-3),
    "efficientnet_b7": (_b(2.0, 3.1), None, 1e-3),
    "efficientnet_v2_s": (
        (
            fused(1, 3, 1, 24, 24, 2),
            fused(4, 3, 2, 24, 48, 4),
            fused(4, 3, 2, 48, 64, 4),
            mbconv(4, 3, 2, 64, 128, 6),
            mbconv(6, 3, 1, 128, 160, 9),
            mbconv(6, 3, 2, 160, 256, 15),
        ),
        1280,
        1e-3,
    ),
    "efficientnet_v2_m": (
        (
            fused(1, 3, 1, 24, 24, 3),
            fused(4, 3, 2, 24, 48, 5),
            fused(4, 3, 2, 48, 80, 5),
            mbconv(4, 3, 2, 80, 160, 7),
            mbconv(6, 3, 1, 160, 176, 14),
            mbconv(6, 3, 2, 176, 304, 18),
            mbconv(6, 3, 1, 304, 512, 5),
        ),
        1280,
        1e-3,
    ),
    "efficientnet_v2_l": (
        (
            fused(1, 3, 1, 32, 32, 4),
            fused(4, 3, 2, 32, 64, 7),
            fused(4, 3, 2, 64, 96, 7),
            mbconv(4, 3, 2, 96, 192, 10),
            mbconv(6, 3, 1, 192, 224, 19),
            mbconv(6, 3, 2, 224, 384, 25),
            mbconv(6, 3, 1, 384, 640, 7),
        ),
        1280,
        1e-3,
    ),
}

# torchvision's get_model_weights(arch).DEFAULT.transforms(), read once (torchvision 0.29):
# crop, resize, interpolation. (b1's DEFAULT is IMAGENET1K_V2.)
PREPROCESSING = {
    "efficientnet_b0": Preprocessing(224, 256, "bicubic"),
    "efficientnet_b1": Preprocessing(240, 255, "bilinear"),
    "efficientnet_b2": Preprocessing(288, 288, "bicubic"),
    "efficientnet_b3": Preprocessing(300, 320, "bicubic"),
    "efficientnet_b4": Preprocessing(380, 384, "bicubic"),
    "efficientnet_b5": Preprocessing(456, 456, "bicubic"),
    "efficientnet_b6": Preprocessing(528, 528, "bicubic"),
    "efficientnet_b7": Preprocessing(600, 600, "bicubic"),
    "efficientnet_v2_s": Preprocessing(384, 384, "bilinear"),
    "efficientnet_v2_m": Preprocessing(480, 480, "bilinear"),
    "efficientnet_v2_l": Preprocessing(480, 480, "bicubic"),
}
# timm's names whose module is one of CONFIGS' (timm 1.0.31); timm's eps may differ from torchvision's.
TIMM_CONFIGS = {"timm/efficientnet_b0": CONFIGS["efficientnet_b0"]}
# timm's pretrained_cfg of efficientnet_b0.ra_in1k (read once): 224, crop_pct 0.875, bicubic, ImageNet.
PREPROCESSING["timm/efficientnet_b0"] = Preprocessing(224, 256, "bicubic")
# The same transforms' normalisation where it is not ImageNet's: efficientnet_v2_l's weights take
# mean = std = (0.5, 0.5, 0.5) (the converter records it in the file, as for EfficientNet-Lite0).
INPUT_NORMALIZATION = {"efficientnet_v2_l": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


class MBConv(nn.Module):
    """[1x1 ``expand`` + SiLU] -> kxk ``depthwise`` + SiLU -> ``se`` -> 1x1 ``project`` (+ input)."""

    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        expanded = make_divisible(self.input_channels * self.expand_ratio)
        y = x
        if expanded != self.input_channels:
            y = rules.silu(Conv(expanded, 1, use_bias=True, name="expand")(y))
        y = Conv(
            expanded, self.kernel, self.stride, (self.kernel - 1) // 2, groups=expanded, use_bias=True, name="depthwise"
        )(y)
        y = rules.silu(y)
        y = SqueezeExcitation(max(1, self.input_channels // 4), "silu", name="se")(y, rules)
        y = Conv(self.out_channels, 1, use_bias=True, name="project")(y)
        return y + x if self.stride == 1 and self.input_channels == self.out_channels else y


class FusedMBConv(nn.Module):
    """kxk ``expand`` + SiLU -> 1x1 ``project`` (+ input); at expansion 1 one kxk ``conv`` + SiLU."""

    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        expanded = make_divisible(self.input_channels * self.expand_ratio)
        pad = (self.kernel - 1) // 2
        if expanded != self.input_channels:
            y = rules.silu(Conv(expanded, self.kernel, self.stride, pad, use_bias=True, name="expand")(x))
            y = Conv(self.out_channels, 1, use_bias=True, name="project")(y)
        else:
            y = rules.silu(Conv(self.out_channels, self.kernel, self.stride, pad, use_bias=True, name="conv")(x))
        return y + x if self.stride == 1 and self.input_channels == self.out_channels else y


class EfficientNet(nn.Module):
    """torchvision ``EfficientNet`` (V1 and V2): SiLU stem, block stages, 1x1 head, pool, linear.

    Any input size works (fully convolutional up to the global average pool).
    """

    stages: tuple[Stage, ...]
    last_channel: int | None = None  # None: 4x the last stage's width
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, rules: Rules) -> jax.Array:
        """``x``: ``(N, H, W, 3)`` normalised -> logits ``(N, num_classes)``."""
        stages = [Stage(*s) for s in self.stages]
        x = rules.silu(Conv(stages[0].input_channels, 3, 2, 1, use_bias=True, name="features_0")(x))
        for i, s in enumerate(stages, 1):
            block = {"MBConv": MBConv, "FusedMBConv": FusedMBConv}[s.block]
            for j in range(s.num_layers):
                first = j == 0
                x = block(
                    s.expand_ratio,
                    s.kernel,
                    s.stride if first else 1,
                    s.input_channels if first else s.out_channels,
                    s.out_channels,
                    name=f"features_{i}_{j}",
                )(x, rules)
        last = self.last_channel or 4 * stages[-1].out_channels
        x = rules.silu(Conv(last, 1, use_bias=True, name=f"features_{len(stages) + 1}")(x))
        return Dense(self.num_classes, name="classifier_1")(global_avg_pool(x))


def efficientnet(
    stages: Sequence[Sequence],
    last_channel: int | None = None,
    bn_eps: float | None = None,
    num_classes: int = 1000,
) -> EfficientNet:
    """The module of ``stages`` (rows of ``Stage`` fields). ``bn_eps`` is the converter's (folded
    into the weights by ``torch_layout``), not the module's: accepted and ignored here."""
    del bn_eps
    rows = tuple(_stage(s) for s in stages)
    if not rows:
        raise ValueError("an EfficientNet needs at least one stage: pass stages=[(block, expand_ratio, kernel, ...)]")
    return EfficientNet(rows, last_channel, num_classes)


def _stage(row: Sequence) -> Stage:
    s = Stage(*row)
    if s.block not in BLOCKS or s.stride not in (1, 2) or min(s.kernel, s.input_channels, s.out_channels) < 1:
        raise ValueError(
            f"invalid EfficientNet stage {tuple(row)}: need block in {BLOCKS}, stride 1 or 2 and "
            "positive kernel and channels"
        )
    return s


ARCHITECTURES = {
    arch: functools.partial(efficientnet, stages=stages, last_channel=last_channel)
    for arch, (stages, last_channel, _) in {**CONFIGS, **TIMM_CONFIGS}.items()
}


def torch_config(module) -> dict:
    """The builder options of a torch ``EfficientNet``: ``{}`` if it has a named architecture's
    stages, head width and BatchNorm epsilon, otherwise ``stages``, ``last_channel`` and ``bn_eps``
    as read off its modules (the expansion ratio as expanded / input channels)."""
    import torch

    if type(module).__module__.startswith("timm."):
        return timm_torch_config(module)
    if type(module).__name__ != "EfficientNet":
        raise ValueError(
            f"expected a torchvision EfficientNet, got {type(module).__name__}: "
            "build it with torchvision.models.efficientnet"
        )
    stages = []
    for stage in list(module.features)[1:-1]:
        b = stage[0]
        kind = type(b).__name__
        if kind not in BLOCKS:
            raise ValueError(f"unknown EfficientNet block {kind}: only torchvision's MBConv and FusedMBConv convert")
        convs = [m for m in b.block.modules() if isinstance(m, torch.nn.Conv2d)]
        # the kxk convolution: the depthwise one (MBConv), the first one (FusedMBConv)
        spatial = next(c for c in convs if c.groups > 1) if kind == "MBConv" else convs[0]
        inp = convs[0].in_channels
        expanded = spatial.out_channels if kind == "MBConv" else (convs[0].out_channels if len(b.block) == 2 else inp)
        stages.append(
            (kind, expanded / inp, spatial.kernel_size[0], spatial.stride[0], inp, b.out_channels, len(stage))
        )
    head = module.features[-1][0].out_channels
    last_channel = None if head == 4 * stages[-1][5] else head
    eps = {m.eps for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    if len(eps) != 1:
        raise ValueError(f"the EfficientNet's BatchNorms use several epsilons {sorted(eps)}: one is supported")
    bn_eps = eps.pop()
    for named_stages, named_last, named_eps in CONFIGS.values():
        if (
            tuple(map(tuple, stages)) == tuple(map(tuple, named_stages))
            and last_channel == named_last
            and bn_eps == named_eps
        ):
            return {}
    return {"stages": tuple(tuple(s) for s in stages), "last_channel": last_channel, "bn_eps": bn_eps}


def timm_torch_config(module) -> dict:
    """The builder options of a timm ``EfficientNet`` (``timm.models.efficientnet``): ``{}`` if it
    has a named model's stages, head width and BatchNorm eps, otherwise ``stages``,
    ``last_channel`` and ``bn_eps`` as read off its blocks (``DepthwiseSeparableConv`` -> an MBConv
    of expansion 1, ``InvertedResidual`` -> an MBConv of expansion mid / input).

    Raises:
      ValueError: one line naming the first timm option this module does not compute (TF 'SAME'
        padding, another block kind, activation, squeeze-excitation width or gate, an expansion
        with a kernel, dilation, groups, ``noskip``, another global pool).
    """
    from torch import nn as tnn

    def need(ok: bool, what: str, fix: str):
        if not ok:
            raise ValueError(f"this timm EfficientNet has {what}, which jaxpull's EfficientNet does not compute: {fix}")

    if type(module).__name__ != "EfficientNet":
        raise ValueError(
            f"timm's {type(module).__name__} is not an EfficientNet jaxpull converts: use timm's efficientnet_b0"
        )
    convs = [m for m in module.modules() if isinstance(m, tnn.Conv2d)]
    need(
        all(type(c) is tnn.Conv2d for c in convs),
        "TensorFlow 'SAME' padding (tf_* models)",
        "use timm's efficientnet_* (PyTorch padding)",
    )
    need(
        all(c.padding == ((c.kernel_size[0] - 1) // 2,) * 2 and c.dilation == (1, 1) for c in convs),
        "other padding or dilation",
        "use timm's efficientnet_* with output_stride 32",
    )
    acts = [
        m.act for m in module.modules() if type(m).__name__ == "BatchNormAct2d" and not isinstance(m.act, tnn.Identity)
    ]
    need(all(type(a) is tnn.SiLU for a in acts), "an activation other than SiLU", "use act_layer='swish'")
    norms = [m for m in module.modules() if isinstance(m, tnn.BatchNorm2d)]
    eps = {m.eps for m in norms}
    need(
        len(eps) == 1 and all(type(m).__name__ == "BatchNormAct2d" for m in norms),
        "several BatchNorm eps or norm layers",
        "use one norm_layer",
    )
    need(
        getattr(module.global_pool, "pool_type", None) == "avg" and isinstance(module.classifier, tnn.Linear),
        "another global pool or classifier",
        "use global_pool='avg' and num_classes > 0",
    )
    stem = module.conv_stem
    need(stem.kernel_size == (3, 3) and stem.stride == (2, 2), "another stem convolution", "use a 3x3/2 stem")
    stages = []
    for stage in module.blocks:
        kind = type(stage[0]).__name__
        ratio = (
            stage[0].conv_dw.out_channels / stage[0].conv_dw.in_channels if kind == "DepthwiseSeparableConv" else None
        )
        for b in stage:
            need(
                type(b).__name__ == kind and kind in ("DepthwiseSeparableConv", "InvertedResidual"),
                f"{type(b).__name__} blocks",
                "use DepthwiseSeparableConv and InvertedResidual blocks",
            )
            dw = b.conv_dw
            need(
                dw.groups == dw.in_channels == dw.out_channels,
                "grouped (not depthwise) convolutions",
                "use group_size=1",
            )
            need(
                getattr(b, "conv_s2d", None) is None and isinstance(b.aa, tnn.Identity),
                "space-to-depth or anti-aliasing",
                "use a plain efficientnet_*",
            )
            ds = kind == "DepthwiseSeparableConv"
            inp, out = (
                (dw.in_channels, b.conv_pw.out_channels) if ds else (b.conv_pw.in_channels, b.conv_pwl.out_channels)
            )
            need(b.has_skip == (dw.stride == (1, 1) and inp == out), "noskip", "build it with noskip=False")
            if ds:
                need(
                    not b.has_pw_act and b.conv_pw.kernel_size == (1, 1),
                    "an activation or kernel after the pointwise convolution",
                    "use pw_act=False",
                )
            else:
                need(
                    b.conv_pw.kernel_size == (1, 1) and b.conv_pwl.kernel_size == (1, 1),
                    "an expansion or projection kernel other than 1x1",
                    "use exp_kernel_size=1",
                )
                need(dw.in_channels != inp, "an InvertedResidual of expansion 1", "use a DepthwiseSeparableConv there")
                ratio = ratio or dw.in_channels / inp
            need(
                make_divisible(inp * ratio) == dw.in_channels,
                f"an expanded width {dw.in_channels} of {inp} channels that expansion {ratio:g} does not give",
                "use one expansion ratio per stage and widths of multiples of 8",
            )
            se = b.se
            need(
                type(se).__name__ == "SqueezeExcite",
                "no squeeze-excitation or another kind",
                "use se_layer=SqueezeExcite",
            )
            need(
                se.conv_reduce.out_channels == max(1, inp // 4),
                f"an SE width {se.conv_reduce.out_channels} where jaxpull's is input // 4 = {max(1, inp // 4)}",
                "use channels whose SE widths agree",
            )
            need(
                type(se.act1) is tnn.SiLU and type(se.gate) is tnn.Sigmoid,
                "another SE activation or gate",
                "use SiLU and sigmoid",
            )
        first = stage[0]
        inp = first.conv_dw.in_channels if kind == "DepthwiseSeparableConv" else first.conv_pw.in_channels
        out = first.conv_pw.out_channels if kind == "DepthwiseSeparableConv" else first.conv_pwl.out_channels
        stages.append(("MBConv", ratio, first.conv_dw.kernel_size[0], first.conv_dw.stride[0], inp, out, len(stage)))
    head = module.conv_head.out_channels
    last_channel = None if head == 4 * stages[-1][5] else head
    bn_eps = eps.pop()
    for named_stages, named_last, _ in TIMM_CONFIGS.values():
        if (
            tuple(map(tuple, stages)) == tuple(map(tuple, named_stages))
            and last_channel == named_last
            and bn_eps == 1e-5
        ):
            return {}
    return {"stages": tuple(tuple(s) for s in stages), "last_channel": last_channel, "bn_eps": bn_eps}


def _timm_layout(sd, stages: tuple[Stage, ...], eps: float) -> dict:
    """Map a timm EfficientNet state_dict onto this module's parameter tree (see the module docstring)."""
    last = len(stages) + 1
    p = {
        "features_0": sd.conv_bn("conv_stem", "bn1", eps),
        f"features_{last}": sd.conv_bn("conv_head", "bn2", eps),
        "classifier_1": sd.dense("classifier"),
    }
    for i, s in enumerate(stages):
        for j in range(s.num_layers):
            b = f"blocks.{i}.{j}"
            inp = s.input_channels if j == 0 else s.out_channels
            block = {
                "se": {"fc1": sd.conv_bn(f"{b}.se.conv_reduce", None), "fc2": sd.conv_bn(f"{b}.se.conv_expand", None)}
            }
            if make_divisible(inp * s.expand_ratio) != inp:  # InvertedResidual
                block["expand"] = sd.conv_bn(f"{b}.conv_pw", f"{b}.bn1", eps)
                block["depthwise"] = sd.conv_bn(f"{b}.conv_dw", f"{b}.bn2", eps)
                block["project"] = sd.conv_bn(f"{b}.conv_pwl", f"{b}.bn3", eps)
            else:  # DepthwiseSeparableConv
                block["depthwise"] = sd.conv_bn(f"{b}.conv_dw", f"{b}.bn1", eps)
                block["project"] = sd.conv_bn(f"{b}.conv_pw", f"{b}.bn2", eps)
            p[f"features_{i + 1}_{j}"] = block
    return p


def torch_layout(
    arch: str,
    sd,
    stages: Sequence[Sequence] | None = None,
    last_channel: int | None = None,
    bn_eps: float | None = None,
) -> dict:
    """Map a torchvision (or timm: ``timm/...``) EfficientNet state_dict onto this module's parameter
    tree (``stages`` and ``bn_eps``: a model of other sizes than ``arch``'s, see ``torch_config``)."""
    named_stages, _, named_eps = {**CONFIGS, **TIMM_CONFIGS}[arch]
    stages = named_stages if stages is None else tuple(_stage(s) for s in stages)
    eps = named_eps if bn_eps is None else bn_eps
    if arch.startswith("timm/"):
        return _timm_layout(sd, stages, eps)
    conv = lambda pre: sd.conv_bn(f"{pre}.0", f"{pre}.1", eps)  # Conv2dNormActivation
    last = len(stages) + 1
    p = {
        "features_0": conv("features.0"),
        f"features_{last}": conv(f"features.{last}"),
        "classifier_1": sd.dense("classifier.1"),
    }
    for i, s in enumerate(stages, 1):
        for j in range(s.num_layers):
            inp = s.input_channels if j == 0 else s.out_channels
            expands = make_divisible(inp * s.expand_ratio) != inp
            b = f"features.{i}.{j}.block"
            if s.block == "MBConv":
                names = (["expand"] if expands else []) + ["depthwise", "se", "project"]
            else:
                names = ["expand", "project"] if expands else ["conv"]
            block = {}
            for k, name in enumerate(names):
                if name == "se":
                    block["se"] = {"fc1": sd.conv_bn(f"{b}.{k}.fc1", None), "fc2": sd.conv_bn(f"{b}.{k}.fc2", None)}
                else:
                    block[name] = conv(f"{b}.{k}")
            p[f"features_{i}_{j}"] = block
    return p


CLASSIFIER = {a: "classifier" if a.startswith("timm/") else "classifier.1" for a in ARCHITECTURES}  # the logits' layer
# ModelSpec.config options (a model of other sizes: torch_config); stage rows as ``Stage``
CONFIG_OPTIONS = {
    "stages": tuple[tuple[Block, float, int, Literal[1, 2], int, int, options.COUNT], ...],
    "last_channel": int | None,
    "bn_eps": Annotated[float, options.Range(0, 1)],
}


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    preprocessing=PREPROCESSING,
    torch_config=torch_config,
    input_normalization=INPUT_NORMALIZATION,
    classifier=CLASSIFIER,
    config_options=CONFIG_OPTIONS,
    gradcam_layer=GradCamLayer("features.-1", before_batchnorm=True),  # the last convolution (features[-1][0])
)
