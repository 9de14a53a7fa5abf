"""Read per-class Dice from an nnU-Net validation ``summary.json`` (v2 layout, and v1's ``results`` key)."""
from __future__ import annotations

from nnpp import NnppError
from nnpp.run.common import load_json_file


def read_dice(summary_path: str) -> dict[str, float]:
    """{label id (str): mean Dice} for each foreground class; v2 ``mean`` or v1 ``results.mean``."""
    summary = load_json_file(summary_path, "validation summary")
    means = summary.get("mean") or summary.get("results", {}).get("mean")
    if not isinstance(means, dict):
        raise NnppError(f"{summary_path} has no per-class 'mean' Dice; is it an nnU-Net summary.json?")
    return {str(k): float(v["Dice"]) for k, v in means.items() if str(k) != "0" and "Dice" in v}


def label_names(dataset_json: dict | None) -> dict[str, str]:
    """{label id: name}. v2 dataset.json maps name -> id, v1 maps id -> name."""
    labels = (dataset_json or {}).get("labels", {})
    if all(isinstance(v, int) for v in labels.values()):
        return {str(v): k for k, v in labels.items()}
    return {str(k): str(v) for k, v in labels.items()}


def format_dice(summary_path: str, dataset_json: dict | None = None) -> str:
    dice = read_dice(summary_path)
    names = label_names(dataset_json)
    lines = [f"Dice {names.get(k, 'class ' + k)} (label {k}): {v:.4f}" for k, v in dice.items()]
    if dice:
        lines.append(f"Dice mean foreground: {sum(dice.values()) / len(dice):.4f}")
    return "\n".join(lines)
