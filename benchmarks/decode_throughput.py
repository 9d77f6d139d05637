#!/usr/bin/env python3
"""Decoding a shard sample, per image encoding of ``run.py shard``, beside its size cost.

Generates a synthetic Cityscapes split (frames of ``--size``, the real 1024x2048 by default)
and a synthetic VOC split (photos of 375-500 px a side, as VOC's), packs each twice with
``sharding.write.shard_split`` (``--image-encoding original`` and ``lz4``), reads the
samples' members into memory and times, on one core (one thread, page cache irrelevant:
the bytes are in memory), what the loaders do per sample: image + label through
``sharding.samples.decode_members`` (PIL for PNG/JPEG and the label PNG; LZ4 + ``.npy``
for the lz4 encoding). For the original bytes it also times torchvision.io's decoders
(``decode_png`` / ``decode_jpeg``, image and label) on the same bytes, as the floor of
decoding them, and says whether they give PIL's pixels.

"bytes/sample" counts the shard files (tar headers included) per sample; "x orig" is that
against the original encoding's shards. Each sample's time is the fastest of ``--repeat``
decodes; the table gives their mean.

    python benchmarks/decode_throughput.py                      # 8 Cityscapes frames, 32 VOC photos
    python benchmarks/decode_throughput.py --images 16 --voc-images 64 --repeat 5
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before numpy and torch load

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding.pixels import IMAGE_MEMBER, LABEL_MEMBER  # noqa: E402
from sharding.samples import LABEL_PNG, decode_members  # noqa: E402
from sharding.synthetic import make_cityscapes, make_voc  # noqa: E402
from sharding.text import format_table, parse_size  # noqa: E402
from sharding.verify import tar_samples  # noqa: E402
from sharding.write import shard_split  # noqa: E402

Members = dict[str, bytes]


def best_ms(decode: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        decode()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def mean_ms(samples: list[Members], decode: Callable[[Members], object], repeat: int) -> float:
    """Mean over the samples of each one's fastest decode, in milliseconds."""
    return float(np.mean([best_ms(lambda m=m: decode(m), repeat) for m in samples]))


def pack(dataset: str, root: Path, split: str, out: Path, encoding: str) -> tuple[list[Members], int]:
    """The split packed with ``encoding``: its samples' members in memory, and the shards' bytes."""
    shard_split(dataset, root, split, out, shard_size=8, workers=1, show_progress=False, encoding=encoding)
    shards = sorted(out.glob(f"{split}-*.tar"))
    return [members for shard in shards for _, members in tar_samples(shard)], sum(p.stat().st_size for p in shards)


def torchvision_decoders(ext: str) -> tuple[str, Callable[[Members], tuple[np.ndarray, np.ndarray]]]:
    """torchvision.io's decoder for ``ext`` and for the label PNG, one thread."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    torch.set_num_threads(1)
    image_decoder = decode_png if ext == "png" else decode_jpeg
    name = f"torchvision.io.{image_decoder.__name__} + decode_png"

    def decode(members: Members) -> tuple[np.ndarray, np.ndarray]:
        image = image_decoder(torch.frombuffer(bytearray(members[ext]), dtype=torch.uint8), mode=ImageReadMode.RGB)
        label = decode_png(torch.frombuffer(bytearray(members[LABEL_PNG]), dtype=torch.uint8))
        return image.permute(1, 2, 0).numpy(), label[0].numpy()

    return name, decode


def measure(dataset: str, root: Path, split: str, scratch: Path, repeat: int) -> list[list[str]]:
    """The table's rows for one dataset: original (PIL), original (torchvision.io), lz4."""
    ext = "png" if dataset == "cityscapes" else "jpg"
    original, original_bytes = pack(dataset, root, split, scratch / f"{dataset}-original", "original")
    lz4, lz4_bytes = pack(dataset, root, split, scratch / f"{dataset}-lz4", "lz4")
    n = len(original)
    height, width = decode_members(original[0], "first")[1].shape
    sizes = f"{height}x{width}" if dataset == "cityscapes" else "375-500 px"
    base_ms = mean_ms(original, lambda m: decode_members(m, "?"), repeat)
    tv_name, tv_decode = torchvision_decoders(ext)
    tv_ms = mean_ms(original, tv_decode, repeat)
    lz4_ms = mean_ms(lz4, lambda m: decode_members(m, "?"), repeat)
    same_tv = all(all(np.array_equal(a, b) for a, b in zip(tv_decode(m), decode_members(m, "?"))) for m in original)
    same_lz4 = all(all(np.array_equal(a, b) for a, b in zip(decode_members(x, "?"), decode_members(y, "?")))
                   for x, y in zip(original, lz4))

    def row(what: str, decoder: str, shard_bytes: int, ms: float, same: str) -> list[str]:
        return [f"{dataset} {sizes}", what, decoder, f"{shard_bytes / n / 1e6:.2f}",
                f"{shard_bytes / original_bytes:.2f}", f"{ms:.2f}", f"{1e3 / ms:.0f}", f"{base_ms / ms:.1f}", same]

    return [
        row(f"original: {ext} + {LABEL_PNG}", "PIL (decode_members)", original_bytes, base_ms, "-"),
        row(f"original: {ext} + {LABEL_PNG}", tv_name, original_bytes, tv_ms, "yes" if same_tv else "no"),
        row(f"lz4: {IMAGE_MEMBER} + {LABEL_MEMBER}", "LZ4 + .npy (decode_members)", lz4_bytes, lz4_ms,
            "yes" if same_lz4 else "NO"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="synthetic Cityscapes frames (train split)")
    parser.add_argument("--size", default="1024x2048", help="Cityscapes frame size HxW (the real one: 1024x2048)")
    parser.add_argument("--voc-images", type=int, default=32, help="synthetic VOC photos (train_aug split, >= 4)")
    parser.add_argument("--repeat", type=int, default=3, help="decodes per sample; the fastest is kept")
    parser.add_argument("--tmp", type=Path, help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="decode-bench-", dir=args.tmp))
    try:
        height, width = parse_size(args.size)
        t0 = time.perf_counter()
        make_cityscapes(scratch / "cityscapes", train=args.images, val=2, test=2, height=height, width=width)
        make_voc(scratch / "voc", train_aug=args.voc_images, val=2, min_size=375, max_size=500)
        print(f"generated {args.images} synthetic Cityscapes frames and {args.voc_images} VOC photos in "
              f"{time.perf_counter() - t0:.1f} s; one thread, {os.cpu_count()} CPU cores, load average "
              f"{os.getloadavg()[0]:.2f}\n")
        rows = (measure("cityscapes", scratch / "cityscapes", "train", scratch, args.repeat)
                + measure("voc", scratch / "voc", "train_aug", scratch, args.repeat))
        print(format_table(("dataset", "encoding", "decoder", "MB/sample", "x orig", "ms/sample", "samples/s",
                            "speed-up", "= PIL's pixels"), rows))
        print("\nms/sample: image + label decoded to uint8 arrays, one core; MB/sample: the shard files' bytes; "
              "x orig and speed-up against the original encoding decoded with PIL")
    finally:
        if args.tmp is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
