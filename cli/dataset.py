"""Training data for `python -m cli.train`: a folder of images with captions, checked before anything starts.

Two layouts:
- image + same-name caption file: `cat.png` with `cat.txt` next to it (sub-folders are searched too);
- a captions JSONL (`--captions file.jsonl`): one JSON object per line with the image path (`file_name`, `image`,
  `file` or `path`; relative to the dataset folder) and its caption (`text`, `caption` or `prompt`), as Hugging
  Face's `metadata.jsonl` has it.

Object masks (optional, for mask-supervised training: `--mask-steps`): per image, the objects its caption names and
where each one is, as a mask image or a box:
- next to `cat.png`, a file `cat.objects.json`: `[{"phrase": "red cube", "mask": "cat_cube.png"},
  {"phrase": "blue ball", "box": [0.5, 0.1, 0.9, 0.6]}]` (or `{"objects": [...]}`);
- in a captions JSONL, the same list under `"objects"` in the image's record.
`phrase`: words of the caption that name the object (its colour, its noun, ...). `mask`: an image file (path
relative to the dataset folder; white = the object, any mode; the same size as the image, since it is resized and
centre-cropped with it). `box`: [left, top, right, bottom] as fractions 0..1 of the image. At most 16 objects.

`scan()` reads every caption and object file and opens every image and mask once; any problem (no images, an image
without caption, an unreadable file, an empty caption, a JSONL line that is not JSON, an object whose phrase is not in
the caption, a missing, empty or wrongly sized mask, a bad box) ends in one DatasetError listing all of them, so a
run never starts half-broken.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_IMAGE_KEYS = ("file_name", "image", "file", "path")
_CAPTION_KEYS = ("text", "caption", "prompt")
OBJECTS_SUFFIX = ".objects.json"
MAX_OBJECTS = 16
MAX_LISTED = 25


class DatasetError(ValueError):
    """The dataset cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object of an image: the caption words naming it, and a mask file or a box (fractions of the image)."""

    phrase: str
    mask: Path | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    objects: tuple[ObjectSpec, ...] = ()


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


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def _parse_objects(raw, folder: Path, caption: str, problems: list[str], where: str) -> tuple[ObjectSpec, ...]:
    """Objects of one image from their JSON form; every problem is appended to `problems`."""
    if isinstance(raw, dict) and "objects" in raw:
        raw = raw["objects"]
    if not isinstance(raw, list):
        problems.append(f"{where}: objects must be a list of {{\"phrase\": ..., \"mask\" or \"box\": ...}}")
        return ()
    if len(raw) > MAX_OBJECTS:
        problems.append(f"{where}: {len(raw)} objects; at most {MAX_OBJECTS}")
        return ()
    caption_words = set(_words(caption))
    out = []
    for k, obj in enumerate(raw, 1):
        here = f"{where}: object {k}"
        if not isinstance(obj, dict):
            problems.append(f"{here}: expected a JSON object")
            continue
        phrase = obj.get("phrase")
        if not isinstance(phrase, str) or not _words(phrase):
            problems.append(f"{here}: no phrase (the caption words that name the object)")
            continue
        absent = [w for w in _words(phrase) if w not in caption_words]
        if absent:
            problems.append(f"{here}: phrase {phrase!r} has word(s) {absent} that are not in the caption")
            continue
        has_mask, has_box = "mask" in obj, "box" in obj
        if has_mask == has_box:
            problems.append(f"{here} ({phrase}): give exactly one of \"mask\" (an image file) or \"box\"")
            continue
        if has_box:
            box = obj["box"]
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                problems.append(f"{here} ({phrase}): box must be [left, top, right, bottom] (fractions 0..1)")
                continue
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
                problems.append(f"{here} ({phrase}): box {box} must satisfy 0 <= left < right <= 1 and "
                                f"0 <= top < bottom <= 1 (fractions of the image)")
                continue
            out.append(ObjectSpec(phrase.strip(), box=(x0, y0, x1, y1)))
            continue
        mask = obj["mask"]
        if not isinstance(mask, str) or not mask:
            problems.append(f"{here} ({phrase}): mask must be a file name")
            continue
        path = folder / mask if not Path(mask).is_absolute() else Path(mask)
        if not path.is_file():
            problems.append(f"{here} ({phrase}): mask file {mask} not found")
            continue
        out.append(ObjectSpec(phrase.strip(), mask=path))
    return tuple(out)


def _read_objects_file(path: Path, folder: Path, caption: str, problems: list[str], where: str):
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{where}: {path.name} cannot be read ({e})")
        return ()
    except json.JSONDecodeError as e:
        problems.append(f"{where}: {path.name} is not JSON ({e.msg}, line {e.lineno})")
        return ()
    return _parse_objects(raw, folder, caption, problems, f"{where} ({path.name})")


def _referenced_masks(folder: Path) -> set[Path]:
    """Mask files named by the folder's object files: they are masks, not training images."""
    out = set()
    for path in folder.rglob("*" + OBJECTS_SUFFIX):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # reported when the file is read for its image
        raw = raw.get("objects") if isinstance(raw, dict) else raw
        for obj in raw if isinstance(raw, list) else []:
            if isinstance(obj, dict) and isinstance(obj.get("mask"), str) and obj["mask"]:
                out.add((folder / obj["mask"]).resolve())
    return out


