"""Analytic prompt adherence for the shapes dataset: colour, shape and direction read off a video."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from framework.data.video_decode import as_rgb255

# The generator's palette (data/make_shapes_dataset.py; a test checks they agree).
PALETTE = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 235), "yellow": (235, 220, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
CHANCE = {"colour": 1 / 4, "shape": 1 / 3, "direction": 1 / 4, "all": 1 / 48}
# Words a prompt may use besides the label itself.
_SYNONYMS = {"upward": "up", "upwards": "up", "downward": "down", "downwards": "down",
             "leftward": "left", "leftwards": "left", "rightward": "right", "rightwards": "right"}

FOREGROUND = 60.0  # RGB distance (0-255) from the background beyond which a pixel surely shows the shape
NOISE_FLOOR = 0.15  # coverage below this is background texture or compression noise
# Fill ratio of the bounding box: triangle 0.5, circle pi/4 ~ 0.785, square 1.0. Thin apex rows and blurred
# chroma push decoded triangles up to ~0.61 (circles 0.78-0.81, squares > 0.97): cut between those ranges.
TRIANGLE_BELOW, SQUARE_ABOVE = 0.69, 0.89

Label = tuple[str | None, str | None, str | None]


def parse_prompt(text: str) -> Label:
    """(colour, shape, direction) named in a prompt such as "a red circle moves left"; None where absent."""
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]

    def first(names: Iterable[str]) -> str | None:
        return next((w for w in words if w in names), None)

    return first(PALETTE), first(SHAPES), first(DIRECTIONS)


def _fill_ratio(cover: np.ndarray) -> float | None:
    """Shape area over its bounding box area for a coverage map (H, W) in [0, 1]; None when empty.

    The box sides are soft (the sum of each column's / row's largest coverage), so they have sub-pixel
    precision: an integer box around a 21-pixel circle can be off by 10% and blur circles into squares.
    """
    width, height = cover.max(axis=0).sum(), cover.max(axis=1).sum()
    return float(cover.sum() / (width * height)) if width > 0 and height > 0 else None


def detect(video: np.ndarray, value_range: tuple[float, float] | None = None) -> Label:
    """(colour, shape, direction) of the moving shape in video (T, H, W, 3); None where nothing stands out.

    value_range is what black and white map to: default (0, 255) for integer videos, (0, 1) for floats.
    """
    rgb = as_rgb255(video, value_range)
    # The shape covers a small part of each frame, so the per-channel median is the background.
    background = np.median(rgb.reshape(-1, 3), axis=0)
    sure = np.linalg.norm(rgb - background, axis=-1) > FOREGROUND  # (T, H, W)
    if not sure.any():
        return None, None, None
    mean = rgb[sure].mean(axis=0)
    colour = min(PALETTE, key=lambda n: float(np.linalg.norm(mean - np.asarray(PALETTE[n]))))
    # Coverage = how far each pixel lies from the background towards the shape's colour: anti-aliased edges
    # count in proportion, which keeps the fill ratio and the centroid sub-pixel accurate.
    towards = mean - background
    cover = np.clip((rgb - background) @ towards / float(towards @ towards), 0.0, 1.0)
    cover[cover < NOISE_FLOOR] = 0.0
    # The median over frames of the fill ratio is steadier than a single middle frame's.
    ratios = [r for r in map(_fill_ratio, cover) if r is not None]
    ratio = float(np.median(ratios))
    shape = "triangle" if ratio < TRIANGLE_BELOW else "square" if ratio > SQUARE_ABOVE else "circle"
    present = [t for t in range(len(cover)) if cover[t].sum() > 0]
    (x0, y0), (x1, y1) = (_centroid(cover[t]) for t in (present[0], present[-1]))
    dx, dy = x1 - x0, y1 - y0
    if dx == dy == 0:
        direction = None
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"  # image rows grow downwards
    return colour, shape, direction


def _centroid(cover: np.ndarray) -> tuple[float, float]:
    """Coverage-weighted (x, y) centre of a map (H, W)."""
    ys, xs = np.indices(cover.shape)
    total = cover.sum()
    return float((xs * cover).sum() / total), float((ys * cover).sum() / total)


def adherence(videos: Iterable[np.ndarray], prompts: Sequence[str],
              value_range: tuple[float, float] | None = None) -> dict[str, float]:
    """Fractions of videos whose detected colour, shape, direction (and all three) match their prompt."""
    hits = {k: 0 for k in CHANCE}
    n = 0
    for video, prompt in zip(videos, prompts, strict=True):
        want, got = parse_prompt(prompt), detect(video, value_range)
        # A part the prompt does not name cannot be matched: None never counts as a hit.
        ok = [w is not None and w == g for w, g in zip(want, got)]
        for key, hit in zip(("colour", "shape", "direction", "all"), (*ok, all(ok))):
            hits[key] += hit
        n += 1
    if n == 0:
        raise ValueError("adherence needs at least one (video, prompt) pair")
    return {k: v / n for k, v in hits.items()}
