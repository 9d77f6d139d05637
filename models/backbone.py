"""ResNet trunk that describes its stage features (in the manner of timm's ``feature_info``).

DF-DAM (Xiong et al., section 3.1) reads three of ResNet's four stages: stage 1 as spatial
information, stages 3 and 4 as context information. The trunk is torchvision's ResNet,
*not* dilated (output stride 32): Tables 4 and 6 of the paper pin a budget that a dilated
trunk would exceed several times over.
"""
from __future__ import annotations

import http.client
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import resnet

from models.names import PRETRAINED, BackboneName

# One entry per name of models.names.BACKBONES (tests/models checks that they agree): the
# builder and torchvision's ImageNet weights per models.names.PRETRAINED keyword.
_BUILDERS = {
    "resnet18": (resnet.resnet18, {"imagenet": resnet.ResNet18_Weights.IMAGENET1K_V1,
                                   "imagenet_v1": resnet.ResNet18_Weights.IMAGENET1K_V1}),
    "resnet50": (resnet.resnet50, {"imagenet": resnet.ResNet50_Weights.IMAGENET1K_V2,
                                   "imagenet_v1": resnet.ResNet50_Weights.IMAGENET1K_V1}),
    "resnet101": (resnet.resnet101, {"imagenet": resnet.ResNet101_Weights.IMAGENET1K_V2,
                                     "imagenet_v1": resnet.ResNet101_Weights.IMAGENET1K_V1}),
}

DOWNLOAD_PROBE_TIMEOUT_S = 20.0
"""How long to wait for download.pytorch.org to answer before calling the machine offline
(a firewall that drops packets would otherwise hold a connection attempt for minutes)."""


class WeightsUnavailable(FileNotFoundError):
    """ImageNet weights that are neither in torch's cache nor downloadable from here."""


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


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}: expected one of {sorted(_BUILDERS)}")


def imagenet_weights(name: BackboneName, which: str = "imagenet") -> resnet.WeightsEnum:
    """torchvision's weights enum that ``which`` (one of :data:`models.names.PRETRAINED`) means for ``name``."""
    _check_name(name)
    if which not in PRETRAINED:
        raise ValueError(f"unknown ImageNet weights {which!r}: expected one of {', '.join(PRETRAINED)}")
    return _BUILDERS[name][1][which]


def imagenet_weights_file(name: BackboneName, which: str = "imagenet") -> Path:
    """Where torch keeps ``which`` weights of ``name`` once downloaded:
    ``$TORCH_HOME/hub/checkpoints/<file>`` (``torch.hub.get_dir()``), e.g.
    ``resnet101-cd907fc2.pth``; a copy put there by hand is used as is."""
    url = imagenet_weights(name, which).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch_imagenet_weights(name: BackboneName, which: str = "imagenet", *, progress: bool | None = None) -> Path:
    """The local file of ``which`` ImageNet weights of ``name``, downloaded into torch's cache if absent.

    torchvision's own download (its URL, its hash check, an atomic move into the cache) runs
    only after download.pytorch.org answered within :data:`DOWNLOAD_PROBE_TIMEOUT_S`. Where it
    cannot be reached (no internet, a firewall), :class:`WeightsUnavailable` says how to give
    the weights instead: a local ``state_dict`` path as ``model.weights``, or the file in the
    cache folder. ``progress``: torchvision's download bar; ``None``: on a terminal only.
    """
    enum = imagenet_weights(name, which)
    path = imagenet_weights_file(name, which)
    if path.is_file():
        return path
    try:
        urllib.request.urlopen(enum.url, timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()  # headers only, then hang up
        path.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = torch.hub.HASH_REGEX.search(path.name)
        torch.hub.download_url_to_file(enum.url, str(path), hash_prefix.group(1) if hash_prefix else None,
                                       progress=sys.stderr.isatty() if progress is None else progress)
    except (OSError, http.client.HTTPException, RuntimeError) as exc:  # URLError, timeouts, refusals; bad hash
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise WeightsUnavailable(
            f"cannot download the ImageNet weights of {name} ({enum}) from {enum.url}: {reason}. "
            f"On a machine without internet, copy that file from one with it and either pass its path, "
            f"--set model.weights=/path/to/{path.name} (any torchvision {name} state_dict), or put it in "
            f"torch's cache as {path} (that folder is $TORCH_HOME/hub/checkpoints; TORCH_HOME defaults to "
            f"~/.cache/torch), on every node"
        ) from None
    return path


def load_state_dict_file(net: resnet.ResNet, path: Path, name: str) -> None:
    """Load a torchvision ResNet ``state_dict`` file into ``net``; its ``fc`` layer may be present or not."""
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


def resnet_stages(
    name: BackboneName = "resnet18",
    weights: str | Path | None = None,
    out_stages: tuple[int, ...] = (1, 3, 4),
) -> ResNetStages:
    """Build a ResNet trunk for DF-DAM.

    ``weights``:
      * ``None`` (default): random initialisation; never touches the network.
      * ``"imagenet"`` / ``"imagenet_v1"`` (:data:`models.names.PRETRAINED`): torchvision's
        ImageNet weights, read from torch's cache (``$TORCH_HOME/hub/checkpoints``) or
        downloaded into it (:func:`fetch_imagenet_weights`; :class:`WeightsUnavailable`
        where that is impossible).
      * a path to a local ``.pth`` file holding a torchvision ResNet ``state_dict``
        (the ``fc`` layer may be present or not), for clusters without internet.
    """
    _check_name(name)
    builder = _BUILDERS[name][0]
    net = builder(weights=None)
    if weights is None:
        return ResNetStages(net, out_stages)
    if isinstance(weights, str) and weights in PRETRAINED:
        path = fetch_imagenet_weights(name, weights)
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone weights {str(path)!r} not found: expected {', '.join(map(repr, PRETRAINED))}, None, "
                f"or a path to a torchvision {name} state_dict (.pth)"
            )
    load_state_dict_file(net, path, name)
    return ResNetStages(net, out_stages)