def _check_masks(ex: Example, problems: list[str], where: str) -> None:
    """Each mask opens, has the image's size and is not empty; each box covers at least one pixel."""
    from PIL import Image, ImageOps

    try:
        with Image.open(ex.image) as im:
            size = im.size
            upright = ImageOps.exif_transpose(im).size if any(o.box for o in ex.objects) else size  # boxes: as drawn
    except Exception:
        return  # the image's own problem is reported already
    for obj in ex.objects:
        if obj.mask is None:
            x0, y0, x1, y1 = obj.box
            width, height = (x1 - x0) * upright[0], (y1 - y0) * upright[1]
            if width < 1 or height < 1:
                problems.append(f"{where}: box {list(obj.box)} ({obj.phrase}) is {width:.2g}x{height:.2g} pixels of "
                                f"the {upright[0]}x{upright[1]} image; a box must cover at least one pixel each way")
            continue
        try:
            with Image.open(obj.mask) as m:
                m.load()
                if m.size != size:
                    problems.append(f"{where}: mask {obj.mask.name} ({obj.phrase}) is {m.size[0]}x{m.size[1]} but the "
                                    f"image is {size[0]}x{size[1]}; masks must have the image's size")
                    continue
                if m.convert("L").getextrema()[1] == 0:
                    problems.append(f"{where}: mask {obj.mask.name} ({obj.phrase}) is empty (all black)")
        except Exception as e:
            problems.append(f"{where}: mask {obj.mask.name} ({obj.phrase}) is unreadable ({type(e).__name__})")


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
            objects = ()
            if "objects" in record:
                objects = _parse_objects(record["objects"], folder, text, problems, f"{where} objects")
            examples.append(Example(path, text.strip(), objects))
        if not examples and not problems:
            problems.append(f"{captions.name}: no records")
    else:
        masks = _referenced_masks(folder)
        images = [p for p in _images_in(folder) if p.resolve() not in masks]
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
                objects_file = image.with_name(image.stem + OBJECTS_SUFFIX)
                objects = (
                    _read_objects_file(objects_file, folder, text, problems, str(rel)) if objects_file.is_file() else ()
                )
                examples.append(Example(image, text, objects))
    if check_images:
        for ex in examples:
            where = str(ex.image.relative_to(folder) if ex.image.is_relative_to(folder) else ex.image)
            _check_image(ex.image, problems, where)
            _check_masks(ex, problems, where)
    if problems:
        raise _report(folder, problems)
    if not examples:
        raise DatasetError(f"dataset {folder}: no usable examples")
    return examples


def fingerprint(examples: list[Example], *parts) -> str:
    """A short hash of the examples (paths, sizes, mtimes, captions) and settings, to key caches."""
    h = hashlib.sha256()
    for ex in examples:  # (object masks are not cached, so they are not part of the key)
        st = ex.image.stat()
        h.update(f"{ex.image}\0{st.st_size}\0{st.st_mtime_ns}\0{ex.caption}\n".encode())
    for p in parts:
        h.update(f"{p}\n".encode())
    return h.hexdigest()[:16]


def _square(im, resolution: int, resample):
    from PIL import Image

    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((nw, nh), resample if resample is not None else Image.Resampling.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def load_image(path: Path, resolution: int):
    """Image -> ComfyUI IMAGE [1, R, R, 3] in 0..1: shorter side resized to R, then centre-cropped."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode == "I":
            im = im.point(lambda v: v * (1 / 255))
        im = _square(im.convert("RGB"), resolution, None)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def load_object_mask(ex: Example, obj: ObjectSpec, resolution: int):
    """An object's mask [R, R] in 0..1, cropped like its image (load_image): from its mask file or its box."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageOps

    with Image.open(ex.image) as im:
        size = ImageOps.exif_transpose(im).size
    if obj.mask is not None:
        with Image.open(obj.mask) as m:
            plane = ImageOps.exif_transpose(m).convert("L")
    else:
        plane = Image.new("L", size, 0)
        left, top = obj.box[0] * size[0], obj.box[1] * size[1]
        # (PIL's corners are inclusive; a box under one pixel, which scan() reports, still draws one pixel)
        right, bottom = max(left, obj.box[2] * size[0] - 1), max(top, obj.box[3] * size[1] - 1)
        ImageDraw.Draw(plane).rectangle([left, top, right, bottom], fill=255)
    plane = _square(plane, resolution, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(plane, dtype=np.float32).copy() / 255.0)
