"""Synthetic Cityscapes: street scenes written in the real ``leftImg8bit/`` + ``gtFine/`` layout.

The reader in :mod:`sharding.cityscapes` cannot tell it from the real thing: same
folders, file names and label encodings (official Cityscapes labelIds, with void ids
such as ego vehicle and rectification border, plus the ``*_gtFine_color.png``
colourings). Frames have sky above a skyline of buildings and trees, a road in
perspective between sidewalks and terrain, and cars, buses, trucks, people, cyclists,
poles, signs and lights on it. Every class has its own colour family and shape, with
texture (windows, lane marks, foliage), noise and lighting changes. Everything follows
from ``seed``: the same arguments write byte-identical files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from cityscapesscripts.helpers.labels import id2label

from sharding.synthetic_drawing import (Box, Canvas, _jitter, _photograph, _png_bytes, _prepare_out, _textured,
                                        _write_marker, smooth_noise)
from sharding.text import bar_disabled

CITYSCAPES_CITIES = {
    "train": ("aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich"),
}
_SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}

# Cityscapes label ids (official table) drawn by the generator.
UNLABELED, EGO_VEHICLE, RECTIFICATION_BORDER, OUT_OF_ROI, STATIC = 0, 1, 2, 3, 4
ROAD, SIDEWALK, PARKING, BUILDING, WALL, FENCE = 7, 8, 9, 11, 12, 13
POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY = 17, 19, 20, 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE = 24, 25, 26, 27, 28, 33


def _draw_vehicle(rng: np.random.Generator, c: Canvas, cx: float, yb: float, w: float, kind: int) -> None:
    """A car, truck or bus standing on the road with its wheels at row ``yb``."""
    wheel = (18, 18, 20)
    if kind == CAR:
        body = _jitter(rng, (35, 45, 125), 20)
        c.paint(c.rect((cx - w / 2, yb - 0.34 * w, cx + w / 2, yb - 0.08 * w)), CAR, body)
        c.paint(c.polygon([(cx - 0.32 * w, yb - 0.33 * w), (cx - 0.22 * w, yb - 0.52 * w),
                           (cx + 0.22 * w, yb - 0.52 * w), (cx + 0.34 * w, yb - 0.33 * w)]), CAR, body)
        c.paint(c.rect((cx - 0.24 * w, yb - 0.48 * w, cx + 0.24 * w, yb - 0.36 * w)), CAR, (150, 170, 190))
        c.paint(c.rect((cx - 0.46 * w, yb - 0.26 * w, cx - 0.36 * w, yb - 0.21 * w)), CAR, (230, 220, 170))
        c.paint(c.rect((cx + 0.36 * w, yb - 0.26 * w, cx + 0.46 * w, yb - 0.21 * w)), CAR, (230, 220, 170))
        wheels, r = (cx - 0.3 * w, cx + 0.3 * w), 0.09 * w
    elif kind == TRUCK:
        c.paint(c.rect((cx - w / 2, yb - 0.8 * w, cx + 0.2 * w, yb - 0.1 * w)), TRUCK, _jitter(rng, (195, 195, 185), 10))
        c.paint(c.rect((cx + 0.2 * w, yb - 0.5 * w, cx + w / 2, yb - 0.1 * w)), TRUCK, _jitter(rng, (150, 40, 30), 15))
        c.paint(c.rect((cx + 0.26 * w, yb - 0.45 * w, cx + 0.45 * w, yb - 0.32 * w)), TRUCK, (120, 140, 160))
        wheels, r = (cx - 0.35 * w, cx - 0.15 * w, cx + 0.35 * w), 0.08 * w
    else:  # BUS
        c.paint(c.rect((cx - w / 2, yb - 0.6 * w, cx + w / 2, yb - 0.08 * w)), BUS, _jitter(rng, (30, 125, 125), 15))
        c.paint(c.rect((cx - 0.46 * w, yb - 0.54 * w, cx + 0.46 * w, yb - 0.38 * w)), BUS, (40, 60, 70))
        wheels, r = (cx - 0.33 * w, cx + 0.33 * w), 0.08 * w
    for x in wheels:
        c.paint(c.ellipse((x - r, yb - 2 * r, x + r, yb)), kind, wheel)


def _draw_person(rng: np.random.Generator, c: Canvas, cx: float, yb: float, h: float, label: int) -> None:
    """A pedestrian (PERSON, reddish clothes) or a rider (RIDER, orange jacket) with feet at ``yb``."""
    shirt = _jitter(rng, (195, 50, 60) if label == PERSON else (235, 125, 30), 25)
    c.paint(c.rect((cx - 0.11 * h, yb - 0.47 * h, cx - 0.01 * h, yb)), label, (40, 40, 62))
    c.paint(c.rect((cx + 0.01 * h, yb - 0.47 * h, cx + 0.11 * h, yb)), label, (40, 40, 62))
    c.paint(c.rect((cx - 0.15 * h, yb - 0.8 * h, cx + 0.15 * h, yb - 0.45 * h)), label, shirt)
    c.paint(c.ellipse((cx - 0.09 * h, yb - h, cx + 0.09 * h, yb - 0.8 * h)), label, (225, 180, 150))


def _draw_cyclist(rng: np.random.Generator, c: Canvas, cx: float, yb: float, h: float) -> None:
    """A bicycle (BICYCLE) with its rider (RIDER) on top."""
    r = 0.2 * h
    frame = _jitter(rng, (125, 20, 40), 15)
    for x in (cx - 0.3 * h, cx + 0.3 * h):
        ring = c.ellipse((x - r, yb - 2 * r, x + r, yb)) & ~c.ellipse((x - 0.7 * r, yb - 1.7 * r, x + 0.7 * r, yb - 0.3 * r))
        c.paint(ring, BICYCLE, (25, 25, 25))
    c.paint(c.mask(lambda d: d.line([(round(cx - 0.3 * h), round(yb - r)), (round(cx), round(yb - 0.55 * h)),
                                     (round(cx + 0.3 * h), round(yb - r))], fill=1, width=max(1, round(0.05 * h)))),
            BICYCLE, frame)
    _draw_person(rng, c, cx, yb - 0.35 * h, 0.8 * h, RIDER)


def _draw_pole(rng: np.random.Generator, c: Canvas, x: float, yb: float, h: float, top: int | None) -> None:
    """A pole with an optional traffic sign or traffic light on top."""
    w = max(1.0, 0.035 * h)
    c.paint(c.rect((x - w / 2, yb - h, x + w / 2, yb)), POLE, _jitter(rng, (80, 80, 86), 8))
    s = 0.16 * h
    if top == TRAFFIC_SIGN:
        box = (x - s / 2, yb - h - s, x + s / 2, yb - h)
        shape = c.ellipse(box) if rng.random() < 0.5 else c.rect(box)
        c.paint(shape, TRAFFIC_SIGN, _jitter(rng, (225, 200, 35), 15))
    elif top == TRAFFIC_LIGHT:
        c.paint(c.rect((x - s / 3, yb - h - 1.1 * s, x + s / 3, yb - h)), TRAFFIC_LIGHT, (45, 42, 40))
        lamp = (235, 150, 40) if rng.random() < 0.5 else (60, 200, 90)
        c.paint(c.ellipse((x - s / 5, yb - h - 0.8 * s, x + s / 5, yb - h - 0.4 * s)), TRAFFIC_LIGHT, lamp)


def _draw_skyline(rng: np.random.Generator, c: Canvas, horizon: float) -> None:
    """Sky with clouds, then buildings with windows, walls, fences and trees along the horizon."""
    h, w = c.height, c.width
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    rows = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    sky = (1 - rows) * np.array([95, 145, 215], np.float32) + rows * np.array([190, 210, 235], np.float32)
    sky = np.broadcast_to(sky, (h, w, 3)).copy()
    clouds = np.clip(smooth_noise(rng, h, w, max(4, w // 10)) - 0.6, 0, None)[:, :, None]
    sky = sky + clouds * 60
    c.paint(np.ones((h, w), bool), SKY, sky)
    x = rng.uniform(-0.05, 0.02) * w
    while x < w:
        bw = rng.uniform(0.08, 0.22) * w
        if rng.random() < 0.8:
            top = horizon - rng.uniform(0.12, 0.42) * h
            base = _jitter(rng, (125, 112, 100), 25)
            facade = c.rect((x, top, x + bw, horizon + 2))
            c.paint(facade, BUILDING, _textured(rng, c, base, 0.06, 6))
            step = max(4.0, 0.05 * h)
            col, row = (xs - x) % step, (ys - top) % step
            windows = (facade & (col >= 0.3 * step) & (col < 0.75 * step) & (row >= 0.25 * step)
                       & (row < 0.8 * step) & (ys < horizon - 0.5 * step) & (xs < x + bw - 0.3 * step))
            c.paint(windows, BUILDING, (60, 66, 80))
        x += bw
    for _ in range(rng.integers(1, 4)):  # trees: trunk and foliage are both vegetation
        tx = rng.uniform(0, w)
        r = rng.uniform(0.08, 0.16) * h
        cy = horizon - rng.uniform(0.1, 0.25) * h
        foliage = _textured(rng, c, _jitter(rng, (55, 105, 40), 10), 0.35, 3)
        c.paint(c.rect((tx - 0.12 * r, cy, tx + 0.12 * r, horizon + 2)), VEGETATION, (80, 60, 40))
        c.paint(c.ellipse((tx - 1.3 * r, cy - r, tx + 1.3 * r, cy + r)), VEGETATION, foliage)
    if rng.random() < 0.5:
        x0 = rng.uniform(0, 0.6) * w
        c.paint(c.rect((x0, horizon - 0.07 * h, x0 + rng.uniform(0.15, 0.35) * w, horizon + 2)), WALL,
                _textured(rng, c, _jitter(rng, (165, 155, 128), 10), 0.05, 8))
    if rng.random() < 0.5:
        x0 = rng.uniform(0, 0.6) * w
        x1 = x0 + rng.uniform(0.15, 0.35) * w
        fence = c.rect((x0, horizon - 0.06 * h, x1, horizon + 2))
        posts = (np.arange(w) % max(3, w // 40) == 0)[None, :].repeat(h, 0)
        c.paint(fence, FENCE, _jitter(rng, (150, 125, 95), 10))
        c.paint(fence & posts, FENCE, (95, 80, 60))


def _draw_ground(rng: np.random.Generator, c: Canvas, horizon: float, vp: float) -> tuple[float, float, float]:
    """Terrain, sidewalks and a road in perspective; returns the road's (top half-width, spread, sidewalk spread)."""
    h, w = c.height, c.width
    ground = c.rect((0, horizon, w, h))
    c.paint(ground, TERRAIN, _textured(rng, c, _jitter(rng, (150, 165, 95), 10), 0.2, 4))
    a, b = 0.02 * w, rng.uniform(0.45, 0.7) * w
    b2 = b * rng.uniform(1.5, 1.9)
    c.paint(c.polygon([(vp - a * 1.5, horizon), (vp + a * 1.5, horizon), (vp + b2, h), (vp - b2, h)]), SIDEWALK,
            _textured(rng, c, _jitter(rng, (168, 148, 160), 10), 0.06, 3))
    c.paint(c.polygon([(vp - a, horizon), (vp + a, horizon), (vp + b, h), (vp - b, h)]), ROAD,
            _textured(rng, c, _jitter(rng, (88, 84, 92), 8), 0.05, 10))
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    t = np.clip((ys - horizon) / (h - horizon), 0, 1)
    lane = (np.abs(xs - vp) <= 0.5 + 2.5 * t) & (np.floor(np.sqrt(t) * 9) % 2 == 0) & (ys > horizon + 1)
    c.paint(lane & (c.label == ROAD), ROAD, (225, 225, 220))
    if rng.random() < 0.3:  # a parking bay: void in the train ids
        side = rng.choice([-1, 1])
        y0 = horizon + 0.4 * (h - horizon)
        t0, t1 = 0.4, 0.8
        c.paint(c.polygon([(vp + side * (a + t0 * b), y0), (vp + side * (a + t0 * b2 * 0.9), y0),
                           (vp + side * (a + t1 * b2 * 0.9), horizon + t1 * (h - horizon)),
                           (vp + side * (a + t1 * b), horizon + t1 * (h - horizon))]), PARKING, (118, 100, 112))
    return a, b, b2


