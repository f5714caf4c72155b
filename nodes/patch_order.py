"""Where MaskAttn sits among other packs' attention patches: its two attn2_patch entries at the ends of the list
(OrderedPatchList), and the other packs' attention replaces it adopts (chains) or refuses (ForeignPatchError)."""

from __future__ import annotations

import copy

from ..masks.topology import key_to_name
from .containers import MaskAttnAttention, chainable
from .gate_patch import MaskAttnGatePatch, MaskAttnLayoutPatch


class ForeignPatchError(RuntimeError):
    """Another node's attention replace sits where MaskAttn must go, and it cannot be chained."""


# ComfyUI shows an error's type as `module.QualName`; the pack's module path would read as a filesystem path.
ForeignPatchError.__module__ = "MaskAttn"


def _position(patch) -> int:
    """-1: first (MaskAttn's layout patch), 1: last (its gate patch), 0: any other pack's patch."""
    return -1 if isinstance(patch, MaskAttnLayoutPatch) else 1 if isinstance(patch, MaskAttnGatePatch) else 0


class OrderedPatchList(list):
    """The "attn2_patch" list of a model MaskAttn patched. MaskAttn's layout patch stays first and its gate patch
    last, whatever other packs add before or after Apply MaskAttn, so the gate reads n/context exactly as the
    attention runs them and the two orders of applying nodes give the same model.

    ComfyUI and packs grow the list with `old + [new]` (ModelPatcher.set_model_patch), `[new] + old`, `.append`,
    `.extend` (0.3.64 merges hook patches so), `.copy()` (copy_nested_dicts, at every sampling run) and deepcopy
    (ModelPatcher.clone): each keeps this type and MaskAttn at the ends, and so does an index assignment, so plain
    iteration (what every transformer block call does) needs no sorting.
    """

    def __init__(self, items=()):
        super().__init__(sorted(items, key=_position))  # (stable: other packs keep their relative order)

    def _storage(self) -> list:
        return list(list.__iter__(self))

    def _reorder(self):
        list.__setitem__(self, slice(None), sorted(list.__iter__(self), key=_position))

    def __setitem__(self, index, value):  # (ModelPatcher.model_patches_to assigns what a patch's .to() returns)
        list.__setitem__(self, index, value)
        self._reorder()

    def __add__(self, other):
        return OrderedPatchList([*self._storage(), *other])

    def __radd__(self, other):
        return OrderedPatchList([*other, *self._storage()])

    def __iadd__(self, other):
        self.extend(other)
        return self

    def append(self, patch):
        list.append(self, patch)
        self._reorder()

    def extend(self, patches):
        list.extend(self, patches)
        self._reorder()

    def insert(self, index, patch):
        list.insert(self, index, patch)
        self._reorder()

    def copy(self):
        return OrderedPatchList(self._storage())

    __copy__ = copy

    def __deepcopy__(self, memo):
        return OrderedPatchList(copy.deepcopy(self._storage(), memo))


def chainable_replaces(replaces: dict, sites, what: str, fix: str) -> dict:
    """{site key: another pack's attention replace to adopt} at `sites`; one that cannot be chained is refused by
    name, before anything is installed."""
    foreign = {}
    for site in sites:
        existing = replaces.get(site.key)
        if existing is None or isinstance(existing, MaskAttnAttention):
            continue
        if not chainable(existing):
            raise ForeignPatchError(
                f"Apply MaskAttn: another node already replaced the {what} at {key_to_name(site.key)} with "
                f"{type(existing).__name__}, which cannot be chained (it has no callback list). Apply MaskAttn "
                f"before that node, {fix}."
            )
        foreign[site.key] = existing
    return foreign
