"""The synthetic world of the embedded default model: scenes, their prompts, their exact renderings.

A scene is one shape on a plain background. Every attribute is categorical and every full prompt
maps to exactly one image, so a generated picture can be scored against a known ground truth
(attribute read-back, PSNR, SSIM). The grammar is small on purpose: the whole world (1,584 scenes)
is learnable by a ~3M-parameter UNet within a few GPU minutes, yet the text decides every pixel.

Grammar (optional parts in brackets)::

    a [small|large] <colour> <shape> [<position phrase>] [on a <background> background]

e.g. "a small red circle at the top left on a blue background".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
RGB = tuple[int, int, int]

# Shape colours and backgrounds are far apart in RGB (>= 100 units) so that a blurry, slightly
# off-colour generation still reads back unambiguously.
COLOURS: dict[str, RGB] = {
    "red": (230, 40, 40),
    "green": (40, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (160, 60, 200),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, RGB] = {
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "blue": (50, 90, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, int] = {"small": 16, "large": 28}  # bounding-box side in pixels
GRID: tuple[int, int, int] = (14, 32, 50)  # centre coordinate of each third (large shapes fit exactly)
# position name -> (row, column) on the 3x3 grid, and the phrase that says it
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}  # fmt: skip
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}  # fmt: skip
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "background")
OPTIONAL_ATTRIBUTES: tuple[str, ...] = ("size", "position", "background")  # may be left out of a prompt


@dataclass(frozen=True)
class Scene:
    """A fully specified scene: the ground truth of one full prompt."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        checks = (
            (self.shape, SHAPES),
            (self.colour, COLOURS),
            (self.size, SIZES),
            (self.position, POSITIONS),
            (self.background, BACKGROUNDS),
        )
        for value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"unknown attribute value {value!r}")
        if self.colour == self.background:
            raise ValueError("a shape cannot have the colour of its background")

    @property
    def centre(self) -> tuple[int, int]:
        """(x, y) pixel centre of the shape's bounding box."""
        row, col = POSITIONS[self.position]
        return GRID[col], GRID[row]

    def prompt(self, omit: Iterable[str] = ()) -> str:
        """The prompt for this scene, leaving out the optional attributes named in ``omit``."""
        return PartialScene(**{a: getattr(self, a) for a in ATTRIBUTES if a not in set(omit)}).prompt()


@dataclass(frozen=True)
class PartialScene:
    """What a prompt says; None where it says nothing (the harness scores only what is said)."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None

    def prompt(self) -> str:
        if self.shape is None or self.colour is None:
            raise ValueError("a prompt needs at least a colour and a shape")
        words = ["a"] + ([self.size] if self.size else []) + [self.colour, self.shape]
        if self.position:
            words.append(POSITION_PHRASES[self.position])
        if self.background:
            words.append(f"on a {self.background} background")
        return " ".join(words)

    def full(self) -> Scene | None:
        """The Scene if every attribute is given, else None."""
        values = {a: getattr(self, a) for a in ATTRIBUTES}
        return None if None in values.values() else Scene(**values)


def _alternation(words: Iterable[str]) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_PHRASE_TO_POSITION = {p: name for name, p in POSITION_PHRASES.items()}
_PHRASE_TO_POSITION.update({"in the centre": "center", "in the middle": "center"})
_PROMPT_RE = re.compile(
    rf"^an? (?:(?P<size>{_alternation(SIZES)}) )?(?P<colour>{_alternation(COLOURS)}) "
    rf"(?P<shape>{_alternation(SHAPES)})(?: (?P<position>{_alternation(_PHRASE_TO_POSITION)}))?"
    rf"(?: on an? (?P<background>{_alternation(BACKGROUNDS)}) background)?$"
)


def parse_prompt(text: str) -> PartialScene:
    """Read a prompt of the grammar back into attributes; ValueError if it is outside the grammar."""
    norm = " ".join(text.lower().replace("grey", "gray").strip().rstrip(".").split())
    match = _PROMPT_RE.match(norm)
    if match is None:
        raise ValueError(f"prompt is outside the synthetic grammar: {text!r}")
    parts = match.groupdict()
    if parts["position"] is not None:
        parts["position"] = _PHRASE_TO_POSITION[parts["position"]]
    if parts["colour"] == parts["background"]:
        raise ValueError(f"shape colour equals background colour: {text!r}")
    return PartialScene(**parts)


def all_scenes() -> list[Scene]:
    """Every scene of the world, in a fixed canonical order (the training set)."""
    return [
        Scene(shape, colour, size, position, background)
        for background in BACKGROUNDS
        for colour in COLOURS
        if colour != background
        for shape in SHAPES
        for size in SIZES
        for position in POSITIONS
    ]


_SUPERSAMPLE = 4


def _subpixel_grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Sample coordinates (x, y), shape (size*4, size*4): 4x4 samples inside each pixel."""
    coords = (np.arange(size * _SUPERSAMPLE, dtype=np.float64) + 0.5) / _SUPERSAMPLE
    return np.meshgrid(coords, coords, indexing="xy")


_XS, _YS = _subpixel_grid()


def shape_coverage(shape: str, cx: float, cy: float, side: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape (anti-aliased), shape (64, 64), float64.

    The shape's bounding box is a side x side square centred at (cx, cy); the triangle points up.
    The analyser reuses this as its shape templates, so the two can never disagree on geometry.
    """
    dx, dy, half = _XS - cx, _YS - cy, side / 2.0
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= half
    elif shape == "triangle":
        inside = (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2.0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    n = IMAGE_SIZE
    return inside.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The exact ground-truth image of a scene: uint8 array (64, 64, 3). Deterministic."""
    cx, cy = scene.centre
    cover = shape_coverage(scene.shape, cx, cy, SIZES[scene.size])[..., None]
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64)
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float64)
    return np.rint(bg * (1.0 - cover) + fg * cover).astype(np.uint8)


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """Ground truth of many scenes: uint8 array (N, 64, 64, 3)."""
    if not scenes:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return np.stack([render(s) for s in scenes])


def render_prompt(text: str) -> np.ndarray:
    """Ground truth of a full prompt; ValueError for a partial prompt (it has no single image)."""
    scene = parse_prompt(text).full()
    if scene is None:
        raise ValueError(f"prompt does not specify every attribute: {text!r}")
    return render(scene)


def is_trained_prompt(text: str) -> bool:
    """Whether ``text`` is word for word a prompt the embedded model was trained on: a scene's prompt
    with any of its optional attributes left out (no synonyms, capitals or full stops)."""
    try:
        scene = parse_prompt(text)
    except ValueError:
        return False
    return scene.prompt() == text


def grammar() -> str:
    """The exact grammar of the training prompts, generated from the world's vocabulary (README.md
    shows this text; a test keeps the two equal)."""
    rows = (
        ("size", " | ".join(SIZES)),
        ("colour", " | ".join(COLOURS)),
        ("shape", " | ".join(SHAPES)),
        ("position", " | ".join(POSITION_PHRASES.values())),
        ("background", " | ".join(BACKGROUNDS) + "   (never the shape's colour)"),
    )
    lines = ["a [<size>] <colour> <shape> [<position>] [on a <background> background]", ""]
    lines += [f"{name + ':':<12}{choices}" for name, choices in rows]
    return "\n".join(lines)
