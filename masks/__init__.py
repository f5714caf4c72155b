"""MaskAttn maths in pure torch (no ComfyUI import): gate heads, masking, topology, gate files."""

from .attention import DeferredBias, explicit_attention, masked_attention
from .gate import NEGATIVE_VALUE, GateHead, GateResult, gate_bias, hard_gate, strength_to_negative_value
from .gatefile import GateFileError, import_reference_checkpoint, load_gates, save_gates
from .gates import GateMismatchError, MaskAttnGates
from .runtime import GateRuntime
from .source import GateSource
from .topology import CrossAttnSite, UnsupportedModelError, discover_sites, select_sites

__all__ = [
    "NEGATIVE_VALUE", "CrossAttnSite", "DeferredBias", "GateFileError", "GateHead", "GateMismatchError", "GateResult",
    "GateRuntime", "GateSource", "MaskAttnGates", "UnsupportedModelError", "discover_sites", "explicit_attention",
    "gate_bias", "hard_gate", "import_reference_checkpoint", "load_gates", "masked_attention", "save_gates",
    "select_sites", "strength_to_negative_value",
]
