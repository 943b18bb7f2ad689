"""A contact sheet's tiles: a PNG grid of images, each enlarged with its caption under it.

Shared by `synthetic.contact_sheet` (a generator's raw records) and `data_pipelines.contact_sheet`
(what the model is fed), which write their own captions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import cv2
import numpy as np

# Caption text is drawn with OpenCV's Hershey font: 11 px lines, ASCII only.
_FONT, _FONT_SCALE, _LINE_HEIGHT = cv2.FONT_HERSHEY_PLAIN, 0.75, 11
_BORDER = 2   # grey frame around each tile, px
# Captions may use typographic dashes ("AU \u2013"); the Hershey font would draw them as "?".
_TO_ASCII = str.maketrans({"\u2013": "-", "\u2014": "-", "\u2212": "-"})
# A parenthesised group ("(12 lab.)") or else a run of non-spaces: the units a line breaks between.
_WORDS = re.compile(r"\([^)]*\)|\S+")


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)[0][0]


def _wrap(line: str, width: int) -> list[str]:
    """Breaks `line` at spaces into lines that fit `width` px (a single long word overflows)."""
    lines: list[str] = []
    for word in _WORDS.findall(line.translate(_TO_ASCII)):
        if lines and _text_width(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def draw_sheet(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]], path: str, *,
               columns: int = 8, zoom: int = 2, min_width: int = 112,
               min_text_lines: int = 6) -> np.ndarray:
    """Writes a PNG grid of tiles: each image enlarged, with its caption lines under it.

    Args:
      images: uint8 RGB [H, W, 3] images, all of one shape.
      captions: for each image, its lines of text; a line wider than the tile is wrapped at
        spaces (never inside parentheses).
      path: the PNG file to write.
      columns: most tiles per row (a sheet of fewer images has one row of just those).
      zoom: integer enlargement by pixel repetition (nearest neighbour), so the pixels the
        model sees stay visible as they are, not smoothed.
      min_width: smallest tile width in px, so captions have room under small images.
      min_text_lines: text lines below each image, more if a wrapped caption needs them; a fixed
        minimum keeps the sheet's size the same from one draw to the next.

    Returns:
      The sheet, uint8 RGB; an image's top-left pixel lies at (row * tile height + 2,
      column * tile width + 2 + (tile width - 4 - side) // 2), side = zoom * W.

    Raises:
      ValueError: no images, or not one caption per image.
      OSError: the file cannot be written.
    """
    if not images or len(images) != len(captions):
        raise ValueError(f"need one caption per image and at least one image, got "
                         f"{len(images)} images and {len(captions)} captions")
    height, width = images[0].shape[:2]
    tile_width = max(width * zoom, min_width)
    wrapped = [[part for line in caption for part in _wrap(line, tile_width - 4)]
               for caption in captions]
    text_lines = max(min_text_lines, *(len(lines) for lines in wrapped))
    tiles = []
    for image, lines in zip(images, wrapped):
        tile = np.full((height * zoom + _LINE_HEIGHT * text_lines + 4, tile_width, 3), 255,
                       np.uint8)
        left = (tile_width - width * zoom) // 2
        tile[:height * zoom, left:left + width * zoom] = image.repeat(zoom, 0).repeat(zoom, 1)
        for row, text in enumerate(lines):
            cv2.putText(tile, text, (2, height * zoom + _LINE_HEIGHT * (row + 1)), _FONT,
                        _FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.pad(tile, ((_BORDER, _BORDER), (_BORDER, _BORDER), (0, 0)),
                            constant_values=200))
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    tiles += [np.full_like(tiles[0], 255)] * (rows * columns - len(tiles))
    sheet = np.concatenate([np.concatenate(tiles[r * columns:(r + 1) * columns], axis=1)
                            for r in range(rows)], axis=0)
    if not cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return sheet
