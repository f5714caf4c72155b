"""The thumbnails ComfyUI's Templates browser shows for the example workflows: one card per workflow, a picture above
its title and one-line description (the frontend shows a pack's templates by file name only, so the card carries
them). Written as `<workflow>.jpg` beside the workflow by tests/workflow_build.py, with the pack's icon.

The frontend asks for `/api/workflow_templates/<pack>/<name>.jpg` (mediaSubtype "jpg" for every custom-node
template in comfyui-frontend-package 1.58.1), so the cards are JPEG.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
VIEWER_SHOT = REPO / "docs" / "viewer.png"  # the browser test's screenshot of the viewer on the canvas
VIEWER_BOX = (552, 456, 1052, 872)  # the viewer widget inside that 1600 x 1000 screenshot
HEAT_BOX = (665, 486, 905, 726)  # the viewer's heatmap inside it
ICON = REPO / "docs" / "icon.png"  # the registry's icon (pyproject.toml [tool.comfy] Icon): square, at most 400 px
ICON_SIZE = 256
SIZE = (512, 512)
PICTURE_HEIGHT = 352
MAX_BYTES = 60_000
BACKGROUND, INK, MUTED = (32, 32, 36), (236, 236, 236), (170, 170, 178)
RED, BLUE, YELLOW, PURPLE = (214, 56, 48), (52, 98, 214), (236, 196, 44), (150, 80, 160)


def _font(size: int):
    return ImageFont.load_default(size=size)


def card(title: str, description: str, picture) -> Image.Image:
    """The thumbnail: `picture(width, height)` on top, the title and the description (wrapped) below."""
    image = Image.new("RGB", SIZE, BACKGROUND)
    image.paste(picture(SIZE[0], PICTURE_HEIGHT), (0, 0))
    draw = ImageDraw.Draw(image)
    draw.text((20, PICTURE_HEIGHT + 16), title, font=_font(30), fill=INK)
    body = _font(20)
    for i, line in enumerate(textwrap.wrap(description, width=44)[:3]):
        draw.text((20, PICTURE_HEIGHT + 62 + 26 * i), line, font=body, fill=MUTED)
    return image


def save(image: Image.Image, path: Path) -> None:
    """JPEG at the best quality that stays under MAX_BYTES."""
    for quality in (90, 85, 80, 70, 60, 50):
        image.save(path, "JPEG", quality=quality, optimize=True)
        if path.stat().st_size <= MAX_BYTES:
            return
    raise ValueError(f"{path}: {path.stat().st_size} bytes even at quality {quality}")


def _contain(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to fit width x height, centred on the card's background."""
    scale = min(width / image.width, height / image.height)
    scaled = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    out = Image.new("RGB", (width, height), BACKGROUND)
    out.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return out


def viewer_picture(width: int, height: int) -> Image.Image:
    """The gate viewer itself, from the pack's own screenshot."""
    with Image.open(VIEWER_SHOT) as shot:
        return _contain(shot.convert("RGB").crop(VIEWER_BOX), width, height)


def icon() -> Image.Image:
    """The pack's icon: the viewer's heatmap of one word."""
    with Image.open(VIEWER_SHOT) as shot:
        return shot.convert("RGB").crop(HEAT_BOX).resize((ICON_SIZE, ICON_SIZE), Image.LANCZOS)


def _scene(draw, box, cube, sphere, cat=None):
    """A cube, a sphere (and a cat's head) drawn in `box` in the given colours."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw.rectangle((x0 + 0.14 * w, y0 + 0.42 * h, x0 + 0.44 * w, y0 + 0.80 * h), fill=cube)
    draw.ellipse((x0 + 0.50 * w, y0 + 0.40 * h, x0 + 0.86 * w, y0 + 0.82 * h), fill=sphere)
    if cat is not None:
        cx, cy, r = x0 + 0.30 * w, y0 + 0.24 * h, 0.09 * w
        draw.polygon([(cx - r, cy - 0.2 * r), (cx - 0.6 * r, cy - 1.5 * r), (cx - 0.1 * r, cy - 0.8 * r)], fill=cat)
        draw.polygon([(cx + r, cy - 0.2 * r), (cx + 0.6 * r, cy - 1.5 * r), (cx + 0.1 * r, cy - 0.8 * r)], fill=cat)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=cat)


def compare_picture(width: int, height: int) -> Image.Image:
    """Two panels: the words' colours mixed up (without MaskAttn), each kept to its object (with MaskAttn)."""
    image = Image.new("RGB", (width, height), (58, 58, 64))
    draw = ImageDraw.Draw(image)
    half = width // 2
    _scene(draw, (8, 8, half - 4, height - 40), cube=PURPLE, sphere=(120, 90, 200), cat=(200, 120, 90))
    _scene(draw, (half + 4, 8, width - 8, height - 40), cube=RED, sphere=BLUE, cat=YELLOW)
    draw.line((half, 12, half, height - 12), fill=BACKGROUND, width=4)
    label = _font(22)
    draw.text((half // 2, height - 20), "without", font=label, fill=INK, anchor="mm")
    draw.text((half + half // 2, height - 20), "with MaskAttn", font=label, fill=INK, anchor="mm")
    return image


def region_picture(width: int, height: int) -> Image.Image:
    """The two halves of the canvas, each with the one phrase it admits."""
    image = Image.new("RGB", (width, height), (58, 58, 64))
    draw = ImageDraw.Draw(image)
    half = width // 2
    draw.rectangle((0, 0, half, height), fill=(96, 52, 52))
    draw.rectangle((half, 0, width, height), fill=(48, 60, 100))
    draw.rectangle((0.2 * half, 0.38 * height, 0.8 * half, 0.78 * height), fill=RED)
    draw.ellipse((half + 0.18 * half, 0.34 * height, half + 0.82 * half, 0.82 * height), fill=BLUE)
    for y in range(0, height, 18):
        draw.line((half, y, half, y + 9), fill=INK, width=3)
    label = _font(24)
    draw.text((half // 2, 0.18 * height), '"red cube"', font=label, fill=INK, anchor="mm")
    draw.text((half + half // 2, 0.18 * height), '"blue sphere"', font=label, fill=INK, anchor="mm")
    return image


def layout_picture(width: int, height: int) -> Image.Image:
    """The prompt's words over the canvas, the places they give: the cube left, the sphere right."""
    image = Image.new("RGB", (width, height), (58, 58, 64))
    draw = ImageDraw.Draw(image)
    half = width // 2
    draw.rectangle((0, 0.3 * height, half, height), fill=(96, 52, 52))
    draw.rectangle((half, 0.3 * height, width, height), fill=(48, 60, 100))
    draw.rectangle((0.2 * half, 0.48 * height, 0.8 * half, 0.86 * height), fill=RED)
    draw.ellipse((half + 0.18 * half, 0.44 * height, half + 0.82 * half, 0.9 * height), fill=BLUE)
    label = _font(22)
    draw.text((width // 2, 0.12 * height), '"a red cube to the left of', font=label, fill=INK, anchor="mm")
    draw.text((width // 2, 0.21 * height), 'a blue sphere"', font=label, fill=INK, anchor="mm")
    return image
