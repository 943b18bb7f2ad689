"""Procedural face renderer for the synthetic dataset (`data_pipelines.synthetic`).

A face is drawn with OpenCV's anti-aliased primitives at twice the output size and downsampled
with INTER_AREA; lighting, blur, noise and JPEG are then applied at the output size (about 0.5 ms
per 64x64 image on one CPU core). Geometry is written in face units: origin at the face centre,
u to the right, v down, one unit = half the face height (forehead to chin). A 2x3 affine (roll,
scale, shift) maps face units to pixels, so pose costs nothing extra.

Each rendered AU has one visible, local effect whose size grows with its intensity in [0, 1]
(`AU_REGIONS` says where); the expression is visible only through the AUs. Everything else (who,
where, how photographed) is a `Look` (data_pipelines.synthetic_look), drawn by `draw_look` from
an rng before any AU is known, so the same rng state renders the same person with different AUs.
"""

from __future__ import annotations

import functools
import itertools
import math

import cv2
import numpy as np

from data_pipelines.synthetic_look import Identity, Look, Style, draw_look, mix

# `Style` and `draw_look` are offered here too: a face is `paint(draw_look(rng, style, size), ...)`.
__all__ = ["AU_REGIONS", "CENTRE_X", "CENTRE_Y", "FACE_UNIT", "RENDERABLE_AUS", "Style",
           "draw_look", "paint"]

# AUs this renderer can draw (AU11, outside the default AU list, is drawn too).
RENDERABLE_AUS: tuple[int, ...] = (
    1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 17, 20, 23, 24, 25, 26)

# Where each AU acts: face-unit boxes (u0, v0, u1, v1) of the unposed mean face (measured on the
# renderer, padded by ~0.05). Brows and forehead lie above v = -0.1, eyes and cheeks in
# -0.35..0.3, nose in -0.1..0.35, mouth in 0.15..0.8; only the jaw drop (26) reaches the chin.
AU_REGIONS: dict[int, tuple[float, float, float, float]] = {
    1: (-0.60, -0.65, 0.60, -0.15), 2: (-0.65, -0.65, 0.65, -0.15),
    4: (-0.60, -0.40, 0.60, -0.05), 5: (-0.60, -0.32, 0.60, 0.02),
    6: (-0.72, -0.22, 0.72, 0.36), 7: (-0.60, -0.22, 0.60, 0.05),
    9: (-0.18, -0.10, 0.18, 0.33), 10: (-0.28, 0.15, 0.28, 0.63),
    11: (-0.42, 0.18, 0.42, 0.74), 12: (-0.40, 0.38, 0.40, 0.70),
    14: (-0.45, 0.40, 0.45, 0.72), 15: (-0.38, 0.42, 0.38, 0.74),
    17: (-0.33, 0.40, 0.33, 0.95), 20: (-0.50, 0.42, 0.50, 0.70),
    23: (-0.38, 0.42, 0.38, 0.70), 24: (-0.38, 0.42, 0.38, 0.70),
    25: (-0.33, 0.40, 0.33, 0.76), 26: (-0.80, 0.20, 0.80, 1.30),
}

# The unposed face in the output image: centre at (CENTRE_X, CENTRE_Y) * S, FACE_UNIT * S pixels
# per face unit (the face spans about 80% of the image height with its hair).
CENTRE_X, CENTRE_Y, FACE_UNIT = 0.5, 0.53, 0.37

_SUPERSAMPLE = 2      # faces are drawn at this multiple of the output size, then downsampled
_SHIFT = 4            # cv2 fixed-point bits: sub-pixel coordinates for smooth anti-aliasing
_FIX = 1 << _SHIFT
_AA = cv2.LINE_AA
_T = np.linspace(-1.0, 1.0, 11)           # parameter along eyes, brows and lips
_ARC = np.sqrt(1.0 - _T ** 2)             # half-ellipse profile along _T
_FACE_ANGLES = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
_L5 = np.linspace(-1.0, 1.0, 5)            # parameter along wrinkles
_BUMP5 = np.sin(np.linspace(0.0, np.pi, 5))
_BROW_T = np.linspace(0.0, 1.0, 6)         # brow, inner (0) to outer (1)
# Quadratic through brow control points at t = 0, 0.45, 1 (Lagrange basis, [6, 3]).
_BROW_BASIS = np.stack([
    (_BROW_T - 0.45) * (_BROW_T - 1.0) / 0.45,
    _BROW_T * (_BROW_T - 1.0) / (0.45 * -0.55),
    _BROW_T * (_BROW_T - 0.45) / 0.55], axis=1)


