"""What the gate viewer shows, from a recorded run (masks/record.py): pure, no ComfyUI import, no drawing.

- parsing the Record / Preview nodes' choices: layers (`select_layers`), recorded steps (`parse_steps`), the shown
  step (`parse_step`), the word columns (`choose_columns`);
- selecting the maps: `select_grid` gives the grid's rows (layers or steps) x columns (words) as [R, K, h, w] maps
  in 0..1 with their labels, `word_masks` one map per word at the output size;
- the web viewer's data (`viewer_payload`, read by web/maskattn.js): every recorded layer x step bin x word as
  uint8 maps, and for zero-shot gates their groups and each word's leakage.

Drawing the grid is masks/render.py; the node, its temp files and the prompt tracing are nodes/preview.py.
A bad choice raises ViewerInputError with the message the node shows (naming the node, the input and the fix).
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .record import RunRecord, site_map
from .topology import STAGES

MAX_COLUMNS = 24
VIEWER_BUDGET = 4 * 1024 * 1024  # bytes of maps sent to the browser per kind
KINDS = {"gate": "hard", "probability": "probabilities"}  # the Preview node's `show` -> the recorded kind
STOP_WORDS = frozenset("a an the of and or with on in at to by for from is are this that".split())


class ViewerInputError(ValueError):
    """A layer / step / token choice the run cannot serve; the message names the node, the input and the fix."""


# --- parsing the nodes' choices -----------------------------------------------------------------------------------
def select_layers(spec: str, sites, node: str) -> tuple[list, bool]:
    """Parse a layer choice into (sites, mean). spec: "all", "mean", a stage ("high"/"mid"/"low"), "mean:<stage>",
    or a comma list of layer names ("input.7.0, output.1.1"; "input.7" takes every layer of that block)."""
    text = (spec or "all").strip().lower()
    mean = False
    if text == "mean":
        text, mean = "all", True
    elif text.startswith("mean:"):
        text, mean = text[5:].strip() or "all", True
    if text == "all":
        return list(sites), mean
    if text in STAGES:
        chosen = [s for s in sites if s.stage == text]
        if not chosen:
            raise ViewerInputError(f"{node}: layers '{spec}': no recorded layer is in stage '{text}' (recorded "
                                   f"stages: {', '.join(sorted({s.stage for s in sites})) or 'none'}). Use 'all' or "
                                   f"another stage.")
        return chosen, mean
    chosen = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        found = [s for s in sites if s.name == part or s.name.startswith(part + ".")]
        if not found:
            names = ", ".join(s.name for s in sites[:12]) + (" …" if len(sites) > 12 else "")
            raise ViewerInputError(f"{node}: layers '{spec}': there is no layer '{part}' among {names or 'none'}. "
                                   f"Use a name like 'input.7.0', a stage (high, mid, low), 'all' or 'mean'.")
        chosen += [s for s in found if s not in chosen]
    return chosen, mean


def parse_steps(spec: str, node: str) -> set | None:
    """The steps to record: None for "all", else the set of "0, 5, 10-19"."""
    text = (spec or "all").strip().lower()
    if text == "all":
        return None
    steps = set()
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ViewerInputError(f"{node}: steps '{spec}': '{part}' is not a step index or a range. Use 'all' or a "
                                   f"list such as '0, 5, 10-19' (0 is the first step).")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        steps.update(range(min(lo, hi), max(lo, hi) + 1))
    return steps


def parse_step(step: str, bins, node: str) -> str | int:
    """The step bin shown: "mean", "last", or an index into the run's `bins` (negative from the end)."""
    text = (step or "mean").strip().lower()
    if text in ("mean", "last"):
        return text
    try:
        index = int(text)
    except ValueError:
        raise ViewerInputError(f"{node}: step '{step}': use mean, last, or a step index (0 = first, -1 = last).") \
            from None
    if not -len(bins) <= index < len(bins):
        raise ViewerInputError(f"{node}: step {index}: this run kept {len(bins)} step bins "
                               f"({', '.join(b.label for b in bins[:8])}). Use an index below {len(bins)}, or "
                               f"mean / last.")
    return index


