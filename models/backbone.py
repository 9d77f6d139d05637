"""ResNet trunk that describes its stage features (in the manner of timm's ``feature_info``).

DF-DAM (Xiong et al., section 3.1) reads three of ResNet's four stages: stage 1 as spatial
information, stages 3 and 4 as context information. The trunk is torchvision's ResNet,
*not* dilated (output stride 32): Tables 4 and 6 of the paper pin a budget that a dilated
trunk would exceed several times over.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet

from models.names import BackboneName

# One entry per name of models.names.BACKBONES (tests/models checks that they agree).
_BUILDERS = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V2),
}


@dataclass(frozen=True)
class FeatureInfo:
    """One stage output: its name, channel count and stride relative to the input."""

    stage: int
    num_chs: int
    reduction: int


class ResNetStages(nn.Module):
    """torchvision ResNet cut into its stem and four stages; returns the chosen stages.

    ``forward(x)`` returns ``{stage: feature}`` for each stage in ``out_stages``; with
    DF-DAM's default ``(1, 3, 4)`` that is strides 4, 16 and 32. ``feature_info`` lists
    channel counts and strides so that heads can size themselves without a forward pass.
    """

    def __init__(self, net: resnet.ResNet, out_stages: tuple[int, ...] = (1, 3, 4)) -> None:
        super().__init__()
        if not out_stages or any(s not in (1, 2, 3, 4) for s in out_stages):
            raise ValueError(f"out_stages must be a non-empty subset of (1, 2, 3, 4), got {out_stages}")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        last = max(out_stages)
        # Stages past the last one read are dropped, so they hold no unused parameters.
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4][:last])
        self.out_stages = tuple(sorted(out_stages))
        block = net.layer1[0]
        expansion = 4 if isinstance(block, resnet.Bottleneck) else 1
        widths = {1: 64 * expansion, 2: 128 * expansion, 3: 256 * expansion, 4: 512 * expansion}
        self.feature_info = [FeatureInfo(s, widths[s], 2 ** (s + 1)) for s in self.out_stages]

    def channels(self, stage: int) -> int:
        """Channel count of ``stage``'s output."""
        for info in self.feature_info:
            if info.stage == stage:
                return info.num_chs
        raise KeyError(f"stage {stage} is not an output stage (have {self.out_stages})")

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = self.stem(x)  # (B, 64, H/4, W/4)
        feats: dict[int, torch.Tensor] = {}
        for index, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if index in self.out_stages:
                feats[index] = x
        return feats


def resnet_stages(
    name: BackboneName = "resnet18",
    weights: str | Path | None = None,
    out_stages: tuple[int, ...] = (1, 3, 4),
) -> ResNetStages:
    """Build a ResNet trunk for DF-DAM.

    ``weights``:
      * ``None`` (default): random initialisation; never touches the network.
      * ``"imagenet"``: torchvision's ImageNet weights (downloaded by torchvision into
        its cache on first use, so only where the machine can reach the internet).
      * a path to a local ``.pth`` file holding a torchvision ResNet ``state_dict``
        (the ``fc`` layer may be present or not), for clusters without internet.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}: expected one of {sorted(_BUILDERS)}")
    builder, imagenet = _BUILDERS[name]
    if weights is None:
        net = builder(weights=None)
    elif isinstance(weights, str) and weights == "imagenet":
        net = builder(weights=imagenet)
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone weights {str(path)!r} not found: expected 'imagenet', None, or a "
                f"path to a torchvision {name} state_dict (.pth)"
            )
        net = builder(weights=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or [k for k in unexpected if not k.startswith("fc.")]:
            raise ValueError(
                f"{path} does not hold a {name} state_dict: missing {missing[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )
    return ResNetStages(net, out_stages)
