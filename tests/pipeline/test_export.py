"""run.py export: ONNX and TorchScript files that reproduce the PyTorch model at any batch and size,
checked before they are kept, and nothing written when the check fails."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import run
from models import build_dfdam
from pipeline.checkpoint import save_checkpoint
from pipeline.config import build_config
from pipeline.evaluate import load_any_model, load_model
from pipeline.export import (DEFAULT_ATOL, METADATA_FILE, ExportCheckError, check_shapes, export_model, sample_input,
                             torchscript_runner)

HEIGHT, WIDTH = 64, 96
NUM_CLASSES = 5
# A third shape, checked here on the written file with the tests' own code: another batch and
# odd sizes unlike both shapes the export checked itself (check_shapes(64, 96): 1x3x64x96, 2x3x33x49).
THIRD = (3, 3, 70, 101)
# Logits of PyTorch and of the exported model differ by float32 rounding only (pipeline.export.DEFAULT_ATOL).
ATOL = DEFAULT_ATOL


def _checkpoint(folder: Path, *, nan_bias: bool = False) -> Path:
    torch.manual_seed(0)
    model = build_dfdam(num_classes=NUM_CLASSES, backbone="resnet18")
    if nan_bias:  # a diverged training: every logit of class 0 is NaN
        with torch.no_grad():
            model.head.classifier.bias[0] = float("nan")
    save_checkpoint(folder, model=model, optimizer=None, scaler=None, epoch=0, step=1,
                    config=build_config("synthetic"),
                    dataset={"dataset": "synthetic", "num_classes": NUM_CLASSES,
                             "class_names": [f"c{i}" for i in range(NUM_CLASSES)],
                             "palette": [[i * 40, 0, 0] for i in range(NUM_CLASSES)], "ignore_index": 255},
                    metrics={})
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("export-ckpt") / "epoch_0000")


def _pytorch(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    model, _ = load_any_model(str(checkpoint))
    with torch.no_grad():
        return model(x)


def _printed_diffs(text: str) -> dict[str, float]:
    """``{"1x3x64x96": diff, ...}`` from the printed check table."""
    rows = re.findall(r"^(\d+x3x\d+x\d+)\s+(\S+)\s+(\S+)\s+(yes|NO)$", text, re.M)
    return {shape: float(diff) for shape, diff, _, _ in rows}


class WidthBranch(nn.Module):
    """Python control flow on the input's width: a trace (or torch.export) keeps only the branch of
    the example's width, so the export differs from the model by exactly 1 on narrower inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + 1.0 if x.shape[-1] > 64 else y


def test_torchscript_export_is_dynamic_and_matches_pytorch(checkpoint: Path, tmp_path: Path) -> None:
    model, _ = load_any_model(str(checkpoint))
    out = tmp_path / "dfdam.pt"
    report = export_model(model, "torchscript", out, check_shapes(HEIGHT, WIDTH), atol=ATOL)
    assert out.is_file() and report.path == out
    assert [c.shape for c in report.checks] == [(1, 3, 64, 96), (2, 3, 33, 49)]
    assert all(c.ok and c.max_abs_diff <= ATOL and c.error is None for c in report.checks)
    assert not list(tmp_path.glob(".*.tmp"))

    # The file alone, loaded as a consumer would, on a third batch and size: the trace baked no size in.
    traced = torchscript_runner(out)
    x = sample_input(THIRD)
    got, expected = traced(x), _pytorch(checkpoint, x)
    assert got.shape == expected.shape == (3, NUM_CLASSES, 70, 101)
    assert (got - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_model_that_is_not_shape_generic_fails_and_writes_nothing(fmt: str, tmp_path: Path) -> None:
    out = tmp_path / f"branch.{fmt}"
    out.write_bytes(b"an older export")
    shapes = check_shapes(HEIGHT, WIDTH)  # widths 96 (the example: +1 branch) and 49 (the other)
    with pytest.raises(ExportCheckError) as caught:
        export_model(WidthBranch().eval(), fmt, out, shapes, atol=ATOL)
    checks = caught.value.checks
    assert [c.shape for c in checks] == shapes
    assert checks[0].ok and not checks[1].ok  # the example's own shape reproduces, the other cannot
    assert "2x3x33x49" in str(caught.value) and "was not written" in str(caught.value)
    assert out.read_bytes() == b"an older export"  # the older file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left


def test_cli_onnx_export_prints_the_check_and_runs_in_onnxruntime(checkpoint: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    import onnxruntime as ort

    out = tmp_path / "dfdam.onnx"
    assert run.main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out),
                     "--sample-size", f"{HEIGHT}x{WIDTH}"]) == 0
    printed = capsys.readouterr().out
    diffs = _printed_diffs(printed)
    assert set(diffs) == {"1x3x64x96", "2x3x33x49"}, printed
    assert all(d <= ATOL for d in diffs.values()), printed
    assert f"wrote {out}" in printed and str(checkpoint) in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # one file: the weights are inside

    # Batch, height and width are named dynamic dimensions of the graph; the class count is fixed.
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (proto.graph.input[0], proto.graph.output[0])]
    assert dims == [["batch", 3, "height", "width"], ["batch", NUM_CLASSES, "height", "width"]]

    # The file alone, in onnxruntime, on a third batch and size; it says how to normalise its input.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    loaded = load_model(str(checkpoint))
    assert (meta["mean"], meta["std"]) == (list(loaded.mean), list(loaded.std))
    assert meta["class_names"] == [f"c{i}" for i in range(NUM_CLASSES)] and meta["num_classes"] == NUM_CLASSES
    x = sample_input(THIRD)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    expected = _pytorch(checkpoint, x).numpy()
    assert got.shape == expected.shape == (3, NUM_CLASSES, 70, 101)
    assert float(np.abs(got - expected).max()) <= ATOL


def test_cli_torchscript_export(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dfdam.pt"
    assert run.main(["export", "--model", str(checkpoint), "--format", "torchscript", "--out", str(out),
                     "--sample-size", f"{HEIGHT}x{WIDTH}"]) == 0
    printed = capsys.readouterr().out
    diffs = _printed_diffs(printed)
    assert set(diffs) == {"1x3x64x96", "2x3x33x49"} and all(d <= ATOL for d in diffs.values()), printed
    assert out.is_file() and "TorchScript" in printed
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; its loader is what users have
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[METADATA_FILE])["palette"] == json.dumps([[i * 40, 0, 0] for i in range(NUM_CLASSES)])


def test_cli_failed_check_exits_1_and_leaves_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    diverged = _checkpoint(tmp_path / "diverged", nan_bias=True)
    out = tmp_path / "exports" / "diverged.pt"
    out.parent.mkdir()
    code = run.main(["export", "--model", str(diverged), "--format", "torchscript", "--out", str(out),
                     "--sample-size", f"{HEIGHT}x{WIDTH}"])
    captured = capsys.readouterr()
    assert code == 1
    assert not any(out.parent.iterdir())  # neither the file nor its temporary name
    assert re.search(r"^1x3x64x96\s+nan\s+1e-03\s+NO$", captured.out, re.M), captured.out
    assert "an output is not finite" in captured.err and "was not written" in captured.err


def test_cli_rejects_bad_arguments(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                     "--sample-size", "32x32"]) == 2
    assert "run.py export: error: --sample-size: expected HxW of at least 64x64" in capsys.readouterr().err
    assert run.main(["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                     "--atol", "-1"]) == 2
    assert "run.py export: error: --atol must be >= 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