def choose_columns(words, tokens_spec: str, tokens_recorded: int, node: str) -> list[tuple[str, list[int]]]:
    """Columns of the grid: the chosen words (all by default) that lie in the recorded context."""
    if not words:  # no prompt text: the first tokens after the start token
        count = min(8, max(tokens_recorded - 1, 1))
        words = [(f"#{i}", [i]) for i in range(1, count + 1)]
    words = [(w, [p for p in pos if p < tokens_recorded]) for w, pos in words]
    words = [(w, pos) for w, pos in words if pos]
    spec = [t.strip().lower() for t in (tokens_spec or "").split(",") if t.strip()]
    if spec:
        chosen = []
        for want in spec:
            found = [(w, pos) for w, pos in words if w.lower() == want or w.lower().strip(".,;:!?") == want]
            if not found:
                raise ViewerInputError(f"{node}: tokens: '{want}' is not a word of the prompt. Words: "
                                       f"{', '.join(w for w, _ in words[:40])}. Leave tokens empty for all of them.")
            chosen += [f for f in found if f not in chosen]
        words = chosen
    seen = {}
    out = []
    for w, pos in words[:MAX_COLUMNS]:
        seen[w] = seen.get(w, 0) + 1
        out.append((w if seen[w] == 1 else f"{w}#{seen[w]}", pos))
    return out


# --- selecting the maps -------------------------------------------------------------------------------------------
def recorded_sites(sites, run: RunRecord) -> list:
    """The sites (topology order) that `run` holds maps of."""
    return [s for s in sites if s.key in run.hw]


def largest_hw(run: RunRecord, sites) -> tuple[int, int]:
    """The (h, w) of the finest recorded level among `sites`: every map is shown at this size."""
    return max((run.hw[s.key] for s in sites), key=lambda t: t[0] * t[1])


def resize(x: torch.Tensor, hw) -> torch.Tensor:
    """[..., h, w] -> [..., H, W] bilinear."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]).float(), size=tuple(hw), mode="bilinear", align_corners=False)
    return y.reshape(*lead, *hw)


def layer_mean(run: RunRecord, keys, step, kind, batch_index, hw):
    maps = [site_map(run, k, step, kind=kind, batch_index=batch_index) for k in keys]
    maps = [resize(m, hw) for m in maps if m is not None]
    return torch.stack(maps).mean(0) if maps else None


def word_maps(tmap: torch.Tensor, columns) -> torch.Tensor:
    """[T, h, w] -> [K, h, w]: the mean over each word's token positions."""
    return torch.stack([tmap[pos].mean(0) for _, pos in columns])


@dataclass
class GridSelection:
    """What the Preview node shows of a run: the chosen layers, step, kind, image of the batch and word columns, and
    the grid's rows (labels and [K, h, w] maps; no rows when the choice was not recorded)."""

    layers: list  # the chosen sites
    step: str | int
    kind: str  # "hard" | "probabilities"
    batch_index: int
    columns: list  # (word, token positions)
    hw: tuple  # the size every map is shown at
    row_labels: list
    row_maps: list

    @property
    def column_labels(self) -> list[str]:
        return [c for c, _ in self.columns]

    @property
    def tiles(self) -> torch.Tensor:
        """[R, K, h, w] in 0..1."""
        return torch.stack(self.row_maps)


