"""ComfyUI node classes (thin): the maths lives in ../masks."""

from . import gates, layout, preview, region, train, zeroshot
from .paths import register_model_folder

register_model_folder()

_MODULES = (gates, train, preview, zeroshot, region, layout)
NODE_CLASS_MAPPINGS = {key: cls for module in _MODULES for key, cls in module.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for module in _MODULES
                              for key, name in module.NODE_DISPLAY_NAME_MAPPINGS.items()}
