"""Ray-free prediction files: ``run.py predict`` on one image, a folder of images, or a shard split.

The model predicts as :func:`pipeline.inference.segment` does (whole image by default; the
paper's multi-scale and flip testing and sliding windows with ``settings``, sections 4.4-4.5)
and, for every image ``<name>``, writes into the output folder:

* ``<name>_trainid.png``: the predicted train ids, uint8, mode L, the image's size;
* ``<name>_color.png``: the same in the dataset's palette (the VOC colour map if the model
  does not record one), :func:`pipeline.visualize.colorize`;
* ``<name>_overlay.png``: that colour mask blended over the image (:func:`pipeline.visualize.overlay`);

and, for the benchmark servers:

* ``format="cityscapes"``: ``cityscapes_results/<name>_leftImg8bit.png``, the Cityscapes
  *label ids* (:func:`sharding.cityscapes.label_id_lut`: train id 0 'road' -> label id 7),
  mode L. ``cityscapesscripts``' ``evalPixelLevelSemanticLabeling.getPrediction`` finds the
  prediction of ``<city>_<seq>_<frame>_gtFine_labelIds.png`` as the one file matching
  ``<city>_<seq>_<frame>*.png`` anywhere under ``$CITYSCAPES_RESULTS``, and a second match is
  an error: hence a folder of its own, holding these files alone (``CITYSCAPES_RESULTS=
  <out>/cityscapes_results``; the test server takes the same files, zipped).
* ``format="voc"``: ``results/VOC2012/Segmentation/<comp>_<split>_cls/<image id>.png``, the
  devkit's ``VOCopts.seg.clsrespath`` (``<resdir>Segmentation/%s_%s_cls/%s.png`` with
  competition, test set and image id): palette PNGs (mode P, the VOC colour map) whose values
  are the class ids, one flat folder. ``comp5`` is for models trained on VOC 2012 trainval
  alone, ``comp6`` for any other training data (SBD's ``train_aug``, ImageNet weights: the
  paper's model); the server takes ``results/`` archived.

Names: an image file's stem without a trailing ``_leftImg8bit``, under its subfolder of the
input folder (``leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png`` read from
``leftImg8bit/val`` -> ``frankfurt/frankfurt_000000_000294``); a shard sample's key. Two inputs
with one name (``a.png`` and ``a.jpg``; ``x.png`` and ``x_leftImg8bit.png``; for VOC's flat
folder, one id in two subfolders) are refused before anything is written.

Streaming: files are listed (names only), then read one at a time; consecutive images of one
size form a batch of up to ``batch_size`` (never padded, as :func:`pipeline.data.batch_by_size`),
and a batch's files are written before the next image is read. The work is cut into items,
one shard or :data:`FILES_PER_TASK` files each; batches never cross an item, so in this process
or on ``workers`` Ray workers (:func:`pipeline.ray_map.map_with_model`, each task writing its
files straight into the output folder: on a multi-node cluster a path every node reaches) the
same batches give the same bytes. Every file is written under a temporary name and renamed
(:mod:`sharding.atomic`): a killed run leaves no half-written PNG, a re-run overwrites.
"""
from __future__ import annotations

import dataclasses
import io
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from pipeline.config import InferenceConfig
from pipeline.data import IMAGE_EXTENSIONS
from pipeline.inference import segment
from pipeline.transforms import EvalTransform
from pipeline.visualize import colorize, overlay
from sharding.atomic import TMP_SUFFIX, atomic_write_bytes
from sharding.cityscapes import IMAGE_SUFFIX, label_id_lut
from sharding.classes import IGNORE_INDEX, voc_colormap
from sharding.manifest import list_splits, read_manifest
from sharding.storage import is_remote, shard_samples
from sharding.text import bar_disabled

FORMATS = ("plain", "cityscapes", "voc")
VOC_COMPETITIONS = ("comp5", "comp6")
FILES_PER_TASK = 16  # image files per work item (one Ray task with --workers)
CITYSCAPES_RESULTS = "cityscapes_results"
VOC_RESULTS = "results/VOC2012/Segmentation"
SUFFIXES = ("_trainid.png", "_color.png", "_overlay.png")
CITYSCAPES_STEM = IMAGE_SUFFIX[: -len(".png")]  # "_leftImg8bit"


