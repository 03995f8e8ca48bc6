"""Synthetic scenes for the built-in demo: flat-coloured shapes over textured backgrounds.

A scene is a list of :class:`SceneObject` drawn in order (later objects on top of earlier ones)
over a background texture (noise, stripes, gradient or checker). Rendering returns the picture and
every object's *visible* mask: its full mask minus everything drawn above it. The ground truth marks
the visible region, because that is what the picture shows and what an annotator would outline
(ReasonSeg's labelme polygons follow what is visible), and because mask proposals can only ever
cover visible pixels.

Everything here is a pure function of its arguments and of a ``numpy.random.Generator``, so a
seeded generator reproduces the same scene bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from utils.masks import labelme_to_mask

SHAPES = ("circle", "ring", "square", "triangle", "hexagon", "star", "cross")
# Saturated colours far from each other and from the muted backgrounds, so every colour name is
# unambiguous to a reader of the picture. A tuple of pairs keeps the order explicit.
COLOURS = (
    ("red", (214, 40, 40)),
    ("orange", (245, 140, 20)),
    ("yellow", (238, 214, 30)),
    ("green", (40, 165, 60)),
    ("cyan", (30, 190, 215)),
    ("blue", (40, 70, 215)),
    ("purple", (135, 55, 185)),
    ("pink", (240, 115, 185)),
)
COLOUR_RGB = dict(COLOURS)
BACKGROUNDS = ("noise", "stripes", "gradient", "checker")

_SUBPIXEL_BITS = 4  # cv2.fillPoly draws vertices at 1/16 pixel, so small shapes keep their form
_RING_INNER = 0.5  # inner / outer radius of a ring
_STAR_INNER = 0.45  # inner / outer radius of a star (fat enough to stay star-like at 12 px)
_CROSS_HALF_WIDTH = 0.32  # half arm width / arm length of a cross
_COLOUR_JITTER = 12  # per-channel jitter of an object's colour around its named colour
_PIXEL_NOISE = 3.0  # std of the sensor-like noise added to the whole picture


@dataclass(frozen=True)
class SceneObject:
    """One flat-coloured shape.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of the names in :data:`COLOURS`.
        rgb: the exact colour painted (the named colour with a small jitter).
        center_x, center_y: centre in pixel coordinates (pixel centres are integers).
        radius: circumradius in pixels (the distance from the centre to the furthest corner).
        rotation: rotation in degrees, counter-clockwise on screen.
    """

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    center_x: float
    center_y: float
    radius: float
    rotation: float


@dataclass(frozen=True)
class ObjectGeometry:
    """What an observer measures of one object in the rendered picture.

    Attributes:
        full_area: pixels of the whole shape.
        visible_area: pixels left visible after the objects drawn above it.
        bbox: ``(x0, y0, x1, y1)`` of the visible pixels, inclusive.
        centroid: ``(x, y)`` mean position of the visible pixels.
        num_components: 8-connected pieces of the visible region.
    """

    full_area: int
    visible_area: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    num_components: int

    @property
    def visible_fraction(self) -> float:
        return self.visible_area / max(self.full_area, 1)


def _regular_polygon(num_vertices: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + 2.0 * math.pi * np.arange(num_vertices) / num_vertices
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def shape_outlines(obj: SceneObject) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer outline and optional hole outline of ``obj`` in image coordinates.

    Returns:
        ``(outer, hole)``: ``(V, 2)`` float arrays of ``x, y`` vertices; ``hole`` is ``None``
        except for rings.
    """
    r = obj.radius
    # Image y points down, so "pointing up" is the -y direction (phase -90 degrees).
    up = -math.pi / 2
    hole = None
    if obj.shape == "circle":
        outer = _regular_polygon(96, r, 0.0)
    elif obj.shape == "ring":
        outer = _regular_polygon(96, r, 0.0)
        hole = _regular_polygon(96, r * _RING_INNER, 0.0)
    elif obj.shape == "square":
        outer = _regular_polygon(4, r, math.pi / 4)
    elif obj.shape == "triangle":
        outer = _regular_polygon(3, r, up)
    elif obj.shape == "hexagon":
        outer = _regular_polygon(6, r, 0.0)
    elif obj.shape == "star":
        tips = _regular_polygon(5, r, up)
        notches = _regular_polygon(5, r * _STAR_INNER, up + math.pi / 5)
        outer = np.stack([tips, notches], axis=1).reshape(10, 2)
    elif obj.shape == "cross":
        a = r / math.sqrt(1 + _CROSS_HALF_WIDTH**2)  # arm length, so the corners sit at r
        w = a * _CROSS_HALF_WIDTH
        outer = np.array(
            [[w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a]]
            + [[-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w], [-w, -a]]
        )
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    theta = -math.radians(obj.rotation)  # counter-clockwise on screen with y pointing down
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    centre = np.array([obj.center_x, obj.center_y])

    def place(points: np.ndarray) -> np.ndarray:
        return points @ rotation.T + centre

    return place(outer), None if hole is None else place(hole)


