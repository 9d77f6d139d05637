"""``run.py export``: a trained model as an ONNX or TorchScript file, checked against PyTorch.

The exported graph takes what :class:`models.LogitsOnly` takes, a normalised image batch
(B, 3, H, W) float32, and returns the prediction logits (B, K, H, W), with batch, height and
width all free: the paper evaluates every image at seven scales (0.5-2.0, Table 3), and
DF-DAM's shapes all follow the input's (the bilinear enlargements of section 3.4 and of
DAFM, Eq. 7-8, go to sizes read from tensors; DAFM's global average pooling gives
C x 1 x 1 at any size).

How each format is made, and why:

* **ONNX**: ``torch.onnx.export(dynamo=True)``, the ``torch.export``-based exporter (the
  default since torch 2.9; it builds the graph with onnxscript). Batch, height and width
  are named dynamic dimensions; every interpolation size is computed in the graph from
  ``Shape`` of its input. The older TorchScript-based exporter (``dynamo=False``) also
  gives a correct dynamic graph for this model, but it is deprecated (a
  ``DeprecationWarning`` that says it will be removed) and leaves even the class count a
  symbolic dimension. The dynamo exporter costs more time (15-25 s for DF-DAM-R18 on
  2 CPU cores, a minute when they are busy, against 1-2 s) and the ``onnxscript``
  package. ``torch.export`` alone refuses this model's dynamic shapes: it meets guards on
  the feature sizes it cannot prove for every input size (the equal-size shortcut of
  ``models.attention._resize_to``, a stage-4 map 1 pixel wide); ``torch.onnx`` exports
  with size-oblivious guards instead and takes the general branch, which for equal sizes is the identity (bilinear resizing to
  the same size with ``align_corners=False`` samples every pixel at its own centre). The
  guards it drops are not checked at run time either: a model whose Python code branches on
  the input's size would be exported with the example's branch, silently (the tests export
  one, off by 1.0 at the other size), which is one reason for the check below.
  The weights are stored inside the one file (``external_data=False``: a model up to 2 GB,
  DF-DAM ResNet-101 is 0.17 GB).
* **TorchScript**: ``torch.jit.trace`` of the model. ``torch.jit.script`` cannot compile
  DF-DAM (its ``forward`` merges dicts with ``**``). Tracing records ``x.shape`` reads as
  ``aten::size`` calls, so the interpolation sizes stay computed from the input, not baked
  in; the one Python branch on shapes (``_resize_to``'s shortcut, the ``TracerWarning``
  silenced below) is frozen to the general branch, which is correct for every size as
  above.

Both files carry what a user of the bare file needs beside it (:func:`model_metadata`: the
mean/std to normalise with, the class names, the palette, where the model came from): in ONNX
as the model's ``metadata_props`` (``onnxruntime``: ``session.get_modelmeta().custom_metadata_map``),
in TorchScript as the extra file ``dfdam.json`` (``torch.jit.load(path, _extra_files=...)``).

Neither claim is taken on trust: :func:`export_model` runs the exported file (ONNX in
onnxruntime's ``CPUExecutionProvider``) on two input shapes, the sample (batch 1, H x W)
and batch 2 at an odd size (H/2+1) x (W/2+1), not a multiple of the trunk's stride 32,
against the PyTorch model on the same seeded input, and keeps the file only when the
largest absolute difference of the logits is within ``atol`` on both. It writes to a
temporary name next to the target and renames it into place only after the check: a
failed export leaves nothing behind (nor touches an older file at the target).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sharding.text import format_table

if TYPE_CHECKING:  # torch is imported where it is used, so that `run.py --help` reads FORMATS without it
    import torch
    from torch import nn

    from pipeline.evaluate import LoadedModel

FORMATS = ("onnx", "torchscript")
DEFAULT_SAMPLE_SIZE = "256x512"  # H x W: Cityscapes' 2:1 aspect at a size a CPU checks in a second
# Logits differ between PyTorch and onnxruntime by float32 rounding only: different
# convolution algorithms, batch norm folded into the convolutions, other summation orders.
# Measured here: 5e-7 for random weights at 64x96, 1e-5 for the demo's trained DF-DAM-R18 at
# 256x512 (README, "Exporting a model"); a trace replays PyTorch's own kernels (0 here). A
# graph that computes something else (a size baked in, a branch kept for the example's shape)
# is off by the logits' own scale, units (1.0 in tests/pipeline/test_export.py); 1e-3 sits
# two orders of magnitude from each.
DEFAULT_ATOL = 1e-3
INPUT_NAME, OUTPUT_NAME = "image", "logits"
SAMPLE_SEED = 0


class ExportCheckError(RuntimeError):
    """The exported model's output is not the PyTorch model's on a checked shape (the file is not kept)."""

    def __init__(self, message: str, checks: Sequence[ShapeCheck] = ()) -> None:
        super().__init__(message)
        self.checks = list(checks)


@dataclass(frozen=True)
class ShapeCheck:
    """One input shape (B, 3, H, W) run through both models; ``error`` when the export would not run it."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float
    atol: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        # NaN (a non-finite output on either side) is never within the tolerance.
        return self.error is None and bool(self.max_abs_diff <= self.atol)


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    checks: list[ShapeCheck]
    seconds: float  # export and check
    detail: str  # the format's particulars (ONNX opset, dynamic dimensions)

    @property
    def table(self) -> str:
        return format_checks(self.checks)


