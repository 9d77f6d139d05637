"""DF-DAM model: ResNet trunk, DAFM, 2DPAM, heads. Imports only torch and torchvision."""
from models.attention import DualAttentionFusion, PositionAttention2D, SumFusion
from models.backbone import FeatureInfo, ResNetStages, resnet_stages
from models.dfdam import DFDAM, VARIANTS, LogitsOnly, build_dfdam

__all__ = [
    "DFDAM",
    "VARIANTS",
    "DualAttentionFusion",
    "FeatureInfo",
    "LogitsOnly",
    "PositionAttention2D",
    "ResNetStages",
    "SumFusion",
    "build_dfdam",
    "resnet_stages",
]
