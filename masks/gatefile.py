"""Gate files: our `.safetensors` format, and an importer for the reference implementation's `.pt` checkpoints.

`.safetensors` layout (format "maskattn-comfyui-gates", version 1 for reference heads, 2 for context heads):
  tensors   `heads.{i}.{param}` for each distinct gate head, params named as in the reference
            (`feature_net.0.weight`, ..., `logit_bias`)
  metadata  strings: format, format_version, architecture, stage, placement, hidden_size, threshold,
            negative_value, kind, and `sites`: JSON {"input.7.3": {"head": 0, "stage": "mid", ...}, ...}
  version 2 (context heads, masks/context.py) adds `gate_kind` = "context", `context_features`, `context_hidden`
            and `memory`, and the heads' `context_net.{0,2}.*` tensors. Reference heads are still written as
            version 1, byte for byte as before, so every pack reads them; a version-1 pack refuses a context file
            as "newer than this pack reads". A file without `gate_kind` holds reference heads.

Only safetensors and `torch.load(weights_only=True)` are used: no pickled code ever runs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .context import GATE_CLASSES, GATE_KINDS, ContextGateHead
from .gate import NEGATIVE_VALUE, GateHead
from .gates import MaskAttnGates
from .topology import STAGES, diffusers_name_to_key, key_to_name, name_to_key

FORMAT = "maskattn-comfyui-gates"
FORMAT_VERSION = 2  # the newest version this pack reads
REFERENCE_VERSION = 1  # what reference heads are written as (every pack reads them)
REFERENCE_FORMAT = "maskattn-sdxl-gates-v1"
EXTENSIONS = (".safetensors", ".pt", ".pth")


class GateFileError(ValueError):
    """A gate file that cannot be used; the message names the file and what to do."""


def save_gates(gates: MaskAttnGates, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write `gates` to `path` (.safetensors). Written to a temporary name first: no half-written file on error."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise GateFileError(f"{path.name}: gate files are saved as .safetensors")
    tensors = {
        f"heads.{i}.{name}": t.detach().to("cpu", torch.float32).contiguous()
        for i, head in enumerate(gates.heads)
        for name, t in head.state_dict().items()
    }
    sites = {
        key_to_name(key): {"head": index, "stage": gates.site_stages[key]}
        for key, index in sorted(gates.site_heads.items())
    }
    context = gates.gate_kind == "context"
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if context else REFERENCE_VERSION),
        "architecture": gates.architecture,
        "stage": gates.stage,
        "placement": gates.placement,
        "hidden_size": str(gates.hidden_dim),
        "threshold": repr(float(gates.threshold)),
        "negative_value": repr(float(gates.negative_value)),
        "kind": gates.kind,
        "sites": json.dumps(sites),
        **(_context_metadata(gates) if context else {}),
        **(extra_metadata or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _context_metadata(gates) -> dict[str, str]:
    first = gates.heads[0]
    return {"gate_kind": "context", "context_features": str(first.context_features),
            "context_hidden": str(first.context_hidden), "memory": repr(float(gates.memory))}


def load_gates(path: str | os.PathLike) -> MaskAttnGates:
    """Read a gate file: our .safetensors, or a reference .pt checkpoint (imported)."""
    path = Path(path)
    if not path.is_file():
        raise GateFileError(f"{path}: no such gate file. Put gate files in ComfyUI/models/maskattn/.")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in (".pt", ".pth"):
        return import_reference_checkpoint(path)
    raise GateFileError(f"{path.name}: unknown gate file type {path.suffix!r}; expected one of {', '.join(EXTENSIONS)}")


def _head_from_state(state: dict[str, torch.Tensor], where: str, context: dict | None = None) -> GateHead:
    """A head from its tensors; `context` ({features, hidden}) for a context head, None for a reference head."""
    try:
        c = state["feature_net.0.weight"].shape[0]
        d = state["token_net.0.weight"].shape[0]
        h = state["feature_net.1.weight"].shape[0]
    except KeyError as e:
        raise GateFileError(f"{where}: gate head tensor {e.args[0]} is missing; the file is incomplete") from None
    head = GateHead(c, d, h) if context is None else ContextGateHead(c, d, h, context["features"], context["hidden"])
    try:
        head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise GateFileError(f"{where}: gate head tensors do not fit a MaskAttn gate head: {e}") from None
    head.requires_grad_(False)
    return head


def _load_safetensors(path: Path) -> MaskAttnGates:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types; name the file whatever they are
        raise GateFileError(
            f"{path.name}: not a readable .safetensors file ({type(e).__name__}: {e}). It may be truncated by an "
            f"interrupted download or copy: copy it again."
        ) from None
    if metadata.get("format") != FORMAT:
        hint = "It looks like a model checkpoint or LoRA, not a gate file. " if tensors and not any(
            k.startswith("heads.") for k in tensors) else ""
        raise GateFileError(
            f"{path.name}: not a MaskAttn gate file (no '{FORMAT}' metadata). {hint}Gate files are written by "
            f"'Save MaskAttn Gates' or the trainer; reference .pt checkpoints are imported as they are."
        )
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise GateFileError(f"{path.name}: gate format version {version} is newer than this pack reads "
                            f"({FORMAT_VERSION}); update the MaskAttn node pack.")
    gate_kind = metadata.get("gate_kind", "reference")
    if gate_kind not in GATE_KINDS:
        raise GateFileError(f"{path.name}: gate kind {gate_kind!r} is not one this pack runs "
                            f"({', '.join(GATE_KINDS)}); update the MaskAttn node pack.")
    try:
        sites = json.loads(metadata["sites"])
        grouped: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            m = re.fullmatch(r"heads\.(\d+)\.(.+)", name)
            if not m:
                raise GateFileError(f"{path.name}: unexpected tensor {name!r} in a gate file")
            grouped.setdefault(int(m.group(1)), {})[m.group(2)] = t
        if sorted(grouped) != list(range(len(grouped))):
            raise GateFileError(f"{path.name}: gate heads are not numbered 0..{len(grouped) - 1}; the file is damaged")
        context = None if gate_kind == "reference" else {
            "features": int(metadata["context_features"]), "hidden": int(metadata["context_hidden"])}
        heads = nn.ModuleList(_head_from_state(grouped[i], f"{path.name} head {i}", context)
                              for i in range(len(grouped)))
        site_heads = {name_to_key(n): int(s["head"]) for n, s in sites.items()}
        site_stages = {name_to_key(n): s["stage"] for n, s in sites.items()}
        fields = {} if context is None else {"memory": float(metadata["memory"])}
        return GATE_CLASSES[gate_kind](
            heads=heads, site_heads=site_heads, site_stages=site_stages, **fields,
            architecture=metadata.get("architecture", "unknown"),
            threshold=float(metadata.get("threshold", 0.5)),
            negative_value=float(metadata.get("negative_value", NEGATIVE_VALUE)),
            stage=metadata.get("stage", "mid"), placement=metadata.get("placement", "encoder_decoder"),
            kind=metadata.get("kind", "trained"), source=path.name,
        )
    except GateFileError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise GateFileError(
            f"{path.name}: damaged gate metadata ({type(e).__name__}: {e}); save the gates again") from None


_REF_KEY = re.compile(r"(?P<layer>.+\.attn2)(?:\.processor)?\.gate_head\.(?P<param>.+)")


def import_reference_checkpoint(path: str | os.PathLike) -> MaskAttnGates:
    """Map a reference `.pt` checkpoint ("maskattn-sdxl-gates-v1", diffusers layer names) onto ComfyUI sites.

    Heads shared between layers in the reference (one per stage) are stored once per layer name there; they are
    merged back into one head here when their tensors are equal.
    """
    path = Path(path)
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        kind = "contains pickled objects other than tensors and plain data, which this pack refuses to run" if (
            "weights_only" in str(e) or "Unpickl" in type(e).__name__) else "could not be read (truncated?)"
        first_line = str(e).splitlines()[0][:200] if str(e) else ""
        raise GateFileError(f"{path.name}: this .pt file {kind} ({type(e).__name__}: {first_line}).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != REFERENCE_FORMAT:
        raise GateFileError(
            f"{path.name}: not a MaskAttn-SDXL reference gate checkpoint (expected format '{REFERENCE_FORMAT}', got "
            f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r})."
        )
    config = ckpt.get("maskattn_config") or {}
    state = ckpt.get("gate_state_dict")
    if not isinstance(state, dict) or not state:
        raise GateFileError(f"{path.name}: the checkpoint has no gate_state_dict")
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _REF_KEY.fullmatch(key)
        if not m:
            raise GateFileError(f"{path.name}: unexpected key {key!r} in gate_state_dict")
        per_layer.setdefault(m.group("layer"), {})[m.group("param")] = t
    stage_by_layer = {k.removesuffix(".processor"): v for k, v in (ckpt.get("stage_by_layer") or {}).items()}

    heads: list[GateHead] = []
    states: list[dict[str, torch.Tensor]] = []
    site_heads, site_stages = {}, {}
    for layer, params in per_layer.items():
        try:
            key = diffusers_name_to_key(layer)
        except ValueError as e:
            raise GateFileError(f"{path.name}: {e}") from None
        index = next((i for i, s in enumerate(states) if s.keys() == params.keys() and all(
            s[k].shape == params[k].shape and torch.equal(s[k], params[k]) for k in s)), None)
        if index is None:
            index = len(heads)
            heads.append(_head_from_state(params, f"{path.name} layer {layer}"))
            states.append(params)
        site_heads[key] = index
        stage = stage_by_layer.get(layer) or _reference_stage(layer)
        if stage not in STAGES:
            raise GateFileError(f"{path.name}: layer {layer} has unknown stage {stage!r}")
        site_stages[key] = stage
    token_dims = {h.token_dim for h in heads}
    return MaskAttnGates(
        heads=nn.ModuleList(heads), site_heads=site_heads, site_stages=site_stages,
        architecture="sdxl" if token_dims == {2048} else f"unet(context={'/'.join(map(str, sorted(token_dims)))})",
        threshold=float(config.get("threshold", 0.5)),
        negative_value=float(config.get("negative_value", NEGATIVE_VALUE)),
        stage=str(config.get("stage", "mid")), placement=str(config.get("placement", "encoder_decoder")),
        kind=str(ckpt.get("checkpoint_kind", "trained")), source=path.name,
    )


def _reference_stage(layer: str) -> str:
    if layer.startswith("mid_block."):
        return "low"
    if layer.startswith(("down_blocks.1", "up_blocks.1")):
        return "high"
    return "mid"
