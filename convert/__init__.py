"""jaxpull's converter (installed as ``jaxpull_convert``).

``convert`` ports a torchvision ImageNet model (by weights name, or a local state_dict file
loaded with ``weights_only=True``) into a ``jaxpull.Model``, checks its logits against the torch
model on the same input, and writes one ``.safetensors`` file only if they agree. Without torch,
the checkpoints of the offline table (:mod:`jaxpull_convert.offline`) still convert: jaxpull's own
restricted reader (:mod:`jaxpull_convert.pth`) reads them, and the logits are checked against the
torch logits recorded for that file (:mod:`jaxpull_convert.fingerprint`). timm's models
(``timm/<model name>``) convert through :mod:`jaxpull_convert.timm_source`, with torch and timm.
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