def check_shapes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The input shapes an export is checked on: the sample (batch 1, ``height`` x ``width``) and
    batch 2 at half the size plus one pixel, an odd size that no stride divides."""
    return [(1, 3, height, width), (2, 3, height // 2 + 1, width // 2 + 1)]


def sample_input(shape: Sequence[int]) -> torch.Tensor:
    """A seeded standard-normal batch: what normalised images look like to the model."""
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(SAMPLE_SEED))


METADATA_FILE = "dfdam.json"  # TorchScript's extra file holding model_metadata


def model_metadata(loaded: LoadedModel) -> dict[str, str]:
    """Strings to embed in an exported file: normalisation, classes, palette, source (JSON values)."""
    values = {"mean": list(loaded.mean), "std": list(loaded.std), "source": loaded.source,
              **{k: loaded.dataset[k] for k in ("dataset", "num_classes", "class_names", "palette", "ignore_index")
                 if k in loaded.dataset}}
    return {key: json.dumps(value) for key, value in values.items()}


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write ``model`` as ONNX with dynamic batch, height and width (see the module doc); returns a summary."""
    import onnx
    import torch

    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, external_data=False, verbose=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({**dims},))
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path), load_external_data=False)
    if metadata:
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})
        onnx.save(proto, str(path))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)

    def dims_of(value) -> str:
        return "x".join(d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim)

    return (f"ONNX opset {opset}, {INPUT_NAME} ({dims_of(proto.graph.input[0])}) -> "
            f"{OUTPUT_NAME} ({dims_of(proto.graph.output[0])})")


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path,
                       metadata: dict[str, str] | None = None) -> str:
    """Write ``torch.jit.trace(model)`` (see the module doc for why a trace stays shape-generic)."""
    import torch

    with warnings.catch_warnings():
        # _resize_to's equal-size shortcut: its general branch is exact for every size, and the
        # check on a second shape below is what proves the trace generic.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, (example,), check_trace=False)
            classes = model(example).shape[1]
    traced.save(str(path), _extra_files={METADATA_FILE: json.dumps(metadata or {})})
    return f"TorchScript (torch.jit.trace), {INPUT_NAME} (Bx3xHxW) -> {OUTPUT_NAME} (Bx{classes}xHxW)"


def onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ONNX file in an onnxruntime CPU session, with torch's thread count."""
    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(session.run(None, {name: x.numpy()})[0]))

    return run


