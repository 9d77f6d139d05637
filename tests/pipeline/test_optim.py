"""Poly LR (section 4.1) and parameter groups."""
from __future__ import annotations

import pytest
import torch

from models import build_dfdam
from pipeline.config import OptimConfig
from pipeline.optim import PolySchedule, build_optimizer, parameter_groups, poly_lr, set_lr


@pytest.mark.parametrize(("it", "max_it"), [(0, 100), (1, 100), (50, 100), (99, 100), (100, 100), (7, 13)])
def test_poly_lr_matches_its_formula(it: int, max_it: int) -> None:
    assert poly_lr(0.01, it, max_it, 0.9) == pytest.approx(0.01 * (1 - it / max_it) ** 0.9)


def test_poly_lr_ends_at_zero_and_decreases() -> None:
    values = [poly_lr(0.1, i, 20) for i in range(21)]
    assert values[0] == 0.1 and values[-1] == 0.0
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        poly_lr(0.1, 0, 0)


def test_groups_head_lr_x10_and_no_decay_on_bn_and_bias() -> None:
    model = build_dfdam(5)
    cfg = OptimConfig(lr=0.01, weight_decay=5e-4, head_lr_mult=10.0)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert set(groups) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(model.backbone.stem[0].weight) in ids["backbone"]
    assert id(model.backbone.stem[1].weight) in ids["backbone/no_decay"]  # BN weight
    assert id(model.head.classifier.bias) in ids["head/no_decay"]
    assert id(model.context_fusion.weight_high.weight) in ids["head"]
    assert sum(len(v) for v in ids.values()) == sum(1 for _ in model.parameters())
    opt = build_optimizer(model, cfg)
    set_lr(opt, PolySchedule(cfg.lr, 100, 0.9), 10)
    by_name = {g["name"]: g for g in opt.param_groups}
    expected = poly_lr(0.01, 10, 100)
    assert by_name["backbone"]["lr"] == pytest.approx(expected)
    assert by_name["head"]["lr"] == pytest.approx(10 * expected)
    assert by_name["head/no_decay"]["weight_decay"] == 0.0 and by_name["head"]["weight_decay"] == 5e-4
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_schedule_retarget_continues_without_a_jump() -> None:
    fresh = PolySchedule(0.01, end=100)
    assert [fresh.lr(t) for t in range(101)] == [poly_lr(0.01, t, 100) for t in range(101)]
    assert fresh.retarget(40, 100) is fresh  # same budget: the very same segment, step for step
    longer = fresh.retarget(40, 200)
    assert longer.lr(40) == fresh.lr(40)  # the rate reached so far, not a jump back up
    assert longer.lr(200) == 0.0 and all(longer.lr(t) > longer.lr(t + 1) for t in range(40, 200))
    assert PolySchedule(**longer.to_dict()) == longer
    with pytest.raises(ValueError, match="already done"):
        fresh.retarget(40, 40)