def select_grid(run: RunRecord, recorded, words, *, layers: str, step: str, rows: str, tokens: str, show: str,
                batch_index: int, node: str) -> GridSelection:
    """The Preview node's grid from its inputs: `recorded` are the run's sites (`recorded_sites`), `words` the
    prompt's (word, positions); rows "layers" (one per chosen layer, or their mean) or "steps" (every step bin,
    the chosen layers averaged)."""
    chosen, mean = select_layers(layers, recorded, node)
    step_arg = parse_step(step, run.bins, node)
    kind = KINDS.get(show, "probabilities")
    b = min(int(batch_index), max(run.batch - 1, 0))
    columns = choose_columns(words, tokens, run.tokens, node)
    hw = largest_hw(run, recorded)
    if rows == "steps":
        row_labels, row_maps = [], []
        for index, bin_ in enumerate(run.bins):
            m = layer_mean(run, [s.key for s in chosen], index, kind, b, hw)
            if m is not None:
                row_maps.append(word_maps(m, columns))
                row_labels.append(f"{bin_.label} ({'mean' if len(chosen) > 1 else chosen[0].name})")
    elif mean or len(chosen) == 1:
        m = layer_mean(run, [s.key for s in chosen], step_arg, kind, b, hw)
        row_maps = [word_maps(m, columns)] if m is not None else []
        stage = f" ({layers.split(':', 1)[1].strip()})" if ":" in layers else ""
        row_labels = [chosen[0].name if len(chosen) == 1 else f"mean of {len(chosen)} layers{stage}"]
    else:
        row_maps, row_labels = [], []
        for s in chosen:
            m = site_map(run, s.key, step_arg, kind=kind, batch_index=b)
            if m is not None:
                row_maps.append(word_maps(resize(m, hw), columns))
                row_labels.append(s.name)
    return GridSelection(chosen, step_arg, kind, b, columns, hw, row_labels, row_maps)


def word_masks(run: RunRecord, grid: GridSelection, out_hw) -> torch.Tensor:
    """[K, H, W]: each word's map (the chosen layers' mean at the chosen step) at the output size; one empty mask
    when nothing of it was recorded."""
    maps = layer_mean(run, [s.key for s in grid.layers], grid.step, grid.kind, grid.batch_index, grid.hw)
    return resize(word_maps(maps, grid.columns), out_hw) if maps is not None else torch.zeros(1, *out_hw)


def output_size(image, latent, hw) -> tuple[int, int]:
    """(H, W) of the masks: the IMAGE's, else 8x the LATENT's, else 8x the recorded latent size `hw`."""
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return int(image.shape[1]), int(image.shape[2])
    if isinstance(latent, dict) and isinstance(latent.get("samples"), torch.Tensor):
        s = latent["samples"]
        return int(s.shape[-2]) * 8, int(s.shape[-1]) * 8
    return hw[0] * 8, hw[1] * 8


# --- the gate source, as the viewer names and groups it -------------------------------------------------------------
def gate_source_label(gates) -> str:
    """How the viewer names the gates, so training-free (zero-shot) ones are not taken for the learned ones."""
    kind = gates.kind
    if kind == "zero-shot":
        return f"{gates.label} zero-shot gates"
    if kind == "region":
        return f"region gates ({gates.source})" if gates.source else "region gates"
    return f"learned gates ({gates.source})" if gates.source else "learned gates"


def group_positions(gates, tokens_recorded: int) -> list[tuple[str, list[int]]]:
    """(group name, token positions) of zero-shot gates' groups; [] for other gate sources."""
    token_groups = gates.token_groups if gates is not None else None
    grouping = gates.grouping if gates is not None else None
    if not token_groups or grouping is None:
        return []
    out = []
    for g, words in enumerate(grouping.group_words()):
        positions = [p for p, gg in enumerate(token_groups) if gg == g and p < tokens_recorded]
        if positions:
            out.append((" ".join(words), positions))
    return out


def layout_places(gates, tokens_recorded: int) -> list[dict]:
    """Zero-shot gates with a layout from the prompt: each group's place (as `group_positions` lists the groups) as
    {"x": [lo, hi], "y": [lo, hi]} fractions of the image, for the viewer's groups mode; [] without one."""
    layout = gates.layout if gates is not None else None
    if layout is None or not layout.active:
        return []
    out = []
    for g in range(len(gates.grouping.groups)):
        if any(gg == g and p < tokens_recorded for p, gg in enumerate(gates.token_groups)):
            x, y = layout.band_of(g)
            out.append({"x": list(x), "y": list(y)})
    return out


