"""The search-space language of ``run.py tune``: which config fields are searched, and how.

A :class:`Dimension` is one searched field: ``uniform`` or ``loguniform`` over [low, high],
a ``choice``, or a ``grid``. The default space is the paper's three knobs around its own
values (Eq. 12's lambda_c = 0.4 and lambda_s = 0.1, the preset's learning rate); a JSON file
and ``name=kind:low:high`` strings change it. A grid (``--grid FIELD=V1,V2,...``, any config
field, values parsed by the field's type) runs every value: the paper's ablation (section
4.2, Tables 1-2) is ``--grid model.variant=sum,dafm,dafm+2dpam``. Every name, kind, range
and value is checked here, before anything starts. Nothing here imports Ray
(``pipeline/tune.py`` turns a space into Tune's).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, apply_overrides, with_values

# Short names for the paper's three knobs; any numeric config field "section.field" also works.
ALIASES = {"lambda_c": "loss.lambda_c", "lambda_s": "loss.lambda_s", "lr": "optim.lr"}
KINDS = ("uniform", "loguniform", "choice")  # sampled; "grid" dimensions come from parse_grid
GRID = "grid"

# Fields a grid cannot vary: the search sets them for every trial alike (resources, budget,
# where things are kept), each with the option that does.
SEARCH_OWNED = {
    "train.workers": "--workers-per-trial", "train.cpus_per_worker": "--set train.cpus_per_worker",
    "train.gpu": "--gpu", "train.epochs": "--epochs", "train.storage": "--storage", "data.shards": "--data",
    "tracking.uri": "--set tracking.uri", "tracking.experiment": "--set tracking.experiment",
}


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: ``uniform``/``loguniform`` over [low, high], or a ``choice``."""

    name: str  # as the user wrote it (lambda_c, lr, optim.weight_decay, model.variant, ...)
    key: str  # config field, section.field
    kind: str  # uniform | loguniform | choice | grid
    low: float = 0.0
    high: float = 0.0
    values: tuple[float | str, ...] = ()  # choice: floats; grid: the values' text, as given

    def contains(self, value: float | str) -> bool:
        if self.kind in ("choice", GRID):
            return value in self.values
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == GRID:
            return f"{self.name} in grid {list(self.values)}"
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


def parse_space(cfg: Config, specs: list[str] | None = None, file: str | Path | None = None,
                grid: dict[str, Dimension] | None = None) -> dict[str, Dimension]:
    """The default space, changed by a JSON file and then by ``name=kind:low:high`` strings.

    With a ``grid`` (:func:`parse_grid`), the space is the grid plus only what the file and
    the strings name: every other field keeps the preset's value, so that an ablation
    compares its grid points at the same hyper-parameters.

    File: ``{"lambda_c": {"type": "uniform", "low": 0, "high": 1}, "lr": {"type":
    "loguniform", "low": 1e-3, "high": 1e-1}, "lambda_s": {"type": "choice", "values": [0,
    0.1]}}``. Strings: ``lambda_c=uniform:0:1``, ``lr=loguniform:1e-3:1e-1``,
    ``lambda_s=choice:0,0.1,0.2``. Unknown names, kinds and empty ranges are refused.
    """
    space = dict(grid) if grid else default_space(cfg)
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
            if kind in KINDS and len(bounds) != 2:
                raise ConfigError(f"--space {text!r}: {kind} takes two bounds; expected {name.strip()}={kind}:LOW:HIGH "
                                  "such as lr=loguniform:1e-3:1e-1")
            spec = {"type": kind, "low": bounds[0], "high": bounds[1] if len(bounds) > 1 else None}
        space[name.strip()] = _dimension(name.strip(), spec, cfg, f"--space {text!r}")
    replaced = [n for n, d in (grid or {}).items() if space[n] is not d]
    if replaced:
        raise ConfigError(f"{', '.join(replaced)}: both in --grid and in --space/--space-file; give it in one of them")
    keys = [d.key for d in space.values()]
    if len(keys) != len(set(keys)):
        raise ConfigError(f"the search space names one config field twice: {sorted(keys)}")
    return space


