"""One typed, frozen, nested configuration for training, evaluation and tuning.

Presets carry the paper's hyper-parameters (section 4.1): ``cityscapes`` (batch 8,
lr 0.01, weight decay 5e-4, crop 1024), ``voc`` (batch 16, lr 0.001, weight decay 1e-5,
crop 512), both starting from ImageNet weights (``model.weights="imagenet"``: fetched into
torch's cache, or ``--set model.weights=/path/to/resnet.pth`` without internet), and
``synthetic`` (small and fast, random initialisation, for the demo and tests). Any field can be
overridden with ``section.field=value`` strings (``--set`` on the command line); values
are parsed by the field's type, and unknown sections or fields are rejected with the
closest valid names.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from models.names import BACKBONES, VARIANTS
from sharding.classes import IGNORE_INDEX
from sharding.text import parse_size


class ConfigError(ValueError):
    """A preset, override or value that the configuration cannot take."""


@dataclass(frozen=True)
class ModelConfig:
    """DF-DAM's architecture (see ``models.build_dfdam``)."""

    backbone: str = "resnet18"  # one of models.names.BACKBONES
    variant: str = "dafm+2dpam"  # one of models.names.VARIANTS (Tables 1-2)
    weights: str | None = None  # None | models.names.PRETRAINED | path to a torchvision ResNet state_dict
    channels: int = 128  # 1x1 projections (section 3.4)
    gate_hidden: int = 32  # 2DPAM hidden width
    refine_channels: int = 128  # refine block width
    aux_channels: int = 64  # auxiliary heads' width


# The paper's recipe (section 4.1): "mean subtraction" with the ImageNet statistics the
# pre-trained backbones were trained with, and random scales from {0.75, ..., 2.0}. The
# defaults of DataConfig and of pipeline.transforms.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PAPER_TRAIN_SCALES: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how samples become batches."""

    shards: str = ""  # folder with <split>-%06d.tar and <split>.manifest.parquet
    train_split: str = "train"
    val_split: str = "val"
    crop_size: tuple[int, int] = (1024, 1024)  # (H, W) of training crops
    scales: tuple[float, ...] = PAPER_TRAIN_SCALES  # random scale set
    batch_size: int = 8  # global batch, split evenly across workers
    eval_batch_size: int = 1  # per worker
    loader_workers: int = -1  # data-loading processes per training worker; -1: see loader_workers()
    prefetch_batches: int = 2  # batches each loading process keeps ready
    shuffle_buffer: int = 64  # samples
    # Damaged samples (bytes that do not decode, a shard cut short) one training rank skips in
    # one epoch, each with a warning naming its shard and key, before training stops; counted
    # per epoch as `data_skipped`. Evaluation never skips (pipeline/data.py).
    max_skipped: int = 10
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class OptimConfig:
    """SGD with a poly learning rate (section 4.1) and DFN/BiSeNet practice where silent."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    head_lr_mult: float = 10.0  # non-backbone parameters learn 10x faster
    no_decay_norm_bias: bool = True  # no weight decay on BN and bias


@dataclass(frozen=True)
class LossConfig:
    """Eq. 12's weights."""

    lambda_c: float = 0.4
    lambda_s: float = 0.1
    ignore_index: int = IGNORE_INDEX


@dataclass(frozen=True)
class TrainConfig:
    """How long, on what, and where results are kept."""

    epochs: int = 10
    workers: int = 2  # Ray Train workers (one process each)
    gpu: bool = False
    cpus_per_worker: int = 1
    amp: bool = True  # mixed precision, applied on GPU only
    sync_bn: bool = True  # SyncBatchNorm, applied only with GPUs and more than one worker
    seed: int = 0
    max_failures: int = 0  # worker-group restarts from the latest checkpoint (lost worker or node); -1: no limit
    storage: str = "runs"  # Ray Train storage folder (made absolute before use)
    timeout_s: int = 1800  # collective timeout (gloo/NCCL)
    log_every: int = 10  # steps between progress lines


INFERENCE_MODES = ("whole", "slide")


