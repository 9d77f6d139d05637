"""ImageNet weights for the backbone (section 4.1): which files, torch's cache, offline nodes, local files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from models.backbone import (WeightsUnavailable, fetch_imagenet_weights, imagenet_weights_file, resnet_stages)
from models.names import BACKBONES, PRETRAINED


def _trunk_state(trunk) -> dict[str, torch.Tensor]:
    """The trunk's parameters and buffers under torchvision's names (conv1, bn1, layer1, ...)."""
    names = {"stem.0": "conv1", "stem.1": "bn1", **{f"stages.{i}": f"layer{i + 1}" for i in range(4)}}
    out = {}
    for key, value in trunk.state_dict().items():
        prefix = next(p for p in names if key.startswith(p + "."))
        out[names[prefix] + key[len(prefix):]] = value
    return out


def _assert_trunk_holds(trunk, reference: dict[str, torch.Tensor]) -> None:
    state = _trunk_state(trunk)
    assert state and set(state) == {k for k in reference if not k.startswith("fc.")}
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key


def test_keywords_name_torchvisions_files() -> None:
    assert PRETRAINED == ("imagenet", "imagenet_v1")
    names = {(b, w): imagenet_weights_file(b, w).name for b in BACKBONES for w in PRETRAINED}
    assert names == {
        ("resnet18", "imagenet"): "resnet18-f37072fd.pth", ("resnet18", "imagenet_v1"): "resnet18-f37072fd.pth",
        ("resnet50", "imagenet"): "resnet50-11ad3fa6.pth", ("resnet50", "imagenet_v1"): "resnet50-0676ba61.pth",
        ("resnet101", "imagenet"): "resnet101-cd907fc2.pth", ("resnet101", "imagenet_v1"): "resnet101-63fe2227.pth",
    }


def test_a_local_state_dict_loads_into_the_trunk(tmp_path: Path) -> None:
    torch.manual_seed(5)
    reference = resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(reference, path)
    _assert_trunk_holds(resnet_stages("resnet18", weights=str(path)), reference)
    torch.save({k: v for k, v in reference.items() if not k.startswith("fc.")}, path)  # without fc: fine too
    _assert_trunk_holds(resnet_stages("resnet18", weights=path), reference)


def test_imagenet_reads_torch_cache_without_the_network(offline_torch_home: Path) -> None:
    torch.manual_seed(6)
    reference = resnet18(weights=None).state_dict()
    cached = offline_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_file("resnet18") == cached
    cached.parent.mkdir(parents=True)
    torch.save(reference, cached)
    assert fetch_imagenet_weights("resnet18") == cached
    _assert_trunk_holds(resnet_stages("resnet18", weights="imagenet"), reference)


def test_offline_imagenet_fails_early_and_says_how_to_give_the_weights(offline_torch_home: Path) -> None:
    with pytest.raises(WeightsUnavailable) as caught:
        resnet_stages("resnet101", weights="imagenet")
    message = str(caught.value)
    expected_cache = offline_torch_home / "hub" / "checkpoints" / "resnet101-cd907fc2.pth"
    assert "cannot download the ImageNet weights of resnet101 (ResNet101_Weights.IMAGENET1K_V2)" in message
    assert "https://download.pytorch.org/models/resnet101-cd907fc2.pth" in message
    assert "--set model.weights=/path/to/resnet101-cd907fc2.pth" in message
    assert f"torch's cache as {expected_cache}" in message and "$TORCH_HOME/hub/checkpoints" in message
    assert isinstance(caught.value, FileNotFoundError)  # run.py prints it as one line, exit status 2
    assert not expected_cache.exists() and not any(offline_torch_home.rglob("*.pth*"))
