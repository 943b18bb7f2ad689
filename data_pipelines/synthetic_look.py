"""Everything about a synthetic face but its AUs: who, where, and how it was photographed.

A `Look` is a person (`Identity`), a pose in the frame, a background with clutter, an occasional
occluder and the photograph's lighting, blur, noise and JPEG quality. `draw_look` draws one from
an rng, always consuming the same amount of it and before any AU is known, so the same rng state
renders the same person with different AUs; a dataset's `Style` sets how much each nuisance
varies. `data_pipelines.synthetic_render.paint` paints a look with AUs.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Style:
    """Nuisance levels of a synthetic dataset: each >= 0, 0 = off, 1 = the default strength.

    Levels above 1 exaggerate. With every level 0 a face is the mean person, frontal and centred,
    on a plain grey background, with no photometric change, blur, noise, JPEG or occluder.

    Attributes:
      identity: spread of face shape, skin tone, feature sizes and hair.
      pose: roll, scale and shift of the face in the frame.
      clutter: background colour and clutter shapes.
      lighting: brightness, contrast, colour balance and a lighting gradient.
      blur: Gaussian blur.
      noise: additive pixel noise.
      jpeg: JPEG round trip at a random quality.
      occlusion: occasional occluders (hand, bar, glasses).
      tint: a fixed RGB gain on every image, so that two datasets can look different.
    """
    identity: float = 1.0
    pose: float = 1.0
    clutter: float = 1.0
    lighting: float = 1.0
    blur: float = 1.0
    noise: float = 1.0
    jpeg: float = 1.0
    occlusion: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        levels = [f.name for f in dataclasses.fields(self) if f.name != "tint"]
        bad = [name for name in levels if not getattr(self, name) >= 0]
        if bad or len(self.tint) != 3:
            raise ValueError(f"Style levels must be >= 0 and tint an RGB triple: {self}")
        # Configs hand over lists; tuples keep the style hashable.
        object.__setattr__(self, "tint", tuple(float(t) for t in self.tint))


@dataclasses.dataclass(frozen=True)
class Identity:
    """A person: feature placement and sizes in face units, colours as RGB 0..255."""
    face_w: float       # half-width of the face outline
    jaw: float          # how much the lower face tapers towards the chin
    chin: float         # chin height (v)
    eye_y: float
    eye_dx: float       # half the distance between the eye centres
    eye_w: float        # eye half-width
    eye_h: float        # upper eye opening
    iris_r: float
    brow_y: float
    brow_t: float       # brow thickness
    nose_y: float       # nose tip
    nose_w: float
    mouth_y: float
    mouth_w: float      # mouth half-width
    lip_up: float       # lip thicknesses
    lip_low: float
    hairline: float
    long_hair: bool
    skin: tuple
    lips: tuple
    hair: tuple
    iris: tuple
    shirt: tuple


@dataclasses.dataclass(frozen=True)
class Look:
    """Everything about one image except its AUs: who, where, and how it was photographed."""
    identity: Identity
    roll: float         # in-plane rotation, radians
    scale: float        # face size factor
    shift: tuple        # (dx, dy) of the face, output pixels
    background: tuple   # RGB
    clutter: tuple      # background shapes, see _draw_clutter
    occluder: tuple | None   # see _draw_occluder
    gain: float         # brightness factor
    bias: float         # grey levels added
    gradient: tuple     # relative gain change across the image, (x, y)
    cast: tuple         # RGB gains (white balance)
    blur: float         # Gaussian sigma, output pixels; 0 = none
    noise: float        # noise std, grey levels
    noise_at: tuple     # offsets into the shared noise texture
    jpeg: int           # JPEG quality; 0 = no round trip


# --------------------------------------------------------------------------------------------
# Drawing the nuisances. One rng call per look (a fixed-size block of uniforms) keeps the rng
# consumption independent of the outcome and costs a couple of microseconds.

_MAX_CLUTTER = 12
_IDENTITY_DRAWS = 28
# identity, pose, background, clutter slots, occluder, photometric.
_NUM_DRAWS = _IDENTITY_DRAWS + 5 + 3 + 10 * _MAX_CLUTTER + 8 + 13
_SKIN_DARK, _SKIN_LIGHT = (88, 56, 40), (246, 212, 186)
_HAIR_COLOURS = ((40, 28, 22), (85, 55, 35), (150, 110, 60), (200, 170, 110), (120, 50, 25),
                 (150, 150, 150), (25, 25, 30))


def mix(a, b, t: float) -> tuple:
    """The colour `t` of the way from colour `a` to colour `b`."""
    return tuple(float(x + (y - x) * t) for x, y in zip(a, b))


def draw_identity(take, level: float) -> Identity:
    """Draws a person from `take()` (the next uniform in [0, 1)); level 0: the mean face."""
    u = [take() for _ in range(_IDENTITY_DRAWS)]
    j = [(2.0 * x - 1.0) * level for x in u]     # jitters in [-level, level]
    tone = min(max(0.55 + 0.5 * j[0], 0.0), 1.0)
    skin = mix(_SKIN_DARK, _SKIN_LIGHT, tone)
    skin = (skin[0], skin[1] * (1 + 0.05 * j[1]), skin[2] * (1 + 0.08 * j[2]))
    varied = level > 0
    return Identity(
        face_w=0.74 + 0.06 * j[3], jaw=0.30 + 0.12 * j[4], chin=1.0 + 0.03 * j[5],
        eye_y=-0.05 + 0.025 * j[6], eye_dx=0.33 + 0.025 * j[7], eye_w=0.18 + 0.015 * j[8],
        eye_h=0.085 + 0.008 * j[9], iris_r=0.08 + 0.006 * j[10],
        brow_y=-0.27 + 0.02 * j[11], brow_t=0.055 + 0.012 * j[12],
        nose_y=0.26 + 0.025 * j[13], nose_w=0.11 + 0.015 * j[14],
        mouth_y=0.56 + 0.025 * j[15], mouth_w=0.27 + 0.025 * j[16],
        lip_up=0.05 + 0.01 * j[17], lip_low=0.07 + 0.012 * j[18],
        hairline=-0.68 + 0.06 * j[19], long_hair=varied and u[20] < 0.4,
        skin=skin, lips=mix(skin, (150, 45, 55), 0.45 + 0.1 * j[21]),
        hair=_HAIR_COLOURS[int(u[22] * len(_HAIR_COLOURS)) if varied else 1],
        iris=(70, 110, 150) if varied and u[23] > 0.7 else (60, 40, 25),
        shirt=tuple(60.0 + 150.0 * x for x in u[24:27]) if varied else (70.0, 90.0, 140.0))


def _draw_clutter(take, level: float) -> tuple:
    """Background shapes (kind, x, y, w, h, angle, rgb) in output-image fractions; each of
    _MAX_CLUTTER slots is filled with probability 0.35 * level (about 4 shapes at level 1)."""
    shapes = []
    for _ in range(_MAX_CLUTTER):
        on, kind, x, y, w, h, angle = (take() for _ in range(7))
        colour = (20.0 + 215.0 * take(), 20.0 + 215.0 * take(), 20.0 + 215.0 * take())
        if on < 0.35 * level:
            shapes.append((int(kind * 3), x, y, 0.05 + 0.3 * w, 0.05 + 0.3 * h, angle * 180.0,
                           colour))
    return tuple(shapes)


def _draw_occluder(take, level: float) -> tuple | None:
    """An occluder on about 12% of faces at level 1: (kind, u, v, angle, rgb)."""
    u = [take() for _ in range(8)]
    if u[0] >= 0.12 * level:
        return None
    kind = ("hand", "bar", "glasses")[int(u[1] * 3)]
    return (kind, (u[2] - 0.5) * 1.2, u[3] * 1.3 - 0.3, (u[4] - 0.5) * 1.6,
            tuple(30.0 + 200.0 * x for x in u[5:8]))


def draw_look(rng: np.random.Generator, style: Style, size: int) -> Look:
    """Draws everything but the AUs; always consumes the same amount of `rng`."""
    take = iter(rng.random(_NUM_DRAWS).tolist()).__next__
    identity = draw_identity(take, style.identity)
    pose = [(2.0 * take() - 1.0) * style.pose for _ in range(5)]
    background = mix((128, 128, 128), [25.0 + 205.0 * take() for _ in range(3)],
                      min(style.clutter, 1.0))
    clutter = _draw_clutter(take, style.clutter)
    occluder = _draw_occluder(take, style.occlusion)
    ph = [2.0 * take() - 1.0 for _ in range(13)]
    lit = style.lighting
    # Blur, noise and JPEG each leave part of the images untouched, as in real collections.
    use_jpeg = (ph[6] + 1.0) / 2.0 < 0.5 * style.jpeg
    quality = int(min(max(95 - (35 + 25 * ph[7]) * style.jpeg, 5), 95)) if use_jpeg else 0
    return Look(
        identity=identity,
        roll=0.1 * (pose[3] + pose[4]),                      # triangular, within +-0.2 rad
        scale=1.0 + 0.07 * pose[0], shift=(0.05 * size * pose[1], 0.04 * size * pose[2]),
        background=background, clutter=clutter, occluder=occluder,
        gain=1.0 + 0.18 * lit * ph[0], bias=20.0 * lit * ph[1],
        gradient=(0.25 * lit * ph[2], 0.25 * lit * ph[3]),
        cast=tuple(1.0 + 0.06 * lit * x for x in ph[8:11]),
        blur=max(0.0, 0.1 + 0.6 * ph[4]) * style.blur,
        noise=max(0.0, 1.0 + 3.0 * ph[5]) * style.noise,
        noise_at=(int(32768 * (ph[11] + 1)), int(32768 * (ph[12] + 1))), jpeg=quality)
