"""ComfyUI node classes (thin): the maths lives in ../masks."""

from . import gates
from .paths import register_model_folder

register_model_folder()

NODE_CLASS_MAPPINGS = {**gates.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**gates.NODE_DISPLAY_NAME_MAPPINGS}
