"""A programmatic judge of the shapes world: from an image, what colour the shape is, on what background, what shape.

It reads pixel statistics only (no model, no training), so it can score the pocket model's generated images and
retrieved renders without itself being something that might be wrong in the same way as the model. Its own accuracy
is measured by :func:`judge_accuracy` on rendered scenes, clean or passed through :func:`degrade`, which imitates
the blur, noise and colour cast of a small diffusion model's 32 x 32 output.

Usage::

    judge(world.render(Scene("red", "circle", "blue")))        # Judgement(colour='red', background='blue', ...)
    judge_accuracy(World(0), samples=240, strength=1.0)        # JudgeAccuracy(colour=..., shape=..., ...)
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from gill.pocket.world import IMAGE_SIZE, World
from gill.tiny import COLOURS

_NAMES = sorted(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)  # (8, 3), 0..255
# Fewer foreground pixels than this cannot be called a shape: the smallest rendered shape (a triangle half the
# side wide) covers about 120 of the 1024 pixels, while stray noise pixels come in ones and twos.
_MIN_SHAPE_PIXELS = 24
# The first pass takes pixels this far (RGB Euclidean, 0..441) from the background as foreground. The two closest
# palette colours (yellow and orange) are 73 apart; a 3 x 3 median filter first brings noise well under this.
_FOREGROUND_DISTANCE = 32.0
# A colour from fewer interior pixels than this is too noisy; the whole mask's median is used instead.
_MIN_INTERIOR_PIXELS = 9
# Between the classes' ranges on degraded renders; see _shape.
_TRIANGLE_TAPER = 0.7
_SQUARE_FILL = 0.86
# A pixel this far (RGB Euclidean) from every blend of the two colours is neither shape, background nor edge ...
_OFF_BLEND_DISTANCE = 60.0
# ... and an image with more than this share of such pixels is no scene (at most 0.003 of a render degraded at
# strength 1.5 are, 0.13 at strength 2; at least 0.35 of a uniform-noise image).
_MAX_OFF_BLEND = 0.25
# Below a triangle's 1/2 (0.56 at the least when degraded at strength 1.5): a sprawling blob, not a shape.
_MIN_FILL = 0.4


@dataclass(frozen=True)
class Judgement:
    """What the judge sees: palette colour names of the shape and of the background, and the shape's name
    (``None`` when the foreground is too small to call, e.g. a plain single-colour image)."""

    colour: str
    background: str
    shape: str | None


@dataclass(frozen=True)
class JudgeAccuracy:
    """Fractions (0..1) of ``samples`` judged images whose colour, background and shape were right."""

    colour: float
    background: float
    shape: float
    samples: int


def _nearest(rgb: np.ndarray, exclude: str | None = None) -> str:
    """The palette name nearest (RGB Euclidean) to one ``rgb`` triple (0..255), never ``exclude``."""
    distances = np.linalg.norm(_PALETTE - rgb, axis=1)
    if exclude is not None:
        distances[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(distances))]


def _pixels(image: Image.Image) -> np.ndarray:
    """``image`` as a (32, 32, 3) float array of 0..255, denoised by a 3 x 3 median filter."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        # BOX averages every source pixel when shrinking (no aliasing of a noisy large image); BILINEAR enlarges.
        shrink = image.width > IMAGE_SIZE or image.height > IMAGE_SIZE
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    # A median keeps the shape's edges (a blur would round a square's corners) and removes pixel noise.
    return np.asarray(image.filter(ImageFilter.MedianFilter(3)), dtype=np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) ``mask``: drops specks of noise apart from the shape."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else mask


def _spread(mask: np.ndarray, erode: bool) -> np.ndarray:
    """``mask`` (H, W, bool) eroded (a pixel stays if its whole 3 x 3 block is set; outside the image counts as
    set, so a shape at the edge is not eaten from there) or dilated (set if any of its 3 x 3 block is)."""
    padded = np.pad(mask, 1, constant_values=erode)
    blocks = [padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] for dy in range(3) for dx in range(3)]
    return np.logical_and.reduce(blocks) if erode else np.logical_or.reduce(blocks)