class PredictError(ValueError):
    """Input that cannot be predicted as asked: no images, two images with one name, a format
    the model's dataset does not fit."""


@dataclass(frozen=True)
class Outputs:
    """Where the files of one image go, relative to ``out``."""

    out: str  # absolute: Ray workers may start elsewhere
    format: str = "plain"
    palette: tuple[tuple[int, int, int], ...] = tuple(voc_colormap(256))
    ignore_index: int = IGNORE_INDEX
    voc_folder: str = f"{VOC_RESULTS}/comp6_val_cls"

    def files(self, name: str) -> list[str]:
        """The paths (relative to ``out``, ``/``-separated) written for the image ``name``."""
        files = [name + suffix for suffix in SUFFIXES]
        if self.format == "cityscapes":
            files.append(f"{CITYSCAPES_RESULTS}/{name}{IMAGE_SUFFIX}")
        elif self.format == "voc":
            files.append(f"{self.voc_folder}/{name.rsplit('/', 1)[-1]}.png")
        return files


@dataclass(frozen=True)
class PredictTask:
    """One work item: a shard, or a few image files, with everything needed to predict it."""

    outputs: Outputs
    settings: InferenceConfig
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    batch_size: int
    shard: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # (absolute path, output name)


@dataclass(frozen=True)
class PredictReport:
    model: str
    input: str
    out: str
    images: int
    files: int
    seconds: float
    workers: int = 0
    outputs: Outputs | None = None
    removed_temporaries: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        where = f"on {self.workers} Ray worker(s)" if self.workers else "in this process"
        lines = [f"model: {self.model}", f"input: {self.input}",
                 f"predicted {self.images} images {where} in {self.seconds:.1f} s "
                 f"({self.images_per_s:.2f} images/s); wrote {self.files} files into {self.out}"]
        if self.outputs is not None and self.outputs.format == "cityscapes":
            lines.append(f"Cityscapes label-id files: {Path(self.out) / CITYSCAPES_RESULTS} "
                         f"(CITYSCAPES_RESULTS for csEvalPixelLevelSemanticLabeling; zip it for the test server)")
        elif self.outputs is not None and self.outputs.format == "voc":
            lines.append(f"VOC palette PNGs: {Path(self.out) / self.outputs.voc_folder} "
                         f"(archive {Path(self.out) / 'results'} for the evaluation server)")
        if self.removed_temporaries:
            lines.append(f"removed {self.removed_temporaries} temporary file(s) left by an interrupted run")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- names and inputs


def image_name(path: Path, root: Path | None = None) -> str:
    """The output name of an image file: its stem without a trailing ``_leftImg8bit``, under its
    folder relative to ``root`` (``/``-separated)."""
    stem = path.stem
    if stem.endswith(CITYSCAPES_STEM) and len(stem) > len(CITYSCAPES_STEM):
        stem = stem[: -len(CITYSCAPES_STEM)]
    parent = path.parent.relative_to(root).as_posix() if root is not None else "."
    return stem if parent == "." else f"{parent}/{stem}"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, exclude: Path | None = None) -> Iterator[Path]:
    """The image files under ``folder``, sorted folder by folder, found as they are walked;
    hidden entries and ``exclude`` (the output folder, when inside the input) are skipped."""
    exclude = exclude.resolve() if exclude is not None else None
    for current, dirs, files in os.walk(folder):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != exclude)
        for name in sorted(files):
            if is_image_file(here / name):
                yield here / name