@dataclass(frozen=True)
class InferenceConfig:
    """How a trained model predicts when evaluated (sections 4.4-4.5, Tables 3 and 5).

    The softmax is averaged over ``scales`` x (image, its left-right flip) at the input size;
    ``mode="slide"`` runs each scaled image in ``crop``-sized windows ``stride`` apart. The
    defaults (one scale, no flip, whole image) are what training validates with. The paper's
    test protocol: ``scales=PAPER_EVAL_SCALES, flip=True`` (see pipeline/inference.py).
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    mode: str = "whole"  # one of INFERENCE_MODES
    crop: tuple[int, int] | None = None  # (H, W) of a sliding window; needed by mode "slide"
    stride: tuple[int, int] | None = None  # (H, W) between windows; None: 2/3 of the crop

    @property
    def protocol(self) -> str:
        """The metric-name suffix that says how predictions were made: ``""`` for the default
        (one scale, whole image, no flip), else ``"ms"``, ``"flip"``, ``"slide"`` joined by ``_``."""
        parts = [name for name, on in (("ms", self.scales != (1.0,)), ("flip", self.flip),
                                        ("slide", self.mode == "slide")) if on]
        if len(self.scales) == 1 and self.scales != (1.0,):
            parts[0] = f"x{self.scales[0]:g}"  # one other scale is not multi-scale
        return "_".join(parts)


# The paper's evaluation scales (section 4.4): "scales = {0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0}".
PAPER_EVAL_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: embedded SQLite store by default, or MLFLOW_TRACKING_URI / ``uri``."""

    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = ""  # "" -> dfdam-<dataset>
    log_model: bool = True
    overlays: int = 4  # colourised validation predictions logged as images
    # How long the end of a run waits for an unreachable tracking server to come back before it
    # leaves what is missing in the run's outbox (pipeline/tracking.py Outbox; `run.py track sync`).
    outbox_wait_s: float = 60.0