def _fill(canvas: np.ndarray, points: np.ndarray, value: int) -> None:
    fixed = np.round(points * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(canvas, [fixed], value, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)


def object_mask(obj: SceneObject, height: int, width: int) -> np.ndarray:
    """The full (unoccluded) mask of ``obj``: ``(H, W)`` bool."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    outer, hole = shape_outlines(obj)
    _fill(canvas, outer, 1)
    if hole is not None:
        _fill(canvas, hole, 0)
    return canvas.astype(bool)


def render_masks(
    objects: list[SceneObject], height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Full and visible masks of ``objects`` drawn in order (later ones on top).

    Returns:
        ``(full_masks, visible_masks)``, both ``(N, H, W)`` bool; the visible masks are disjoint.
    """
    full = np.zeros((len(objects), height, width), dtype=bool)
    owner = np.full((height, width), -1, dtype=np.int16)
    for index, obj in enumerate(objects):
        full[index] = object_mask(obj, height, width)
        owner[full[index]] = index
    visible = owner[None] == np.arange(len(objects), dtype=np.int16)[:, None, None]
    return full, visible


def measure_objects(full_masks: np.ndarray, visible_masks: np.ndarray) -> list[ObjectGeometry]:
    """:class:`ObjectGeometry` of each object from its ``(N, H, W)`` full and visible masks."""
    geometries = []
    for full, visible in zip(full_masks, visible_masks):
        ys, xs = np.nonzero(visible)
        if len(xs) == 0:
            bbox, centroid, components = (0, 0, 0, 0), (0.0, 0.0), 0
        else:
            bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
            centroid = (float(xs.mean()), float(ys.mean()))
            components = cv2.connectedComponents(visible.astype(np.uint8), connectivity=8)[0] - 1
        geometries.append(ObjectGeometry(int(full.sum()), len(xs), bbox, centroid, int(components)))
    return geometries


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour: greys, beiges, slate, so objects stand out by colour."""
    grey = rng.uniform(70.0, 200.0)
    tint = rng.uniform(-18.0, 18.0, size=3)
    return np.clip(grey + tint, 0.0, 255.0)


def render_background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """A textured background ``(H, W, 3)`` float32 in ``[0, 255]``.

    ``noise``: smooth blotches; ``stripes``: a sinusoid at a random angle and period;
    ``gradient``: a linear blend between two colours; ``checker``: a rotated checkerboard.
    """
    first, second = _muted_colour(rng), _muted_colour(rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0.0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    if kind == "noise":
        cells = int(rng.integers(3, 7))
        coarse = rng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
        blend = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    elif kind == "stripes":
        period = rng.uniform(0.06, 0.16) * max(height, width)
        blend = 0.5 + 0.5 * np.sin(2.0 * math.pi * along / period + rng.uniform(0.0, 2 * math.pi))
    elif kind == "gradient":
        blend = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    elif kind == "checker":
        across = -xs * math.sin(angle) + ys * math.cos(angle)
        cell = rng.uniform(0.08, 0.2) * max(height, width)
        blend = ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    blend = np.clip(blend, 0.0, 1.0)[..., None]
    return (first * (1.0 - blend) + second * blend).astype(np.float32)


def render_image(
    rng: np.random.Generator,
    objects: list[SceneObject],
    full_masks: np.ndarray,
    background: str,
) -> np.ndarray:
    """Paint ``objects`` (``(N, H, W)`` full masks) over a background: ``(H, W, 3)`` uint8."""
    height, width = full_masks.shape[1:]
    image = render_background(rng, background, height, width)
    for obj, mask in zip(objects, full_masks):
        image[mask] = np.asarray(obj.rgb, dtype=np.float32)
    image += rng.normal(0.0, _PIXEL_NOISE, size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def sample_objects(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_objects: int,
    allow_overlap: bool,
    radius_range: tuple[float, float] = (0.08, 0.2),
    max_tries: int = 60,
) -> list[SceneObject] | None:
    """Random shapes, colours, sizes, rotations and positions, fully inside the image.

    Args:
        radius_range: circumradius range as fractions of the shorter image side.
        allow_overlap: if False, circumcircles stay 2 px apart; if True, objects may overlap
            (whether each stays visible enough is checked by the caller on the rendered masks).

    Returns:
        the objects in drawing order, or ``None`` if they could not be placed.
    """
    side = min(height, width)
    objects: list[SceneObject] = []
    for _ in range(num_objects):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour, base_rgb = COLOURS[int(rng.integers(len(COLOURS)))]
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        rgb = tuple(int(c) for c in np.clip(np.asarray(base_rgb) + jitter, 0, 255))
        radius = float(rng.uniform(*radius_range)) * side
        rotation = float(rng.uniform(0.0, 360.0))
        for _ in range(max_tries):
            cx = float(rng.uniform(radius, width - 1 - radius))
            cy = float(rng.uniform(radius, height - 1 - radius))
            clear = all(
                math.hypot(cx - o.center_x, cy - o.center_y) >= radius + o.radius + 2.0
                for o in objects
            )
            # Overlapping scenes still keep centres apart so no object swallows another.
            apart = all(
                math.hypot(cx - o.center_x, cy - o.center_y) >= 0.6 * max(radius, o.radius)
                for o in objects
            )
            if clear or (allow_overlap and apart):
                break
        else:
            return None
        objects.append(
            SceneObject(
                shape, colour, rgb, round(cx, 2), round(cy, 2), round(radius, 2), round(rotation, 1)
            )
        )
    return objects


def _bridge(polygon: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Splice ``hole`` into ``polygon`` through their closest vertices.

    The two coincident bridge edges cancel when filled, so one simple polygon list can describe a
    region with a hole (labelme polygons cannot hold holes, and ReasonSeg readers draw each polygon
    on its own). The bridge runs through the region itself, so drawing its outline adds nothing.
    """
    distances = ((polygon[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
    hole_loop = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([polygon[: i + 1], hole_loop, polygon[i:]])


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Labelme-style polygons of a binary mask, one per 8-connected piece, holes bridged in.

    Args:
        mask: ``(H, W)`` bool.

    Returns:
        a list of ``(V, 2)`` int32 arrays of ``x, y`` pixel coordinates.
    """
    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return []
    hierarchy = hierarchy[0]
    polygons = []
    for index, contour in enumerate(contours):
        if hierarchy[index][3] != -1:
            continue  # a hole: spliced into its parent below
        polygon = contour[:, 0, :]
        child = hierarchy[index][2]
        while child != -1:
            polygon = _bridge(polygon, contours[child][:, 0, :])
            child = hierarchy[child][0]
        polygons.append(polygon.astype(np.int32))
    return polygons


def scene_is_clear(
    objects: list[SceneObject],
    visible_masks: np.ndarray,
    geometry: list[ObjectGeometry],
    min_visible_fraction: float = 0.7,
    min_visible_area: int = 60,
) -> bool:
    """Whether every object can be told apart in the picture.

    Each object must be visible in one piece, mostly unoccluded and not tiny, and objects that
    touch (visible regions within 4 px) must have different colour names: two touching shapes of
    the same flat colour would read as one blob, and the ground truth would then draw a border
    the picture does not show.

    Args:
        visible_masks: ``(N, H, W)`` bool, from :func:`render_masks`.
    """
    for geo in geometry:
        if geo.num_components != 1 or geo.visible_area < min_visible_area:
            return False
        if geo.visible_fraction < min_visible_fraction:
            return False
    kernel = np.ones((9, 9), dtype=np.uint8)  # 4 px in every direction
    for i in range(len(objects)):
        grown = cv2.dilate(visible_masks[i].astype(np.uint8), kernel).astype(bool)
        for j in range(i + 1, len(objects)):
            if objects[i].colour == objects[j].colour and (grown & visible_masks[j]).any():
                return False
    return True


def exact_polygons(visible_mask: np.ndarray) -> list[np.ndarray] | None:
    """Labelme polygons of ``(H, W)`` bool ``visible_mask``, or ``None`` unless they rasterise
    (as ReasonSeg readers do) to exactly that mask."""
    polygons = mask_to_polygons(visible_mask)
    shapes = [{"label": "target", "points": p.tolist()} for p in polygons]
    height, width = visible_mask.shape
    if not np.array_equal(labelme_to_mask(shapes, height, width) == 1, visible_mask):
        return None
    return polygons
