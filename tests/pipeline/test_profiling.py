"""`run.py profile`: DF-DAM's size against the paper's Tables 4 and 6."""
from __future__ import annotations

import json

import pytest

import run
from pipeline.profiling import profile_rows


@pytest.mark.parametrize(("backbone", "params", "macs"), [("resnet18", 11.57e6, 10.31e9), ("resnet101", 43.24e6, 35.52e9)])
def test_dfdam_matches_the_papers_budget(backbone: str, params: float, macs: float) -> None:
    row = profile_rows(backbone, (320, 640), 19, references=False)[0]
    assert abs(row.params / params - 1) < 0.03, row
    assert abs(row.macs / macs - 1) < 0.08, row
    assert row.params_vs_paper == pytest.approx(row.params / params - 1)


def test_json_rows_dfdam_first_with_references(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["profile", "--backbone", "resnet18", "--size", "320x640", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["model"].startswith("DF-DAM (resnet18")
    assert all(isinstance(r["params"], int) and isinstance(r["macs"], int) for r in rows)
    names = [r["model"] for r in rows]
    assert "torchvision fcn_resnet101" in names and "torchvision deeplabv3_resnet101" in names
    # DF-DAM is far cheaper than the dilated torchvision references at the same input.
    measured = {r["model"]: r for r in rows if r["source"] == "measured"}
    assert measured["torchvision deeplabv3_resnet101"]["macs"] > 10 * rows[0]["macs"]


def test_table_names_the_unit(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["profile", "--no-reference", "--size", "160x320"]) == 0
    out = capsys.readouterr().out
    assert "MACs" in out and "3x160x320" in out