@dataclass(frozen=True)
class Config:
    preset: str = "cityscapes"
    dataset: str = "cityscapes"  # what the preset's hyper-parameters were made for
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.field": value}`` for every field (MLflow params)."""
        out: dict[str, Any] = {"preset": self.preset, "dataset": self.dataset}
        for section in _SECTIONS:
            for f in fields(getattr(self, section)):
                out[f"{section}.{f.name}"] = getattr(getattr(self, section), f.name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Inverse of :meth:`to_dict` (lists back to tuples), for configs read from JSON or checkpoints."""
        sections = {}
        for f in fields(cls):
            if f.name not in _SECTIONS:
                continue
            section_type = f.default_factory  # type: ignore[misc]
            given = dict(data.get(f.name, {}))
            unknown = set(given) - {g.name for g in fields(section_type)}
            if unknown:
                raise ConfigError(f"unknown field(s) {sorted(unknown)} in config section {f.name!r}")
            sections[f.name] = section_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
        return validate(cls(preset=data.get("preset", "custom"), dataset=data.get("dataset", "cityscapes"), **sections))


_SECTIONS = ("model", "data", "optim", "loss", "train", "tracking", "inference")


# The cluster presets survive this many lost workers or nodes per run (each restart resumes from
# the latest checkpoint, losing at most one epoch): preemptions and node losses are routine on a
# multi-node cluster, and a persistent fault still ends the run after a few tries.
CLUSTER_MAX_FAILURES = 3


def _preset_cityscapes() -> Config:
    return Config(
        preset="cityscapes",
        dataset="cityscapes",
        model=ModelConfig(weights="imagenet"),
        data=DataConfig(crop_size=(1024, 1024), batch_size=8),
        optim=OptimConfig(lr=0.01, weight_decay=5e-4),
        train=TrainConfig(epochs=200, max_failures=CLUSTER_MAX_FAILURES),
    )


def _preset_voc() -> Config:
    return Config(
        preset="voc",
        dataset="voc",
        model=ModelConfig(backbone="resnet101", weights="imagenet"),
        data=DataConfig(train_split="train_aug", crop_size=(512, 512), batch_size=16),
        optim=OptimConfig(lr=0.001, weight_decay=1e-5),
        train=TrainConfig(epochs=50, max_failures=CLUSTER_MAX_FAILURES),
    )


def _preset_synthetic() -> Config:
    return Config(
        preset="synthetic",
        dataset="synthetic",
        data=DataConfig(
            crop_size=(128, 128),
            scales=(0.75, 1.0, 1.25, 1.5),
            batch_size=8,
            eval_batch_size=4,
            loader_workers=0,
            shuffle_buffer=32,
        ),
        optim=OptimConfig(lr=0.01, weight_decay=1e-4),
        train=TrainConfig(epochs=24, workers=2, log_every=6),
    )


# In the order run.py lists them as --preset choices.
PRESETS = {"synthetic": _preset_synthetic, "cityscapes": _preset_cityscapes, "voc": _preset_voc}


def preset(name: str) -> Config:
    """The named preset; a clear error naming the valid ones otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _parse(text: str, hint: Any, where: str) -> Any:
    """Parse ``text`` as a value of type ``hint`` (int, float, bool, str, X | None, tuples).

    Tuples are comma-separated; a pair of ints (a size such as ``data.crop_size``) is also
    taken as ``HxW``.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.strip().lower() in ("none", "null", ""):
            return None
        return _parse(text, args[0], where)
    if origin is tuple:
        args = typing.get_args(hint)
        if args == (int, int) and "x" in text.lower():
            try:
                return parse_size(text)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        parts = [p for p in text.split(",") if p.strip()] if text.strip() else []
        if len(args) == 2 and args[1] is Ellipsis:
            if not parts:
                raise ConfigError(f"{where}: expected at least one value, got {text!r}")
            return tuple(_parse(p, args[0], where) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse(p, a, where) for p, a in zip(parts, args))
    try:
        if hint is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
    except ValueError:
        raise ConfigError(f"{where}: expected {hint.__name__}, got {text!r}") from None
    raise ConfigError(f"{where}: cannot parse type {hint}")


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` strings; unknown names and bad values raise ConfigError."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, text = item.split("=", 1)
        section_name, field_name, hint = _field(config, key.strip(), item)
        config = _set(config, section_name, field_name, _parse(text, hint, key.strip()))
    return validate(config)


def with_values(config: Config, values: dict[str, Any]) -> Config:
    """``config`` with ``{"section.field": value}`` set as typed values, no text in between.

    For values that are already Python objects (Tune's sampled floats): ints and floats go
    to float fields as floats, every other value must have the field's type.
    """
    for key, value in values.items():
        section_name, field_name, hint = _field(config, key, key)
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif hint in (int, float, bool, str) and type(value) is not hint:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        config = _set(config, section_name, field_name, value)
    return validate(config)


def _field(config: Config, key: str, where: str) -> tuple[str, str, Any]:
    """``(section, field, type hint)`` of ``section.field``; unknown names raise with the closest valid ones."""
    if "." not in key:
        raise ConfigError(f"override {where!r} must name section.field, e.g. optim.lr=0.01")
    section_name, field_name = key.split(".", 1)
    if section_name not in _SECTIONS:
        near = _nearest(section_name, list(_SECTIONS))
        hint = f"; did you mean {near!r}?" if near else ""
        raise ConfigError(f"unknown config section {section_name!r} in {where!r}: expected one of {list(_SECTIONS)}{hint}")
    hints = typing.get_type_hints(type(getattr(config, section_name)))
    if field_name not in hints:
        near = _nearest(field_name, list(hints))
        hint = f"; did you mean {section_name}.{near}?" if near else ""
        raise ConfigError(f"unknown field {key!r}: {section_name} has {sorted(hints)}{hint}")
    return section_name, field_name, hints[field_name]


def _nearest(name: str, choices: list[str]) -> str | None:
    """The valid name a misspelt one most likely meant: difflib's closest, else the longest that
    one of them begins with (``lrate`` -> ``lr``, ``epoch`` -> ``epochs``); None if nothing is near."""
    near = difflib.get_close_matches(name, choices, n=1)
    if near:
        return near[0]
    begun = [c for c in choices if min(len(c), len(name)) >= 2 and (name.startswith(c) or c.startswith(name))]
    return max(begun, key=len) if begun else None


def _set(config: Config, section_name: str, field_name: str, value: Any) -> Config:
    return replace(config, **{section_name: replace(getattr(config, section_name), **{field_name: value})})


def validate(config: Config) -> Config:
    """Check values that types alone cannot; returns the config unchanged."""
    checks = [
        (config.model.backbone in BACKBONES, f"model.backbone must be {_one_of(BACKBONES)}"),
        (config.model.variant in VARIANTS, f"model.variant must be {_one_of(VARIANTS)}"),
        (config.optim.lr > 0, "optim.lr must be positive"),
        (config.loss.lambda_c >= 0 and config.loss.lambda_s >= 0, "loss.lambda_c and loss.lambda_s must be >= 0"),
        (config.train.epochs >= 1, "train.epochs must be at least 1"),
        (config.train.workers >= 1, "train.workers must be at least 1"),
        (config.train.cpus_per_worker >= 1, "train.cpus_per_worker must be at least 1"),
        (config.train.max_failures >= -1, "train.max_failures must be -1 (no limit) or at least 0"),
        (config.data.loader_workers >= -1, "data.loader_workers must be -1 (from train.cpus_per_worker) or at least 0"),
        (config.data.prefetch_batches >= 1, "data.prefetch_batches must be at least 1"),
        (config.data.max_skipped >= 0, "data.max_skipped must be >= 0 (0: any damaged sample stops training)"),
        (config.data.batch_size >= config.train.workers, "data.batch_size (global) must be at least train.workers"),
        (config.train.workers < 1 or config.data.batch_size % config.train.workers == 0,
         "data.batch_size must be divisible by train.workers"),
        (all(s > 0 for s in config.data.scales), "data.scales must be positive"),
        (min(config.data.crop_size) >= 32, "data.crop_size must be at least 32x32 (output stride 32)"),
        (config.tracking.outbox_wait_s >= 0, "tracking.outbox_wait_s must be >= 0 (seconds)"),
        *inference_checks(config.inference),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{message} (got {_describe(config)})")
    return config


def loader_workers(config: Config) -> Config:
    """``config`` with ``data.loader_workers`` resolved: -1 becomes one loading process per CPU a
    training worker holds beyond the one its training loop runs on (``train.cpus_per_worker - 1``),
    at least 1. A GPU worker given 8 CPUs gets 7 processes decoding and augmenting for it.
    """
    if config.data.loader_workers >= 0:
        return config
    processes = max(1, config.train.cpus_per_worker - 1)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, loader_workers=processes))


def inference_checks(inference: InferenceConfig) -> list[tuple[bool, str]]:
    """``(ok, message)`` for the values of an inference section (also checked alone by run.py)."""
    slide = inference.mode == "slide"
    return [
        (inference.mode in INFERENCE_MODES, f"inference.mode must be {_one_of(INFERENCE_MODES)}"),
        (bool(inference.scales) and all(s > 0 for s in inference.scales), "inference.scales must be positive"),
        (not slide or inference.crop is not None, "inference.mode=slide needs inference.crop (HxW)"),
        (inference.crop is None or min(inference.crop) >= 32, "inference.crop must be at least 32x32 (output stride 32)"),
        (inference.stride is None or min(inference.stride) >= 1, "inference.stride must be at least 1x1"),
        (inference.stride is None or inference.crop is None
         or all(s <= c for s, c in zip(inference.stride, inference.crop)),
         "inference.stride must not exceed inference.crop (windows would leave pixels unseen)"),
    ]


def _one_of(names: tuple[str, ...]) -> str:
    """``"a, b or c"``."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def _describe(config: Config) -> str:
    return (f"backbone={config.model.backbone}, variant={config.model.variant}, lr={config.optim.lr}, "
            f"lambda_c={config.loss.lambda_c}, lambda_s={config.loss.lambda_s}, epochs={config.train.epochs}, "
            f"workers={config.train.workers}, batch_size={config.data.batch_size}, crop={config.data.crop_size}")


def build_config(preset_name: str, overrides: list[str] | None = None) -> Config:
    """The preset with ``overrides`` applied."""
    return apply_overrides(preset(preset_name), list(overrides or []))