# --------------------------------------------------------------------------------------------
# Painting.


class _Pen:
    """Draws shapes given in face units onto a canvas, through the look's pose.

    Drawing is dominated by Python overhead on tiny point arrays, so points go through one
    precomputed fixed-point affine, symmetric shapes are drawn in one call, and scalars avoid
    numpy altogether.
    """

    def __init__(self, img: np.ndarray, look: Look):
        size = img.shape[0]             # the supersampled canvas
        self.img = img
        self.px = FACE_UNIT * size * look.scale         # pixels per face unit
        c, s = math.cos(look.roll), math.sin(look.roll)
        a, b = c * self.px * _FIX, s * self.px * _FIX
        # The 0.5 turns the int cast (truncation of positive values) into rounding.
        self.x0 = (size * CENTRE_X + _SUPERSAMPLE * look.shift[0]) * _FIX + 0.5
        self.y0 = (size * CENTRE_Y + _SUPERSAMPLE * look.shift[1]) * _FIX + 0.5
        self.coef = (a, -b, b, a)
        self.m = np.array([[a, -b], [b, a]])
        self.o = np.array([[self.x0], [self.y0]])
        self.angle = math.degrees(look.roll)

    def _pts(self, shapes) -> list[np.ndarray]:
        """Fixed-point pixel polylines of [(u, v), ...] (equal-length u, v sequences)."""
        if len(shapes) == 1:
            u, v = shapes[0]
            return [(self.m @ np.array((u, v), np.float64) + self.o).T.astype(np.int32)]
        u = np.concatenate([np.asarray(u, np.float64) for u, _ in shapes])
        v = np.concatenate([np.asarray(v, np.float64) for _, v in shapes])
        xy = (self.m @ np.array((u, v)) + self.o).T.astype(np.int32)
        ends = list(itertools.accumulate(len(u) for u, _ in shapes))
        return [xy[start:end] for start, end in zip([0] + ends[:-1], ends)]

    def point(self, u: float, v: float) -> tuple[int, int]:
        a, nb, b, d = self.coef
        return int(a * u + nb * v + self.x0), int(b * u + d * v + self.y0)

    def width(self, w: float) -> int:
        return max(1, int(w * self.px + 0.5))

    def polys(self, shapes, colour) -> None:
        """Fills disjoint polygons [(u, v), ...] in one colour."""
        cv2.fillPoly(self.img, self._pts(shapes), colour, _AA, _SHIFT)

    def lines(self, shapes, colour, w: float) -> None:
        """Open polylines [(u, v), ...] of width w (face units)."""
        cv2.polylines(self.img, self._pts(shapes), False, colour, self.width(w), _AA, _SHIFT)

    def ellipse(self, u, v, au, av, colour, w: float = 0.0, start=0, end=360) -> None:
        """A filled ellipse (w = 0) or an outline/arc of width w (face units)."""
        scale = self.px * _FIX
        axes = (max(1, int(au * scale)), max(1, int(av * scale)))
        cv2.ellipse(self.img, self.point(u, v), axes, self.angle, start, end, colour,
                    self.width(w) if w else -1, _AA, _SHIFT)


def _shade(colour, depth: float) -> tuple:
    """`colour` darkened by the fraction `depth` (a crease of intensity a: depth ~ 0.5 a)."""
    return tuple(c * (1.0 - depth) for c in colour)


def _mirror(u, v) -> list:
    """The shape (u, v) given for the right side (u > 0), and its mirror image."""
    u = np.asarray(u, np.float64)
    return [(u, v), (-u, v)]


