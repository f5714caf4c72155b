"""Training data for `python -m cli.train`: a folder of images with captions, checked before anything starts.

Two layouts:
- image + same-name caption file: `cat.png` with `cat.txt` next to it (sub-folders are searched too);
- a captions JSONL (`--captions file.jsonl`): one JSON object per line with the image path (`file_name`, `image`,
  `file` or `path`; relative to the dataset folder) and its caption (`text`, `caption` or `prompt`), as Hugging
  Face's `metadata.jsonl` has it.

`scan()` reads every caption and opens every image once; any problem (no images, an image without caption, an
unreadable file, an empty caption, a JSONL line that is not JSON) ends in one DatasetError listing all of them, so
a run never starts half-broken.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_IMAGE_KEYS = ("file_name", "image", "file", "path")
_CAPTION_KEYS = ("text", "caption", "prompt")
MAX_LISTED = 25


class DatasetError(ValueError):
    """The dataset cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def _report(folder: Path, problems: list[str]) -> DatasetError:
    shown = problems[:MAX_LISTED]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return DatasetError(
        f"dataset {folder}: {len(problems)} problem(s), nothing was started:\n  " + "\n  ".join(shown) + more
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _read_caption(path: Path, problems: list[str], where: str) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        problems.append(f"{where}: caption file {path.name} is not UTF-8 text")
        return None
    except OSError as e:
        problems.append(f"{where}: caption file {path.name} cannot be read ({e.strerror or e})")
        return None
    if not text:
        problems.append(f"{where}: caption file {path.name} is empty")
        return None
    return text


def _check_image(path: Path, problems: list[str], where: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() does not decode pixels; a truncated file fails here
            im.load()
    except Exception as e:  # PIL raises many types for broken files
        problems.append(f"{where}: unreadable image ({type(e).__name__}: {str(e)[:120]})")


def scan(folder, captions: str | Path | None = None, *, check_images: bool = True) -> list[Example]:
    """Every (image, caption) pair of the dataset, in a stable order; raises DatasetError listing every problem."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"dataset {folder}: not a folder")
    problems: list[str] = []
    examples: list[Example] = []
    if captions is not None:
        captions = Path(captions).expanduser()
        if not captions.is_file():
            raise DatasetError(f"captions file {captions} does not exist")
        try:
            lines = captions.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"captions file {captions} cannot be read: {e}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{captions.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{where}: expected a JSON object")
                continue
            image = next((record[k] for k in _IMAGE_KEYS if isinstance(record.get(k), str)), None)
            text = next((record[k] for k in _CAPTION_KEYS if isinstance(record.get(k), str)), None)
            if image is None:
                problems.append(f"{where}: no image path (one of {', '.join(_IMAGE_KEYS)})")
                continue
            path = (folder / image) if not Path(image).is_absolute() else Path(image)
            if not path.is_file():
                problems.append(f"{where}: image {image} not found in {folder}")
                continue
            if text is None or not text.strip():
                problems.append(f"{where}: image {image} has no caption (one of {', '.join(_CAPTION_KEYS)})")
                continue
            examples.append(Example(path, text.strip()))
        if not examples and not problems:
            problems.append(f"{captions.name}: no records")
    else:
        images = _images_in(folder)
        if not images:
            raise DatasetError(
                f"dataset {folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, sub-folders included)"
            )
        for image in images:
            rel = image.relative_to(folder)
            caption_file = image.with_suffix(".txt")
            if not caption_file.is_file():
                problems.append(f"{rel}: no caption (expected {caption_file.name} next to it)")
                continue
            text = _read_caption(caption_file, problems, str(rel))
            if text is not None:
                examples.append(Example(image, text))
    if check_images:
        for ex in examples:
            _check_image(
                ex.image, problems, str(ex.image.relative_to(folder) if ex.image.is_relative_to(folder) else ex.image)
            )
    if problems:
        raise _report(folder, problems)
    if not examples:
        raise DatasetError(f"dataset {folder}: no usable examples")
    return examples


def fingerprint(examples: list[Example], *parts) -> str:
    """A short hash of the examples (paths, sizes, mtimes, captions) and settings, to key caches."""
    h = hashlib.sha256()
    for ex in examples:
        st = ex.image.stat()
        h.update(f"{ex.image}\0{st.st_size}\0{st.st_mtime_ns}\0{ex.caption}\n".encode())
    for p in parts:
        h.update(f"{p}\n".encode())
    return h.hexdigest()[:16]


def load_image(path: Path, resolution: int):
    """Image -> ComfyUI IMAGE [1, R, R, 3] in 0..1: shorter side resized to R, then centre-cropped."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode == "I":
            im = im.point(lambda v: v * (1 / 255))
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]
