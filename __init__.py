"""MaskAttn for ComfyUI: learned token-to-latent gates on SDXL's cross-attention (arXiv 2509.15357)."""

WEB_DIRECTORY = "./web"

try:
    import folder_paths  # noqa: F401  (always importable inside ComfyUI)
except ImportError:
    # Imported outside ComfyUI (pytest collecting this folder, command-line tools): the maths in masks/ stays
    # importable; there are no nodes to register without a host.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
