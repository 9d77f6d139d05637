"""The bad-input campaign (issue 12): every subcommand refuses bad input with one clear line.

One table, :data:`ROWS`: each row makes one bad input (tiny real files in its own folder), runs
``run.main(argv)`` in this process and asserts that

- the exit status is not 0 (an uncaught exception would be a traceback: the test fails);
- stderr holds one message line (argparse's usage lines aside), no ``Traceback``;
- that line holds every expected fragment: the problem and what was expected instead;
- nothing was left behind: the row's folder and the shared datasets are as they were (no
  half-written shard folder, no output file), and the MLflow store (a real SQLite store that
  ``MLFLOW_TRACKING_URI`` points every row at) holds no run left RUNNING and no registry version.

Every refusal happens before Ray starts: no row starts a cluster (the rows that name a Ray
address name one where nothing listens, refused by a TCP connect). A few rows run again through
a real ``python run.py`` to show the exit status a shell sees.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from tests.damage import damage_member

REPO = Path(__file__).resolve().parents[1]
VOC_LISTS = Path("VOCdevkit/VOC2012/ImageSets/Segmentation")
SBD = Path("benchmark_RELEASE/dataset")


# --------------------------------------------------------------------------- shared inputs


@dataclass(frozen=True)
class Inputs:
    """What the rows share (read-only: a row that breaks something breaks its own copy)."""

    cityscapes: Path  # a tiny synthetic Cityscapes root
    voc: Path  # a tiny synthetic VOC 2012 + SBD root
    shards: Path  # tiny_shards: synthetic Cityscapes shards (19 classes)
    voc_shards: Path  # the VOC root's shards (21 classes)
    checkpoint: Path  # an untrained DF-DAM-R18 checkpoint for `shards`
    store: Path  # a real SQLite MLflow store: no runs, one registered model (dfdam-synthetic) without versions
    closed_port: int  # a 127.0.0.1 port bound by this process, never listening: connections refused
    error_server: str  # http://127.0.0.1:PORT answering every request with HTTP 500


@dataclass
class Row:
    """One bad input: ``make(inputs, folder) -> argv`` and the fragments its message must hold."""

    name: str
    make: Callable[[Inputs, Path], list[str]]
    fragments: tuple[str, ...]


class _Answers500(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_error(500, "Internal Server Error")

    do_POST = do_GET

    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        pass


@pytest.fixture(scope="module")
def inputs(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    from pipeline.checkpoint import build_model, save_checkpoint
    from pipeline.config import build_config
    from pipeline.loop import dataset_info
    from pipeline.tracking import MlflowClient
    from sharding.manifest import read_manifest
    from sharding.synthetic import make_cityscapes, make_voc
    from sharding.write import shard_dataset
    from tests.sharding.conftest import CITYSCAPES_SIZE, VOC_SIZE

    base = tmp_path_factory.mktemp("bad-inputs")
    make_cityscapes(base / "cityscapes", seed=0, **CITYSCAPES_SIZE)
    make_voc(base / "voc", seed=0, **VOC_SIZE)
    shard_dataset("voc", base / "voc", base / "voc-shards", shard_size=8, workers=1, show_progress=False)
    import torch

    torch.manual_seed(0)
    manifest = read_manifest(tiny_shards, "val")
    cfg = build_config("synthetic", [f"data.shards={tiny_shards}"])
    checkpoint = save_checkpoint(base / "checkpoint", model=build_model(cfg.model, manifest.num_classes,
                                                                        pretrained=False),
                                 optimizer=None, scaler=None, epoch=0, step=0, config=cfg,
                                 dataset=dataset_info(manifest), metrics={})
    store = base / "mlflow.db"
    MlflowClient(f"sqlite:///{store}").create_registered_model("dfdam-synthetic")  # a name without versions
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers500)
    thread = threading.Thread(target=server.serve_forever, name="answers-500", daemon=True)
    thread.start()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))  # held, never listening: connections to it are refused
        try:
            yield Inputs(base / "cityscapes", base / "voc", tiny_shards, base / "voc-shards", checkpoint, store,
                         blocker.getsockname()[1], f"http://127.0.0.1:{server.server_address[1]}")
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


# --------------------------------------------------------------------------- making bad files


def _copy(source: Path, folder: Path) -> Path:
    return Path(shutil.copytree(source, folder / source.name))


def _first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


def _colour_mask(i: Inputs, folder: Path) -> Path:
    """A Cityscapes copy whose first labelIds file is an RGB colour image."""
    root = _copy(i.cityscapes, folder)
    label = _first(root, "gtFine/val/*/*_gtFine_labelIds.png")
    ids = np.asarray(Image.open(label))
    Image.fromarray(np.stack([ids, ids, ids], axis=-1)).save(label)
    return root


def _wrong_size_label(i: Inputs, folder: Path) -> Path:
    root = _copy(i.cityscapes, folder)
    label = _first(root, "gtFine/val/*/*_gtFine_labelIds.png")
    ids = np.asarray(Image.open(label))
    Image.fromarray(ids[: ids.shape[0] // 2]).save(label)  # half the image's height
    return root


def _truncated_png(i: Inputs, folder: Path) -> Path:
    root = _copy(i.cityscapes, folder)
    image = _first(root, "leftImg8bit/val/*/*_leftImg8bit.png")
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return root


def _jpeg_named_png(i: Inputs, folder: Path) -> Path:
    root = _copy(i.cityscapes, folder)
    image = _first(root, "leftImg8bit/val/*/*_leftImg8bit.png")
    buffer = io.BytesIO()
    Image.open(image).convert("RGB").save(buffer, format="JPEG")
    image.write_bytes(buffer.getvalue())
    return root


def _voc_list(i: Inputs, folder: Path, list_file: Path, line: str, *, replace_first: bool = True) -> Path:
    """A VOC copy whose ``list_file`` has ``line`` in place of its first id (the count stays right)."""
    root = _copy(i.voc, folder)
    path = root / list_file
    lines = path.read_text().splitlines()
    lines = [line, *lines[1:]] if replace_first else [*lines, line]
    path.write_text("\n".join(lines) + "\n")
    return root


def _shard_argv(dataset: str, root: Path, folder: Path, *extra: str) -> list[str]:
    return ["shard", "--dataset", dataset, "--root", str(root), "--out", str(folder / "out"), "--workers", "1",
            "--no-progress", *extra]


def _train(i: Inputs, folder: Path, *extra: str, command: str = "train", data: Path | None = None) -> list[str]:
    return [command, "--data", str(data or i.shards), "--storage", str(folder / "runs"),
            "--set", "data.crop_size=64x64", "--set", "data.batch_size=4", *extra]


def _tune(i: Inputs, folder: Path, *extra: str) -> list[str]:
    return _train(i, folder, "--trials", "1", "--epochs", "1", *extra, command="tune")


def _empty(folder: Path, name: str = "empty") -> Path:
    path = folder / name
    path.mkdir()
    return path


def _state_of_another_model(i: Inputs, folder: Path) -> Path:
    """A checkpoint whose weights are DF-DAM-R18's (dafm+2dpam) but whose config says the sum variant."""
    import torch

    state = torch.load(i.checkpoint, map_location="cpu", weights_only=False)
    state["config"]["model"]["variant"] = "sum"
    path = folder / "sum" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save(state, path)
    return path


