"""Shared parts of the synthetic datasets: painting, photographing, encoding, the output folder.

Scenes are painted back to front on a :class:`Canvas` (a float RGB image and its label
map); :class:`Texture` and :func:`smooth_noise` give every region texture, and
``_photograph`` adds lighting changes, a colour cast, slow shading and sensor noise, so
that a colour threshold alone does not solve the data. Encoders write PNG and JPEG bytes
with fixed settings, so that the same seed gives byte-identical files.

The output folder is prepared here, and every generator ends by writing
``dfdam_synthetic.json`` (:data:`sharding.marker.MARKER`) in the dataset root, declaring
the image count of each split; :mod:`sharding.marker` reads it back for the sharder,
which checks against it instead of the official counts of the full releases.
"""
from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from sharding.marker import MARKER

Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------- output folder, marker (read by sharding.marker)

def _prepare_out(out: Path, layout_dirs: tuple[str, ...]) -> None:
    """Create ``out``, clearing a previous synthetic dataset; refuse other non-empty folders."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} is not empty and holds no {MARKER}; refusing to write a synthetic "
                                  "dataset into it (choose an empty or new folder)")
        (out / MARKER).unlink()
        for name in layout_dirs:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_marker(out: Path, layout: str, seed: int, counts: dict[str, int], params: dict[str, Any]) -> dict:
    marker = {"generator": "sharding.synthetic", "layout": layout, "seed": seed,
              "expected_counts": counts, "params": params}
    (out / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return marker


# --------------------------------------------------------------------------- drawing

class Canvas:
    """An image (float RGB) and its label map, painted back to front."""

    def __init__(self, height: int, width: int, fill_label: int, fill_colour: tuple[float, float, float]) -> None:
        self.height, self.width = height, width
        self.image = np.empty((height, width, 3), dtype=np.float32)  # (H, W, 3)
        self.image[:] = fill_colour
        self.label = np.full((height, width), fill_label, dtype=np.uint8)  # (H, W)

    def mask(self, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
        """A boolean (H, W) mask of whatever ``draw`` fills with 1 on a blank canvas."""
        layer = Image.new("L", (self.width, self.height), 0)
        draw(ImageDraw.Draw(layer))
        return np.asarray(layer, dtype=bool)

    def rect(self, box: Box) -> np.ndarray:
        return self.mask(lambda d: d.rectangle(_int_box(box), fill=1))

    def ellipse(self, box: Box) -> np.ndarray:
        return self.mask(lambda d: d.ellipse(_int_box(box), fill=1))

    def polygon(self, points: list[tuple[float, float]]) -> np.ndarray:
        return self.mask(lambda d: d.polygon([(round(x), round(y)) for x, y in points], fill=1))

    def paint(self, mask: np.ndarray, label: int | None, colour: Any) -> None:
        """Set ``mask`` to ``label`` (None keeps the label) and to ``colour``.

        ``colour`` is an (r, g, b), a :class:`Texture`, or an (H, W, 3) array.
        """
        if label is not None:
            self.label[mask] = label
        if isinstance(colour, Texture):
            self.image[mask] = colour.field[mask][:, None] * colour.colour[None, :]  # (N, 3)
            return
        colour = np.asarray(colour, dtype=np.float32)
        self.image[mask] = colour[mask] if colour.ndim == 3 else colour


@dataclass(frozen=True)
class Texture:
    """A colour modulated per pixel: ``colour * field``, evaluated only where it is painted."""

    colour: np.ndarray  # (3,)
    field: np.ndarray  # (H, W) multiplicative

    def striped(self, stripes: np.ndarray, shade: float) -> "Texture":
        """The same texture, darkened by ``shade`` where ``stripes`` (H, W) is true."""
        return Texture(self.colour, np.where(stripes, self.field * shade, self.field))


def _int_box(box: Box) -> list[int]:
    x0, y0, x1, y1 = box
    return [round(min(x0, x1)), round(min(y0, y1)), round(max(x0, x1)), round(max(y0, y1))]


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Unit-variance-ish noise, smooth over about ``cell`` pixels, (H, W) float32."""
    small = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2))).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR), dtype=np.float32)


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _textured(rng: np.random.Generator, canvas: Canvas, colour: np.ndarray, strength: float, cell: int) -> Texture:
    """``colour`` modulated by smooth noise of the given strength and grain."""
    field = 1.0 + strength * smooth_noise(rng, canvas.height, canvas.width, cell)
    return Texture(np.asarray(colour, dtype=np.float32), field)


def _photograph(rng: np.random.Generator, image: np.ndarray, noise: float) -> np.ndarray:
    """Lighting, colour cast, slow shading and sensor noise; returns uint8 RGB."""
    height, width = image.shape[:2]
    gain = rng.uniform(0.8, 1.2)
    cast = rng.uniform(0.93, 1.07, 3).astype(np.float32)
    shading = 1.0 + 0.08 * smooth_noise(rng, height, width, max(height, width) // 3)
    out = image * (gain * cast)[None, None, :] * shading[:, :, None]
    out += rng.normal(0.0, noise, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _jpeg_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()

