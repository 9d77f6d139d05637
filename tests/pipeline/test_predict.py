"""run.py predict (pipeline/predict.py): the files it writes for a shard split, a folder of images
and one image; the Cityscapes and VOC benchmark formats; names, clashes, re-runs; Ray workers."""
from __future__ import annotations

import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import run
from pipeline.checkpoint import build_model, save_checkpoint
from pipeline.config import DataConfig, InferenceConfig
from pipeline.data import shard_loader
from pipeline.evaluate import load_model
from pipeline.inference import segment
from pipeline.loop import dataset_info
from pipeline.predict import CITYSCAPES_RESULTS, PredictError, image_name, predict, same_size_batches
from sharding.cityscapes import label_id_lut, train_id_lut
from sharding.classes import voc_classes, voc_colormap
from sharding.manifest import read_manifest

PLAIN = ("_trainid.png", "_color.png", "_overlay.png")


def _save(folder: Path, tiny_shards: Path, num_classes: int, dataset: dict) -> Path:
    from tests.conftest import _tiny_config

    cfg = _tiny_config(tiny_shards, folder)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes, pretrained=False).eval()
    return save_checkpoint(folder / "epoch_0001", model=model, optimizer=None, scaler=None, epoch=0, step=0,
                           config=cfg, dataset=dataset, metrics={})


