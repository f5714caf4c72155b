"""The command-line trainer: dataset checks, a real run, bit-for-bit resume, and torchrun/DDP with two CPU processes.

Real checkpoints cannot be tiny (ComfyUI's loader only accepts known architectures), so the runs use the hidden
`--model-factory` hook with tests/train_support.py (the tiny SDXL of comfy_host, a stand-in CLIP and VAE); the
loading, caching, training, logging and writing code is the same as for a real checkpoint.
"""

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_maskattn.cli.dataset import DatasetError, scan
from comfyui_maskattn.cli.train import EXIT_DATASET, main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_support import make_dataset  # noqa: E402

FACTORY = f"{REPO / 'tests' / 'train_support.py'}:tiny_components"


def _args(data, out, *extra):
    return [
        "--model-factory",
        FACTORY,
        "--data",
        str(data),
        "--output",
        str(out),
        "--resolution",
        "32",
        "--hidden",
        "8",
        "--lr",
        "1e-3",
        "--no-progress",
        "--cpu",
        *extra,
    ]


def _run(args, timeout=240, torchrun=0):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            f"--nproc_per_node={torchrun}",
            "--master_addr",
            "127.0.0.1",
            f"--master_port={port}",
            "-m",
            "cli.train",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "cli.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# --- bad datasets: a clear report, and nothing starts ---------------------------------------------------------------
def _bad(tmp_path, capsys, data, *extra):
    out = tmp_path / "run"
    code = main(_args(data, out, *extra))
    err = capsys.readouterr().err
    assert code == EXIT_DATASET
    assert not out.exists()  # nothing was started or written
    return err


