"""Soak: a long ComfyUI session with the pack, on a real server, checking that it keeps working and loses nothing.

    python benchmarks/soak.py                            # 200 prompts, 4 of them re-run on fresh servers
    python benchmarks/soak.py --prompts 20 --fresh 1     # the reduced version CI runs (tests/test_soak.py)

One server (the tiny random test checkpoint, cli/tiny_pack; a tiny learned gate file) gets the prompts queued back
to back, each right after the previous one finished, cycling through learned, zero-shot, region and no gates with
other prompts, sizes, samplers, gate options and the viewer (Record + Preview Gates) on some. Then, on the same
server:
- interrupts: a gated run is interrupted (POST /interrupt) after its first step and in its middle, each followed by
  a prompt that shares the interrupted one's gates node;
- two models: one zero-shot MASKATTN applied to two models in one prompt, a patched model applied twice with the
  same gates and with other, narrower gates.
Every check compares with a fresh server (nothing run before): a sample of the soak's prompts, the prompts after the
interrupts (image and the viewer's data) and the two-model prompt against each model with its own gates alone. On the
CPU with fixed seeds the latents must be bit-exact, the PNG pixels and the viewer's maps equal.

Prints the server's memory after warm-up and over the last prompts, the time per prompt by kind and every failure;
exits 1 when a check fails or a prompt fails. Memory and times are reported, never asserted (the goal for the memory:
at most 50 MB growth over the last 150 prompts). Two memory figures, read inside the server after every prompt (the
test pack's route, cli/tiny_pack/memory.py):
- resident memory (RSS), what the system sees;
- memory held: RSS less the free blocks glibc's malloc keeps for reuse (mallinfo2), what the process still uses.
  The goal is read on this one. The soak switches the checkpoint every 11th prompt, and each switch builds a new
  model whose weights come from the allocator's heaps: glibc raises its mmap threshold once a large block is freed,
  so later models' tensors no longer come from (and go back to) mmap, and their freed blocks stay in the heaps.
  That part of the RSS growth is free memory, not anything kept: malloc_trim(0) at the end returns it, and the
  report prints the RSS after it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cli import run_example, server  # noqa: E402
from cli.host import find_host  # noqa: E402
from cli.tiny_pack.memory import ROUTE as MEMORY_ROUTE  # noqa: E402

GATE_FILE = "maskattn_soak_tiny.safetensors"
KINDS = ("learned", "zero-shot", "region", "none")
# (prompt, the two phrases region gates place: left half, right half)
TEXTS = (
    ("a photo of a red cube on top of a blue sphere, a yellow cat beside them", "red cube", "blue sphere"),
    ("a green apple and an orange book on a wooden table", "green apple", "orange book"),
    ("a small white dog next to a black car, evening light", "white dog", "black car"),
    ("a purple vase with yellow flowers beside a silver lamp", "purple vase", "silver lamp"),
)
NEGATIVE = "blurry, low quality"
SIZES = (64, 96, 128)
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m")
ZERO_SHOT_OPTIONS = (  # (stage, partition, end_tokens, self_attention)
    ("mid", "aggregate", "keep", "open"),
    ("all", "layer", "keep", "open"),
    ("all", "aggregate", "hide_in_regions", "separate_groups"),
    ("mid", "aggregate", "keep", "separate_groups"),
)


@dataclass(frozen=True)
class Spec:
    """One prompt of the session."""

    tag: str
    kind: str
    text: int = 0  # index into TEXTS
    size: int = 64
    steps: int = 4
    seed: int = 0
    sampler: str = "euler"
    viewer: bool = False
    model_seed: int = 0
    option: int = 0  # zero-shot: ZERO_SHOT_OPTIONS index; region and learned: stage "all" (0) or "mid" (1)


def session_specs(count: int) -> list[Spec]:
    """The soak's prompts: kinds in turn, the rest varied at other periods so the combinations keep changing."""
    return [Spec(tag=f"soak{i:04d}", kind=KINDS[i % 4], text=(i // 4) % len(TEXTS), size=SIZES[(i // 3) % 3],
                 steps=3 + i % 3, seed=1000 + i, sampler=SAMPLERS[(i // 5) % 3], viewer=i % 4 != 3 and i % 3 == 0,
                 model_seed=1 if i % 11 == 10 else 0, option=(i // 4) % (4 if i % 4 == 1 else 2))
            for i in range(count)]


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def add_gates(prompt: dict, spec: Spec, clip: list, prefix: str = "") -> tuple[list | None, list, str]:
    """Adds the spec's gates (and positive conditioning) to `prompt` under ids starting with `prefix`; returns
    (the MASKATTN link or None, the positive CONDITIONING link, Apply MaskAttn's stage)."""
    text, left, right = TEXTS[spec.text]
    if spec.kind == "zero-shot":
        stage, partition, end_tokens, self_attention = ZERO_SHOT_OPTIONS[spec.option]
        prompt[prefix + "gates"] = node("MaskAttnZeroShotGates", text=text, stage=stage, start_percent=0.2, groups="",
                                        partition=partition, end_tokens=end_tokens, self_attention=self_attention,
                                        clip=clip)
        return [prefix + "gates", 0], [prefix + "gates", 2], "all"
    prompt[prefix + "pos"] = node("CLIPTextEncode", text=text, clip=clip)
    stage = ("all", "mid")[spec.option % 2]
    if spec.kind == "learned":
        prompt[prefix + "gates"] = node("MaskAttnLoadGates", gate_name=GATE_FILE)
    elif spec.kind == "region":
        half = spec.size // 2
        prompt[prefix + "blank"] = node("SolidMask", value=0.0, width=spec.size, height=spec.size)
        prompt[prefix + "half"] = node("SolidMask", value=1.0, width=half, height=spec.size)
        for name, x in (("left", 0), ("right", half)):
            prompt[prefix + name] = node("MaskComposite", x=x, y=0, operation="add",
                                         destination=[prefix + "blank", 0], source=[prefix + "half", 0])
        prompt[prefix + "gates"] = node("MaskAttnRegionGates", text=text, phrases=f"{left}\n{right}", stage=stage,
                                        end_tokens="keep", clip=clip, mask_1=[prefix + "left", 0],
                                        mask_2=[prefix + "right", 0])
        stage = "all"
    else:
        return None, [prefix + "pos", 0], stage
    return [prefix + "gates", 0], [prefix + "pos", 0], stage


def apply_node(model: list, maskattn: list, stage: str = "all") -> dict:
    return node("MaskAttnApply", threshold=0.5, strength=1.0, stage=stage, placement="encoder_decoder",
                start_percent=0.0, end_percent=1.0, gate_uncond=True, model=model, maskattn=maskattn)


def add_sampling(prompt: dict, spec: Spec, model: list, positive: list, prefix: str = "", viewer=None) -> None:
    """KSampler -> VAE Decode -> Save Image and Save Latent (named by the spec's tag), and Preview Gates on `viewer`
    (the recorded model) when given."""
    p = prefix
    prompt[p + "neg"] = node("CLIPTextEncode", text=NEGATIVE, clip=["ckpt", 1])
    prompt[p + "latent"] = node("EmptyLatentImage", width=spec.size, height=spec.size, batch_size=1)
    prompt[p + "sampler"] = node("KSampler", seed=spec.seed, steps=spec.steps, cfg=5.0, sampler_name=spec.sampler,
                                 scheduler="normal", denoise=1.0, model=model, positive=positive,
                                 negative=[p + "neg", 0], latent_image=[p + "latent", 0])
    prompt[p + "decode"] = node("VAEDecode", samples=[p + "sampler", 0], vae=["ckpt", 2])
    prompt[p + "image"] = node("SaveImage", filename_prefix=f"soak/{spec.tag}{p}", images=[p + "decode", 0])
    prompt[p + "latents"] = node("SaveLatent", filename_prefix=f"soak_latents/{spec.tag}{p}",
                                 samples=[p + "sampler", 0])
    if viewer is not None:
        prompt[p + "preview"] = node("MaskAttnPreviewGates", layers="mean", step="mean", rows="layers", tokens="",
                                     show="gate", opacity=0.6, batch_index=0, text="", model=viewer,
                                     image=[p + "decode", 0], conditioning=positive)


def build_prompt(spec: Spec) -> dict:
    """The API-format prompt of one spec (node ids are fixed, so ComfyUI's cache keeps what did not change)."""
    prompt = {"ckpt": node("MaskAttnTestTinyCheckpoint", seed=spec.model_seed)}
    maskattn, positive, stage = add_gates(prompt, spec, ["ckpt", 1])
    model, viewer = ["ckpt", 0], None
    if maskattn is not None:
        prompt["apply"] = apply_node(model, maskattn, stage)
        model = ["apply", 0]
        if spec.viewer:
            prompt["record"] = node("MaskAttnRecordGates", layers="all", steps="all", record_uncond=False,
                                    max_side=32, cap_mb=64, model=model)
            model = viewer = ["record", 0]
    add_sampling(prompt, spec, model, positive, viewer=viewer)
    return prompt


def two_model_prompts(tag: str) -> tuple[dict, dict]:
    """(the session's prompt, its reference). The session's: one zero-shot MASKATTN applied to model A and model B,
    and to A twice; A patched by it, then by learned gates at a narrower stage. The reference: every branch with
    gates of its own, applied once (the learned gates alone)."""
    spec = Spec(tag=tag, kind="zero-shot", text=0, size=64, steps=4, seed=77, option=2)  # stage all
    learned = replace(spec, kind="learned", option=1)  # stage mid
    prompts = []
    for separate in (False, True):
        prompt = {"ckpt": node("MaskAttnTestTinyCheckpoint", seed=0),
                  "ckptB": node("MaskAttnTestTinyCheckpoint", seed=1)}
        shared, positive, _ = add_gates(prompt, spec, ["ckpt", 1])

        def own(prefix):  # the reference's gates for one branch
            return add_gates(prompt, spec, ["ckpt", 1], prefix=prefix)[0] if separate else shared

        prompt["applyA"] = apply_node(["ckpt", 0], shared)
        prompt["applyB"] = apply_node(["ckptB", 0], own("B"))
        prompt["applyS"] = apply_node(["ckpt", 0] if separate else ["applyA", 0], own("S"))
        prompt["applyL"] = apply_node(["ckpt", 0] if separate else ["applyA", 0],
                                      add_gates(prompt, learned, ["ckpt", 1], prefix="L")[0], "mid")
        for branch in "ABSL":
            add_sampling(prompt, replace(spec, tag=f"{tag}_{branch}"), ["apply" + branch, 0], positive, prefix=branch)
        prompts.append(prompt)
    return prompts[0], prompts[1]


# --- a server -------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What one prompt gave: its status, seconds, and outputs (latents by node, image pixels by node, viewer data)."""

    ok: bool
    seconds: float
    error: str = ""
    latents: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    viewer: dict = field(default_factory=dict)
    interrupted_after: int | None = None  # steps done before the interrupt, when one was sent


class Server:
    """A ComfyUI server on 127.0.0.1 with this pack, the tiny test checkpoint and the soak's gate file."""

    def __init__(self, host: Path, work: Path, gate_file: Path):
        self.work = work
        self.out = work / "output"
        self.out.mkdir(parents=True)
        (work / "maskattn").mkdir()
        shutil.copy2(gate_file, work / "maskattn" / GATE_FILE)
        port = server.free_port()
        self.base = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        self.proc, self.log = run_example.start_server(host, work, self.out, smoke=True, port=port, cpu=True)
        server.wait_ready(self.base, self.proc, self.log)
        self.start_seconds = time.monotonic() - started

    def memory(self, trim: bool = False) -> dict:
        """The server's {"rss", "allocator_free"} in bytes (allocator_free: None off glibc); trim: return the
        allocator's free pages to the system first."""
        return server.get_json(self.base, MEMORY_ROUTE + ("?trim=1" if trim else ""))

    def stop(self):
        server.stop(self.proc)

    def run(self, prompt: dict, interrupt_at: int | None = None, timeout: float = 600.0) -> Result:
        """Queue `prompt`, wait for it, read its outputs. interrupt_at: POST /interrupt once the sampler has done that
        many steps (0: as soon as it starts)."""
        started = time.monotonic()
        prompt_id, done = asyncio.run(self._follow(prompt, interrupt_at, timeout))
        entry = self._history(prompt_id, timeout)
        seconds = time.monotonic() - started
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        if interrupt_at is not None:
            interrupted = any(kind == "execution_interrupted" for kind, _ in messages)
            return Result(ok=interrupted, seconds=seconds, interrupted_after=done,
                          error="" if interrupted else "the run was not interrupted")
        if status and not status.get("completed", False):
            errors = [data.get("exception_message", kind) for kind, data in messages if kind != "execution_start"
                      and kind != "execution_cached"]
            return Result(ok=False, seconds=seconds, error="; ".join(map(str, errors))[:2000] or str(status))
        result = Result(ok=True, seconds=seconds)
        for node_id, output in entry.get("outputs", {}).items():
            for item in output.get("latents", []):
                result.latents[node_id] = self._latent(item)
            for item in output.get("images", []):
                if item.get("type") == "output":
                    result.images[node_id] = self._pixels(item)
            for item in output.get("maskattn_viewer", []):
                result.viewer[node_id] = self._viewer(item)
        return result

    async def _follow(self, prompt: dict, interrupt_at: int | None, timeout: float) -> tuple[str, int]:
        """Queue the prompt on a websocket of its own; returns (prompt id, sampler steps done when it ended)."""
        import aiohttp  # ComfyUI's own dependency

        client_id = uuid.uuid4().hex
        ws_url = self.base.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        sampler_ids = {k for k, v in prompt.items() if v["class_type"] == "KSampler"}
        done, sent = 0, False
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                async with session.post(self.base + "/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                    answer = await r.json()
                if r.status != 200 or "prompt_id" not in answer:
                    raise RuntimeError(f"ComfyUI refused the prompt: {json.dumps(answer)[:3000]}")
                prompt_id = answer["prompt_id"]
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    msg = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            raise RuntimeError("ComfyUI closed the websocket")
                        continue
                    event = json.loads(msg.data)
                    kind, data = event.get("type"), event.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    if kind == "progress":
                        done = int(data.get("value", 0))
                    started = kind == "executing" and str(data.get("node")) in sampler_ids
                    if interrupt_at is not None and not sent and (
                            (interrupt_at == 0 and started) or (kind == "progress" and done >= interrupt_at)):
                        async with session.post(self.base + "/interrupt") as r:
                            await r.read()
                        sent = True
                    if kind == "executing" and data.get("node") is None:
                        return prompt_id, done
                    if kind in ("execution_error", "execution_interrupted", "execution_success"):
                        return prompt_id, done
        raise RuntimeError(f"the prompt did not finish within {timeout:.0f} s")

    def _history(self, prompt_id: str, timeout: float) -> dict:
        # ComfyUI announces the end of a run before it stores the run's history: wait for the entry
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = server.get_json(self.base, f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:
                return entry
            time.sleep(0.02)
        raise RuntimeError(f"no history for prompt {prompt_id}")

    def _path(self, item: dict) -> Path:
        return self.out / item.get("subfolder", "") / item["filename"]

    def _latent(self, item: dict):
        from safetensors.torch import load_file

        return load_file(str(self._path(item)))["latent_tensor"]

    def _pixels(self, item: dict):
        import numpy as np
        from PIL import Image

        with Image.open(self._path(item)) as img:
            return np.asarray(img.convert("RGB")).copy()

    def _viewer(self, item: dict) -> dict:
        if "filename" not in item:
            return {"message": item.get("message", "")}
        query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.base}/view?{query}", timeout=60) as r:
            payload = json.loads(r.read().decode("utf-8"))
        # what differs between servers by design: the run's number and the temp file names
        payload.pop("run", None)
        payload.pop("image", None)
        payload["summary"] = payload.get("summary", "").split(": ", 1)[-1]
        return payload


def differences(got: Result, want: Result) -> list[str]:
    """What differs between a run and its reference run (empty: the same latents bit for bit, pixels and viewer)."""
    import numpy as np
    import torch

    if not got.ok or not want.ok:
        return [f"failed: {got.error or want.error}"]
    out = []
    for kind, same in (("latents", torch.equal), ("images", np.array_equal), ("viewer", lambda a, b: a == b)):
        mine, theirs = getattr(got, kind), getattr(want, kind)
        if set(mine) != set(theirs):
            out.append(f"{kind}: nodes {sorted(mine)} vs {sorted(theirs)}")
        out += [f"{kind} of node {k} differ" for k in sorted(set(mine) & set(theirs)) if not same(mine[k], theirs[k])]
    return out


# --- the soak --------------------------------------------------------------------------------------------------------
def fresh_sample(specs: list[Spec], count: int) -> list[Spec]:
    """`count` late prompts of the session to re-run on fresh servers: the kinds in turn, the samplers in turn."""
    picked = []
    for k in range(count):
        kind, sampler = KINDS[k % len(KINDS)], SAMPLERS[k % len(SAMPLERS)]
        of_kind = [s for s in specs if s.kind == kind and s not in picked]
        both = [s for s in of_kind if s.sampler == sampler]
        if both or of_kind:
            picked.append((both or of_kind)[-1])
    return picked


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=200, help="prompts queued back to back (default 200)")
    p.add_argument("--window", type=int, default=150,
                   help="the last prompts over which memory growth is measured (default 150; at most 3/4 of them)")
    p.add_argument("--fresh", type=int, default=4, help="soak prompts re-run on fresh servers (default 4)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, the ComfyUI this pack is in, or the test "
                                     "host)")
    return p.parse_args(argv)


def say(text: str):
    print(text, flush=True)


def mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def main(argv=None) -> int:
    args = parse_args(argv)
    host = find_host(args.comfyui)
    if args.prompts < 4:
        raise SystemExit("--prompts: at least 4 (one of each kind)")
    window = max(1, min(args.window, args.prompts * 3 // 4))
    specs = session_specs(args.prompts)
    # one torch thread in the servers (as the tests' servers run): the tiny model gains nothing from more, and
    # threads contending on a busy machine make the times noise
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    failures: list[str] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maskattn_soak_") as tmp:
        tmp = Path(tmp)
        gate_file = tmp / GATE_FILE
        run_example._write_smoke_gates(host, tmp, GATE_FILE)
        servers = itertools.count()

        def fresh() -> Server:
            return Server(host, tmp / f"server{next(servers)}", gate_file)

        soak = fresh()
        say(f"ComfyUI {host} on {soak.base} (CPU), started in {soak.start_seconds:.1f} s; {args.prompts} prompts, "
            f"memory over the last {window}")
        results, memory = {}, []
        try:
            for i, spec in enumerate(specs):
                result = results[spec.tag] = soak.run(build_prompt(spec))
                memory.append(soak.memory())
                if not result.ok:
                    failures.append(f"prompt {spec.tag} ({spec.kind}): {result.error}")
                if (i + 1) % 25 == 0:
                    say(f"  {i + 1} prompts, server RSS {mb(memory[-1]['rss'])}, held {held(memory[-1])}")
            # interrupts, then the prompt after each (sharing the interrupted prompt's gates node)
            victim = Spec(tag="victim", kind="zero-shot", text=1, size=128, steps=12, seed=5, viewer=True, option=2)
            after = replace(victim, tag="after", size=64, steps=4, seed=6)
            interrupts = {}
            for where in (0, 3):
                cut = soak.run(build_prompt(replace(victim, tag=f"victim{where}")), interrupt_at=where)
                if not cut.ok:
                    failures.append(f"interrupt at step {where}: {cut.error}")
                interrupts[where] = (cut, soak.run(build_prompt(replace(after, tag=f"after{where}"))))
            shared_prompt, reference_prompt = two_model_prompts("two")
            shared = soak.run(shared_prompt)
            memory_end = soak.memory()
            trimmed = soak.memory(trim=True)
        finally:
            soak.stop()
        soak_seconds = time.monotonic() - began

        say("checks against fresh servers:")

        def compare(label: str, got: Result, want: Result) -> None:
            found = differences(got, want)
            say(f"  {label}: {'same' if not found else 'DIFFERENT: ' + '; '.join(found)}")
            failures.extend(f"{label}: {d}" for d in found)

        def check(label: str, got: Result, prompt: dict) -> None:
            reference = fresh()
            try:
                compare(label, got, reference.run(prompt))
            finally:
                reference.stop()

        for spec in fresh_sample(specs, args.fresh):
            check(f"prompt {spec.tag} ({spec.kind}{', viewer' if spec.viewer else ''}, {spec.size} px, "
                  f"{spec.sampler})", results[spec.tag], build_prompt(spec))
        reference = fresh()
        try:
            want = reference.run(build_prompt(after))
        finally:
            reference.stop()
        for where, (cut, next_result) in interrupts.items():
            compare(f"the prompt after an interrupt {'as sampling started' if where == 0 else f'after step {where}'} "
                    f"({cut.interrupted_after} steps reported before it stopped): image and viewer", next_result, want)
        check("one MASKATTN on two models (A, B); A patched twice by it (S), then by narrower gates (L)", shared,
              reference_prompt)
        total_seconds = time.monotonic() - began

    report(specs, results, memory, memory_end, trimmed, window, soak_seconds, total_seconds, failures)
    return 1 if failures else 0


def held_bytes(reading: dict) -> int | None:
    """Resident memory less the allocator's free blocks (None where the allocator's figure is not readable)."""
    free = reading.get("allocator_free")
    return None if free is None else reading["rss"] - free


def held(reading: dict) -> str:
    value = held_bytes(reading)
    return "unreadable" if value is None else mb(value)


def checkpoint_builds(specs: list[Spec]) -> int:
    """How many times the session's checkpoint node runs again (its seed changed)."""
    return sum(a.model_seed != b.model_seed for a, b in zip(specs, specs[1:]))


def report(specs, results, memory, memory_end, trimmed, window, soak_seconds, total_seconds, failures) -> None:
    start = len(memory) - window - 1 if len(memory) > window else 0

    def figures(values: list[int]) -> tuple[str, int]:
        warm, last = values[start], values[-window:]
        growth = values[-1] - warm
        return (f"after warm-up ({start + 1} prompts) {mb(warm)}; over the last {window} prompts min {mb(min(last))}, "
                f"max {mb(max(last))}, end {mb(values[-1])}; growth {mb(growth)} (max - warm-up: "
                f"{mb(max(last) - warm)})"), growth

    text, rss_growth = figures([m["rss"] for m in memory])
    say(f"memory, resident (server RSS): {text}")
    if held_bytes(memory[0]) is None:
        say("memory held: unreadable here (needs glibc's mallinfo2); goal: RSS growth at most 50 MB")
    else:
        text, held_growth = figures([held_bytes(m) for m in memory])
        say(f"memory held (RSS less the free blocks glibc's malloc keeps): {text}; goal: at most 50 MB")
        say(f"  the rest of the RSS growth, {mb(rss_growth - held_growth)}, is free blocks the allocator keeps for "
            f"reuse (the checkpoint was built anew {checkpoint_builds(specs[start:])} times in this window)")
    trim = ("malloc_trim(0), which returns the allocator's free pages to the system" if held_bytes(trimmed) is not None
            else "a garbage collection")
    say(f"after the interrupts and the two-model prompt: RSS {mb(memory_end['rss'])}, held {held(memory_end)}; "
        f"after {trim}: RSS {mb(trimmed['rss'])}")
    say("time per prompt (s): kind  count  median  p95  max")
    for kind in KINDS:
        times = sorted(results[s.tag].seconds for s in specs if s.kind == kind)
        if times:
            p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
            say(f"  {kind:9} {len(times):5}  {statistics.median(times):6.3f}  {p95:5.3f}  {times[-1]:5.3f}")
    all_times = [r.seconds for r in results.values()]
    say(f"  all       {len(all_times):5}  {statistics.median(all_times):6.3f}  mean {statistics.mean(all_times):.3f}")
    say(f"wall time: session {soak_seconds:.0f} s, with the fresh-server checks {total_seconds:.0f} s")
    say(f"failures: {len(failures)}")
    for failure in failures:
        say(f"  {failure}")


if __name__ == "__main__":
    sys.exit(main())
