"""The registry policy of a search: register its best model, and crown it if it wins.

The best *finished* trial's model becomes a new version of the registered model
(``dfdam-<dataset>`` by default), tagged with its validation mIoU and a fingerprint of the
validation data it was measured on. It takes the alias ``champion`` only if it beats the
current champion on the same data: a champion measured on other data is measured again on
this validation split first, so two numbers from different data are never compared.

A search with a grid (the paper's ablation, ``run.py tune --grid``) registers nothing unless
it is given a model name: it compares variants, often on a short budget, and its best
trial is no candidate for ``champion`` of the models the plain searches register.
"""
from __future__ import annotations

import hashlib
from typing import Any

from pipeline import tracking
from pipeline.config import Config
from pipeline.trials import TrialRow
from sharding.manifest import Manifest

ALIAS = "champion"


def validation_fingerprint(manifest: Manifest) -> str:
    """Identity of a validation split: sha256 over its samples' keys and checksums."""
    table = manifest.table.select(["key", "image_sha256", "label_sha256"]).to_pylist()
    digest = hashlib.sha256()
    for row in sorted(table, key=lambda r: r["key"]):
        digest.update(f"{row['key']}:{row['image_sha256']}:{row['label_sha256']}\n".encode())
    return digest.hexdigest()


def registry_name(dataset: str, register_as: str | None, grid: bool) -> str | None:
    """The registered model a search's best trial goes to: ``register_as``, else
    ``dfdam-<dataset>``; for a search with a grid only ``register_as`` (None: register nothing)."""
    if register_as:
        return register_as
    return None if grid else f"dfdam-{dataset}"


def register_best(rows: list[TrialRow], uri: str, model_name: str, cfg: Config,
                  val_manifest: Manifest) -> dict[str, Any] | None:
    """Register the best finished trial's model; move ``champion`` to it if it wins."""
    finished = [r for r in rows if r.status == "finished" and r.run_id]
    if not finished:
        return None
    best = max(finished, key=lambda r: r.val_miou)
    fingerprint = validation_fingerprint(val_manifest)
    version = tracking.register_model(uri, best.run_id, model_name,
                                      tags={"val_miou": repr(best.val_miou), "val_data": fingerprint,
                                            "val_split": val_manifest.split})
    champion = tracking.get_alias(uri, model_name, ALIAS)
    champion_miou = None
    if champion is not None:
        if champion.tags.get("val_data") == fingerprint and "val_miou" in champion.tags:
            champion_miou = float(champion.tags["val_miou"])
        else:  # measured on other data: measure it again on this validation split
            from pipeline.evaluate import evaluate_model

            champion_miou = evaluate_model(f"models:/{model_name}@{ALIAS}", cfg.data.shards,
                                           val_manifest.split, tracking_uri=uri).miou
    promoted = champion is None or best.val_miou > champion_miou
    if promoted:
        tracking.set_alias(uri, model_name, ALIAS, version)
    return {"model": model_name, "version": version, "alias": ALIAS, "trial_id": best.trial_id, "val_miou": best.val_miou,
            "previous_champion": None if champion is None else {"version": champion.version, "val_miou": champion_miou},
            "champion": promoted}
