#!/usr/bin/env python3
"""Evaluation images/s of one worker under each prediction protocol, beside single-scale.

DF-DAM (``--backbone``, eval mode, random weights: speed does not depend on them) predicts
``--images`` random images of ``--size`` through ``pipeline.inference.predict_scores``, the
function ``run.py evaluate`` and ``run.py predict`` use, once per protocol:

* ``single``: one whole-image pass (what training validates with);
* ``flip``: the image and its mirror;
* ``ms``: the paper's scales {0.5, ..., 2.0} (section 4.4);
* ``ms_flip``: both, the paper's test protocol (Tables 3 and 5);
* ``slide``: ``--crop`` windows 2/3 of a crop apart, one scale.

The peer is the single-scale row of the same run. ``pixels x`` is how many more input pixels
a protocol runs through the network than one pass (sum of s^2 over the scales, times 2 with
flips; for slide the windows' total area over the image's), the cost a protocol should have
if the network's cost is proportional to its input; ``time x`` is the measured ratio. The
last column extrapolates to Cityscapes val (500 frames) on one worker; N Ray workers
(``run.py evaluate --workers N``) divide it by about N, since shards are independent.

Each row: one untimed warm-up image, then ``--images`` timed images, the median seconds per
image reported. ``torch.set_num_threads(--threads)``: a Ray worker with one CPU runs with 1.

Examples::

    python benchmarks/eval_throughput.py                                # CPU, 256x512, ResNet-18
    python benchmarks/eval_throughput.py --size 1024x2048 --images 1 --protocols single,ms_flip
    python benchmarks/eval_throughput.py --device cuda --size 1024x2048 --images 5  # a Cityscapes frame on a GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import LogitsOnly, build_dfdam  # noqa: E402
from models.names import BACKBONES  # noqa: E402
from pipeline.config import PAPER_EVAL_SCALES, InferenceConfig  # noqa: E402
from pipeline.inference import predict_scores, windows  # noqa: E402
from sharding.text import format_table, parse_size  # noqa: E402

CITYSCAPES_VAL = 500


def protocols(crop: tuple[int, int]) -> dict[str, InferenceConfig]:
    return {
        "single": InferenceConfig(),
        "flip": InferenceConfig(flip=True),
        "ms": InferenceConfig(scales=PAPER_EVAL_SCALES),
        "ms_flip": InferenceConfig(scales=PAPER_EVAL_SCALES, flip=True),
        "slide": InferenceConfig(mode="slide", crop=crop),
    }


def pixel_ratio(settings: InferenceConfig, size: tuple[int, int]) -> float:
    """Input pixels through the network per image, relative to one whole-image pass."""
    flips = 2 if settings.flip else 1
    if settings.mode == "slide":
        assert settings.crop is not None
        area = 0
        for scale in settings.scales:
            h, w = round(size[0] * scale), round(size[1] * scale)
            area += sum((r.stop - r.start) * (c.stop - c.start) for r, c in windows(h, w, settings.crop, (
                max(1, 2 * settings.crop[0] // 3), max(1, 2 * settings.crop[1] // 3))))
        return flips * area / (size[0] * size[1])
    return flips * sum(s * s for s in settings.scales)


def time_protocol(model, settings: InferenceConfig, size: tuple[int, int], images: int, device) -> float:
    """Median seconds per image (one untimed warm-up)."""
    x = torch.randn(1, 3, *size, device=device)
    predict_scores(model, x, settings)
    times = []
    for _ in range(images):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_scores(model, x, settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="256x512", help="image HxW (Cityscapes: 1024x2048)")
    p.add_argument("--crop", default=None, help="slide window HxW (default: the image's height, square)")
    p.add_argument("--backbone", default="resnet18", choices=BACKBONES)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--images", type=int, default=2, help="timed images per protocol")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    p.add_argument("--protocols", default="single,flip,ms,ms_flip,slide")
    args = p.parse_args(argv)

    size = parse_size(args.size, minimum=64)
    crop = parse_size(args.crop, minimum=32) if args.crop else (size[0], size[0])
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LogitsOnly(build_dfdam(args.classes, backbone=args.backbone, aux_heads=False)).eval().to(device)
    chosen = protocols(crop)
    names = [n.strip() for n in args.protocols.split(",")]
    unknown = [n for n in names if n not in chosen]
    if unknown:
        p.error(f"--protocols: unknown {unknown}; expected some of {list(chosen)}")
    if "single" not in names:
        names.insert(0, "single")  # the peer every row is compared with

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"DF-DAM {args.backbone}, {args.classes} classes, {size[0]}x{size[1]} images, {name}; "
          f"load average {load:.1f} at start", flush=True)
    rows, base = [], None
    with torch.no_grad():
        for protocol in names:
            seconds = time_protocol(model, chosen[protocol], size, args.images, device)
            base = seconds if protocol == "single" else base
            ratio = pixel_ratio(chosen[protocol], size)
            rows.append((protocol, f"{1 / seconds:.3f}", f"{seconds:.2f}", f"{ratio:.2f}",
                         f"{seconds / base:.2f}", f"{CITYSCAPES_VAL * seconds / 60:.1f}"))
            print(f"  {protocol}: {seconds:.2f} s/image", flush=True)
    print()
    print(format_table(("protocol", "images/s", "s/image", "pixels x", "time x",
                        f"min for {CITYSCAPES_VAL} images"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
