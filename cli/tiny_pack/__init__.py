"""Test-only ComfyUI node pack: a tiny random SDXL-architecture checkpoint (MODEL, CLIP, VAE) for tests and smoke runs.

Never shipped as part of MaskAttn's nodes: tests (and `cli.run_example --smoke`) add this folder to ComfyUI's
custom_nodes search path through an extra_model_paths file. The weights are random: images are noise-like and
the gates are whatever random gate heads make of them. It exists so workflows can run end to end on a CPU in
seconds.
"""

from .memory import register_route
from .tiny import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

register_route()  # the soak's memory readings (benchmarks/soak.py)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
