"""Drawing for the Preview Gates node: the titled grid of heatmap tiles over the image, the message card, and the
conversions between ComfyUI's IMAGE tensors, numpy arrays and PIL images. numpy + PIL (imported when drawing) +
torch; no ComfyUI import. What is drawn is chosen in masks/viewer.py.
"""

from __future__ import annotations

import numpy as np
import torch

_CMAP_ANCHORS = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                          (250, 193, 39), (252, 255, 164)], dtype=np.float32)  # dark violet -> yellow ("inferno"-like)
TITLE_H, PAD = 28, 4  # a tile's title band and the gap between tiles, in pixels
THUMBNAIL_SIDE = 512  # the image sent under the web viewer's maps is at most this wide or high


def colormap(values: np.ndarray) -> np.ndarray:
    """[..] in 0..1 -> [.., 3] uint8."""
    x = np.clip(values, 0, 1) * (len(_CMAP_ANCHORS) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_CMAP_ANCHORS) - 2)
    t = (x - i)[..., None]
    return (_CMAP_ANCHORS[i] * (1 - t) + _CMAP_ANCHORS[i + 1] * t).astype(np.uint8)


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(text, width):
    limit = max(4, width // 6)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tile_width(columns: int) -> int:
    """Pixels per tile: narrower when there are many word columns."""
    return 160 if columns <= 8 else 112


def grid_titles(row_labels, col_labels) -> list[list[str]]:
    """The title of each tile, "word | row" (row: a layer, a mean of layers, or a step), one list per row."""
    return [[f"{col} | {row}" for col in col_labels] for row in row_labels]


def render_grid(tiles, row_labels, col_labels, base: np.ndarray | None, opacity: float, tile_w: int):
    """tiles [R, K, h, w] in 0..1; base [H, W, 3] uint8 or None. Returns (PIL image, titles [[str]]): tile (r, k)
    is tiles[r, k] in the colour map over `base` at `opacity`, under the two title lines of titles[r][k]."""
    from PIL import Image, ImageDraw

    R, K, h, w = tiles.shape
    aspect = (base.shape[0] / base.shape[1]) if base is not None else h / w
    tile_h = max(16, round(tile_w * aspect))
    font = _font(11)
    grid = Image.new("RGB", (K * (tile_w + PAD) + PAD, R * (tile_h + TITLE_H + PAD) + PAD), (24, 24, 28))
    draw = ImageDraw.Draw(grid)
    base_img = Image.fromarray(base).resize((tile_w, tile_h), Image.BILINEAR) if base is not None else None
    base_arr = np.asarray(base_img, dtype=np.float32) if base_img is not None else None
    for r in range(R):
        for k in range(K):
            heat = torch.nn.functional.interpolate(tiles[r, k][None, None].float(), size=(tile_h, tile_w),
                                                   mode="bilinear", align_corners=False)[0, 0].numpy()
            rgb = colormap(heat).astype(np.float32)
            if base_arr is not None:
                rgb = base_arr * (1 - opacity) + rgb * opacity
            x0, y0 = PAD + k * (tile_w + PAD), PAD + r * (tile_h + TITLE_H + PAD)
            grid.paste(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)), (x0, y0 + TITLE_H))
            draw.text((x0 + 2, y0 + 1), _fit(col_labels[k], tile_w), fill=(255, 255, 255), font=font)
            draw.text((x0 + 2, y0 + 14), _fit(row_labels[r], tile_w), fill=(170, 170, 180), font=font)
    return grid, grid_titles(row_labels, col_labels)


def message_image(message: str, width=512):
    """A card with `message` word-wrapped on it: what the node shows instead of a grid."""
    from PIL import Image, ImageDraw

    lines, line = [], ""
    for word in message.split():
        if len(line) + len(word) + 1 > width // 7:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    img = Image.new("RGB", (width, 16 + 16 * len(lines)), (48, 20, 20))
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(lines):
        draw.text((8, 8 + 16 * i), text, fill=(255, 220, 200), font=_font(12))
    return img


def to_image_tensor(img) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE [1, H, W, 3] float in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def base_image(image, b) -> np.ndarray | None:
    """Image `b` of a ComfyUI IMAGE batch as [H, W, 3] uint8 (the last one when b is past the batch); None when
    `image` is not an IMAGE."""
    if image is None or not isinstance(image, torch.Tensor) or image.ndim != 4:
        return None
    img = image[min(b, image.shape[0] - 1), ..., :3].float().clamp(0, 1)
    return (img.cpu().numpy() * 255).round().astype(np.uint8)


def thumbnail(arr: np.ndarray):
    """[H, W, 3] uint8 -> PIL image, scaled down (bilinear) to at most THUMBNAIL_SIDE a side."""
    from PIL import Image

    img = Image.fromarray(arr)
    if max(img.size) > THUMBNAIL_SIDE:
        scale = THUMBNAIL_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return img
