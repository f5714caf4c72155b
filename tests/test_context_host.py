"""Context gates (masks/context.py) inside a real ComfyUI: Apply MaskAttn samples with them in every precision, the
viewer nodes record them, every executor gives the same latents, a fresh context head gives the reference head's
bits, and the trainer trains them (head = context) with a bit-for-bit resume and refuses the wrong head by name."""

import pytest
import torch

pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture(scope="module")
def pack(host):
    from comfyui_maskattn.nodes import gates as gate_nodes
    from comfyui_maskattn.nodes import hooks

    return gate_nodes, hooks


@pytest.fixture(scope="module")
def sdxl(host):
    return host.tiny_sdxl(seed=0)


def _sites(model, stage="all"):
    from comfyui_maskattn.masks.topology import select_sites
    from comfyui_maskattn.nodes.hooks import model_sites

    return select_sites(model_sites(model), stage, "encoder_decoder")


def _randomise(gates, seed, context_scale=1.0):
    """Random reference weights (about half the pairs suppressed); the context term scaled by `context_scale`
    (0: a fresh context head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in gates.heads:
            for name, p in head.named_parameters():
                if name.startswith("context_net"):
                    continue  # (the reference weights draw the same numbers for both kinds)
                if name == "logit_bias":
                    p.zero_()
                elif p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if hasattr(head, "context_net"):
                head.context_net[2].weight.mul_(0).add_(context_scale)
    return gates


def context_gates(model, seed=0, context_scale=1.0):
    from comfyui_maskattn.masks.context import ContextGates

    gates = ContextGates.fresh(_sites(model), hidden_dim=16, seed=seed, stage="all")
    return _randomise(gates, seed, context_scale)


def reference_gates(model, seed=0):
    from comfyui_maskattn.masks.gates import MaskAttnGates

    return _randomise(MaskAttnGates.fresh(_sites(model), hidden_dim=16, seed=seed, stage="all"), seed)


def apply(pack, model, gates, **kw):
    gate_nodes, _ = pack
    args = dict(threshold=0.5, strength=1.0, stage="all", placement="encoder_decoder", start_percent=0.0,
                end_percent=1.0)
    args.update(kw)
    return gate_nodes.MaskAttnApply().apply(model, gates, **args)[0]


def conds(host, model, tokens=77, seed=0):
    return host.make_cond(model, tokens=tokens, seed=seed), host.make_cond(model, tokens=tokens, seed=seed + 1)


# --- sampling -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_context_gates_sample_finite_in_every_precision(host, pack, dtype):
    model = host.tiny_sdxl(seed=2, dtype=dtype)
    pos, neg = conds(host, model)
    gates = context_gates(model)
    out = host.ksample(apply(pack, model, gates), pos, neg, steps=3)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    if dtype == torch.float32:  # the context term acts: the same heads without it sample otherwise
        fresh = context_gates(model, context_scale=0.0)
        assert not torch.equal(host.ksample(apply(pack, model, fresh), pos, neg, steps=3), out)


def test_a_fresh_context_head_samples_the_reference_heads_bits(host, pack, sdxl):
    pos, neg = conds(host, sdxl)
    for gate_uncond in (True, False):
        ref = host.ksample(apply(pack, sdxl, reference_gates(sdxl), gate_uncond=gate_uncond), pos, neg, steps=3)
        ctx = host.ksample(apply(pack, sdxl, context_gates(sdxl, context_scale=0.0), gate_uncond=gate_uncond),
                           pos, neg, steps=3)
        assert torch.equal(ref, ctx) and not torch.equal(ref, host.ksample(sdxl, pos, neg, steps=3))


def test_every_executor_samples_the_same_latents(host, pack, sdxl):
    from comfyui_maskattn.masks.runtime import EXECUTORS

    pos, neg = conds(host, sdxl)
    gates = context_gates(sdxl)
    outs = []
    for make in EXECUTORS.values():
        patched = apply(pack, sdxl, gates)
        pack[1].installed_runtime(patched).executor = make()
        outs.append(host.ksample(patched, pos, neg, steps=3))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_each_run_starts_afresh_and_a_late_start_still_feeds_the_aggregate(host, pack, sdxl):
    pos, neg = conds(host, sdxl)
    gates = context_gates(sdxl)
    patched = apply(pack, sdxl, gates)
    first = host.ksample(patched, pos, neg, steps=3)
    assert torch.equal(host.ksample(patched, pos, neg, steps=3), first)  # no aggregate leaks from the last run
    late = apply(pack, sdxl, gates, start_percent=0.5)
    from comfyui_maskattn.masks.run_state import RUN_STATE_KEY

    run = late.model_options["transformer_options"][RUN_STATE_KEY]
    host.ksample(late, pos, neg, steps=3)
    assert run.state.steps >= 1  # the ungated steps were observed


def test_record_and_preview_show_context_gates(host, pack, sdxl):
    from comfyui_maskattn.nodes.preview import MaskAttnPreviewGates, MaskAttnRecordGates

    pos, neg = conds(host, sdxl)
    gates = context_gates(sdxl)
    (recorded,) = MaskAttnRecordGates().record(apply(pack, sdxl, gates), "all", "all", False, 8, 64)
    latent = host.ksample(recorded, pos, neg, steps=2)
    out = MaskAttnPreviewGates().preview(recorded, "mean", "mean", "layers", "", "gate", 0.6, 0,
                                         latent={"samples": latent})
    image = out["result"][0]
    assert image.ndim == 4 and torch.isfinite(image).all()
    assert out["ui"]["text"][0].startswith("learned gates, run 1: ") and " 2 steps" in out["ui"]["text"][0]


# --- training -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(host):
    return host.tiny_sdxl(seed=0, transformer_depth=(0, 1, 1))


def _examples(host, model, n=4, px=32, tokens=8):
    from comfyui_maskattn.nodes.training_examples import prepare_examples

    gen = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(n, 4, px // 8, px // 8, generator=gen)}
    cond = []
    for i in range(n):
        cond += host.make_cond(model, tokens=tokens, seed=i)
    return prepare_examples(model, latent, cond)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_context_training_resumes_bit_for_bit(host, small, checkpointing):
    from comfyui_maskattn.masks.train import TrainConfig
    from comfyui_maskattn.nodes import gate_training as T

    examples = _examples(host, small)
    config = TrainConfig(steps=4, batch_size=2, lr=1e-2, seed=4, objective="soft_backward", head="context")

    def fresh(seed=0, bias=0.5):
        return T.new_gates(small, "all", "encoder_decoder", 8, seed, bias, head="context")

    def run(gates, state=None, stop_after=0):
        saved = {}
        result = T.train(small, examples, gates, config, resume=state, stop_after=stop_after,
                         gradient_checkpointing=checkpointing,
                         on_end=lambda trainer, complete: saved.update(state=trainer.state_dict()))
        return saved["state"], result.history

    straight = fresh()
    _, history = run(straight)
    assert all(torch.isfinite(torch.tensor(history)))
    assert any(h.context_net[2].weight.abs().sum() > 0 for h in straight.heads)  # the context term trained
    split = fresh()
    state, _ = run(split, stop_after=2)
    other = fresh(5, -1.0)
    _, resumed = run(other, state=state)
    assert resumed == history
    for a, b in zip(straight.heads.state_dict().values(), other.heads.state_dict().values()):
        assert torch.equal(a, b)


def test_the_wrong_head_is_refused_by_name(host, small):
    from comfyui_maskattn.masks.train import TrainConfig
    from comfyui_maskattn.nodes import gate_training as T
    from comfyui_maskattn.nodes.training_examples import TrainingInputError

    ctx = T.new_gates(small, "all", "encoder_decoder", 8, 0, 0.5, head="context")
    ctx.source = "ctx.safetensors"
    ref = T.new_gates(small, "all", "encoder_decoder", 8, 0, 0.5)
    ref.source = "ref.safetensors"
    with pytest.raises(TrainingInputError, match="ctx.safetensors holds context gates; train with head = context"):
        T.start_gates(small, ctx, head="reference")
    with pytest.raises(TrainingInputError, match="ref.safetensors holds reference gates; train with head = reference"):
        T.start_gates(small, ref, head="context")
    assert type(T.start_gates(small, ctx, head="context")) is type(ctx)
    with pytest.raises(TrainingInputError, match="train with head = reference"):
        T.train(small, _examples(host, small), ref, TrainConfig(steps=1, head="context"))
    with pytest.raises(ValueError, match="checkpoint 'reference', now 'context'"):
        config = TrainConfig(steps=1, seed=1, head="reference")
        saved = {}
        T.train(small, _examples(host, small), ref, config,
                on_end=lambda trainer, complete: saved.update(state=trainer.state_dict()))
        T.train(small, _examples(host, small), ctx, TrainConfig(steps=1, seed=1, head="context"),
                resume=saved["state"])


def test_the_command_line_refuses_an_init_file_of_the_other_head(host, small, tmp_path, capsys):
    import sys
    from pathlib import Path

    from comfyui_maskattn.cli.train import EXIT_USAGE, main
    from comfyui_maskattn.masks.gatefile import save_gates
    from comfyui_maskattn.nodes import gate_training as T

    tests = Path(__file__).resolve().parent
    sys.path.insert(0, str(tests))
    from train_support import make_dataset

    gates = T.new_gates(small, "all", "encoder_decoder", 8, 0, 0.5, head="context")
    init = save_gates(gates, tmp_path / "ctx.safetensors")
    data = make_dataset(tmp_path / "data", count=2)
    code = main(["--model-factory", f"{tests / 'train_support.py'}:tiny_components", "--data", str(data), "--output",
                 str(tmp_path / "run"), "--resolution", "32", "--hidden", "8", "--steps", "1", "--no-progress", "--cpu",
                 "--init", str(init)])
    assert code == EXIT_USAGE
    assert "ctx.safetensors holds context gates; train with head = context" in capsys.readouterr().out
