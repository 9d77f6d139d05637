"""A small, learnable scene dataset written in the real Cityscapes and VOC + SBD layouts.

The readers in :mod:`sharding.cityscapes` and :mod:`sharding.voc` cannot tell it from
the real thing: same folders, file names, label encodings (Cityscapes labelIds with
void ids such as ego vehicle and rectification border; VOC palette PNGs with the 255
void border; SBD ``cls/*.mat`` files holding the MATLAB struct ``GTcls.Segmentation``),
and VOC/SBD split lists that overlap the way the real ones do.

Scenes are drawn so that a small network can learn them in minutes on a CPU:
Cityscapes frames have sky above a skyline of buildings and trees, a road in
perspective between sidewalks and terrain, and cars, buses, trucks, people, cyclists,
poles, signs and lights on it; VOC images have one to three objects of different
classes on a cluttered background. Every class has its own colour family and shape,
with texture (windows, lane marks, foliage, stripes), noise and lighting changes, so a
colour threshold alone does not solve it. Everything follows from ``seed``: the same
arguments write byte-identical files.

``make-synthetic`` also writes ``dfdam_synthetic.json`` in the dataset root, declaring
the image count of each split; the sharder checks against it instead of the official
counts of the full releases.

The generator is split by what its parts do; this module is its public face and
re-exports their API, so ``from sharding.synthetic import make_cityscapes`` is all a
caller needs:

- :mod:`sharding.synthetic_drawing`: the canvas, textures, noise, the "photograph"
  step, PNG/JPEG encoding, the output folder and the marker file.
- :mod:`sharding.synthetic_cityscapes`: street scenes and the Cityscapes layout.
- :mod:`sharding.synthetic_voc`: object photos and the VOC 2012 + SBD layout.
"""
from __future__ import annotations

from sharding.synthetic_cityscapes import (BICYCLE, BUILDING, BUS, CAR, CITYSCAPES_CITIES, EGO_VEHICLE, FENCE,
                                           OUT_OF_ROI, PARKING, PERSON, POLE, RECTIFICATION_BORDER, RIDER, ROAD,
                                           SIDEWALK, SKY, STATIC, TERRAIN, TRAFFIC_LIGHT, TRAFFIC_SIGN, TRUCK,
                                           UNLABELED, VEGETATION, WALL, colourise_label_ids, make_cityscapes,
                                           render_cityscapes)
from sharding.synthetic_drawing import Box, Canvas, Texture, smooth_noise
from sharding.synthetic_voc import (VocLists, make_voc, palette_png, render_voc, sbd_mat, voc_border, voc_lists,
                                    voc_object_colour, voc_test_ids, write_segmentation_class_aug)

__all__ = [
    # the two generators and their scene renderers
    "make_cityscapes", "make_voc", "render_cityscapes", "render_voc",
    # drawing
    "Box", "Canvas", "Texture", "smooth_noise",
    # Cityscapes: cities per split, label ids drawn, the colour table
    "CITYSCAPES_CITIES", "colourise_label_ids",
    "UNLABELED", "EGO_VEHICLE", "RECTIFICATION_BORDER", "OUT_OF_ROI", "STATIC",
    "ROAD", "SIDEWALK", "PARKING", "BUILDING", "WALL", "FENCE",
    "POLE", "TRAFFIC_LIGHT", "TRAFFIC_SIGN", "VEGETATION", "TERRAIN", "SKY",
    "PERSON", "RIDER", "CAR", "TRUCK", "BUS", "BICYCLE",
    # VOC + SBD: class colours, void border, label files, split lists, test ids, the SegmentationClassAug layout
    "voc_object_colour", "voc_border", "palette_png", "sbd_mat", "VocLists", "voc_lists", "voc_test_ids",
    "write_segmentation_class_aug",
]