def leakage_report(gates) -> tuple[list[dict], str]:
    """Zero-shot gates: the share of each word's attention inside its group's region, as the payload's `leakage`
    entries and the words added to the node's summary; ([], "") for other gate sources."""
    leakage = gates.leakage() if gates is not None else []
    if not leakage:
        return [], ""
    entries = [{"word": w, "group": g, "inside": round(share, 4)} for w, g, share in leakage]
    return entries, "; attention inside its region: " + ", ".join(f"{w} {100 * share:.0f}%" for w, _, share in leakage)


# --- the web viewer's data ------------------------------------------------------------------------------------------
def first_token(columns, groups) -> int:
    """The column the viewer opens on: the first group's first word (zero-shot gates), else the first word that is
    not an article or a preposition."""
    if groups:
        first = set(groups[0][1])
        for k, (_, pos) in enumerate(columns):
            if first.intersection(pos):
                return k
    for k, (word, _) in enumerate(columns):
        if word.split("#")[0].lower() not in STOP_WORDS:
            return k
    return 0


def viewer_payload(run: RunRecord, recorded, columns, b, base_ui, opacity, gates=None, leakage=None) -> dict:
    """Every recorded layer x step bin x column as uint8 maps, base64, for the browser viewer; with zero-shot
    gates also each group's map (the share of locations that keep the group), from which the viewer draws the
    partition, and `leakage` (`leakage_report`'s entries). `base_ui`: the `ui` entry of the image drawn under the
    maps, or None."""
    hw = largest_hw(run, recorded)
    L, S, K = len(recorded), len(run.bins), len(columns)
    while L * S * K * hw[0] * hw[1] > VIEWER_BUDGET and max(hw) > 8:
        hw = (max(1, math.ceil(hw[0] / 2)), max(1, math.ceil(hw[1] / 2)))
    kinds = {}
    for kind in ("hard", "probabilities"):
        data = torch.zeros(L, S, K, *hw, dtype=torch.uint8)
        present = torch.zeros(L, S, dtype=torch.uint8)
        for li, s in enumerate(recorded):
            for si in range(S):
                m = site_map(run, s.key, si, kind=kind, batch_index=b)
                if m is None:
                    continue
                data[li, si] = (resize(word_maps(m, columns), hw).clamp(0, 1) * 255).round().to(torch.uint8)
                present[li, si] = 1
        kinds[kind] = data
    groups = group_positions(gates, run.tokens)
    group_gate = torch.zeros(L, S, len(groups), *hw, dtype=torch.uint8)
    for li, s in enumerate(recorded):
        for si in range(S):
            m = site_map(run, s.key, si, kind="hard", batch_index=b) if groups else None
            if m is not None:
                maps = torch.stack([m[pos].mean(0) for _, pos in groups])
                group_gate[li, si] = (resize(maps, hw).clamp(0, 1) * 255).round().to(torch.uint8)
    payload = {
        "run": run.run_id,
        "summary": run.summary(),
        "layers": [{"name": s.name, "stage": s.stage, "diffusers": s.diffusers_name} for s in recorded],
        "steps": [{"label": bin_.label, "first": bin_.first, "last": bin_.last,
                   "sigma": [bin_.sigma_max, bin_.sigma_min]} for bin_ in run.bins],
        "tokens": [{"word": w, "positions": pos} for w, pos in columns],
        "h": hw[0], "w": hw[1],
        "present": base64.b64encode(present.numpy().tobytes()).decode("ascii"),
        "gate": base64.b64encode(kinds["hard"].numpy().tobytes()).decode("ascii"),
        "probability": base64.b64encode(kinds["probabilities"].numpy().tobytes()).decode("ascii"),
        "image": base_ui,
        "opacity": opacity,
        "first_token": first_token(columns, groups),
        "groups": [{"name": name, "positions": pos} for name, pos in groups],
        "group_gate": base64.b64encode(group_gate.numpy().tobytes()).decode("ascii"),
    }
    if leakage:  # zero-shot gates: the share of each word's attention inside its group's region
        payload["leakage"] = leakage
    places = layout_places(gates, run.tokens)
    if places:  # zero-shot gates with a layout: each group's place, drawn in the groups mode
        payload["layout"] = places
    return payload