def _run_with_checkpoint(i: Inputs, folder: Path, name: str) -> None:
    """``<folder>/runs/<name>``: a Ray Train run folder whose one checkpoint is the R18 one (1 epoch)."""
    target = folder / "runs" / name / "checkpoint_000000"
    target.mkdir(parents=True)
    for file in i.checkpoint.parent.iterdir():
        shutil.copy2(file, target / file.name)


def _resumed_with_another_backbone(i: Inputs, folder: Path) -> list[str]:
    _run_with_checkpoint(i, folder, "r18")
    return _train(i, folder, "--resume", "--name", "r18", "--epochs", "3", "--set", "model.backbone=resnet50")


def _damaged_shards(i: Inputs, folder: Path, how: str) -> Path:
    """A copy of the tiny shards with one shard deleted, cut to half its size, or replaced by another."""
    shards = _copy(i.shards, folder)
    if how == "deleted":
        (shards / "train-000001.tar").unlink()
    elif how == "cut":
        shard = shards / "val-000000.tar"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shutil.copyfile(shards / "train-000000.tar", shards / "train-000001.tar")
    return shards


def _damaged_image(i: Inputs, folder: Path) -> Path:
    """A copy of the tiny shards whose first val image's bytes no decoder recognises."""
    shards = _copy(i.shards, folder)
    damage_member(shards / "val-000000.tar", 0, "png", "header")
    return shards


