"""jaxpull's converter (installed as ``jaxpull_convert``; needs torch and torchvision).

``convert`` ports a torchvision ImageNet model (by weights name, or a local state_dict file
loaded with ``weights_only=True``) into a ``jaxpull.Model``, checks its logits against the torch
model on the same input, and writes one ``.safetensors`` file only if they agree.
"""

from jaxpull_convert.converter import (
    LOGIT_TOLERANCE,
    ConversionError,
    convert,
    from_state_dict,
    from_torch_module,
    logit_parity,
)

__all__ = ["convert", "from_state_dict", "from_torch_module", "logit_parity", "ConversionError", "LOGIT_TOLERANCE"]