def check_names(names: Iterable[tuple[str, str]], outputs: Outputs) -> None:
    """Refuse two inputs that would write one file (``(name, source)`` pairs), and an input
    whose files would land in the benchmark files' folder (``cityscapes_results/``: the
    evaluation would find two files for one image; ``results/`` for VOC)."""
    owner: dict[str, str] = {}
    reserved = {"cityscapes": CITYSCAPES_RESULTS, "voc": VOC_RESULTS.split("/")[0]}.get(outputs.format)
    for name, source in names:
        if reserved is not None and name.split("/", 1)[0] == reserved and "/" in name:
            raise PredictError(f"{source}: its files would go into {reserved}/, the folder of the --format "
                               f"{outputs.format} files; rename that subfolder or predict it on its own")
        for file in outputs.files(name):
            if file in owner:
                raise PredictError(f"{source} and {owner[file]} would both write {file}: two inputs with one "
                                   f"output name (an image's name is its stem without '{CITYSCAPES_STEM}')")
            owner[file] = source


def _chunks(items: Sequence, size: int) -> Iterator[tuple]:
    for start in range(0, len(items), size):
        yield tuple(items[start:start + size])


def plan_tasks(source: Path | str, outputs: Outputs, template: PredictTask, split: str = "val",
               files_per_task: int = FILES_PER_TASK) -> tuple[list[PredictTask], list[list[str]], int | None]:
    """The work items for ``source`` (an image, a folder of images, or a shard folder: a URL is
    one, see ``sharding/storage.py``), the names each must write, and the shard split's class
    count (None for image files)."""
    remote = is_remote(source)
    if not remote and source.is_file():
        if not is_image_file(source):
            raise PredictError(f"{source}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
        name = image_name(source)
        return [dataclasses.replace(template, files=((str(source.resolve()), name),))], [[name]], None
    if not remote and not source.is_dir():
        raise FileNotFoundError(f"{source}: no such image, folder or shard folder")
    if remote or list_splits(source):
        manifest = read_manifest(source, split)
        keys = manifest.table.column("key").to_pylist()
        shards = manifest.table.column("shard").to_pylist()
        check_names(((k, f"sample {k!r} of {s}") for k, s in zip(keys, shards)), outputs)
        by_shard: dict[str, list[str]] = {info.name: [] for info in manifest.shard_infos}
        for key, shard in zip(keys, shards):
            by_shard[shard].append(key)
        tasks = [dataclasses.replace(template, shard=path) for path in manifest.shards]
        return tasks, [by_shard[info.name] for info in manifest.shard_infos], manifest.num_classes
    out = Path(outputs.out)
    files = [(str(path.resolve()), image_name(path, source)) for path in list_images(source, exclude=out)]
    if not files:
        raise PredictError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or its subfolders, "
                           f"and no <split>.manifest.parquet of a shard folder")
    check_names(((name, path) for path, name in files), outputs)
    chunks = list(_chunks(files, files_per_task))
    return [dataclasses.replace(template, files=chunk) for chunk in chunks], [[n for _, n in c] for c in chunks], None


# ----------------------------------------------------------------------------- reading, batching, writing


def read_files(files: Iterable[tuple[str, str]]) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, uint8 (H, W, 3) RGB)`` of each file, read when asked for."""
    for path, name in files:
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except OSError as exc:
            raise PredictError(f"{path}: not a readable image ({exc}); expected a PNG or JPG file") from exc
        yield name, rgb


def read_shard(shard: str) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, uint8 (H, W, 3) RGB)`` of each sample of one shard, in order; a sample that does
    not decode, or a shard cut short, is a :class:`PredictError` naming it (never skipped)."""
    import webdataset as wds

    from pipeline.data import VERIFY_HINT, decode_sample
    from sharding.storage import display
    from sharding.tarstream import TarError

    pipeline = wds.DataPipeline(wds.SimpleShardList([shard]), shard_samples())  # a path or a URL
    key = None
    try:
        for sample in pipeline:
            key = sample.get("__key__")
            yield key, decode_sample(sample)["image"]
    except (ValueError, TarError) as exc:  # decode_members' and the tar reader's errors name the shard
        where = f"{display(shard)}" + (f", sample {key!r}" if key else "")
        raise PredictError(f"{where}: {exc}; expected a shard written by `run.py shard`. {VERIFY_HINT}") from None


