"""Puts MaskAttn into a (cloned) model: `install` is the one entry point the nodes call.

The parts it assembles each have their own module: MaskAttn's two attn2_patch entries (nodes/gate_patch.py), the
attention containers at each gated site (nodes/containers.py), their place beside other packs' patches and replaces
(nodes/patch_order.py) and the gate executor (nodes/executor.py). With nodes/preview.py (recording) and
nodes/gate_training.py (a training session), these are the modules that touch ModelPatcher / transformer_options.
"""

from __future__ import annotations

from ..masks.run_state import RUN_STATE_KEY
from ..masks.runtime import GateRuntime
from ..masks.source import GateSource
from ..masks.topology import CrossAttnSite, discover_sites
from .containers import MaskAttnAttention, MaskAttnSelfAttention
from .executor import executor_for
from .gate_patch import MaskAttnGatePatch, MaskAttnLayoutPatch, StepClock
from .patch_order import OrderedPatchList, chainable_replaces


def model_sites(model) -> list[CrossAttnSite]:
    """Cross-attention sites of a ComfyUI MODEL (ModelPatcher)."""
    return discover_sites(model.model.diffusion_model)


def install(model, gates: GateSource, sites: list[CrossAttnSite], *, threshold: float, negative_value: float,
            sigma_start: float | None = None, sigma_end: float | None = None, cond_only: bool = False):
    """A patched clone of `model` (a ModelPatcher); the input model is never changed."""
    make_executor = executor_for(model)  # first: a bad $MASKATTN_CUDA_GATE fails before anything is patched
    patched = model.clone()
    to = patched.model_options.setdefault("transformer_options", {})
    replaces = to.get("patches_replace", {}).get("attn2", {})
    self_replaces = to.get("patches_replace", {}).get("attn1", {})
    masks_self = gates.masks_self_attention
    # A second Apply MaskAttn replaces the first: drop our earlier patches, keep callbacks adopted by it.
    others = [p for p in to.get("patches", {}).get("attn2_patch", [])
              if not isinstance(p, (MaskAttnGatePatch, MaskAttnLayoutPatch))]
    foreign = chainable_replaces(replaces, sites, "cross-attention",
                                 "or narrow MaskAttn's stage/placement so the layers do not overlap")
    foreign_self = chainable_replaces(self_replaces, sites if masks_self else (), "self-attention",
                                      "or set the zero-shot gates' self_attention to 'open'")

    runtime = GateRuntime(gates=gates, sites=frozenset(s.key for s in sites), threshold=threshold,
                          negative_value=negative_value, cond_only=cond_only, executor=make_executor())
    run = gates.new_run()  # what the source gathers while this model samples (masks/run_state.py)
    if run is None:
        to.pop(RUN_STATE_KEY, None)
    else:
        to[RUN_STATE_KEY] = run
    gate_patch = MaskAttnGatePatch(runtime, StepClock(sigma_start, sigma_end))
    to.setdefault("patches", {})["attn2_patch"] = OrderedPatchList([MaskAttnLayoutPatch(), *others, gate_patch])
    for site in sites:
        existing = replaces.get(site.key)
        adopt = existing if isinstance(existing, MaskAttnAttention) or site.key in foreign else None
        patched.set_model_attn2_replace(MaskAttnAttention(gate_patch, site.key, adopt), *site.key)
        existing = self_replaces.get(site.key)
        if masks_self:
            adopt = existing if isinstance(existing, MaskAttnAttention) or site.key in foreign_self else None
            patched.set_model_attn1_replace(MaskAttnSelfAttention(gate_patch, site.key, adopt), *site.key)
        elif isinstance(existing, MaskAttnSelfAttention):  # a second Apply without self-attention masking
            if existing.callback:  # (keeps the adopted callbacks; these gates mask nothing there)
                patched.set_model_attn1_replace(MaskAttnSelfAttention(gate_patch, site.key, existing), *site.key)
            else:
                patched.model_options["transformer_options"]["patches_replace"]["attn1"].pop(site.key, None)
    # An earlier Apply's containers at layers these gates leave out would keep gating with the earlier gates (an
    # attention-family source computes its bias in the container): point them at this runtime, which leaves those
    # layers ungated and keeps the callbacks they adopted.
    for key, existing in list(replaces.items()):
        if isinstance(existing, MaskAttnAttention) and key not in runtime.sites:
            patched.set_model_attn2_replace(MaskAttnAttention(gate_patch, key, existing), *key)
    for key, existing in list(self_replaces.items()):
        if isinstance(existing, MaskAttnSelfAttention) and key not in runtime.sites:
            patched.set_model_attn1_replace(MaskAttnSelfAttention(gate_patch, key, existing), *key)
    return patched, runtime


def installed_runtime(model) -> GateRuntime | None:
    """The GateRuntime MaskAttn put on this model, if any (for the viewer and tests)."""
    for p in model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", []):
        if isinstance(p, MaskAttnGatePatch):
            return p.runtime
    return None