def test_dataset_without_images(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a caption without an image")
    assert "no images found" in _bad(tmp_path, capsys, tmp_path / "data")


def test_dataset_image_without_caption_and_unreadable_image(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", count=3)
    (data / "img01.txt").unlink()
    (data / "img02.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "img00.txt").write_text("   ")
    err = _bad(tmp_path, capsys, data)
    assert "3 problem(s)" in err
    assert "img01.png: no caption (expected img01.txt next to it)" in err
    assert "img02.png: unreadable image" in err
    assert "img00.txt is empty" in err


def test_dataset_bad_jsonl(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", count=2, layout="jsonl")
    jsonl = data / "metadata.jsonl"
    jsonl.write_text(
        jsonl.read_text()
        + "{not json\n"
        + '{"file_name": "missing.png", "text": "x"}\n'
        + '{"file_name": "img00.png"}\n'
    )
    err = _bad(tmp_path, capsys, data, "--captions", str(jsonl))
    assert (
        "line 3: not JSON" in err and "missing.png not found" in err and "line 5: image img00.png has no caption" in err
    )


def test_good_datasets_scan(tmp_path):
    txt = scan(make_dataset(tmp_path / "a", count=3))
    assert [e.image.name for e in txt] == ["img00.png", "img01.png", "img02.png"] and all(e.caption for e in txt)
    data = make_dataset(tmp_path / "b", count=2, layout="jsonl")
    assert len(scan(data, data / "metadata.jsonl")) == 2
    with pytest.raises(DatasetError, match="not a folder"):
        scan(tmp_path / "nope")


# --- runs -------------------------------------------------------------------------------------------------------------
def test_run_checkpoints_and_resumes_bit_for_bit(tmp_path):
    from comfyui_maskattn.masks.gatefile import load_gates
    from comfyui_maskattn.masks.train import load_state

    data = make_dataset(tmp_path / "data", count=4)
    straight, split = tmp_path / "straight", tmp_path / "split"
    log = _run(_args(data, straight, "--steps", "4", "--save-every", "2", "--batch-size", "2"))
    assert "wrote" in log
    _run(_args(data, split, "--steps", "4", "--save-every", "2", "--batch-size", "2", "--stop-after", "2"))
    assert not (split / "maskattn_gates.safetensors").exists()
    assert load_state(split / "latest.pt")["step"] == 2
    log = _run(_args(data, split, "--steps", "4", "--save-every", "2", "--batch-size", "2", "--resume"))
    assert "resumed at step 2" in log

    a, b = _tensors(straight / "maskattn_gates.safetensors"), _tensors(split / "maskattn_gates.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [list(csv.DictReader(open(p / "loss.csv"))) for p in (straight, split)]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]] and len(rows[0]) == 4
    assert (straight / "checkpoints" / "step_0000002.pt").is_file()
    gates = load_gates(straight / "maskattn_gates.safetensors")  # what the Load node reads
    assert gates.kind == "trained" and gates.hidden_dim == 8 and len(gates.site_heads) == 5
    state = load_state(straight / "latest.pt")
    assert state["step"] == 4 and state["optimizer"]["state"]  # optimizer state travels with the checkpoint


@pytest.mark.parametrize("head", ["reference", "context"])
def test_torchrun_ddp_two_cpu_processes(tmp_path, head):
    data = make_dataset(tmp_path / "data", count=4)
    out = tmp_path / "ddp"
    log = _run(_args(data, out, "--steps", "3", "--save-every", "2", "--head", head), torchrun=2)
    sums = re.findall(r"final gate checksum ([0-9a-f]{16})", log)  # two processes share one stdout
    assert len(sums) == 2 and sums[0] == sums[1], log[-2000:]  # both ranks hold the same gates
    assert "2 process(es)" in log
    assert len(list(csv.DictReader(open(out / "loss.csv")))) == 3
    assert sorted(p.name for p in (out / "cache").iterdir()) == sorted(
        p.name for p in (out / "cache").iterdir() if "of2" in p.name
    )  # each rank cached its own shard
    assert (out / "maskattn_gates.safetensors").is_file() and (out / "checkpoints" / "step_0000002.pt").is_file()
    from comfyui_maskattn.masks.gatefile import load_gates

    assert load_gates(out / "maskattn_gates.safetensors").gate_kind == head


# --- object masks: the dataset format, its checks, and a mask-supervised run ------------------------------------------
def test_good_object_datasets_scan(tmp_path):
    for layout in ("txt", "jsonl"):
        data = make_dataset(tmp_path / layout, count=2, layout=layout, objects=True)
        examples = scan(data, data / "metadata.jsonl" if layout == "jsonl" else None)
        assert [e.image.name for e in examples] == ["img00.png", "img01.png"]  # mask files are not images
        cube, sphere = examples[0].objects
        assert cube.phrase == "red cube" and cube.mask.name == "img00_cube.png" and cube.box is None
        assert sphere.phrase == "blue sphere" and sphere.box == (0.5, 0.0, 1.0, 1.0)


def test_object_dataset_problems_are_all_listed(tmp_path, capsys):
    import json

    from PIL import Image

    data = make_dataset(tmp_path / "data", count=4, objects=True)
    (data / "img00.objects.json").write_text(json.dumps([
        {"phrase": "green cube", "mask": "img00_cube.png"},
        {"phrase": "blue sphere", "box": [0.6, 0.0, 0.4, 1.0]},
        {"phrase": "red cube"},
    ]))
    (data / "img01.objects.json").write_text("[{not json")
    (data / "img02.objects.json").write_text(json.dumps([{"phrase": "red cube", "mask": "nowhere.png"}]))
    Image.new("L", (16, 16), 255).save(data / "img03_cube.png")  # the wrong size
    Image.new("L", (32, 32), 0).save(data / "img02_cube.png")  # still referenced by nothing: an image without caption
    err = _bad(tmp_path, capsys, data)
    assert "green" in err and "not in the caption" in err
    assert "box [0.6, 0.0, 0.4, 1.0] must satisfy" in err
    assert 'give exactly one of "mask"' in err
    assert "img01.objects.json is not JSON" in err
    assert "mask file nowhere.png not found" in err
    assert "img03_cube.png (red cube) is 16x16 but the image is 32x32" in err
    assert "img02_cube.png: no caption" in err
    assert "img01_cube.png: no caption" in err  # its objects file is broken, so nothing names it a mask
    assert "8 problem(s)" in err


def test_empty_mask_and_mask_steps_without_masks(tmp_path, capsys):
    from PIL import Image

    data = make_dataset(tmp_path / "data", count=2, objects=True)
    Image.new("L", (32, 32), 0).save(data / "img01_cube.png")
    assert "img01_cube.png (red cube) is empty" in _bad(tmp_path, capsys, data)
    plain = make_dataset(tmp_path / "plain", count=2)
    out = tmp_path / "run2"
    code = main(_args(plain, out, "--steps", "2", "--mask-steps", "1"))
    assert code == EXIT_DATASET and "--mask-steps needs object masks" in capsys.readouterr().out


def test_a_dataset_with_object_masks_trains_on_them_by_default(host, tmp_path):
    data = make_dataset(tmp_path / "data", count=2, objects=True)
    log = _run(_args(data, tmp_path / "run", "--steps", "2", "--save-every", "0"))
    assert "after 2 mask-supervised steps (background keep)" in log  # --mask-steps -1: every step, masks given
    log = _run(_args(data, tmp_path / "off", "--steps", "2", "--save-every", "0", "--mask-steps", "0"))
    assert "mask-supervised" not in log


def test_mask_supervised_run_then_objective(tmp_path):
    from comfyui_maskattn.masks.gatefile import load_gates
    from comfyui_maskattn.masks.train import load_state

    data = make_dataset(tmp_path / "data", count=4, objects=True)
    out = tmp_path / "run"
    log = _run(_args(data, out, "--steps", "4", "--mask-steps", "2", "--objective", "soft_backward",
                     "--batch-size", "2", "--save-every", "0", "--mask-outside", "close"))
    assert "objective soft_backward after 2 mask-supervised steps (background close)" in log
    state = load_state(out / "latest.pt")
    assert state["config"]["objective"] == "soft_backward" and state["config"]["mask_steps"] == 2
    assert state["config"]["mask_outside"] == "close"
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert len(rows) == 4 and all(float(r["loss"]) >= 0 for r in rows)
    assert load_gates(out / "maskattn_gates.safetensors").kind == "trained"


def test_a_box_under_one_pixel_is_reported_and_still_draws(tmp_path, capsys):
    import json

    from comfyui_maskattn.cli.dataset import Example, ObjectSpec, load_object_mask

    data = make_dataset(tmp_path / "data", count=2, objects=True)
    narrow = [0.5, 0.0, 0.51, 1.0]  # 0.32 px of a 32 px image
    (data / "img01.objects.json").write_text(json.dumps([{"phrase": "red cube", "mask": "img01_cube.png"},
                                                         {"phrase": "blue sphere", "box": narrow}]))
    err = _bad(tmp_path, capsys, data)
    assert "1 problem(s)" in err and "box [0.5, 0.0, 0.51, 1.0] (blue sphere) is 0.32x32 pixels" in err
    # drawing it (a caller that skipped the checks) gives a one-pixel line, not PIL's "x1 must be >= x0"
    plane = load_object_mask(Example(data / "img01.png", "a blue sphere"), ObjectSpec("blue sphere", box=tuple(narrow)),
                             32)
    assert plane.shape == (32, 32) and float(plane.sum()) == 32.0 and float(plane[:, 16].sum()) == 32.0


def test_clip_tokens_use_the_shared_tokenizer_helper_and_build_the_fallback_vocabulary_once(host):
    from comfyui_maskattn.nodes.tokens import clip_tokens, clip_vocab

    from train_support import FakeClip

    clip = FakeClip()
    tokens, vocab = clip_tokens(clip, "a red cube")
    assert vocab is clip.tokenizer.clip_l.inv_vocab and tokens["l"][0][1][2] == 1  # with word ids
    hidden = type("Wrapper", (), {"tokenize": lambda self, text, **kw: clip.tokenize(text, **kw)})()
    # a CLIP wrapper that hides its tokenizer: the host's stock CLIP vocabulary serves, built once
    first, second = clip_tokens(hidden, "a red cube")[1], clip_tokens(hidden, "a blue sphere")[1]
    assert first is second is clip_vocab(hidden, "l") and first[49406] == "<|startoftext|>"