def render_cityscapes(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (H, W, 3) uint8 RGB and its (H, W) uint8 Cityscapes label ids."""
    c = Canvas(height, width, UNLABELED, (0, 0, 0))
    h, w = height, width
    horizon = rng.uniform(0.38, 0.5) * h
    vp = rng.uniform(0.4, 0.6) * w
    _draw_skyline(rng, c, horizon)
    a, b, b2 = _draw_ground(rng, c, horizon, vp)

    def road_x(t: float, lane: float) -> float:  # lane in [-1, 1] across the road at depth t
        return vp + lane * (a + t * b) * 0.75

    def walk_x(t: float, side: int) -> float:  # the middle of a sidewalk at depth t
        return vp + side * (a + t * (b + b2) / 2)

    things: list[tuple[float, Callable[[], None]]] = []  # (bottom row, draw): far things first
    for _ in range(rng.integers(1, 5)):
        t = rng.uniform(0.15, 0.9)
        kind = rng.choice([CAR, CAR, CAR, BUS, TRUCK])
        things.append((t, lambda t=t, kind=kind: _draw_vehicle(
            rng, c, road_x(t, rng.uniform(-1, 1)), horizon + t * (h - horizon), (0.06 + 0.32 * t) * w, kind)))
    for _ in range(rng.integers(1, 4)):
        t = rng.uniform(0.1, 0.8)
        things.append((t, lambda t=t: _draw_person(
            rng, c, walk_x(t, rng.choice([-1, 1])), horizon + t * (h - horizon), (0.12 + 0.5 * t) * h, PERSON)))
    if rng.random() < 0.35:
        t = rng.uniform(0.2, 0.8)
        things.append((t, lambda t=t: _draw_cyclist(
            rng, c, road_x(t, rng.choice([-0.85, 0.85])), horizon + t * (h - horizon), (0.12 + 0.45 * t) * h)))
    for _ in range(rng.integers(1, 4)):
        t = rng.uniform(0.05, 0.7)
        top = rng.choice([TRAFFIC_SIGN, TRAFFIC_LIGHT, 0])
        things.append((t, lambda t=t, top=top: _draw_pole(
            rng, c, walk_x(t, rng.choice([-1, 1])) + rng.uniform(-3, 3), horizon + t * (h - horizon),
            (0.25 + 0.6 * t) * h, int(top) or None)))
    if rng.random() < 0.4:  # bins and boxes: "static", void in the train ids
        t = rng.uniform(0.1, 0.7)
        things.append((t, lambda t=t: c.paint(c.rect(_static_box(walk_x(t, rng.choice([-1, 1])),
                                                                  horizon + t * (h - horizon), (0.04 + 0.1 * t) * h)),
                                              STATIC, _jitter(rng, (110, 80, 50), 15))))
    for _, draw in sorted(things, key=lambda thing: thing[0]):
        draw()
    if rng.random() < 0.3:  # a patch nobody labelled
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.5, 0.8) * h
        c.paint(c.ellipse((cx - 0.04 * w, cy - 0.03 * h, cx + 0.04 * w, cy + 0.03 * h)), UNLABELED, (70, 60, 65))
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    hood = ys >= h * rng.uniform(0.88, 0.93) + 0.25 * h * ((xs - w / 2) / (w / 2)) ** 2
    c.paint(hood, EGO_VEHICLE, _textured(rng, c, np.array([28, 28, 34], np.float32), 0.1, 8))
    border = max(1, w // 128)
    c.paint(c.rect((0, 0, border - 1, h)) | c.rect((w - border, 0, w, h)), RECTIFICATION_BORDER, (0, 0, 0))
    c.paint(c.rect((0, 0, w, 0)), OUT_OF_ROI, (0, 0, 0))
    return _photograph(rng, c.image, 5.0), c.label


def _static_box(cx: float, yb: float, s: float) -> Box:
    return (cx - s / 2, yb - 1.2 * s, cx + s / 2, yb)


def colourise_label_ids(ids: np.ndarray) -> np.ndarray:
    """(H, W) label ids -> (H, W, 3) uint8 colours of the official table (``*_gtFine_color.png``)."""
    lut = np.zeros((256, 3), np.uint8)
    for label_id, label in id2label.items():
        if 0 <= label_id < 256:
            lut[label_id] = label.color
    return lut[ids]


def make_cityscapes(out: Path | str, *, seed: int = 0, train: int = 48, val: int = 12, test: int = 6,
                    height: int = 128, width: int = 256, cities: dict[str, int] | None = None,
                    show_progress: bool = False) -> dict[str, Any]:
    """Write a synthetic Cityscapes (``leftImg8bit/`` + ``gtFine/``) with the given image counts.

    Args:
        out: the dataset root to create.
        seed: everything follows from it.
        train, val, test: images per split.
        height, width: image size (the real one is 1024 x 2048).
        cities: cities per split (default 2 train, 1 val, 1 test).

    Returns:
        The marker written to ``<out>/dfdam_synthetic.json``.
    """
    out = Path(out)
    counts = {"train": train, "val": val, "test": test}
    per_split = {"train": 2, "val": 1, "test": 1, **(cities or {})}
    if min(counts.values()) < 1:
        raise ValueError(f"every split needs at least one image, got {counts}")
    if height < 16 or width < 16:
        raise ValueError(f"images must be at least 16x16, got {height}x{width}")
    for split, n in per_split.items():
        if not 1 <= n <= len(CITYSCAPES_CITIES[split]):
            raise ValueError(f"{split} can have 1 to {len(CITYSCAPES_CITIES[split])} cities, got {n}")
    _prepare_out(out, ("leftImg8bit", "gtFine"))
    bar = tqdm(total=sum(counts.values()), unit="img", desc="synthetic cityscapes", disable=bar_disabled(show_progress))
    for split, count in counts.items():
        names = CITYSCAPES_CITIES[split][: per_split[split]]
        for index in range(count):
            city = names[index % len(names)]
            key = f"{city}_{index // len(names):06d}_000019"
            rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
            rgb, ids = render_cityscapes(rng, height, width)
            if split == "test":  # test annotations are not public: only the void regions are labelled
                ids = np.where(np.isin(ids, (EGO_VEHICLE, RECTIFICATION_BORDER, OUT_OF_ROI)), ids, UNLABELED)
                ids = ids.astype(np.uint8)
            image_dir = out / "leftImg8bit" / split / city
            label_dir = out / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            (image_dir / f"{key}_leftImg8bit.png").write_bytes(_png_bytes(Image.fromarray(rgb)))
            (label_dir / f"{key}_gtFine_labelIds.png").write_bytes(_png_bytes(Image.fromarray(ids)))
            (label_dir / f"{key}_gtFine_color.png").write_bytes(_png_bytes(Image.fromarray(colourise_label_ids(ids))))
            bar.update(1)
    bar.close()
    params = {"height": height, "width": width, "cities": per_split}
    return _write_marker(out, "cityscapes", seed, counts, params)