@pytest.fixture(scope="module")
def checkpoint(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained DF-DAM-R18 saved as a training checkpoint for the tiny (Cityscapes) shards."""
    manifest = read_manifest(tiny_shards, "val")
    return _save(tmp_path_factory.mktemp("checkpoint"), tiny_shards, manifest.num_classes, dataset_info(manifest))


@pytest.fixture(scope="module")
def voc_checkpoint(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same network with VOC's 21 classes and class table."""
    table = voc_classes()
    dataset = {"dataset": "voc", "num_classes": table.num_classes, "class_names": list(table.names),
               "palette": [list(c) for c in table.palette], "ignore_index": table.ignore_index}
    return _save(tmp_path_factory.mktemp("voc-checkpoint"), tiny_shards, table.num_classes, dataset)


@pytest.fixture(scope="module")
def shard_run(checkpoint: Path, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """The val split predicted in this process with --format cityscapes."""
    out = tmp_path_factory.mktemp("predict-shards")
    return out, predict(str(checkpoint), tiny_shards, out, format="cityscapes")


@pytest.fixture(scope="module")
def image_dir(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The val photos as files in the Cityscapes layout (the shards keep the files' bytes):
    <root>/leftImg8bit/val/<city>/<key>_leftImg8bit.png."""
    root = tmp_path_factory.mktemp("cityscapes-files")
    manifest = read_manifest(tiny_shards, "val")
    sources = dict(zip(manifest.table.column("key").to_pylist(), manifest.table.column("image_source").to_pylist()))
    for shard in manifest.shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "png":
                    path = root / sources[key]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(tar.extractfile(member).read())
    return root / "leftImg8bit" / "val"


@pytest.fixture(scope="module")
def dir_run(checkpoint: Path, image_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("predict-dir")
    return out, predict(str(checkpoint), image_dir, out, format="cityscapes", files_per_task=4)


def _ids(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_shard_input_writes_the_models_segmentation_of_every_image(checkpoint: Path, tiny_shards: Path,
                                                                   shard_run) -> None:
    out, report = shard_run
    manifest = read_manifest(tiny_shards, "val")
    loaded = load_model(str(checkpoint))
    palette = np.array(manifest.palette, dtype=np.uint8)
    data = DataConfig(eval_batch_size=1, loader_workers=0, mean=loaded.mean, std=loaded.std)
    keys = []
    for images, _, batch_keys in shard_loader(manifest.shards, data):
        expected = segment(loaded.model, images).numpy()  # (1, H, W)
        key = batch_keys[0]
        keys.append(key)
        trainid = Image.open(out / f"{key}_trainid.png")
        assert trainid.mode == "L" and trainid.size == (128, 64)  # (W, H) of the 64x128 images
        assert np.array_equal(_ids(out / f"{key}_trainid.png"), expected[0])
        color = Image.open(out / f"{key}_color.png")
        assert color.mode == "RGB" and np.array_equal(np.asarray(color), palette[expected[0]])
        assert Image.open(out / f"{key}_overlay.png").size == (128, 64)
    assert report.images == manifest.num_samples == len(keys) == 6
    assert report.files == 6 * 4
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{k}{s}" for k in keys for s in PLAIN)
    assert not list(out.rglob("*.tmp"))


def test_cityscapes_format_writes_label_ids_where_the_official_evaluation_finds_them(shard_run) -> None:
    from cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling import getPrediction

    out, report = shard_run
    lut = label_id_lut()
    assert lut[0] == 7 and lut[13] == 26 and lut[18] == 33  # road, car, bicycle
    assert np.array_equal(train_id_lut()[lut[:19]], np.arange(19))
    results = out / CITYSCAPES_RESULTS
    keys = sorted(p.name[: -len("_trainid.png")] for p in out.glob("*_trainid.png"))
    for key in keys:
        benchmark = results / f"{key}_leftImg8bit.png"
        assert Image.open(benchmark).mode == "L"
        assert np.array_equal(_ids(benchmark), lut[_ids(out / f"{key}_trainid.png")])
        # The file the evaluation pairs with the ground truth <key>_gtFine_labelIds.png.
        found = getPrediction(SimpleNamespace(predictionPath=str(results), predictionWalk=None),
                              f"{key}_gtFine_labelIds.png")
        assert found == str(benchmark)
    # Pointed at --out itself, it finds the plain files too and refuses: why the folder is separate.
    with pytest.raises(SystemExit):
        getPrediction(SimpleNamespace(predictionPath=str(out), predictionWalk=None), f"{keys[0]}_gtFine_labelIds.png")
    assert "cityscapes_results" in report.summary()


def test_a_folder_of_images_gives_what_the_shards_give(image_dir: Path, shard_run, dir_run) -> None:
    shard_out, _ = shard_run
    out, report = dir_run
    files = sorted(image_dir.rglob("*_leftImg8bit.png"))
    assert report.images == len(files) == 6
    for path in files:
        name = image_name(path, image_dir)  # <city>/<key>
        assert name == f"{path.parent.name}/{path.name[: -len('_leftImg8bit.png')]}"
        key = name.split("/")[1]
        # The overlay: the colour half over the photo, rounded half up.
        photo = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
        colour = np.asarray(Image.open(out / f"{name}_color.png")).astype(np.int64)
        assert np.array_equal(np.asarray(Image.open(out / f"{name}_overlay.png")), (photo + colour + 1) // 2)
        for suffix in PLAIN:
            assert (out / f"{name}{suffix}").read_bytes() == (shard_out / f"{key}{suffix}").read_bytes()
        assert ((out / CITYSCAPES_RESULTS / f"{name}_leftImg8bit.png").read_bytes()
                == (shard_out / CITYSCAPES_RESULTS / f"{key}_leftImg8bit.png").read_bytes())


def test_voc_format_writes_palette_pngs_of_class_ids_in_the_devkit_layout(voc_checkpoint: Path, image_dir: Path,
                                                                         tmp_path: Path) -> None:
    image = sorted(image_dir.rglob("*.png"))[0]
    report = predict(str(voc_checkpoint), image, tmp_path, format="voc", split="test")
    name = image.name[: -len("_leftImg8bit.png")]
    result = tmp_path / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls" / f"{name}.png"
    assert report.images == 1 and report.files == 4
    ids = _ids(tmp_path / f"{name}_trainid.png")
    assert ids.shape == (64, 128) and int(ids.max()) < 21
    png = Image.open(result)
    assert png.mode == "P" and png.size == (128, 64)
    assert png.getpalette()[: 256 * 3] == [v for colour in voc_colormap(256) for v in colour]
    assert np.array_equal(np.asarray(png), ids)
    assert np.array_equal(np.asarray(Image.open(tmp_path / f"{name}_color.png")),
                          np.array(voc_colormap(21), dtype=np.uint8)[ids])
    with pytest.raises(PredictError, match="trained on voc"):
        predict(str(voc_checkpoint), image, tmp_path / "cs", format="cityscapes")


def test_batches_hold_consecutive_images_of_one_size(checkpoint: Path, image_dir: Path, tmp_path: Path) -> None:
    shapes = [(4, 6, 3), (4, 6, 3), (4, 6, 3), (2, 6, 3), (4, 6, 3), (4, 6, 3)]
    samples = [(str(i), np.zeros(shape, np.uint8)) for i, shape in enumerate(shapes)]
    assert [[n for n, _ in b] for b in same_size_batches(samples, 2)] == [["0", "1"], ["2"], ["3"], ["4", "5"]]
    # Mixed sizes, batch 2: each image predicted with the batch it was in, at its own size.
    folder = tmp_path / "images"
    folder.mkdir()
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(image_dir.rglob("*.png"))[:3]]
    photos.insert(1, photos[0][:32, :64].copy())  # a, small, b, c -> batches [a], [small], [b, c]
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / f"img{i}.png")
    out = tmp_path / "out"
    predict(str(checkpoint), folder, out, batch_size=2)
    loaded = load_model(str(checkpoint))
    from pipeline.transforms import EvalTransform

    transform = EvalTransform(loaded.mean, loaded.std)
    for batch in ([0], [1], [2, 3]):
        expected = segment(loaded.model, torch.stack([transform.image(photos[i]) for i in batch])).numpy()
        for i, ids in zip(batch, expected):
            assert np.array_equal(_ids(out / f"img{i}_trainid.png"), ids)


def test_two_inputs_with_one_name_are_refused_before_anything_is_written(checkpoint: Path, voc_checkpoint: Path,
                                                                         image_dir: Path, tmp_path: Path) -> None:
    photo = sorted(image_dir.rglob("*.png"))[0]
    clash = tmp_path / "clash"
    (clash / "a").mkdir(parents=True)
    (clash / "a" / "x.png").write_bytes(photo.read_bytes())
    (clash / "a" / "x_leftImg8bit.png").write_bytes(photo.read_bytes())
    with pytest.raises(PredictError, match="x_leftImg8bit.png and .*x.png would both write a/x_trainid.png"):
        predict(str(checkpoint), clash, tmp_path / "out1")
    assert not (tmp_path / "out1").exists()
    # One id in two subfolders: fine as plain files, a clash in VOC's flat results folder.
    flat = tmp_path / "flat"
    for sub in ("b", "c"):
        (flat / sub).mkdir(parents=True)
        (flat / sub / "2007_000033.png").write_bytes(photo.read_bytes())
    with pytest.raises(PredictError, match="comp6_val_cls/2007_000033.png"):
        predict(str(voc_checkpoint), flat, tmp_path / "out2", format="voc")
    # An input subfolder named like the benchmark folder: the evaluation would find two files per image.
    reserved = tmp_path / "reserved"
    (reserved / "cityscapes_results").mkdir(parents=True)
    (reserved / "cityscapes_results" / "y.png").write_bytes(photo.read_bytes())
    with pytest.raises(PredictError, match="would go into cityscapes_results/"):
        predict(str(checkpoint), reserved, tmp_path / "out4", format="cityscapes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no image files"):
        predict(str(checkpoint), tmp_path / "empty", tmp_path / "out3")


def test_one_image_by_the_command_line_overwrites_and_clears_what_a_killed_run_left(
        checkpoint: Path, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = sorted(image_dir.rglob("*.png"))[0]
    name = photo.name[: -len("_leftImg8bit.png")]
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{name}_trainid.png").write_bytes(b"half a PNG")  # an earlier run's file
    (out / f".{name}_color.png.12345.tmp").write_bytes(b"half a PNG")  # a killed run's temporary
    assert run.main(["predict", "--model", str(checkpoint), "--input", str(photo), "--out", str(out),
                     "--flip", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "predicted 1 images" in printed and "images/s" in printed and str(out) in printed
    assert "removed 1 temporary file" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}{s}" for s in PLAIN)
    loaded = load_model(str(checkpoint))
    from pipeline.transforms import EvalTransform

    image = EvalTransform(loaded.mean, loaded.std).image(np.asarray(Image.open(photo).convert("RGB")))
    assert np.array_equal(_ids(out / f"{name}_trainid.png"),
                          segment(loaded.model, image[None], InferenceConfig(flip=True))[0].numpy())


def test_help_names_the_files_and_formats(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(["predict", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("_trainid.png", "_color.png", "_overlay.png", "cityscapes_results/<name>_leftImg8bit.png",
                   "results/VOC2012/Segmentation/<comp>_<split>_cls/<id>.png", "--workers", "--batch-size"):
        assert phrase in text


def test_two_ray_workers_write_the_same_bytes_as_this_process(ray_cluster, checkpoint: Path, tiny_shards: Path,
                                                               image_dir: Path, shard_run, dir_run,
                                                               tmp_path: Path) -> None:
    for (expected_out, expected), source in ((shard_run, tiny_shards), (dir_run, image_dir)):
        out = tmp_path / Path(expected_out).name
        report = predict(str(checkpoint), source, out, format="cityscapes", workers=2, files_per_task=4)
        assert report.workers == 2 and report.images == expected.images == 6 and report.files == expected.files
        files = sorted(p.relative_to(expected_out) for p in Path(expected_out).rglob("*.png"))
        assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == files and len(files) == 24
        for file in files:
            assert (out / file).read_bytes() == (Path(expected_out) / file).read_bytes(), file
