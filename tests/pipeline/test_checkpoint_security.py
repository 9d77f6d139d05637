"""Checkpoints load with ``torch.load(..., weights_only=True)``: what training writes loads, old
files still load, and a file that is not a checkpoint, or one that carries a pickled object, is
refused with one line naming the file (``run.py`` included), never unpickled as code."""
from __future__ import annotations

import json
import re
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from pipeline.checkpoint import (CHECKPOINT_FILE, CheckpointError, build_model, load_checkpoint,
                                 model_from_checkpoint, save_checkpoint)
from pipeline.config import ConfigError, build_config
from pipeline.loop import setup_training
from pipeline.optim import build_optimizer

EXPECTED = "expected a DF-DAM checkpoint written by `run.py train`"


class Payload:
    """A class a checkpoint could carry pickled: loading it by reference would import and build it."""


class Opener:
    """A pickle that calls ``open(marker, "w")`` when unpickled: the file appears if it ever runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _config():
    return build_config("synthetic", ["model.backbone=resnet18", "data.crop_size=64x64"])


@pytest.fixture(scope="module")
def parts():
    """(config, a DF-DAM-R18 with one SGD step taken: momentum buffers in its optimizer state, its
    optimizer, its grad scaler), built once for the module."""
    torch.manual_seed(0)
    cfg = _config()
    model = build_model(cfg.model, 19, pretrained=False)
    optimizer = build_optimizer(model, cfg.optim)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.float().mean() for v in out.values() if torch.is_tensor(v)).backward()
    optimizer.step()
    return cfg, model, optimizer, torch.amp.GradScaler("cpu", enabled=False)


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, dict]:
    """A checkpoint as the worker writes it, with numpy values where a caller could pass them."""
    cfg, model, optimizer, scaler = parts
    folder = tmp_path_factory.mktemp("ckpt") / "epoch_0001"
    dataset = {"dataset": "cityscapes", "num_classes": np.int64(19), "class_names": [f"c{i}" for i in range(19)],
               "palette": np.zeros((19, 3), dtype=np.uint8), "ignore_index": 255}
    metrics = {"val_miou": np.float32(0.25), "train_loss": np.float64(1.5), "best_val_miou": 0.25}
    save_checkpoint(folder, model=model, optimizer=optimizer, scaler=scaler, epoch=0, step=3, config=cfg,
                    dataset=dataset, metrics=metrics, schedule={"base_lr": 0.01, "end": 9, "power": 0.9})
    return folder, model, optimizer.state_dict()


def test_what_training_writes_loads_with_weights_only(saved) -> None:
    folder, model, optimizer_state = saved
    raw = torch.load(folder / CHECKPOINT_FILE, weights_only=True)  # the safe loader alone, no allow-list
    assert raw["metrics"] == {"val_miou": 0.25, "train_loss": 1.5, "best_val_miou": 0.25}
    assert type(raw["metrics"]["val_miou"]) is float and type(raw["dataset"]["num_classes"]) is int
    assert torch.equal(raw["dataset"]["palette"], torch.zeros(19, 3, dtype=torch.uint8))
    assert isinstance(raw["model"], OrderedDict) and raw["model"]._metadata == model.state_dict()._metadata
    momentum = [s["momentum_buffer"] for s in raw["optimizer"]["state"].values()]
    assert momentum and all(torch.equal(a, b["momentum_buffer"])
                            for a, b in zip(momentum, optimizer_state["state"].values()))
    assert json.loads((folder / "checkpoint.json").read_text())["metrics"]["val_miou"] == 0.25

    state = load_checkpoint(folder)
    rebuilt = model_from_checkpoint(state, folder)
    for (name, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_entry_the_safe_loader_would_refuse_fails_at_save_time(parts, tmp_path: Path) -> None:
    cfg, model, optimizer, scaler = parts
    with pytest.raises(TypeError, match=r"checkpoint\['metrics'\]\['when'\] is a pathlib\.PosixPath"):
        save_checkpoint(tmp_path / "epoch_0001", model=model, optimizer=optimizer, scaler=scaler, epoch=0, step=1,
                        config=cfg, dataset={"num_classes": 19}, metrics={"when": tmp_path})
    assert not (tmp_path / "epoch_0001").exists()  # nothing written


def test_a_checkpoint_written_before_weights_only_still_loads(parts, tmp_path: Path) -> None:
    """The file as the earlier ``save_checkpoint`` wrote it (``torch.save`` of the raw state dicts,
    no schedule: older still), a bare .pt without its record; and the same in torch's legacy format."""
    cfg, model, optimizer, scaler = parts
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": 1, "step": 6, "config": cfg.to_dict(), "dataset": {"num_classes": 19},
             "metrics": {"best_val_miou": 0.5}}
    for name, zipped in (("zip.pt", True), ("legacy.pt", False)):
        torch.save(state, tmp_path / name, _use_new_zipfile_serialization=zipped)
        loaded = load_checkpoint(tmp_path / name)
        assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
        assert loaded["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    resumed = setup_training(cfg, 19, 3, torch.device("cpu"), loaded)  # the model is rebuilt from it here
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert resumed.start_epoch == 2 and resumed.best == 0.5
    assert resumed.schedule.end == 3 * cfg.train.epochs  # the poly policy of its own config


def test_resume_compares_the_model_from_the_record_without_reading_the_weights(saved, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """``train --resume`` with another model: refused from ``checkpoint.json`` alone; a record
    written before it held the model section falls back to the checkpoint itself."""
    import pipeline.train as train

    folder, _, _ = saved
    run_dir = tmp_path / "run"
    shutil.copytree(folder, run_dir / folder.name)
    record_file = run_dir / folder.name / "checkpoint.json"
    record = json.loads(record_file.read_text())
    assert record["model"] == _config().to_dict()["model"]
    same, other = (build_config("synthetic", [f"model.backbone={b}", "data.crop_size=64x64", "train.epochs=3"])
                   for b in ("resnet18", "resnet50"))
    refused = r"was trained as model\.backbone=resnet18 \(now resnet50\)"

    def no_weights(*args, **kwargs):
        raise AssertionError("check_resume read the checkpoint's weights")

    with monkeypatch.context() as patch:
        patch.setattr(train, "load_checkpoint", no_weights)
        with pytest.raises(ConfigError, match=refused):
            train.check_resume(run_dir, other)
        train.check_resume(run_dir, same)

    del record["model"]
    record_file.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=refused):
        train.check_resume(run_dir, other)
    train.check_resume(run_dir, same)


def _refusals(tmp_path: Path, saved_file: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a file that must be refused, what the message says about it)."""
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, data: bytes, says: str) -> None:
        (tmp_path / name).write_bytes(data)
        files[name] = (tmp_path / name, says)

    add("passwd", b"root:x:0:0:root:/root:/bin/bash\n", "neither a zip archive nor a pickle")
    add("empty.pt", b"", "an empty file")
    whole = saved_file.read_bytes()
    add("cut.pt", whole[: len(whole) // 2], "damaged, cut short or not from torch.save")
    with zipfile.ZipFile(tmp_path / "junk.zip", "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    files["junk.zip"] = (tmp_path / "junk.zip", "damaged, cut short or not from torch.save")
    torch.save({"model": {}, "epoch": 0, "config": {}, "dataset": {}, "extra": Payload()}, tmp_path / "object.pt")
    files["object.pt"] = (tmp_path / "object.pt", f"carries a pickled Python object \\({__name__}.Payload\\)")
    torch.save({"model": {}, "metrics": {"x": np.float64(1.0)}}, tmp_path / "numpy.pt")
    files["numpy.pt"] = (tmp_path / "numpy.pt", "carries a pickled Python object \\(numpy")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    files["list.pt"] = (tmp_path / "list.pt", "holds a list, not a dict")
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 0}, tmp_path / "partial.pt")
    files["partial.pt"] = (tmp_path / "partial.pt", "is not a DF-DAM checkpoint: it lacks 'config'")
    return files


def test_files_that_are_not_checkpoints_are_refused_naming_the_file(tmp_path: Path, saved) -> None:
    marker = tmp_path / "ran"
    torch.save({"model": {}, "epoch": 0, "config": {}, "dataset": {}, "x": Opener(marker)}, tmp_path / "opener.pt")
    files = _refusals(tmp_path, saved[0] / CHECKPOINT_FILE)
    files["opener.pt"] = (tmp_path / "opener.pt", "carries a pickled Python object \\((builtins|io)\\.open\\)")
    for name, (path, says) in files.items():
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} .*{says}.*{EXPECTED}") as caught:
            load_checkpoint(path)
        assert "\n" not in str(caught.value), name
    assert not marker.exists()  # the pickled call never ran


def test_weights_of_another_model_than_the_config_says_are_refused(saved) -> None:
    folder = saved[0]
    state = load_checkpoint(folder)
    state["dataset"] = {**state["dataset"], "num_classes": 21}  # a 19-class head under a 21-class config
    with pytest.raises(CheckpointError, match=f"^{folder}: its weights do not fit the model its config describes "
                                              r"\(resnet18, .*21 classes\): size mismatch"):
        model_from_checkpoint(state, folder)


@pytest.mark.parametrize("command", ["evaluate", "predict", "explain", "export"])
def test_run_py_refuses_a_foreign_file_in_one_line(command: str, tmp_path: Path, tiny_shards: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "street.png"
    Image.fromarray(np.zeros((32, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    argv = {
        "evaluate": ["--data", str(tiny_shards), "--no-log"],
        "predict": ["--input", str(image), "--out", str(out), "--no-progress"],
        "explain": ["--input", str(image), "--out", str(out)],
        "export": ["--format", "torchscript", "--out", str(out / "model.pt")],
    }[command]
    passwd = Path("/etc/passwd") if Path("/etc/passwd").is_file() else tmp_path / "passwd"
    if not passwd.exists():
        passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    pickled = tmp_path / "object.pt"
    torch.save({"model": {}, "epoch": 0, "config": {}, "dataset": {}, "extra": Payload()}, pickled)
    for model, says in ((passwd, "is not a readable torch checkpoint"), (pickled, "carries a pickled Python object")):
        assert run.main([command, "--model", str(model), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"run.py {command}: error: {model} {says}"), err
        assert EXPECTED in err[-1] and not any("Traceback" in line for line in err)
        assert not out.exists() or not any(out.iterdir())  # nothing written