def _paint_clutter(img: np.ndarray, clutter: tuple) -> None:
    size = img.shape[0]
    for kind, x, y, w, h, angle, colour in clutter:
        cx, cy, w, h = int(x * size), int(y * size), int(w * size), int(h * size)
        if kind == 0:
            cv2.rectangle(img, (cx - w // 2, cy - h // 2), (cx + w // 2, cy + h // 2), colour, -1)
        elif kind == 1:
            cv2.ellipse(img, (cx, cy), (w // 2, h // 2), angle, 0, 360, colour, -1, _AA)
        else:
            cv2.line(img, (cx - w, cy - h), (cx + w, cy + h), colour, max(2, h // 6), _AA)


_COS, _SIN = np.cos(_FACE_ANGLES), np.sin(_FACE_ANGLES)
_LOWER = _SIN > 0


def _paint_head(pen: _Pen, p: Identity, a) -> None:
    """Hair, shirt, neck, ears, the face outline (AU26 drops the jaw) and the fringe."""
    if p.long_hair:
        pen.ellipse(0.0, 0.3, p.face_w + 0.17, 1.2, p.hair)
    pen.ellipse(0.0, 2.05, 1.55, 0.72, p.shirt)
    pen.polys([((-0.33, 0.33, 0.36, -0.36), (0.3, 0.3, 1.6, 1.6))], _shade(p.skin, 0.22))
    pen.ellipse(0.0, -0.24, p.face_w + 0.08, 0.9, p.hair)
    for s in (-1.0, 1.0):
        pen.ellipse(s * p.face_w * 0.98, p.eye_y + 0.14, 0.08, 0.15, _shade(p.skin, 0.08))
    u = p.face_w * _COS * np.where(_LOWER, 1.0 - p.jaw * _SIN ** 2, 1.0)
    v = np.where(_LOWER, _SIN * p.chin + 0.22 * a[26] * _SIN ** 3, _SIN)
    pen.polys([(u, v)], p.skin)
    # Fringe: the face top above the hairline, in hair colour, hanging a little in the middle.
    top = math.asin(min(0.99, -p.hairline))
    theta = np.linspace(math.pi + top, 2 * math.pi - top, 9)
    arc_u = (p.face_w + 0.02) * np.cos(theta)
    edge_v = p.hairline + 0.05 * (1.0 - (arc_u / arc_u[0]) ** 2)
    pen.polys([(np.concatenate([arc_u, arc_u[::-1]]),
                np.concatenate([1.02 * np.sin(theta), edge_v[::-1]]))], p.hair)


def _paint_upper_face(pen: _Pen, p: Identity, a) -> None:
    """Forehead wrinkles (AU1 centre, AU2 sides), glabella lines (AU4), nose (AU9, 10, 11)."""
    skin = p.skin
    if a[1]:
        pen.lines([(0.15 * _L5, p.brow_y - 0.2 - 0.08 * k - 0.02 * (1 - _L5 ** 2))
                   for k in range(2)], _shade(skin, 0.55 * a[1]), 0.026)
    if a[2]:
        pen.lines([shape for k in range(2) for shape in _mirror(
            0.4 + 0.125 * _L5, p.brow_y - 0.17 - 0.08 * k - 0.03 * _BUMP5)],
            _shade(skin, 0.55 * a[2]), 0.026)
    if a[4]:
        pen.lines(_mirror((0.03, 0.05), (p.brow_y, p.brow_y + 0.13)),
                  _shade(skin, 0.6 * a[4]), 0.028)
    # Nose: bridge sides, tip, nostrils (AU9 lifts and flares them, and wrinkles the bridge).
    pen.lines(_mirror((0.05, 0.06, p.nose_w * 0.85),
                      (p.eye_y + 0.05, p.nose_y - 0.12, p.nose_y - 0.02)),
              _shade(skin, 0.14), 0.018)
    pen.ellipse(0.0, p.nose_y - 0.03, p.nose_w, 0.05, _shade(skin, 0.2), 0.02, 20, 160)
    for s in (-1.0, 1.0):
        pen.ellipse(s * p.nose_w * 0.5, p.nose_y + 0.005 - 0.04 * a[9],
                    0.028 + 0.016 * a[9], 0.016 + 0.006 * a[9], _shade(skin, 0.55))
    if a[9]:
        pen.lines([(0.075 * _L5, p.eye_y + 0.03 + 0.05 * k + 0.025 * np.abs(_L5))
                   for k in range(3)], _shade(skin, 0.6 * a[9]), 0.026)
    if a[10]:
        pen.lines(_mirror(p.nose_w + np.array((0.015, 0.05, 0.07)),
                          (p.nose_y - 0.02, p.nose_y + 0.07, p.nose_y + 0.15)),
                  _shade(skin, 0.5 * a[10]), 0.028)
    if a[11]:
        pen.lines(_mirror((p.nose_w + 0.02, p.mouth_w + 0.03, p.mouth_w + 0.07),
                          (p.nose_y, p.mouth_y - 0.04, p.mouth_y + 0.12)),
                  _shade(skin, 0.45 * a[11]), 0.026)


def _paint_eyes(pen: _Pen, p: Identity, a) -> None:
    """Eyes (AU5 wider, AU6 narrowed from below, AU7 tightened lids), cheeks and crow's feet."""
    skin, bowl = p.skin, 1.0 - _T ** 2
    up = p.eye_h * (1 + 1.2 * a[5]) * (1 - 0.45 * a[7]) * (1 - 0.15 * a[6])
    low = 0.55 * p.eye_h * (1 - 0.7 * a[6]) * (1 - 0.55 * a[7])
    eyes = [(s * p.eye_dx, s * p.eye_dx + _T * p.eye_w) for s in (-1.0, 1.0)]
    top, bottom = p.eye_y - up * bowl, p.eye_y + low * bowl
    pen.polys([(np.concatenate([u, u[::-1]]), np.concatenate([top, bottom[::-1]]))
               for _, u in eyes], (238, 236, 230))
    iris_v = p.eye_y + 0.02
    for ex, _ in eyes:
        pen.ellipse(ex, iris_v, p.iris_r, p.iris_r, p.iris)
        pen.ellipse(ex, iris_v, 0.45 * p.iris_r, 0.45 * p.iris_r, (15, 12, 12))
    # Skin above and below the lids hides the iris outside the eye opening.
    patches = []
    for ex, u in eyes:
        corners = (ex + p.eye_w, ex - p.eye_w)
        patches.append((np.concatenate([u, corners]),
                        np.concatenate([top, (p.eye_y - 0.17,) * 2])))
        patches.append((np.concatenate([u, corners]),
                        np.concatenate([bottom, (p.eye_y + 0.13,) * 2])))
    pen.polys(patches, skin)
    pen.lines([(u, top) for _, u in eyes], (35, 28, 28), 0.03 + 0.015 * a[7])
    pen.lines([(u, bottom) for _, u in eyes], _shade(skin, 0.3 + 0.45 * a[7]),
              0.018 + 0.03 * a[7])
    if a[6]:
        x0 = p.eye_dx + p.eye_w + 0.025
        feet = [(np.array((x0, x0 + 0.1)), np.array((p.eye_y + d, p.eye_y + 2.5 * d)))
                for d in (-0.035, 0.0, 0.035)]
        furrow = (p.eye_dx + 0.8 * _T * p.eye_w, p.eye_y + low * bowl + 0.05 + 0.015 * bowl)
        pen.lines([m for shape in feet + [furrow] for m in _mirror(*shape)],
                  _shade(skin, 0.55 * a[6]), 0.022)
    # Cheeks: a faint blush that AU6 raises, widens and deepens.
    for s in (-1.0, 1.0):
        pen.ellipse(s * 0.41, p.nose_y - 0.01 - 0.13 * a[6], 0.13 + 0.02 * a[6], 0.085,
                    mix(skin, (205, 80, 85), 0.06 + 0.35 * a[6]))


def _paint_brows(pen: _Pen, p: Identity, a) -> None:
    """Brows: AU1 raises the inner ends, AU2 the outer ends, AU4 lowers and knits them."""
    v0 = p.brow_y + np.array([0.015, -0.03, 0.025])     # inner, middle, outer
    dv = (np.array([-0.13, -0.05, 0.0]) * a[1] + np.array([-0.02, -0.08, -0.14]) * a[2]
          + np.array([0.09, 0.05, 0.02]) * a[4])
    v = _BROW_BASIS @ (v0 + dv)
    inner = p.eye_dx - 0.95 * p.eye_w - 0.05 * a[4]
    u = inner + (p.eye_dx + 1.25 * p.eye_w - inner) * _BROW_T
    half = p.brow_t * (1 + 0.35 * a[4]) * (0.55 - 0.3 * _BROW_T)
    pen.polys(_mirror(np.concatenate([u, u[::-1]]), np.concatenate([v - half, (v + half)[::-1]])),
              mix(p.hair, (25, 20, 18), 0.55))


def _paint_mouth(pen: _Pen, p: Identity, a) -> None:
    """Lips and mouth (AU10, 12, 14, 15, 17, 20, 23, 24, 25, 26) and the chin (AU17)."""
    t, arc = _T, _ARC
    width = (p.mouth_w * (1 + 0.45 * a[20]) * (1 - 0.3 * a[23]) * (1 - 0.12 * a[14])
             + 0.03 * a[12])
    corner = -0.14 * a[12] + 0.11 * a[15] + 0.02 * a[20]
    thin = (1 - 0.35 * a[20]) * (1 - 0.3 * a[23]) * (1 - 0.7 * a[24])
    gap = a[25] * (0.1 + 0.2 * a[26])
    u = t * width
    v0 = p.mouth_y + corner * t ** 2 - 0.045 * a[17] * (1 - t ** 2)
    raise10 = 0.07 * a[10] * np.clip(1 - (t / 0.75) ** 2, 0, None)
    ub = v0 - 0.3 * gap * arc - raise10                 # upper lip, lower edge
    ut = ub - p.lip_up * thin * (0.35 + 0.65 * arc)     # upper lip, upper edge
    lt = v0 + 0.7 * gap * arc                           # lower lip, upper edge
    lb = lt + p.lip_low * thin * (1 + 0.3 * a[17]) * (0.3 + 0.7 * arc)
    both = np.concatenate([u, u[::-1]])
    if gap or a[10]:
        pen.polys([(both, np.concatenate([ub, lt[::-1]]))], (70, 25, 30))
        pen.polys([(both, np.concatenate([ub, np.minimum(ub + 0.045, lt)[::-1]]))],
                  (236, 232, 218))
    # AU23 narrows, thins and darkens the lips and sharpens their border.
    lips = mix(p.lips, (90, 15, 30), 0.75 * a[23])
    pen.polys([(both, np.concatenate([ut, ub[::-1]]))], _shade(lips, 0.08))
    pen.polys([(both, np.concatenate([lt, lb[::-1]]))], lips)
    pen.lines([(u, ub)], _shade(lips, 0.45 + 0.3 * a[24]), 0.018 + 0.02 * a[24])
    if a[23]:
        pen.lines([(u, ut), (u, lb)], _shade(lips, 0.6 * a[23]), 0.04)
    skin, cu, cv = p.skin, width, v0[0]
    if a[24]:   # pressed lips bulge the skin above the upper lip
        pen.lines([(0.16 * _L5, ut[5] - 0.04 + 0.015 * _L5 ** 2)], _shade(skin, 0.5 * a[24]),
                  0.026)
    if a[14]:
        for s in (-1.0, 1.0):
            pen.ellipse(s * (cu + 0.08), cv + 0.01, 0.05, 0.09, _shade(skin, 0.75 * a[14]))
    if a[17]:
        chin = p.chin + 0.22 * a[26]
        pen.ellipse(0.0, lb[5] + 0.1 - 0.03 * a[17], 0.13, 0.05, _shade(skin, 0.55 * a[17]),
                    0.03, 200, 340)
        for x in (-0.06, 0.0, 0.06):
            pen.ellipse(x, chin - 0.13, 0.018, 0.018, _shade(skin, 0.4 * a[17]))


def _paint_occluder(pen: _Pen, p: Identity, occluder: tuple) -> None:
    kind, u, v, angle, colour = occluder
    c, s = math.cos(angle), math.sin(angle)
    if kind == "bar":
        pen.lines([((u - 2 * c, u + 2 * c), (v - 2 * s, v + 2 * s))], colour, 0.16)
    elif kind == "hand":   # four fingers and a palm, outlined so that they read as a hand
        fingers = [(u + (k - 1.5) * np.array((0.075, 0.095)), (v, v - 0.38)) for k in range(4)]
        for colour, grow in ((_shade(p.skin, 0.4), 0.02), (_shade(p.skin, 0.1), 0.0)):
            pen.lines(fingers, colour, 0.065 + grow)
            pen.ellipse(u, v + 0.1, 0.17 + grow / 2, 0.22 + grow / 2, colour)
    else:
        frame = _shade(colour, 0.6)
        for side in (-1.0, 1.0):
            pen.ellipse(side * p.eye_dx, p.eye_y, 1.3 * p.eye_w, 1.1 * p.eye_w, frame, 0.03)
        rim = p.eye_dx + 1.3 * p.eye_w
        pen.lines(_mirror((rim, p.face_w), (p.eye_y, p.eye_y - 0.03))
                  + [((-p.eye_dx + 1.3 * p.eye_w, p.eye_dx - 1.3 * p.eye_w),
                      (p.eye_y, p.eye_y))], frame, 0.03)


@functools.lru_cache(maxsize=8)
def _ramps(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y coordinates in [-1, 1], shaped [S, S, 1], for lighting gradients."""
    r = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return r[None, :, None], r[:, None, None]


@functools.lru_cache(maxsize=8)
def _noise_texture(size: int) -> np.ndarray:
    """A fixed Gaussian noise texture; images read noise at random offsets (cheaper than drawing
    fresh noise for every image, and just as deterministic)."""
    return np.random.default_rng(20240531).standard_normal((size, size, 3), dtype=np.float32)


def _photograph(img: np.ndarray, look: Look, tint) -> np.ndarray:
    """Lighting, colour cast, blur, noise and JPEG, at the output size."""
    size = img.shape[0]
    x, y = _ramps(size)
    gain = look.gain * (1.0 + look.gradient[0] * x + look.gradient[1] * y)
    colour = np.asarray(look.cast, np.float32) * np.asarray(tint, np.float32)
    out = img.astype(np.float32) * (gain * colour) + look.bias
    if look.blur > 0.05:
        out = cv2.GaussianBlur(out, (0, 0), look.blur)
    if look.noise > 0.0:
        bank = _noise_texture(max(256, 2 * size))
        oy, ox = (n % (bank.shape[0] - size) for n in look.noise_at)
        out += look.noise * bank[oy:oy + size, ox:ox + size]
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if look.jpeg:
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR),
                                (cv2.IMWRITE_JPEG_QUALITY, look.jpeg))
        if ok:
            out = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out


def paint(look: Look, au: dict[int, float], size: int,
          tint: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Renders one face.

    Args:
      look: everything but the AUs (`draw_look`).
      au: AU number -> intensity in [0, 1]; absent AUs are 0. Only `RENDERABLE_AUS` allowed.
      size: output side S.
      tint: RGB gain of the dataset (`Style.tint`).

    Returns:
      uint8 [S, S, 3] RGB.
    """
    a = [0.0] * 27
    for number, value in au.items():
        if number not in RENDERABLE_AUS:
            raise ValueError(f"AU{number} cannot be rendered; renderable: {RENDERABLE_AUS}")
        value = min(max(float(value), 0.0), 1.0)
        # Any active AU shows at least at 30% of its full effect: faint AUs stay visible.
        a[number] = 0.3 + 0.7 * value if value > 0 else 0.0
    canvas = _SUPERSAMPLE * size
    img = np.empty((canvas, canvas, 3), np.uint8)
    cv2.rectangle(img, (0, 0), (canvas, canvas), look.background, -1)   # faster than img[:] =
    _paint_clutter(img, look.clutter)
    pen = _Pen(img, look)
    p = look.identity
    _paint_head(pen, p, a)
    _paint_upper_face(pen, p, a)
    _paint_eyes(pen, p, a)
    _paint_brows(pen, p, a)
    _paint_mouth(pen, p, a)
    if look.occluder is not None:
        _paint_occluder(pen, p, look.occluder)
    small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return _photograph(small, look, tint)
