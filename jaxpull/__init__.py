"""jaxpull: excitation and semantic pullbacks in JAX.

Convert a torchvision model once (``jaxpull convert``), then::

    model = jaxpull.load("weights/resnet50.safetensors")    # or a cached name: jaxpull.load("mobilenet_v2")
    logits = model(x)                                        # x: (N, H, W, 3) in [-1, 1]
    maps = jaxpull.pullback(model, x, targets=[207, 1])      # (N, K, H, W, 3), rules="excitation"
    maps = jaxpull.pullback(model, x, [207], rules="semantic", temperature=0.4)  # a preset, overridden
    xs = jaxpull.ascent(model, x, targets=[207, 1])          # (N, K, H, W, 3)
    logits, maps = jaxpull.compare(model, x, [207, 1])       # {"excitation": ..., "semantic": ..., "vanilla gradient": ...}

The backward rules are data (:class:`jaxpull.Rules`, one rule object per layer kind, in
``jaxpull.rules``); the named presets and their ascent settings are :data:`jaxpull.PRESETS`.
"""

from jaxpull.core import rules
from jaxpull.core.model import Model, ModelSpec
from jaxpull.core.pullback import Comparison, ascent, compare, pullback
from jaxpull.core.rules import Rules
from jaxpull.core.settings import PRESETS, Ascent, resolve, resolve_ascent
from jaxpull.files.cache import resolve as load
from jaxpull.files.model_file import ModelFileError, save

__all__ = [
    "ascent",
    "pullback",
    "compare",
    "Comparison",
    "Rules",
    "rules",
    "Ascent",
    "PRESETS",
    "resolve",
    "resolve_ascent",
    "load",
    "save",
    "Model",
    "ModelSpec",
    "ModelFileError",
]
__version__ = "0.1.0"
