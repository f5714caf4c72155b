"""Minimal torchvision stand-in for MaskAttn's tests (NOT the real torchvision).

ComfyUI imports torchvision at module level in a few places (Stable Cascade coders, the LaMa
upscaler, Cosmos, ACE audio), but nothing that the MaskAttn tests run ever calls it. PyPI's
torchvision does not load beside the CPU-only torch this project tests with, so
``tests/comfy_host.py`` puts this package on ``sys.path`` only when ``import torchvision`` fails.

Every name resolves (so ``from torchvision.x import Y`` succeeds at import time); anything that
is actually called raises ``NotImplementedError``.
"""

from . import models, transforms  # noqa: F401
from ._missing import module_getattr

__version__ = "0.0.0+maskattn.stub"
MASKATTN_STUB = True

__getattr__ = module_getattr(__name__)