def same_size_batches(samples: Iterable[tuple[str, np.ndarray]],
                      batch_size: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Consecutive samples of one image size, up to ``batch_size`` at a time: nothing to pad."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pending: list[tuple[str, np.ndarray]] = []
    for sample in samples:
        if pending and (len(pending) == batch_size or pending[0][1].shape != sample[1].shape):
            yield pending
            pending = []
        pending.append(sample)
    if pending:
        yield pending


def _png(image: np.ndarray | Image.Image) -> bytes:
    """PNG bytes of a uint8 (H, W) (mode L) or (H, W, 3) (RGB) array, or of a PIL image."""
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def palette_image(ids: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> Image.Image:
    """A mode P image whose pixel values are ``ids`` (uint8 (H, W)) and whose palette is ``palette``."""
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids, dtype=np.uint8).tobytes())
    image.putpalette([v for colour in palette for v in colour])
    return image


_CITYSCAPES_LABEL_IDS = label_id_lut()
_VOC_PALETTE = tuple(voc_colormap(256))


def write_outputs(outputs: Outputs, name: str, rgb: np.ndarray, train_ids: np.ndarray) -> list[str]:
    """Write the files of one image (:meth:`Outputs.files`), each atomically; returns their paths."""
    out = Path(outputs.out)
    files = outputs.files(name)
    pictures = [_png(train_ids), _png(colorize(train_ids, outputs.palette, outputs.ignore_index)),
                _png(overlay(rgb, train_ids, outputs.palette, outputs.ignore_index))]
    if outputs.format == "cityscapes":
        pictures.append(_png(_CITYSCAPES_LABEL_IDS[train_ids]))
    elif outputs.format == "voc":
        pictures.append(_png(palette_image(train_ids, _VOC_PALETTE)))
    for file, data in zip(files, pictures):
        path = out / file
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return files


def predict_task(model: nn.Module, task: PredictTask, device: torch.device,
                 on_images: Callable[[int], None] | None = None) -> list[str]:
    """Predict one work item and write its files: one Ray task's work (see :mod:`pipeline.ray_map`).

    Returns the names of the images written, in order; ``on_images(n)`` after each batch.
    """
    transform = EvalTransform(task.mean, task.std)
    samples = read_shard(task.shard) if task.shard is not None else read_files(task.files)
    written: list[str] = []
    for batch in same_size_batches(samples, task.batch_size):
        images = torch.stack([transform.image(rgb) for _, rgb in batch]).to(device)  # (B, 3, H, W)
        predictions = segment(model, images, task.settings).cpu().numpy()  # (B, H, W)
        if predictions.size and int(predictions.max()) >= IGNORE_INDEX:
            raise PredictError(f"the model predicts class {int(predictions.max())}: train ids must be below "
                               f"{IGNORE_INDEX} to be written as uint8 PNGs")
        for (name, rgb), train_ids in zip(batch, predictions.astype(np.uint8)):
            write_outputs(task.outputs, name, rgb, train_ids)
            written.append(name)
        if on_images is not None:
            on_images(len(batch))
    return written