def torchscript_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The TorchScript file, loaded back as a consumer would load it."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loaded(x)

    return run


_EXPORTERS = {"onnx": (export_onnx, onnx_runner), "torchscript": (export_torchscript, torchscript_runner)}


def compare(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
            shapes: Sequence[tuple[int, int, int, int]], atol: float) -> list[ShapeCheck]:
    """Largest absolute logit difference between ``model`` and an exported ``run`` on each shape."""
    import torch

    checks = []
    for shape in shapes:
        x = sample_input(shape)
        with torch.no_grad():
            expected = model(x)
        try:
            got = run(x)
        except Exception as exc:  # noqa: BLE001 - the runtime's own error is the finding
            checks.append(ShapeCheck(tuple(shape), float("nan"), atol, f"{type(exc).__name__}: {exc}"))
            continue
        if got.shape != expected.shape:
            checks.append(ShapeCheck(tuple(shape), float("nan"), atol,
                                     f"output {tuple(got.shape)}, PyTorch's {tuple(expected.shape)}"))
            continue
        checks.append(ShapeCheck(tuple(shape), (got.float() - expected.float()).abs().max().item(), atol))
    return checks


def format_checks(checks: Sequence[ShapeCheck]) -> str:
    """``shape  max abs diff  tolerance  ok`` (sharding.text.format_table), one row per checked shape."""
    rows = [("x".join(map(str, c.shape)), f"{c.max_abs_diff:.2e}", f"{c.atol:.0e}", "yes" if c.ok else "NO")
            for c in checks]
    return format_table(["input (BxCxHxW)", "max abs diff", "tolerance", "ok"], rows)


def export_model(model: nn.Module, fmt: str, out: str | Path, shapes: Sequence[tuple[int, int, int, int]],
                 atol: float = DEFAULT_ATOL, metadata: dict[str, str] | None = None) -> ExportReport:
    """Export ``model`` (eval mode, (B,3,H,W) -> (B,K,H,W)) as ``fmt`` to ``out``, checked on ``shapes``.

    The model is exported on the first shape's sample; :class:`ExportCheckError` (and no file
    at ``out``) when the exported model fails or differs by more than ``atol`` on any shape.
    """
    if fmt not in _EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}: expected one of {FORMATS}")
    if not atol >= 0:
        raise ValueError(f"atol must be a number >= 0, got {atol}")
    if not shapes:
        raise ValueError("export_model needs at least one input shape to check")
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: the folder {out.parent} does not exist")
    exporter, runner = _EXPORTERS[fmt]
    start = time.perf_counter()
    model = model.eval()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        detail = exporter(model, sample_input(shapes[0]), tmp, metadata)
        checks = compare(model, runner(tmp), shapes, atol)
        failed = [c for c in checks if not c.ok]
        if failed:
            why = "; ".join(
                f"{'x'.join(map(str, c.shape))}: {c.error}" if c.error else
                f"{'x'.join(map(str, c.shape))}: max abs diff {c.max_abs_diff:.3g} > {atol:g}"
                + (" (NaN: an output is not finite)" if math.isnan(c.max_abs_diff) else "")
                for c in failed)
            raise ExportCheckError(f"the {fmt} export does not reproduce the PyTorch model ({why}); "
                                   f"{out} was not written", checks)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out, fmt, checks, time.perf_counter() - start, detail)


def export_reference(reference: str, fmt: str, out: str | Path, height: int, width: int,
                     atol: float = DEFAULT_ATOL, tracking_uri: str | None = None) -> tuple[ExportReport, str]:
    """:func:`export_model` for a model named as ``run.py evaluate`` names one
    (:func:`pipeline.evaluate.load_model`), its :func:`model_metadata` embedded; also returns
    where the model was read from."""
    from pipeline.evaluate import load_model

    loaded = load_model(reference, tracking_uri)
    report = export_model(loaded.model, fmt, out, check_shapes(height, width), atol, model_metadata(loaded))
    return report, loaded.source
