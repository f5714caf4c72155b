"""MaskAttn under torch.compile, applied the way ComfyUI's TorchCompileModel node applies it (issue 5: compile
friendliness without breaking anything): the compiled patched model samples bit for bit like the eager one, and the
sync-free path (the device_skip executor) adds no graph break of its own.

backend="eager" runs TorchDynamo's tracing, guards and graph breaks without generating code, so this needs no C++
compiler; inductor's code generation is torch's business, not this pack's.
"""

import pytest
import torch

from test_apply_host import apply, make_gates

pytestmark = pytest.mark.usefixtures("host")

# What a host sync or a data-dependent shape inside the gate makes Dynamo say when it breaks the graph there.
SYNC_BREAKS = ("item()", "nonzero", "data-dependent", "dynamic shape", "__bool__")


def compiled(model):
    """A clone whose diffusion model runs through torch.compile(backend="eager") at sampling time."""
    m = model.clone()
    try:
        from comfy_api.torch_helpers import set_torch_compile_wrapper  # what TorchCompileModel calls
    except ImportError:  # hosts from before TorchCompileModel: the same by hand, as older compile nodes did
        m.add_object_patch("diffusion_model", torch.compile(m.model.diffusion_model, backend="eager"))
    else:
        set_torch_compile_wrapper(m, backend="eager")
    return m


@pytest.fixture
def dynamo():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("device_skip", [False, True])
def test_compiled_patched_model_samples_bit_identical_and_sync_free_adds_no_graph_break(host, dynamo, device_skip):
    import comfy_host
    from comfyui_maskattn.masks.runtime import EagerExecutor
    from comfyui_maskattn.nodes import gates as gate_nodes
    from comfyui_maskattn.nodes import hooks

    model = host.tiny_sdxl(seed=0)
    pos, neg = host.make_cond(model, seed=1), host.make_cond(model, seed=2)
    patched = apply((gate_nodes, hooks), model, make_gates(model, mode="random"))
    hooks.installed_runtime(patched).executor = EagerExecutor(device_skip)

    def sample(m):
        return comfy_host.ksample(m, pos, neg, steps=2, width=64, height=64)

    eager = sample(patched)
    assert not torch.equal(eager, sample(model))  # the gates act
    assert torch.equal(sample(compiled(patched)), eager)
    assert dynamo["stats"]["unique_graphs"] > 0  # Dynamo did trace the model
    breaks = " | ".join(dynamo["graph_break"]).lower()
    if device_skip:
        assert not [word for word in SYNC_BREAKS if word.lower() in breaks], breaks
    else:  # the default's one host sync per gated layer is where its graph breaks (the reason device_skip exists)
        assert "item()" in breaks
