"""DF-DAM model: shapes, attention ranges, gradients, variants, weights loading."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from models import DFDAM, VARIANTS, DualAttentionFusion, PositionAttention2D, build_dfdam, resnet_stages
from pipeline.losses import joint_loss

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 96)


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_outputs_are_logits_at_input_size(variant: str, image: torch.Tensor) -> None:
    model = build_dfdam(NUM_CLASSES, "resnet18", variant=variant).train()
    out = model(image)
    assert set(out) == {"out", "aux_context", "aux_spatial"}
    for logits in out.values():
        assert logits.shape == (2, NUM_CLASSES, 64, 96)
        assert torch.isfinite(logits).all()


def test_eval_returns_the_prediction_only(image: torch.Tensor) -> None:
    model = build_dfdam(NUM_CLASSES).eval()
    with torch.no_grad():
        out = model(image)
    assert set(out) == {"out"}
    assert out["out"].shape == (2, NUM_CLASSES, 64, 96)


def test_attention_tensors_have_the_papers_shapes_and_range(image: torch.Tensor) -> None:
    model = build_dfdam(NUM_CLASSES, channels=128).eval()
    with torch.no_grad():
        out = model(image, return_attention=True)
    assert out["alpha_high"].shape == (2, 128, 1, 1)  # alpha^H in R^{C x 1 x 1}
    assert out["alpha_low"].shape == (2, 128, 1, 1)  # alpha^L in R^{C x 1 x 1}
    assert out["beta"].shape == (2, 1, 16, 24)  # beta in R^{1 x H x W} at stage 1 (1/4)
    for name in ("alpha_high", "alpha_low", "beta"):
        assert out[name].min() >= 0 and out[name].max() <= 1, name
    # The two branches are distinct learned vectors, not one shared weight.
    assert not torch.allclose(out["alpha_high"], out["alpha_low"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_trainable_parameter(variant: str, image: torch.Tensor) -> None:
    model = build_dfdam(NUM_CLASSES, variant=variant).train()
    target = torch.randint(0, NUM_CLASSES, (2, 64, 96))
    target[:, :4] = 255
    loss, _ = joint_loss(model(image), target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_variants_differ_as_the_ablation_says(image: torch.Tensor) -> None:
    built = {v: build_dfdam(NUM_CLASSES, variant=v).eval() for v in VARIANTS}
    assert not isinstance(built["sum"].context_fusion, DualAttentionFusion)
    assert built["sum"].spatial_gate is None
    assert isinstance(built["dafm"].context_fusion, DualAttentionFusion)
    assert built["dafm"].spatial_gate is None
    assert isinstance(built["dafm+2dpam"].context_fusion, DualAttentionFusion)
    assert isinstance(built["dafm+2dpam"].spatial_gate, PositionAttention2D)
    sizes = [sum(p.numel() for p in built[v].parameters()) for v in VARIANTS]
    assert sizes[0] < sizes[1] < sizes[2]
    keys = {}
    for v, model in built.items():
        with torch.no_grad():
            keys[v] = set(model(image, return_attention=True)) - {"out"}
    assert keys == {"sum": set(), "dafm": {"alpha_high", "alpha_low"}, "dafm+2dpam": {"alpha_high", "alpha_low", "beta"}}


def test_dafm_computes_eq_7_8() -> None:
    torch.manual_seed(1)
    dafm = DualAttentionFusion(8)
    low, high = torch.randn(2, 8, 6, 10), torch.randn(2, 8, 3, 5)
    fused, att = dafm(low, high)
    pooled = high.mean(dim=(2, 3), keepdim=True)
    alpha_h = torch.sigmoid(dafm.weight_high(pooled))
    alpha_l = torch.sigmoid(dafm.weight_low(pooled))
    up = F.interpolate(high, size=(6, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fused, alpha_l * low + alpha_h * up)
    torch.testing.assert_close(att["alpha_high"], alpha_h)


def test_2dpam_gates_spatial_features_with_one_map() -> None:
    torch.manual_seed(2)
    pam = PositionAttention2D(8, hidden=4).eval()
    x_si, x_ci = torch.randn(2, 8, 6, 10), torch.randn(2, 8, 6, 10)
    gated, att = pam(x_si, x_ci)
    beta = att["beta"]
    assert beta.shape == (2, 1, 6, 10)
    torch.testing.assert_close(gated, beta * x_si)  # Eq. 9: one confidence per position


@pytest.mark.parametrize(
    ("name", "channels"),
    [("resnet18", (64, 256, 512)), ("resnet50", (256, 1024, 2048)), ("resnet101", (256, 1024, 2048))],
)
def test_backbone_describes_its_stages(name: str, channels: tuple[int, int, int]) -> None:
    with torch.device("meta"):
        trunk = resnet_stages(name)
    assert [(f.stage, f.num_chs, f.reduction) for f in trunk.feature_info] == [
        (1, channels[0], 4), (3, channels[1], 16), (4, channels[2], 32)
    ]


def test_builder_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the builder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    for backbone in ("resnet18", "resnet50", "resnet101"):
        with torch.device("meta"):
            assert isinstance(build_dfdam(19, backbone), DFDAM)


def test_backbone_weights_load_from_a_local_file(tmp_path) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(3)
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_dfdam(NUM_CLASSES, "resnet18", weights=path)
    torch.testing.assert_close(model.backbone.stem[0].weight, reference.conv1.weight)
    torch.testing.assert_close(model.backbone.stages[3][1].conv2.weight, reference.layer4[1].conv2.weight)


def test_bad_weights_and_names_fail_clearly(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        build_dfdam(NUM_CLASSES, weights=tmp_path / "nope.pth")
    torch.save({"something": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not hold a resnet18 state_dict"):
        build_dfdam(NUM_CLASSES, weights=tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="unknown variant"):
        build_dfdam(NUM_CLASSES, variant="dafm+pam")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_dfdam(NUM_CLASSES, backbone="resnet34")


def test_names_are_the_ones_the_builders_take() -> None:
    from models import BACKBONES
    from models.backbone import _BUILDERS

    assert tuple(_BUILDERS) == BACKBONES


def test_names_load_without_torch() -> None:
    """config and ``run.py --help`` read models.names; that must not import torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, models.names; assert 'torch' not in sys.modules, 'models.names imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True)
