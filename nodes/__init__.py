"""ComfyUI node classes (thin): the maths lives in ../masks."""

from . import gates, preview, region, train, zeroshot
from .paths import register_model_folder

register_model_folder()

NODE_CLASS_MAPPINGS = {**gates.NODE_CLASS_MAPPINGS, **train.NODE_CLASS_MAPPINGS, **preview.NODE_CLASS_MAPPINGS,
                       **zeroshot.NODE_CLASS_MAPPINGS, **region.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**gates.NODE_DISPLAY_NAME_MAPPINGS, **train.NODE_DISPLAY_NAME_MAPPINGS,
                              **preview.NODE_DISPLAY_NAME_MAPPINGS, **zeroshot.NODE_DISPLAY_NAME_MAPPINGS,
                              **region.NODE_DISPLAY_NAME_MAPPINGS}