def parse_grid(cfg: Config, specs: list[str] | None) -> dict[str, Dimension]:
    """``FIELD=V1,V2,...`` strings -> grid dimensions; every value of every field is tried on ``cfg``.

    FIELD is any config field (``section.field``, or lambda_c, lambda_s, lr); each value is
    parsed by the field's type and checked like ``--set FIELD=V``, so an unknown field or a
    value the config refuses (``model.variant=dafm+3dpam``) is a :class:`ConfigError` here.
    Values are separated by commas, or by semicolons when any is there (for a tuple field:
    ``data.scales=1.0;0.75,1.0,1.25``). The values keep the text given, parsed again in each
    trial (:func:`trial_config`), so they travel through Tune and JSON as they are.
    """
    grid: dict[str, Dimension] = {}
    for text in specs or []:
        where = f"--grid {text!r}"
        name, sep, rest = text.partition("=")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise ConfigError(f"{where}: expected FIELD=V1,V2,... such as model.variant=sum,dafm,dafm+2dpam")
        key = ALIASES.get(name, name)
        if key in SEARCH_OWNED:
            raise ConfigError(f"{where}: {key} is the same for every trial of a search; "
                              f"set it with {SEARCH_OWNED[key]}")
        values = tuple(v.strip() for v in rest.split(";" if ";" in rest else ",") if v.strip())
        typed = []
        for value in values:
            try:
                typed.append(apply_overrides(cfg, [f"{key}={value}"]).flat()[key])
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if len(set(map(repr, typed))) != len(typed):
            raise ConfigError(f"{where}: a value is given twice ({', '.join(values)})")
        if key in {d.key for d in grid.values()}:
            raise ConfigError(f"{where}: {key} already has a grid; give all its values in one --grid")
        grid[name] = Dimension(name, key, GRID, values=values)
    return grid


def grid_points(space: dict[str, Dimension]) -> int:
    """How many points the space's grids span (1 without a grid): trials per sample."""
    points = 1
    for d in space.values():
        if d.kind == GRID:
            points *= len(d.values)
    return points


def check_grid(cfg: Config, space: dict[str, Dimension]) -> None:
    """Every grid point's config is valid with ``cfg`` (as the search runs it: its worker
    count set), so no trial fails on a value after others have run; ConfigError otherwise."""
    grids = [d for d in space.values() if d.kind == GRID]
    for point in itertools.product(*(d.values for d in grids)):
        overrides = [f"{d.key}={v}" for d, v in zip(grids, point)]
        try:
            apply_overrides(cfg, overrides)
        except ConfigError as exc:
            raise ConfigError(f"grid point {' '.join(overrides)}: {exc}") from None


def has_grid(space: dict[str, Dimension]) -> bool:
    return any(d.kind == GRID for d in space.values())


def trial_config(base: Config, space: dict[str, Dimension], params: dict[str, Any]) -> Config:
    """``base`` with one trial's ``params`` (Tune's config: name -> value) set: grid values
    parsed from their text by the field's type, sampled values set as numbers."""
    grid = [f"{space[n].key}={v}" for n, v in params.items() if space[n].kind == GRID]
    sampled = {space[n].key: v for n, v in params.items() if space[n].kind != GRID}
    return with_values(apply_overrides(base, grid), sampled)


def resolve_settings(space: dict[str, Dimension], trials: int | None, scheduler: str | None,
                     search: str | None) -> tuple[int, str, str]:
    """``(trials, scheduler, search)`` for a space, each ``None`` -> its default.

    Without a grid: 8 trials, ASHA, Optuna. With a grid: every grid point is run by Tune's
    basic variant generator (``search="random"``: Optuna cannot take a grid) to the end
    (``scheduler="fifo"``: ASHA would stop some grid points early, and an ablation compares
    finished runs); asking for either of the others is refused. ``trials`` is then the
    number of samples per grid point (default 1); a grid alone samples nothing, so more than
    one would train the same configuration again: vary ``train.seed`` in the grid instead.
    """
    if not has_grid(space):
        return (8 if trials is None else trials), scheduler or "asha", search or "optuna"
    if search not in (None, "random"):
        raise ConfigError(f"--search {search}: a grid (--grid) is run point by point by Tune's basic variant "
                          "generator; Optuna cannot take a grid. Leave --search out (or pass --search random)")
    if scheduler not in (None, "fifo"):
        raise ConfigError(f"--scheduler {scheduler}: a grid (--grid) runs every point to the end; ASHA would stop "
                          "some points early and make the comparison unfair. Leave --scheduler out (or pass fifo)")
    trials = 1 if trials is None else trials
    if trials > 1 and all(d.kind == GRID for d in space.values()):
        raise ConfigError(f"--trials {trials}: with a grid, --trials is the number of samples per grid point, and "
                          "this space samples nothing (every point would train the same configuration again). "
                          "For repeats, add the seed to the grid: --grid train.seed=0,1,2")
    return trials, "fifo", "random"


def paper_point(cfg: Config, space: dict[str, Dimension]) -> dict[str, float] | None:
    """The preset's own values (the paper's lambdas and lr), if the space contains them."""
    flat = cfg.flat()
    point = {name: flat[d.key] for name, d in space.items()}
    return point if all(space[n].contains(v) for n, v in point.items()) else None
