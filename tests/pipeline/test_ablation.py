"""The paper's ablation (section 4.2, Tables 1-2) as a grid search: the grid language, its
settings, the table beside the paper's figures, and one small grid run end to end."""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import run
from pipeline.ablation import PAPER_ABLATION, ablation_table, paper_miou
from pipeline.champion import registry_name
from pipeline.config import ConfigError, build_config
from pipeline.search_space import grid_points, parse_grid, parse_space, resolve_settings, trial_config
from pipeline.trials import TrialRow
from pipeline.tune import SearchSettings, search, to_param_space

VARIANTS = "model.variant=sum,dafm,dafm+2dpam"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("model.varient=sum,dafm", "did you mean model.variant"),  # unknown field
        ("modle.variant=sum", "unknown config section 'modle'"),
        ("model.variant=sum,dafm+3dpam", "model.variant must be sum, dafm or dafm"),  # a value the config refuses
        ("optim.lr=0.01,fast", "optim.lr: expected float, got 'fast'"),  # parsed by the field's type
        ("train.seed=0,1.5", "train.seed: expected int"),
        ("optim.lr=0.01,1e-2", "given twice"),  # equal once parsed
        ("train.epochs=1,2", "set it with --epochs"),  # the search's own
        ("train.workers=1,2", "--workers-per-trial"),
        ("model.variant=", "expected FIELD=V1,V2"),
        ("model.variant", "expected FIELD=V1,V2"),
    ],
)
def test_bad_grids_are_refused_with_what_was_expected(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_grid(build_config("synthetic"), [spec])
    assert f"--grid {spec!r}" in str(caught.value)


def test_a_grid_is_the_whole_space_and_tunes_grid_search() -> None:
    cfg = build_config("synthetic")
    grid = parse_grid(cfg, [VARIANTS, "model.backbone=resnet18,resnet50", "data.crop_size=64x64;96x128"])
    space = parse_space(cfg, [], None, grid=grid)
    # No lambda or lr dimension: they stay at the preset's values.
    assert list(space) == ["model.variant", "model.backbone", "data.crop_size"] and grid_points(space) == 12
    param_space = to_param_space(space)
    assert param_space["model.variant"] == {"grid_search": ["sum", "dafm", "dafm+2dpam"]}
    assert param_space["data.crop_size"] == {"grid_search": ["64x64", "96x128"]}
    # A trial's values are parsed by each field's type.
    trial = trial_config(cfg, space,
                         {"model.variant": "dafm", "model.backbone": "resnet50", "data.crop_size": "96x128"})
    assert (trial.model.variant, trial.model.backbone, trial.data.crop_size) == ("dafm", "resnet50", (96, 128))
    assert (trial.loss.lambda_c, trial.optim.lr) == (cfg.loss.lambda_c, cfg.optim.lr)

    # --space adds sampled dimensions to a grid; one field cannot be in both.
    both = parse_space(cfg, ["lr=loguniform:1e-3:1e-1"], None, grid=parse_grid(cfg, [VARIANTS]))
    assert list(both) == ["model.variant", "lr"]
    trial = trial_config(cfg, both, {"model.variant": "sum", "lr": 0.002})
    assert (trial.model.variant, trial.optim.lr) == ("sum", 0.002)
    with pytest.raises(ConfigError, match="both in --grid and in --space"):
        parse_space(cfg, ["lr=loguniform:1e-3:1e-1"], None, grid=parse_grid(cfg, ["lr=0.01,0.02"]))


def test_a_grid_runs_every_point_to_the_end() -> None:
    cfg = build_config("synthetic")
    grid = parse_space(cfg, [], None, grid=parse_grid(cfg, [VARIANTS]))
    assert resolve_settings(parse_space(cfg), None, None, None) == (8, "asha", "optuna")
    assert resolve_settings(grid, None, None, None) == (1, "fifo", "random")
    with pytest.raises(ConfigError, match="Optuna cannot take a grid"):
        resolve_settings(grid, None, None, "optuna")
    with pytest.raises(ConfigError, match="ASHA would stop"):
        resolve_settings(grid, None, "asha", None)
    with pytest.raises(ConfigError, match="--grid train.seed=0,1,2"):  # repeats of an unsampled grid
        resolve_settings(grid, 3, None, None)
    sampled = parse_space(cfg, ["lambda_c=uniform:0:1"], None, grid=parse_grid(cfg, [VARIANTS]))
    assert resolve_settings(sampled, 2, None, None) == (2, "fifo", "random")


def test_search_refuses_early_stopping_of_a_grid_before_anything_starts(tmp_path: Path) -> None:
    cfg = build_config("synthetic", [f"data.shards={tmp_path}", f"train.storage={tmp_path / 'runs'}"])
    space = parse_space(cfg, [], None, grid=parse_grid(cfg, [VARIANTS]))
    settings = SearchSettings(name="ablation", trials=1, scheduler="asha", search="random", max_concurrent=1,
                              workers_per_trial=1)
    with pytest.raises(ConfigError, match="ASHA would stop"):
        search(cfg, settings, space)
    assert not (tmp_path / "runs").exists()


def test_the_command_line_refuses_optuna_with_a_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run.main(["tune", "--data", str(tmp_path), "--grid", VARIANTS, "--search", "optuna"])
    assert code == 2 and "Optuna cannot take a grid" in capsys.readouterr().err


def test_an_ablation_registers_only_where_it_is_told() -> None:
    assert registry_name("voc", None, grid=False) == "dfdam-voc"
    assert registry_name("voc", None, grid=True) is None
    assert registry_name("voc", "ablations", grid=True) == "ablations"


def _row(trial: str, variant: str, miou: float, status: str = "finished", **params: str) -> TrialRow:
    return TrialRow(trial, {"model.variant": variant, **params}, 4, miou, miou, status, None)


def test_the_table_has_the_papers_rows_beside_ours() -> None:
    cfg = build_config("cityscapes")
    grid = list(parse_grid(cfg, [VARIANTS]).values())
    rows = [_row("c", "dafm+2dpam", 0.5), _row("a", "sum", 0.25), _row("b", "dafm", 0.375)]
    table = ablation_table(rows, grid, dataset="cityscapes", backbone="resnet18", variant="dafm+2dpam", epochs=4)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["backbone", "method", "DAFM", "2DPAM"] and "Table 2, Cityscapes val" in lines[0]
    # The paper's order (baseline, DAFM, both), our final mIoU, then Table 2's figure.
    assert lines[2].split() == ["resnet18", "Sum", "(baseline)", "1/1", "25.0", "70.3"]
    assert lines[3].split() == ["resnet18", "DAFM", "✓", "1/1", "37.5", "72.8"]
    assert lines[4].split() == ["resnet18", "DAFM", "+", "2DPAM", "✓", "✓", "1/1", "50.0", "73.1"]
    assert "after the last of 4 epochs" in table

    # VOC and backbones: Table 1 has no ResNet-18 rows ('-'); a failed trial has no mIoU of ours.
    both = list(parse_grid(cfg, ["model.variant=sum,dafm", "model.backbone=resnet18,resnet101"]).values())
    rows = [_row("a", "sum", 0.25, **{"model.backbone": "resnet101"}),
            _row("b", "dafm", 0.5, status="error", **{"model.backbone": "resnet101"}),
            _row("c", "sum", 0.125, **{"model.backbone": "resnet18"})]
    lines = ablation_table(rows, both, dataset="voc", backbone="resnet18", variant="sum", epochs=2).splitlines()
    assert "Table 1, VOC 2012 val" in lines[0] and "Cityscapes" not in lines[0]
    assert lines[2].split() == ["resnet18", "Sum", "(baseline)", "1/1", "12.5", "-"]
    assert lines[3].split() == ["resnet101", "Sum", "(baseline)", "1/1", "25.0", "72.9"]
    assert lines[4].split() == ["resnet101", "DAFM", "✓", "0/1", "-", "76.8"]


def test_seeds_are_pooled_and_other_data_gets_the_tables_with_its_rows() -> None:
    cfg = build_config("synthetic")
    grid = list(parse_grid(cfg, ["model.variant=sum,dafm", "train.seed=0,1"]).values())
    rows = [_row("a", "sum", 0.25, **{"train.seed": "0"}), _row("b", "sum", 0.5, **{"train.seed": "1"}),
            _row("c", "dafm", 0.5, **{"train.seed": "0"}), _row("d", "dafm", 0.75, **{"train.seed": "1"})]
    table = ablation_table(rows, grid, dataset="synthetic", backbone="resnet18", variant="dafm+2dpam", epochs=1)
    lines = table.splitlines()
    assert "mIoU % mean" in lines[0] and "mIoU % best" in lines[0]
    # Synthetic data: the paper's figures for the same rows, from Table 2 alone (Table 1 has no ResNet-18).
    assert "Table 2, Cityscapes val" in lines[0] and "Table 1" not in lines[0]
    assert lines[2].split() == ["resnet18", "Sum", "(baseline)", "2/2", "37.5", "50.0", "70.3"]
    assert lines[3].split() == ["resnet18", "DAFM", "✓", "2/2", "62.5", "75.0", "72.8"]
    assert "for reference only" in table and "seed" not in lines[0]

    rows = [_row("a", "dafm", 0.5, **{"model.backbone": "resnet18"}),
            _row("b", "dafm", 0.5, **{"model.backbone": "resnet50"})]
    grid = list(parse_grid(cfg, ["model.backbone=resnet18,resnet50"]).values())
    table = ablation_table(rows, grid, dataset="synthetic", backbone="resnet18", variant="dafm", epochs=1)
    assert "Table 2, Cityscapes val" in table.splitlines()[0] and "Table 1, VOC 2012 val" in table.splitlines()[0]


def test_the_papers_figures_are_tables_1_and_2() -> None:
    assert len(PAPER_ABLATION) == 9 and {r.table for r in PAPER_ABLATION} == {1, 2}
    assert paper_miou("voc", "resnet50", "dafm") == 73.7 and paper_miou("cityscapes", "resnet18", "sum") == 70.3
    assert paper_miou("cityscapes", "resnet101", "sum") is None and paper_miou("synthetic", "resnet18", "sum") is None


def test_a_two_variant_grid_runs_one_finished_trial_per_variant(ray_cluster, tiny_shards: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "mlflow.db"
    code = run.main([
        "tune", "--preset", "synthetic", "--data", str(tiny_shards), "--grid", "model.variant=sum,dafm",
        "--epochs", "1", "--workers-per-trial", "1", "--max-concurrent", "2", "--name", "ablation",
        "--storage", str(tmp_path / "runs"), "--set", "data.crop_size=64x64", "--set", "data.batch_size=4",
        "--set", "data.eval_batch_size=2", "--set", "train.timeout_s=120", "--set", f"tracking.uri=sqlite:///{db}",
        "--set", "tracking.overlays=0", "--set", "tracking.log_model=false",
    ])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("dfdam-synthetic")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`dfdam.kind` = 'search'")[0]
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.params["model.variant"] for c in children) == ["dafm", "sum"]
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["dfdam.status"] for c in children} == {"finished"}
    assert all(c.data.params["loss.lambda_c"] == "0.4" for c in children)  # the preset's, not searched
    assert parent.data.metrics["trials"] == 2
    ablation = client.download_artifacts(parent.info.run_id, "search/ablation.txt", str(tmp_path))
    table = Path(ablation).read_text()
    assert "Sum (baseline)" in table and "\nresnet18  DAFM  " in table and "DAFM + 2DPAM" not in table
    assert table in out  # the console shows the table logged to MLflow
    assert "registered nothing" in out and not client.search_registered_models()
