"""The search-space language of ``run.py tune``: which config fields are searched, and how.

A :class:`Dimension` is one searched field: ``uniform`` or ``loguniform`` over [low, high],
or a ``choice``. The default space is the paper's three knobs around its own values
(Eq. 12's lambda_c = 0.4 and lambda_s = 0.1, the preset's learning rate); a JSON file and
``name=kind:low:high`` strings change it. Every name, kind and range is checked here, before
anything starts. Nothing here imports Ray (``pipeline/tune.py`` turns a space into Tune's).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError

# Short names for the paper's three knobs; any numeric config field "section.field" also works.
ALIASES = {"lambda_c": "loss.lambda_c", "lambda_s": "loss.lambda_s", "lr": "optim.lr"}
KINDS = ("uniform", "loguniform", "choice")


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: ``uniform``/``loguniform`` over [low, high], or a ``choice``."""

    name: str  # as the user wrote it (lambda_c, lr, optim.weight_decay, ...)
    key: str  # config field, section.field
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple[float, ...] = ()

    def contains(self, value: float) -> bool:
        if self.kind == "choice":
            return value in self.values
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {list(self.values)}"
        return f"{self.name} ~ {self.kind}[{self.low:g}, {self.high:g}]"


def default_space(cfg: Config) -> dict[str, Dimension]:
    """lambda_c in [0, 1] and lambda_s in [0, 0.5] (both include the paper's value and 0,
    i.e. the auxiliary loss switched off); lr log-uniform within 10x of the preset's."""
    return {
        "lambda_c": Dimension("lambda_c", "loss.lambda_c", "uniform", 0.0, 1.0),
        "lambda_s": Dimension("lambda_s", "loss.lambda_s", "uniform", 0.0, 0.5),
        "lr": Dimension("lr", "optim.lr", "loguniform", cfg.optim.lr / 10, cfg.optim.lr * 10),
    }


def _numeric_fields(cfg: Config) -> set[str]:
    return {k for k, v in cfg.flat().items() if "." in k and isinstance(v, float)}


def _dimension(name: str, spec: dict[str, Any], cfg: Config, where: str) -> Dimension:
    key = ALIASES.get(name, name)
    allowed = sorted(set(ALIASES) | _numeric_fields(cfg))
    if key not in _numeric_fields(cfg):
        raise ConfigError(f"{where}: unknown search parameter {name!r}: expected one of {allowed}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise ConfigError(f"{where}: {name}: type must be one of {list(KINDS)}, got {kind!r}")
    try:
        if kind == "choice":
            values = tuple(float(v) for v in spec["values"])
            if not values:
                raise ConfigError(f"{where}: {name}: choice needs at least one value")
            return Dimension(name, key, kind, values=values)
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {name}: {kind} needs numeric low and high (choice: values): {exc}") from None
    if not low < high:
        raise ConfigError(f"{where}: {name}: low ({low:g}) must be below high ({high:g})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: {name}: loguniform needs low > 0, got {low:g}")
    if low < 0 and key.startswith("loss.lambda"):
        raise ConfigError(f"{where}: {name}: a loss weight cannot be negative (low {low:g})")
    return Dimension(name, key, kind, low, high)


def parse_space(cfg: Config, specs: list[str] | None = None, file: str | Path | None = None) -> dict[str, Dimension]:
    """The default space, changed by a JSON file and then by ``name=kind:low:high`` strings.

    File: ``{"lambda_c": {"type": "uniform", "low": 0, "high": 1}, "lr": {"type":
    "loguniform", "low": 1e-3, "high": 1e-1}, "lambda_s": {"type": "choice", "values": [0,
    0.1]}}``. Strings: ``lambda_c=uniform:0:1``, ``lr=loguniform:1e-3:1e-1``,
    ``lambda_s=choice:0,0.1,0.2``. Unknown names, kinds and empty ranges are refused.
    """
    space = default_space(cfg)
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"search space file {path} not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected an object of name -> {{type, low, high}}")
        for name, spec in data.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"{path}: {name}: expected an object like {{\"type\": \"uniform\", \"low\": 0, \"high\": 1}}")
            space[name] = _dimension(name, spec, cfg, str(path))
    for text in specs or []:
        if "=" not in text or ":" not in text:
            raise ConfigError(f"--space {text!r}: expected name=kind:low:high or name=choice:v1,v2")
        name, rest = text.split("=", 1)
        kind, _, args = rest.partition(":")
        if kind == "choice":
            spec: dict[str, Any] = {"type": kind, "values": [v for v in args.split(",") if v]}
        else:
            bounds = args.split(":")
            spec = {"type": kind, "low": bounds[0], "high": bounds[1] if len(bounds) > 1 else None}
        space[name.strip()] = _dimension(name.strip(), spec, cfg, f"--space {text!r}")
    keys = [d.key for d in space.values()]
    if len(keys) != len(set(keys)):
        raise ConfigError(f"the search space names one config field twice: {sorted(keys)}")
    return space


def paper_point(cfg: Config, space: dict[str, Dimension]) -> dict[str, float] | None:
    """The preset's own values (the paper's lambdas and lr), if the space contains them."""
    flat = cfg.flat()
    point = {name: flat[d.key] for name, d in space.items()}
    return point if all(space[n].contains(v) for n, v in point.items()) else None
