"""Class tables of the supported datasets: names, colours and the ignore index.

Cityscapes' 19 training classes come from the official label table of the
``cityscapesscripts`` package (never a hand-copied list), so a change there is a
change here. PASCAL VOC's 21 classes use the standard VOC colour map, the
bit-shuffle palette that the VOC development kit writes into its PNG masks.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 255
"""Train id of every pixel that is not scored: void classes, borders, unlabelled splits."""

DATASETS: tuple[str, ...] = ("cityscapes", "voc")
"""The datasets with a class table: the layouts ``run.py shard`` reads and ``make-synthetic`` writes."""

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class ClassTable:
    """The classes a dataset is trained on, in train-id order.

    Attributes:
        dataset: ``"cityscapes"`` or ``"voc"``.
        names: class name per train id.
        palette: (r, g, b) colour per train id, for colourised masks.
        ignore_index: the train id of pixels that are not scored.
    """

    dataset: str
    names: tuple[str, ...]
    palette: tuple[Colour, ...]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        """Number of scored classes (train ids ``0 .. num_classes - 1``)."""
        return len(self.names)


def voc_colormap(n: int = 256) -> list[Colour]:
    """The standard PASCAL VOC colour map: bits of the index spread over r, g, b.

    Index 0 is black, 1 is (128, 0, 0), ..., and 255 (the void border) is
    (224, 224, 192), exactly as in the VOC development kit's ``labelcolormap.m``.
    """
    colours: list[Colour] = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours.append((r, g, b))
    return colours


def cityscapes_classes() -> ClassTable:
    """Cityscapes' 19 training classes, names and colours from ``cityscapesscripts``."""
    # Imported here, not above, so that IGNORE_INDEX comes without it (pipeline.config reads it).
    from cityscapesscripts.helpers.labels import labels

    by_train_id = {
        label.trainId: label
        for label in labels
        if 0 <= label.trainId < IGNORE_INDEX
    }
    train_ids = sorted(by_train_id)
    if train_ids != list(range(len(train_ids))):
        raise RuntimeError(f"cityscapesscripts train ids are not contiguous: {train_ids}")
    return ClassTable(
        dataset="cityscapes",
        names=tuple(by_train_id[t].name for t in train_ids),
        palette=tuple(tuple(int(v) for v in by_train_id[t].color) for t in train_ids),  # type: ignore[misc]
    )


def voc_classes() -> ClassTable:
    """PASCAL VOC 2012's 21 classes (background + 20 objects) and their palette colours."""
    cmap = voc_colormap(len(VOC_CLASS_NAMES))
    return ClassTable(dataset="voc", names=VOC_CLASS_NAMES, palette=tuple(cmap))


def classes_for(dataset: str) -> ClassTable:
    """The class table of ``dataset`` (``"cityscapes"`` or ``"voc"``)."""
    if dataset == "cityscapes":
        return cityscapes_classes()
    if dataset == "voc":
        return voc_classes()
    raise ValueError(f"unknown dataset {dataset!r}: expected {' or '.join(map(repr, DATASETS))}")
