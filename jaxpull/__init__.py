"""jaxpull: excitation pullbacks for ReLU networks in JAX.

Convert a torchvision model once (``jaxpull convert``), then::

    model = jaxpull.load("weights/resnet50.safetensors")  # or a cached name: jaxpull.load("mobilenet_v2")
    logits = model(x)                                   # x: (N, H, W, 3) in [-1, 1]
    maps = jaxpull.pullback(model, x, targets=[207, 1])  # (N, K, H, W, 3)
    xs = jaxpull.ascent(model, x, targets=[207, 1])      # (N, K, H, W, 3)
    logits, maps = jaxpull.compare(model, x, [207, 1])   # {"excitation": ..., "semantic": ..., "vanilla gradient": ...}
"""

from jaxpull.core.pullback import Comparison, ascent, compare, pullback
from jaxpull.core.gates import Gating
from jaxpull.files.cache import resolve as load
from jaxpull.files.model_file import ModelFileError, save
from jaxpull.core.model import Model, ModelSpec
from jaxpull.core.settings import PRESETS, Ascent, make_ascent, make_gating

__all__ = [
    "ascent",
    "pullback",
    "compare",
    "Comparison",
    "make_gating",
    "make_ascent",
    "Ascent",
    "PRESETS",
    "Gating",
    "load",
    "save",
    "Model",
    "ModelSpec",
    "ModelFileError",
]
__version__ = "0.1.0"
