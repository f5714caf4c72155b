"""The GateSource protocol (masks/source.py) and the cond-row rule (masks/rows.py), without a host: every shipped
gate source implements the protocol, the callers read only what it declares and probe nothing, and which batch rows
are the positive prompt's follows one rule."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

from comfyui_maskattn.masks.gates import MaskAttnGates
from comfyui_maskattn.masks.region import RegionGates
from comfyui_maskattn.masks.rows import PROMPT_ROWS_KEY, RowLayoutError, cond_rows, prompt_rows
from comfyui_maskattn.masks.source import GateSource, kind_of
from comfyui_maskattn.masks.topology import CrossAttnSite
from comfyui_maskattn.masks.prompt import group_prompt
from comfyui_maskattn.masks.source import PromptGateSource
from comfyui_maskattn.masks.zeroshot import ZeroShotGates

PACK = Path(__file__).resolve().parent.parent
SHIPPED = (MaskAttnGates, ZeroShotGates, RegionGates)
SITES = [CrossAttnSite("input", 7, i, 48, 40, 4, 2, 0, -1, "mid") for i in range(2)]
# The modules that are handed a gate source without knowing which kind (Apply MaskAttn, the hooks, the runtime, the
# recorder and the viewer). Nodes made for one kind (Save: learned; Zero-Shot Masks) check that kind with isinstance.
CALLERS = ("nodes/gates.py", "nodes/hooks.py", "nodes/gate_patch.py", "nodes/containers.py", "nodes/preview.py",
           "masks/viewer.py", "masks/runtime.py", "masks/record.py")


def declared() -> set[str]:
    return {n for n in dir(GateSource) if not n.startswith("__")} | set(GateSource.__annotations__)


def shipped_sources() -> list[GateSource]:
    zero_shot = group_prompt("a red book and a yellow vase")
    token_groups = [-1, 0, 0, -1, 1, 1, -1]
    left, right = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    left[..., :4], right[..., 4:] = 1, 1
    return [
        MaskAttnGates.fresh(SITES, hidden_dim=8, seed=0, kind="test_only"),
        ZeroShotGates(zero_shot, token_groups),
        RegionGates(["red book", "yellow vase"], token_groups, ["start"] + ["text"] * 5 + ["end"], [left, right]),
    ]


@pytest.mark.parametrize("cls", SHIPPED, ids=lambda c: c.__name__)
def test_every_shipped_source_is_a_gate_source_implementing_its_family(cls):
    assert issubclass(cls, GateSource) and not inspect.isabstract(cls)
    if cls.needs_attention:  # keep-probabilities from the layer's own queries and keys
        assert cls.attention_probabilities is not GateSource.attention_probabilities
    else:  # learned heads: the runtime runs heads_on(device)[site_heads[key]]
        assert cls.heads_on is not GateSource.heads_on
        assert "site_heads" in {f.name for f in dataclasses.fields(cls)}
    assert issubclass(ZeroShotGates, PromptGateSource) and issubclass(RegionGates, PromptGateSource)


def test_every_declared_member_reads_plainly_on_every_shipped_source():
    for gates in shipped_sources():
        gates.check_fits(SITES)
        assert gates.covers(SITES[0].key)
        for name in declared() - {"site_heads"}:
            getattr(gates, name)  # (raises if a source lost a member the protocol promises)
        assert isinstance(gates.kind, str) and gates.kind and isinstance(gates.source, str)
        assert isinstance(gates.start_percent, float) and 0.0 <= gates.start_percent < 1.0
        for flag in ("needs_attention", "observes_inactive", "masks_self_attention", "keeps_a_token_per_row"):
            assert isinstance(getattr(gates, flag), bool)
        assert gates.leakage() == [] and gates.region_masks(16, 16) is None  # no run seen yet
        assert isinstance(gates.describe(), str) and gates.describe()
        q = torch.randn(2, 64, 8)
        assert gates.self_attention_bias(SITES[0].key, q, 2, {}, -1e4) is None  # "open" self-attention everywhere
        if gates.needs_attention:
            k = torch.randn(2, 7, 8)
            p = gates.attention_probabilities(SITES[0].key, q, k, 2, {"cond_or_uncond": [1, 0]})
            assert p.shape == (2, 64, 7) and torch.equal(p[0], torch.ones(64, 7))  # the uncond row is never gated
        else:
            assert gates.site_heads[SITES[0].key] < len(gates.heads_on("cpu"))
    learned, zero_shot, region = shipped_sources()
    assert (learned.needs_attention, zero_shot.needs_attention, region.needs_attention) == (False, True, True)
    # (the default partition aggregates, so it watches the steps before its start; v1 only while read)
    assert zero_shot.partition == "aggregate" and zero_shot.observes_inactive is zero_shot.keeps_aggregate is True
    assert zero_shot.start_percent == 0.2 and zero_shot.token_groups and zero_shot.keeps_a_token_per_row
    assert region.token_groups is None and learned.grouping is None


def test_a_source_without_its_family_method_says_what_is_missing():
    class Covers(GateSource):
        needs_attention = True

        def check_fits(self, sites, model_name="this model"):
            pass

        def covers(self, key):
            return True

    with pytest.raises(NotImplementedError, match="needs_attention but has no attention_probabilities"):
        Covers().attention_probabilities(SITES[0].key, torch.zeros(1, 4, 8), torch.zeros(1, 3, 8), 2, {})
    with pytest.raises(TypeError):  # check_fits and covers are required
        type("Nothing", (GateSource,), {})()
    assert kind_of(Covers()) == "gate source" and kind_of(object()) == "object"
    assert Covers().describe() == "gate source gates"


@pytest.mark.parametrize("path", CALLERS)
def test_callers_read_only_declared_members_and_probe_nothing(path):
    text = (PACK / path).read_text(encoding="utf-8")
    probes = re.findall(r"getattr\(\s*(?:[\w.]*\.)?(?:gates|maskattn)\b[^)]*\)", text)
    assert probes == [], f"{path} probes a gate source; declare the member on GateSource instead"
    read = set(re.findall(r"(?<![/\w])(?:gates|maskattn)\.(\w+)", text))
    assert read <= declared(), f"{path} reads {sorted(read - declared())}, which GateSource does not declare"


# --- which rows are the positive prompt's ---------------------------------------------------------------------------
def test_cond_rows_follow_the_sampler_chunks():
    assert cond_rows([1, 0], 4) == (False, False, True, True)  # two images: each chunk one row per image
    assert cond_rows([0, 1], 2) == (True, False)
    assert cond_rows(None, 3) == cond_rows([], 3) == (True, True, True)  # outside a sampler: every row positive
    assert cond_rows([1], 2) == (False, False)  # an uncond-only call
    assert cond_rows([1, 0, 0], 6) == (False, False, True, True, True, True)  # area conds: several cond chunks
    with pytest.raises(RowLayoutError, match="7 rows, which do not split into the sampler's 2 chunks"):
        cond_rows([1, 0], 7)


def test_prompt_rows_are_the_cond_rows_as_indices_unless_the_host_named_them():
    assert torch.equal(prompt_rows({"cond_or_uncond": [1, 0]}, 4, "cpu"), torch.tensor([2, 3]))
    assert prompt_rows({"cond_or_uncond": [1, 0]}, 4, "cpu") is prompt_rows({"cond_or_uncond": [1, 0]}, 4, "cpu")
    assert prompt_rows({}, 3, "cpu") is None and prompt_rows(None, 3, "cpu") is None  # every row is the prompt's
    assert prompt_rows({"cond_or_uncond": [0, 0]}, 2, "cpu") is None
    assert prompt_rows({"cond_or_uncond": [1]}, 2, "cpu") == []
    assert torch.equal(prompt_rows({"cond_or_uncond": [1, 0, 0]}, 3, "cpu"), torch.tensor([1, 2]))
    with pytest.raises(RowLayoutError):
        prompt_rows({"cond_or_uncond": [1, 0]}, 7, "cpu")
    # rows the host adapter found by text win, also for a batch that splits into no chunks
    named = torch.tensor([2, 5])
    assert prompt_rows({"cond_or_uncond": [1, 0], PROMPT_ROWS_KEY: named}, 7, "cpu") is named
    assert prompt_rows({PROMPT_ROWS_KEY: torch.tensor([], dtype=torch.long)}, 4, "cpu") == []
