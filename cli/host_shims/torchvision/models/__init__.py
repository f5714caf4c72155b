"""torchvision.models stand-in (constructors raise when called)."""

from .._missing import module_getattr

__getattr__ = module_getattr(__name__)
