"""torchvision's EfficientNet: efficientnet_b0 ... efficientnet_b7 and efficientnet_v2_s/_m/_l.

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
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax

from jaxpull.core.rules import Rules
from jaxpull.core.layers import Conv, Dense, SqueezeExcitation, global_avg_pool
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.models.family import Family, GradCamLayer

BLOCKS = ("MBConv", "FusedMBConv")


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


def _b(width_mult: float, depth_mult: float) -> Tuple[Stage, ...]:
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

    stages: Tuple[Stage, ...]
    last_channel: Optional[int] = None  # None: 4x the last stage's width
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
    last_channel: Optional[int] = None,
    bn_eps: Optional[float] = None,
    num_classes: int = 1000,
) -> EfficientNet:
    """The module of ``stages`` (rows of ``Stage`` fields). ``bn_eps`` is the converter's (folded
    into the weights by ``torch_layout``), not the module's: accepted and ignored here."""
    del bn_eps
    stages = tuple(_stage(s) for s in stages)
    if not stages:
        raise ValueError("an EfficientNet needs at least one stage: pass stages=[(block, expand_ratio, kernel, ...)]")
    return EfficientNet(stages, last_channel, num_classes)


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
    for arch, (stages, last_channel, _) in CONFIGS.items()
}


def torch_config(module) -> dict:
    """The builder options of a torch ``EfficientNet``: ``{}`` if it has a named architecture's
    stages, head width and BatchNorm epsilon, otherwise ``stages``, ``last_channel`` and ``bn_eps``
    as read off its modules (the expansion ratio as expanded / input channels)."""
    import torch

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


def torch_layout(
    arch: str,
    sd,
    stages: Optional[Sequence[Sequence]] = None,
    last_channel: Optional[int] = None,
    bn_eps: Optional[float] = None,
) -> dict:
    """Map a torchvision EfficientNet state_dict onto this module's parameter tree (``stages`` and
    ``bn_eps``: a model of other sizes than ``arch``'s, see ``torch_config``)."""
    named_stages, _, named_eps = CONFIGS[arch]
    stages = named_stages if stages is None else tuple(_stage(s) for s in stages)
    eps = named_eps if bn_eps is None else bn_eps
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


FAMILY = Family(
    architectures=ARCHITECTURES,
    torch_layout=torch_layout,
    max_pools=False,
    preprocessing=PREPROCESSING,
    torch_config=torch_config,
    input_normalization=INPUT_NORMALIZATION,
    gradcam_layer=GradCamLayer("features.-1", before_batchnorm=True),  # the last convolution (features[-1][0])
)