def _text_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("not an image\n")
    return path


def _space_file(folder: Path, text: str) -> Path:
    path = folder / "space.json"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the table

ROWS = [
    # ---- shard: dataset roots
    Row("shard: missing root", lambda i, f: _shard_argv("cityscapes", f / "nowhere", f),
        ("nowhere", "is not a folder", "expected")),
    Row("shard: empty cityscapes root", lambda i, f: _shard_argv("cityscapes", _empty(f), f),
        ("missing folder", "leftImg8bit", "expected the layout")),
    Row("shard: empty voc root", lambda i, f: _shard_argv("voc", _empty(f), f),
        ("missing folder", "VOCdevkit", "expected the PASCAL VOC 2012 devkit")),
    Row("shard: cityscapes root given as voc", lambda i, f: _shard_argv("voc", i.cityscapes, f),
        ("VOCdevkit", "looks like a Cityscapes root", "--dataset cityscapes")),
    Row("shard: voc root given as cityscapes", lambda i, f: _shard_argv("cityscapes", i.voc, f),
        ("leftImg8bit", "looks like a PASCAL VOC root", "--dataset voc")),
    Row("shard: no --dataset", lambda i, f: ["shard", "--root", str(i.cityscapes), "--out", str(f / "out")],
        ("pack needs --dataset and --root",)),
    Row("shard: --shard-size 0", lambda i, f: _shard_argv("cityscapes", i.cityscapes, f, "--shard-size", "0"),
        ("--shard-size", "must be at least 1")),
    # ---- shard: bad samples (--strict: stop at the first instead of listing it in the rejects)
    Row("shard: RGB colour mask for label ids",
        lambda i, f: _shard_argv("cityscapes", _colour_mask(i, f), f, "--split", "val", "--strict"),
        ("_gtFine_labelIds.png", "mode RGB", "expected a single-channel PNG of Cityscapes label ids")),
    Row("shard: label of another size than its image",
        lambda i, f: _shard_argv("cityscapes", _wrong_size_label(i, f), f, "--split", "val", "--strict"),
        ("_gtFine_labelIds.png", "label is 64x16", "expected the same size")),
    Row("shard: truncated PNG",
        lambda i, f: _shard_argv("cityscapes", _truncated_png(i, f), f, "--split", "val", "--strict"),
        ("_leftImg8bit.png", "truncated")),
    Row("shard: JPEG named .png",
        lambda i, f: _shard_argv("cityscapes", _jpeg_named_png(i, f), f, "--split", "val", "--strict"),
        ("_leftImg8bit.png", "JPEG", "PNG")),
    # ---- shard: VOC and SBD split lists
    Row("shard: VOC list names an id that does not exist",
        lambda i, f: _shard_argv("voc", _voc_list(i, f, VOC_LISTS / "val.txt", "2099_999999"), f,
                                 "--split", "val", "--strict"),
        ("2099_999999", "is listed for val", "neither its image nor its label exists")),
    Row("shard: SBD list names an id that does not exist",
        lambda i, f: _shard_argv("voc", _voc_list(i, f, SBD / "train.txt", "2099_999999"), f,
                                 "--split", "train_aug", "--strict", "--partial"),
        ("2099_999999", "is listed for train_aug", "neither its image nor its label exists")),
    Row("shard: VOC list holds an absolute path",
        lambda i, f: _shard_argv("voc", _voc_list(i, f, VOC_LISTS / "val.txt", "/etc/passwd"), f, "--split", "val"),
        ("val.txt", "line 1", "/etc/passwd", "expected an image id")),
    Row("shard: VOC list holds a ../ path",
        lambda i, f: _shard_argv("voc", _voc_list(i, f, VOC_LISTS / "train.txt", "../../../secret"), f,
                                 "--split", "val"),
        ("train.txt", "line 1", "../../../secret", "expected an image id")),
    Row("shard: SBD list holds a ../ path",
        lambda i, f: _shard_argv("voc", _voc_list(i, f, SBD / "val.txt", "../img/../../../x.jpg"), f,
                                 "--split", "train_aug"),
        ("benchmark_RELEASE/dataset/val.txt", "../img/../../../x.jpg", "expected an image id")),
    Row("shard verify: folder without manifests", lambda i, f: ["shard", "verify", "--out", str(_empty(f))],
        ("holds no <split>.manifest.parquet", "expected the --out folder")),
    Row("shard verify: folder that does not exist", lambda i, f: ["shard", "verify", "--out", str(f / "nowhere")],
        ("nowhere", "does not exist", "expected the --out folder")),
    # ---- make-synthetic
    Row("make-synthetic: --out holds other files",
        lambda i, f: ["make-synthetic", "--layout", "voc", "--out", str(i.shards)],
        ("empty",)),
    Row("make-synthetic: negative --train",
        lambda i, f: ["make-synthetic", "--layout", "voc", "--out", str(f / "out"), "--train", "-1"],
        ("need at least 4 train_aug", "got -1")),
    Row("make-synthetic: malformed --size",
        lambda i, f: ["make-synthetic", "--layout", "cityscapes", "--out", str(f / "out"), "--size", "128x"],
        ("expected HxW such as 128x256", "'128x'")),
    # ---- train: data
    Row("train: missing shard folder", lambda i, f: _train(i, f, data=f / "nowhere"),
        ("nowhere", "does not exist", "expected the --out folder of `run.py shard`")),
    Row("train: empty shard folder", lambda i, f: _train(i, f, data=_empty(f)),
        ("manifest", "train")),
    Row("train: VOC shards with the cityscapes preset",
        lambda i, f: _train(i, f, "--preset", "cityscapes", data=i.voc_shards),
        ("preset 'cityscapes' is made for cityscapes", "holds voc shards", "--preset voc")),
    Row("train: Cityscapes shards with the voc preset",
        lambda i, f: _train(i, f, "--preset", "voc", data=i.shards),
        ("preset 'voc' is made for voc", "holds cityscapes shards", "--preset cityscapes")),
    Row("train: a shard deleted after sharding", lambda i, f: _train(i, f, data=_damaged_shards(i, f, "deleted")),
        ("train-000001.tar", "is missing", "run.py shard verify")),
    Row("train: a shard replaced by another", lambda i, f: _train(i, f, data=_damaged_shards(i, f, "replaced")),
        ("train-000001.tar", "begins with", "replaced by another shard")),
    # ---- train: --set
    Row("train: unknown --set field", lambda i, f: _train(i, f, "--set", "optim.lrate=0.1"),
        ("unknown field 'optim.lrate'", "optim has", "'lr'")),
    Row("train: misspelt --set field", lambda i, f: _train(i, f, "--set", "optim.momentun=0.8"),
        ("unknown field 'optim.momentun'", "did you mean optim.momentum")),
    Row("train: unknown --set section", lambda i, f: _train(i, f, "--set", "optimizer.lr=0.1"),
        ("unknown config section 'optimizer'", "expected one of")),
    Row("train: --set value of the wrong type", lambda i, f: _train(i, f, "--set", "optim.lr=fast"),
        ("optim.lr", "expected float", "'fast'")),
    Row("train: --set without a value", lambda i, f: _train(i, f, "--set", "optim.lr"),
        ("must look like section.field=value",)),
    Row("train: negative learning rate", lambda i, f: _train(i, f, "--set", "optim.lr=-0.01"),
        ("optim.lr must be positive", "lr=-0.01")),
    Row("train: crop larger than any image", lambda i, f: _train(i, f, "--set", "data.crop_size=512x512"),
        ("data.crop_size 512x512", "larger than every image", "expected a crop within 96x192")),
    Row("train: batch not divisible by workers", lambda i, f: _train(i, f, "--workers", "3"),
        ("data.batch_size must be divisible by train.workers", "workers=3", "batch_size=4")),
    Row("train: zero workers", lambda i, f: _train(i, f, "--workers", "0"),
        ("train.workers must be at least 1",)),
    Row("train: zero epochs", lambda i, f: _train(i, f, "--epochs", "0"),
        ("train.epochs must be at least 1",)),
    Row("train: missing backbone weights file",
        lambda i, f: _train(i, f, "--set", f"model.weights={f / 'resnet18.pth'}"),
        ("resnet18.pth", "no such file", "expected")),
    # ---- train: tracking store
    Row("train: tracking URI that is a plain folder",
        lambda i, f: _train(i, f, "--set", f"tracking.uri={_empty(f, 'mlruns')}"),
        ("mlruns", "refuses plain file stores", "use sqlite:////abs/path/mlflow.db or http://host:port")),
    Row("train: tracking server that is not there",
        lambda i, f: _train(i, f, "--set", f"tracking.uri=http://127.0.0.1:{i.closed_port}"),
        ("http://127.0.0.1:", "unreachable", "start it")),
    Row("train: tracking server answering HTTP 500",
        lambda i, f: _train(i, f, "--set", f"tracking.uri={i.error_server}"),
        ("500", "/health")),
    # ---- train: resume, cluster
    Row("train: --resume of a run that does not exist", lambda i, f: _train(i, f, "--resume", "--name", "ghost"),
        ("--resume", "no run named 'ghost'")),
    Row("train: --resume without --name", lambda i, f: _train(i, f, "--resume"),
        ("--resume needs --name",)),
    Row("train: --resume with another backbone", _resumed_with_another_backbone,
        ("model.backbone", "resnet50", "resnet18", "checkpoint")),
    Row("train: --address with nothing listening",
        lambda i, f: _train(i, f, "--address", f"127.0.0.1:{i.closed_port}"),
        ("cannot reach the Ray cluster", "ray start --head")),
    # ---- tune
    Row("tune: --space without a kind", lambda i, f: _tune(i, f, "--space", "lr"),
        ("--space 'lr'", "expected name=kind:low:high")),
    Row("tune: --space with one bound", lambda i, f: _tune(i, f, "--space", "lr=uniform:0.1"),
        ("uniform takes two bounds", "expected lr=uniform:LOW:HIGH")),
    Row("tune: --space of an unknown kind", lambda i, f: _tune(i, f, "--space", "lr=gaussian:0:1"),
        ("type must be one of", "'gaussian'")),
    Row("tune: --space of an unknown name", lambda i, f: _tune(i, f, "--space", "momentumm=uniform:0:1"),
        ("unknown search parameter 'momentumm'", "expected one of")),
    Row("tune: --space with low above high", lambda i, f: _tune(i, f, "--space", "lambda_c=uniform:1:0"),
        ("low (1) must be below high (0)",)),
    Row("tune: loguniform from 0", lambda i, f: _tune(i, f, "--space", "lr=loguniform:0:0.1"),
        ("loguniform needs low > 0",)),
    Row("tune: --space-file that is not JSON",
        lambda i, f: _tune(i, f, "--space-file", str(_space_file(f, "lr: [0, 1]"))),
        ("space.json", "not valid JSON")),
    Row("tune: --grid of a value the config refuses", lambda i, f: _tune(i, f, "--grid", "model.variant=sum,3dpam"),
        ("model.variant must be",)),
    Row("tune: --resume of a search that does not exist", lambda i, f: _tune(i, f, "--resume", "--name", "ghost"),
        ("--resume", "no search named 'ghost'")),
    # ---- evaluate
    Row("evaluate: a file that is not a checkpoint",
        lambda i, f: ["evaluate", "--model", "/etc/passwd", "--data", str(i.shards), "--no-log"],
        ("/etc/passwd", "checkpoint")),
    Row("evaluate: a checkpoint path that does not exist",
        lambda i, f: ["evaluate", "--model", str(f / "runs" / "ghost" / "checkpoint.pt"), "--data", str(i.shards)],
        ("no checkpoint at", "ghost/checkpoint.pt", "expected a checkpoint file or folder")),
    Row("evaluate: a checkpoint for other classes",
        lambda i, f: ["evaluate", "--model", str(i.checkpoint), "--data", str(i.voc_shards), "--no-log"],
        ("predicts 19 classes", "has 21")),
    Row("evaluate: weights that are not the checkpoint's backbone",
        lambda i, f: ["evaluate", "--model", str(_state_of_another_model(i, f)), "--data", str(i.shards), "--no-log"],
        ("checkpoint.pt", "weights do not fit the model its config describes", "sum")),
    Row("evaluate: a models:/ name that does not exist",
        lambda i, f: ["evaluate", "--model", "models:/dfdam-nothing@champion", "--data", str(i.shards)],
        ("models:/dfdam-nothing@champion", "expected models:/NAME/VERSION or models:/NAME@ALIAS")),
    Row("evaluate: a models:/ alias that does not exist",
        lambda i, f: ["evaluate", "--model", "models:/dfdam-synthetic@nosuch", "--data", str(i.shards)],
        ("models:/dfdam-synthetic@nosuch", "alias", "expected models:/NAME/VERSION")),
    Row("evaluate: a models:/ version that does not exist",
        lambda i, f: ["evaluate", "--model", "models:/dfdam-synthetic/7", "--data", str(i.shards)],
        ("models:/dfdam-synthetic/7", "version", "expected models:/NAME/VERSION")),
    Row("evaluate: --address with nothing listening",
        lambda i, f: ["evaluate", "--model", str(i.checkpoint), "--data", str(i.shards), "--workers", "2",
                      "--address", f"127.0.0.1:{i.closed_port}", "--no-log"],
        ("cannot reach the Ray cluster", "ray start --head")),
    Row("evaluate: a run id that does not exist",
        lambda i, f: ["evaluate", "--model", "0123456789abcdef0123456789abcdef", "--data", str(i.shards)],
        ("0123456789abcdef0123456789abcdef", "neither a models:/ URI, a checkpoint, nor a run id")),
    Row("evaluate: a shard cut short",
        lambda i, f: ["evaluate", "--model", str(i.checkpoint), "--data", str(_damaged_shards(i, f, "cut")), "--no-log"],
        ("val-000000.tar", "cut short")),
    Row("evaluate: a split that has no manifest",
        lambda i, f: ["evaluate", "--model", str(i.checkpoint), "--data", str(i.shards), "--split", "tset"],
        ("tset", "manifest")),
    # ---- predict, explain, export, profile
    Row("predict: input that does not exist",
        lambda i, f: ["predict", "--model", str(i.checkpoint), "--input", str(f / "nothing.png"),
                      "--out", str(f / "out")],
        ("nothing.png",)),
    Row("predict: a file that is not an image",
        lambda i, f: ["predict", "--model", str(i.checkpoint), "--input", str(_text_file(f, "junk.png")),
                      "--out", str(f / "out")],
        ("junk.png", "not a readable image", "expected a PNG or JPG file")),
    Row("predict: a shard with a damaged image",
        lambda i, f: ["predict", "--model", str(i.checkpoint), "--input", str(_damaged_image(i, f)), "--split", "val",
                      "--out", str(f / "out")],
        ("val-000000.tar", "sample", "expected a shard written by `run.py shard`", "shard verify")),
    Row("evaluate: missing shard folder",
        lambda i, f: ["evaluate", "--model", str(i.checkpoint), "--data", str(f / "nowhere")],
        ("nowhere", "does not exist", "expected the --out folder of `run.py shard`")),
    Row("predict: --batch-size 0",
        lambda i, f: ["predict", "--model", str(i.checkpoint), "--input", str(i.shards), "--out", str(f / "out"),
                      "--batch-size", "0"],
        ("batch size", "must be at least 1", "got 0")),
    Row("explain: a file that is not an image",
        lambda i, f: ["explain", "--model", str(i.checkpoint), "--input", str(_text_file(f, "junk.png")),
                      "--out", str(f / "out")],
        ("junk.png", "not an image", "expected PNG or JPG")),
    Row("explain: image that does not exist",
        lambda i, f: ["explain", "--model", str(i.checkpoint), "--input", str(f / "nothing.png"),
                      "--out", str(f / "out")],
        ("nothing.png",)),
    Row("explain: malformed --size",
        lambda i, f: ["explain", "--model", str(i.checkpoint), "--input", str(f / "x.png"), "--out", str(f / "out"),
                      "--size", "big"],
        ("--size", "expected HxW such as 128x256")),
    Row("export: --sample-size under 64",
        lambda i, f: ["export", "--model", str(i.checkpoint), "--format", "onnx", "--out", str(f / "m.onnx"),
                      "--sample-size", "32x32"],
        ("--sample-size", "at least 64x64")),
    Row("export: negative --atol",
        lambda i, f: ["export", "--model", str(i.checkpoint), "--format", "onnx", "--out", str(f / "m.onnx"),
                      "--atol", "-1"],
        ("--atol must be >= 0",)),
    Row("track sync: run folder that does not exist", lambda i, f: ["track", "sync", str(f / "runs" / "ghost")],
        ("ghost", "does not exist", "expected a training run's folder")),
    Row("profile: --size under the output stride", lambda i, f: ["profile", "--size", "16x16", "--no-reference"],
        ("--size", "at least 32x32", "'16x16'")),
]


