"""torchvision.transforms stand-in (transforms raise when called)."""

from .._missing import module_getattr
from . import functional  # noqa: F401
from .functional import InterpolationMode  # noqa: F401

__getattr__ = module_getattr(__name__)
