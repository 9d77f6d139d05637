"""The search-space language: the paper's point, changes from the command line and a file, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, build_config
from pipeline.search_space import default_space, paper_point, parse_space


def test_default_space_holds_the_papers_values_and_zero() -> None:
    cfg = build_config("cityscapes")
    space = default_space(cfg)
    assert paper_point(cfg, space) == {"lambda_c": 0.4, "lambda_s": 0.1, "lr": 0.01}
    assert space["lambda_c"].contains(0.0) and space["lambda_s"].contains(0.0)
    assert space["lr"].kind == "loguniform" and space["lr"].low == pytest.approx(0.001)


def test_space_changes_from_the_command_line_and_a_file(tmp_path: Path) -> None:
    cfg = build_config("synthetic")
    file = tmp_path / "space.json"
    file.write_text(json.dumps({"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                                "optim.weight_decay": {"type": "choice", "values": [0, 1e-4]}}))
    space = parse_space(cfg, ["lambda_s=choice:0,0.1,0.2", "lambda_c=uniform:0.2:0.6"], file)
    assert space["lr"].low == 1e-4 and space["lambda_s"].values == (0.0, 0.1, 0.2)
    assert space["lambda_c"].high == 0.6 and space["optim.weight_decay"].values == (0.0, 1e-4)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lamda_c=uniform:0:1", "unknown search parameter 'lamda_c'"),
        ("train.epochs=uniform:1:5", "unknown search parameter"),
        ("lambda_c=gaussian:0:1", "type must be one of"),
        ("lambda_c=uniform:1:0", "must be below"),
        ("lr=loguniform:0:0.1", "low > 0"),
        ("lambda_s=uniform:-1:1", "cannot be negative"),
        ("lambda_c", "expected name=kind:low:high"),
    ],
)
def test_bad_search_spaces_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space(build_config("synthetic"), [spec])