def _features(mask: np.ndarray) -> tuple[float, float, bool]:
    """``(fill, taper, edge)`` of a foreground ``mask`` (H, W, bool, at least one pixel set).

    ``fill``: the mask's share of its bounding box, 1 for a square, pi/4 (0.79) for a circle, 1/2 for a triangle.
    ``taper``: the mean width of the box's top third of rows over that of its bottom third, 1 for a square or a
    circle, 1/5 for a triangle (apex up), and still under 1/2 when blur has eaten the apex. ``edge``: whether the
    mask reaches the image's outermost pixels, which no shape of the world does. All are taken on the
    mask opened by a 3 x 3 square (eroded, then dilated) when enough survives that: one noisy pixel stuck to a side
    would grow the box by a row and pull a square's fill towards a circle's, and opening removes such bumps while
    keeping the outline."""
    opened = _spread(_spread(mask, erode=True), erode=False)
    if opened.sum() >= _MIN_SHAPE_PIXELS:
        mask = opened
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    fill = float(mask.sum()) / ((bottom - top + 1) * (right - left + 1))
    widths = mask[top:bottom + 1].sum(axis=1)
    third = max(len(widths) // 3, 1)
    taper = float(widths[:third].mean() / max(widths[-third:].mean(), 1.0))
    edge = bool(top == 0 or left == 0 or bottom == mask.shape[0] - 1 or right == mask.shape[1] - 1)
    return fill, taper, edge


def _shape(mask: np.ndarray) -> str | None:
    """The shape that a foreground ``mask`` (H, W, bool) draws, or ``None`` when it is too small to call, or is
    no shape of the world: it reaches the image's edge, or fills less of its box than a triangle (a noise image).

    The thresholds sit in the gaps between the classes' ranges measured on 300 renders degraded at strength 1.0
    (fill: circles 0.72 to 0.81, squares 0.97 to 0.99; taper: triangles 0.27 to 0.51, circles and squares 0.92 to
    1.13); clean renders are further apart, and at strength 1.5 only the fill ranges start to overlap."""
    if mask.sum() < _MIN_SHAPE_PIXELS:
        return None
    fill, taper, edge = _features(mask)
    if edge or fill < _MIN_FILL:
        return None
    if taper < _TRIANGLE_TAPER:
        return "triangle"
    return "square" if fill > _SQUARE_FILL else "circle"


def judge(image: Image.Image) -> Judgement:
    """Judge one image of the shapes world (any size and mode; it is judged as a 32 x 32 RGB image).

    Background: the palette colour nearest the median of the outermost ring of pixels (a rendered shape never
    reaches it). Foreground: pixels nearer the shape's colour than the background's; the shape's colour is the
    palette colour (other than the background) nearest the median of the foreground's interior.

    A plain image, or one whose foreground is under :data:`_MIN_SHAPE_PIXELS` pixels, gives ``shape=None`` and, as
    colour, the palette colour other than the background nearest the median of the centre (for a plain image: the
    palette colour nearest the background's own). ``shape`` is also ``None`` for an image that is not two colours
    and their blends (e.g. noise), and for a foreground that reaches the image's edge or sprawls (see _shape)."""
    pixels = _pixels(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    background = _nearest(background_rgb)
    from_background = np.linalg.norm(pixels - background_rgb, axis=2)
    candidates = from_background > _FOREGROUND_DISTANCE
    if candidates.sum() < _MIN_SHAPE_PIXELS:
        quarter = IMAGE_SIZE // 4
        centre = pixels[quarter:-quarter, quarter:-quarter].reshape(-1, 3)
        return Judgement(_nearest(np.median(centre, axis=0), exclude=background), background, None)
    # Split at the midpoint between the two colours, which adapts to how close they are (yellow on orange) and to
    # how far blur has spread them, where one fixed distance would not. The first estimate of the shape's colour
    # (median of everything far from the background) includes blurred edge pixels; the second, from the interior
    # of the first split, does not.
    foreground_rgb, mask = np.median(pixels[candidates], axis=0), candidates
    for _ in range(2):
        split = np.linalg.norm(pixels - foreground_rgb, axis=2) < from_background
        if split.any():  # else (candidates scattered so that their median is nearer the background) keep them
            mask = _largest_component(split)
        interior = _spread(mask, erode=True)
        foreground_rgb = np.median(pixels[interior if interior.sum() >= _MIN_INTERIOR_PIXELS else mask], axis=0)
    colour = _nearest(foreground_rgb, exclude=background)
    # An image of one shape on one background holds only blends of the two colours (blur makes the blends; noise
    # adds a little). Where many pixels are far from every blend (a noise image, a scene of several colours), the
    # mask is an accident of the noise and no shape is called.
    step = foreground_rgb - background_rgb
    along = np.clip((pixels - background_rgb) @ step / max(float(step @ step), 1.0), 0.0, 1.0)
    off_blend = np.linalg.norm(pixels - background_rgb - along[..., None] * step, axis=2) > _OFF_BLEND_DISTANCE
    if off_blend.mean() > _MAX_OFF_BLEND:
        return Judgement(colour, background, None)
    return Judgement(colour, background, _shape(mask))


def degrade(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """``image`` made to look generated: gaussian blur (radius ``strength`` pixels), additive gaussian noise
    (standard deviation 20 x ``strength`` of 0..255) and a colour cast (each channel shifted by up to
    12 x ``strength``). ``strength`` 0 returns the image unchanged; 1 is clearly blurry and noisy yet readable."""
    if strength <= 0:
        return image.copy()
    blurred = image.convert("RGB").filter(ImageFilter.GaussianBlur(radius=strength))
    pixels = np.asarray(blurred, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, 20.0 * strength, pixels.shape) + rng.uniform(-12, 12, 3) * strength
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def judge_accuracy(world: World, samples: int = 240, seed: int = 0, strength: float = 0.0) -> JudgeAccuracy:
    """How often :func:`judge` is right on ``samples`` jittered renders of the world's training and held-out scenes,
    each passed through :func:`degrade` at ``strength`` (0 = clean). A shape of ``None`` counts as wrong."""
    scenes = world.train_scenes + world.heldout_scenes
    layout, noise = random.Random(seed), np.random.default_rng(seed)
    right: Counter[str] = Counter()
    for _ in range(samples):
        scene = layout.choice(scenes)
        verdict = judge(degrade(world.render(scene, layout), noise, strength))
        right["colour"] += verdict.colour == scene.colour
        right["background"] += verdict.background == scene.background
        right["shape"] += verdict.shape == scene.shape
    return JudgeAccuracy(right["colour"] / samples, right["background"] / samples, right["shape"] / samples, samples)