def remove_temporaries(out: Path) -> int:
    """Delete the hidden ``.<file>.<pid>.tmp`` files an interrupted run left under ``out``."""
    removed = 0
    for tmp in out.rglob(f".*.png.*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


# ----------------------------------------------------------------------------- run.py predict


def predict(reference: str, source: str | Path, out: str | Path, *, split: str = "val", format: str = "plain",
            settings: InferenceConfig = InferenceConfig(), batch_size: int = 1, workers: int = 0,
            gpu: bool = False, address: str | None = None, tracking_uri: str | None = None,
            voc_competition: str = "comp6", files_per_task: int = FILES_PER_TASK,
            show_progress: bool = False) -> PredictReport:
    """Predict every image of ``source`` with the model ``reference`` (whatever
    :func:`pipeline.evaluate.load_model` takes) and write the files of the module docstring
    into ``out``. ``workers=N`` runs the work items on N Ray workers (``gpu``: one GPU each).
    """
    from pipeline.evaluate import load_model

    if format not in FORMATS:
        raise PredictError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if voc_competition not in VOC_COMPETITIONS:
        raise PredictError(f"voc_competition must be one of {', '.join(VOC_COMPETITIONS)}, got {voc_competition!r}")
    if batch_size < 1 or workers < 0 or files_per_task < 1:
        raise PredictError(f"batch size and files per task must be at least 1 and workers at least 0, got "
                           f"{batch_size}, {files_per_task} and {workers}")
    source = str(source) if is_remote(source) else Path(source)
    out = Path(out).resolve()
    if not is_remote(source) and not source.exists():
        raise FileNotFoundError(f"{source}: no such image, folder or shard folder")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; expected a folder (created if missing)")
    loaded = load_model(reference, tracking_uri)
    dataset = loaded.dataset
    known = dataset.get("dataset")
    if format != "plain" and known is not None and known != format:
        raise PredictError(f"{loaded.source} was trained on {known}, so its predictions cannot be written "
                           f"as {format} benchmark files")
    for fmt, classes in (("cityscapes", 19), ("voc", 21)):
        if format == fmt and dataset.get("num_classes", classes) != classes:
            raise PredictError(f"{loaded.source} predicts {dataset['num_classes']} classes; {fmt} has {classes}")
    palette = tuple(tuple(int(v) for v in colour) for colour in dataset.get("palette") or voc_colormap(256))
    outputs = Outputs(str(out), format, palette, int(dataset.get("ignore_index", IGNORE_INDEX)),  # type: ignore[arg-type]
                      f"{VOC_RESULTS}/{voc_competition}_{split}_cls")
    template = PredictTask(outputs, settings, tuple(loaded.mean), tuple(loaded.std), batch_size)  # type: ignore[arg-type]
    tasks, expected, num_classes = plan_tasks(source, outputs, template, split, files_per_task)
    if num_classes is not None and "num_classes" in dataset and dataset["num_classes"] != num_classes:
        raise PredictError(f"{loaded.source} predicts {dataset['num_classes']} classes, but split {split!r} of "
                           f"{source} has {num_classes}: predict the data it was trained for")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _predict_into(out, loaded, tasks, expected, outputs, source, workers, gpu, address, show_progress)
    except BaseException:
        if created:
            _remove_empty_folders(out)  # a run that wrote nothing leaves no --out folder behind
        raise


def _remove_empty_folders(folder: Path) -> None:
    """``folder`` and the folders below it, deepest first, where they hold no file."""
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _predict_into(out: Path, loaded: Any, tasks: list[PredictTask], expected: list[list[str]], outputs: Outputs,
                  source: str | Path, workers: int, gpu: bool, address: str | None,
                  show_progress: bool) -> PredictReport:
    """The prediction loop of :func:`predict`, into the existing folder ``out``."""
    removed = remove_temporaries(out)
    total = sum(len(names) for names in expected)
    bar = tqdm(total=total, unit="img", desc="predict", disable=bar_disabled(show_progress))
    start = time.perf_counter()
    if workers:
        from pipeline.ray_map import map_with_model

        results: Iterable[tuple[int, list[str]]] = map_with_model(predict_task, loaded.model, tasks, workers=workers,
                                                                  gpu=gpu, address=address,
                                                                  passthrough=(PredictError,))
    else:
        device = torch.device("cuda") if gpu else torch.device("cpu")
        model = loaded.model.to(device).eval()
        results = ((i, predict_task(model, task, device, on_images=bar.update)) for i, task in enumerate(tasks))
    images = files = 0
    for index, names in results:
        if names != expected[index]:
            what = tasks[index].shard or f"{len(tasks[index].files)} files from {tasks[index].files[0][0]}"
            raise RuntimeError(f"{what}: wrote {len(names)} images, expected {len(expected[index])} "
                               f"({sorted(set(expected[index]) ^ set(names))[:5]} differ)")
        missing = [file for name in names for file in outputs.files(name) if not (out / file).is_file()]
        if missing:
            raise RuntimeError(f"missing outputs after their task finished: {missing[:5]} in {out} (with Ray workers "
                               "on several nodes, --out must be a folder every node reaches)")
        images += len(names)
        files += sum(len(outputs.files(name)) for name in names)
        if workers:
            bar.update(len(names))
    seconds = time.perf_counter() - start
    bar.close()
    return PredictReport(loaded.source, str(source), str(out), images, files, seconds, workers, outputs, removed)
