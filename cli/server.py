"""A ComfyUI server on 127.0.0.1 with this pack: used by the headless example and by the test suite."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .host import TORCHVISION_SHIM_DIR

# Not carried into a runnable copy: the vendored test host's own extra_model_paths.yaml stops main.py, and the
# user-data folders start empty.
SKIP_IN_COPY = {"extra_model_paths.yaml", "custom_nodes", "input", "output", "temp", "user", "__pycache__", ".git",
                ".github", "tests", "tests-ui", "tests-unit"}
_torchvision_ok: bool | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runnable_copy(host: Path, dest: Path) -> Path:
    """A stand-in of the host tree: root .py files copied, everything else linked, fresh user-data folders.

    Root .py files are copied because ComfyUI finds its base folder (models, custom_nodes, temp,
    extra_model_paths.yaml) from the real path of folder_paths.py / main.py.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for entry in Path(host).iterdir():
        if entry.name in SKIP_IN_COPY:
            continue
        target = dest / entry.name
        if entry.is_dir():
            target.symlink_to(entry, target_is_directory=True)
        elif entry.suffix == ".py":
            shutil.copy2(entry, target)
        else:
            target.symlink_to(entry)
    for name in ("custom_nodes", "input", "output", "temp", "user"):
        (dest / name).mkdir(exist_ok=True)
    return dest


def server_env(**extra: str) -> dict:
    """The environment for a ComfyUI subprocess; the torchvision stand-in when the real one cannot load."""
    global _torchvision_ok
    if _torchvision_ok is None:
        check = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
        _torchvision_ok = check.returncode == 0
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop("COMFYUI_PATH", None)
    if not _torchvision_ok and TORCHVISION_SHIM_DIR.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TORCHVISION_SHIM_DIR), env.get("PYTHONPATH")]))
    return env


def launch(root: Path, port: int, out_dir: Path, log_path: Path, *, cpu: bool = True, extra_args=(), env=None):
    """Start `main.py` of `root` on 127.0.0.1:port; output goes to log_path. Returns the process."""
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--output-directory", str(out_dir), *(["--cpu"] if cpu else []), *extra_args]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=root, env=env or server_env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def get_json(base: str, path: str, data=None, timeout=30.0):
    """GET (or POST `data` as JSON) on a loopback server and decode the JSON answer."""
    if not base.startswith(("http://127.", "http://localhost")):
        raise ValueError("loopback servers only")
    request = urllib.request.Request(base + path, data=json.dumps(data).encode() if data is not None else None,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


def log_tail(path, chars=6000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_ready(base: str, proc, log_path: Path, timeout=300.0) -> dict:
    """Wait until /object_info answers and return it; stop the server and raise with the log's tail otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {proc.returncode} during start:\n{log_tail(log_path)}")
        try:
            return get_json(base, "/object_info", timeout=10)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, json.JSONDecodeError):
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"ComfyUI did not answer /object_info within {timeout:.0f} s:\n{log_tail(log_path)}")


def stop(proc, grace=20.0) -> None:
    """Terminate, then kill after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)