# --------------------------------------------------------------------------- checks


def _snapshot(*folders: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folders`` (the MLflow store aside): size and sha256."""
    found = {}
    for folder in folders:
        if not folder.exists():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("mlflow.db"):
                found[str(path)] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
            elif path.is_dir():
                found[str(path)] = (-1, "")
    return found


def _store_counts(store: Path) -> tuple[int, int, int]:
    """(runs, runs not ended, registry versions) in the SQLite MLflow store."""
    with sqlite3.connect(store) as db:
        runs = db.execute("SELECT count(*) FROM runs").fetchone()[0]
        running = db.execute("SELECT count(*) FROM runs WHERE status IN ('RUNNING', 'SCHEDULED')").fetchone()[0]
        versions = db.execute("SELECT count(*) FROM model_versions").fetchone()[0]
    return runs, running, versions


def _message_lines(err: str) -> list[str]:
    """stderr's lines without argparse's usage block (``usage: ...`` and its indented continuation)."""
    lines, in_usage = [], False
    for line in err.splitlines():
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line.startswith(" "):
            continue
        in_usage = False
        if line.strip():
            lines.append(line)
    return lines


class ReachedRay(BaseException):
    """Raised by ``ray.init`` in these tests; a BaseException, so that no ``except Exception`` turns it
    into a clean-looking refusal."""


def run_cli(argv: list[str]) -> int:
    """``run.main(argv)``, with the exit status a shell would see for a ``SystemExit``."""
    import run

    try:
        return run.main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # what Python prints for SystemExit("message")
            print(exc.code, file=sys.stderr)
            return 1
        return 0 if exc.code is None else int(exc.code)


@pytest.fixture
def row_env(inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of the row's own as the working directory, every MLflow call pointed at the shared store,
    no Ray cluster address from the environment, and ``ray.init`` replaced by an error: a row that
    gets that far fails at once instead of starting a cluster."""
    import ray

    def no_ray(*args, **kwargs):
        raise ReachedRay("the bad input reached ray.init: it must be refused before Ray starts")

    monkeypatch.setattr(ray, "init", no_ray)
    folder = tmp_path / "row"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{inputs.store}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return folder


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_is_refused_with_one_clear_line(row: Row, inputs: Inputs, row_env: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv = row.make(inputs, row_env)
    shared = (inputs.cityscapes, inputs.voc, inputs.shards, inputs.voc_shards, inputs.checkpoint.parent)
    before, store_before = _snapshot(row_env, *shared), _store_counts(inputs.store)
    capsys.readouterr()
    code = run_cli(argv)
    out, err = capsys.readouterr()
    assert code != 0, f"{argv} exited 0; stdout: {out[-500:]}"
    assert "Traceback" not in err, err
    lines = _message_lines(err)
    assert len(lines) == 1, f"expected one message line on stderr, got {lines}"
    for fragment in row.fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert _snapshot(row_env, *shared) == before, "files were left behind or changed"
    runs, running, versions = _store_counts(inputs.store)
    assert running == 0 and versions == store_before[2] and runs == store_before[0], \
        f"MLflow store changed: {(runs, running, versions)} vs {store_before}"


def test_the_table_covers_every_subcommand_and_enough_inputs() -> None:
    import run

    commands = set(run.build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse's own
    covered = {row.name.split(":")[0].split()[0] for row in ROWS}
    assert commands <= covered, f"no bad-input row for {sorted(commands - covered)}"
    assert len(ROWS) >= 32 and len({row.name for row in ROWS}) == len(ROWS)


# --------------------------------------------------------------------------- through a real process

SUBPROCESS_ROWS = ("evaluate: a file that is not a checkpoint", "shard: VOC list holds a ../ path",
                   "tune: --space with one bound")


@pytest.mark.slow
def test_a_real_process_exits_non_zero_with_one_line(inputs: Inputs, tmp_path: Path) -> None:
    """The same refusals through ``python run.py``: the exit status a shell sees, stderr alone."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{inputs.store}", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    rows = {row.name: row for row in ROWS}
    for name in SUBPROCESS_ROWS:
        folder = tmp_path / name.split(":")[0].replace(" ", "-")
        folder.mkdir(exist_ok=True)
        argv = rows[name].make(inputs, folder)
        done = subprocess.run([sys.executable, str(REPO / "run.py"), *argv], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode not in (0, None), f"{name}: exit 0"
        assert "Traceback" not in done.stderr, done.stderr
        lines = _message_lines(done.stderr)
        assert len(lines) == 1 and all(f in lines[0] for f in rows[name].fragments), (name, lines)


@pytest.mark.parametrize("token, image_id", [
    ("2007_000032", "2007_000032"),
    ("/JPEGImages/2007_000032.jpg", "2007_000032"),  # DeepLab's lists
    ("SegmentationClassAug/2007_000032.png", "2007_000032"),
    ("/etc/passwd", None), ("../2007_000032", None), ("JPEGImages/../../x.jpg", None),
    ("/JPEGImages/sub/2007_000032.jpg", None), ("2007_000032.jpg", None), ("..", None), ("/img/a.b.jpg", None),
])
def test_a_split_list_names_images_under_the_root_only(token: str, image_id: str | None) -> None:
    from sharding.voc import list_token_id

    assert list_token_id(token) == image_id
