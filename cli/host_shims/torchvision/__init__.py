"""Minimal torchvision stand-in for running ComfyUI where torchvision cannot load (NOT the real torchvision).

ComfyUI imports torchvision at module level in a few places (Stable Cascade coders, the LaMa upscaler, Cosmos, ACE
audio), but nothing that MaskAttn's tools, benchmarks or tests run ever calls it. PyPI's torchvision does not load
beside a locally built CPU torch (the one CI uses), so ``cli/host.py`` puts this folder's parent on ``sys.path``
(and ``cli/server.py`` on a server's PYTHONPATH) only when ``import torchvision`` fails.

Every name resolves (so ``from torchvision.x import Y`` succeeds at import time); anything that is actually called
raises ``NotImplementedError``.
"""

from . import models, transforms  # noqa: F401
from ._missing import module_getattr

__version__ = "0.0.0+maskattn.stub"
MASKATTN_STUB = True

__getattr__ = module_getattr(__name__)
