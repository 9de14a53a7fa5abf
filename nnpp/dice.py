"""Dice as nnU-Net's validation ``summary.json`` holds it (v2, and v1's layout), and as nnpp prints it."""
from __future__ import annotations

import math

from nnpp import NnppError
from nnpp.file_safety import load_json_file


def read_dice(summary_path: str) -> dict[str, float]:
    """{label id (str): mean Dice over the validation cases} for each foreground class; v2 ``mean`` or v1
    ``results.mean``. NaN (nnU-Net's value for a class absent from reference and prediction) stays NaN."""
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


def dice_text(value: float, percent: bool = False) -> str:
    """How nnpp prints a Dice: 0-1 with 4 decimals (nnU-Net's summary), or x100 with 2 (the seed's table)."""
    if math.isnan(value):
        return "nan"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def dice_table(title: str, rows: list, names: dict) -> str:
    """The Dice table nnpp's commands print: ``title``, a header of label names (``names``: id -> name), one line
    per ``(row name, {label id: Dice})``; a row whose Dice is a string prints that note instead."""
    labels = next((list(d) for _, d in rows if isinstance(d, dict)), [])
    width = max(len(name) for name, _ in rows) + 2
    lines = [title, "".ljust(width) + "".join(f"{names.get(k, k):>12}" for k in labels)]
    lines += [name.ljust(width) + (f"   {d}" if isinstance(d, str) else
                                   "".join(dice_text(d.get(k, math.nan)).rjust(12) for k in labels))
              for name, d in rows]
    return "\n".join(lines)


def format_dice(summary_path: str, dataset_json: dict | None = None) -> str:
    dice = read_dice(summary_path)
    names = label_names(dataset_json)
    lines = [f"Dice {names.get(k, 'class ' + k)} (label {k}): {dice_text(v)}" for k, v in dice.items()]
    valid = [v for v in dice.values() if not math.isnan(v)]
    if valid:  # nnU-Net's foreground_mean: the mean over classes, NaN classes left out
        lines.append(f"Dice mean foreground: {dice_text(sum(valid) / len(valid))}")
    return "\n".join(lines)
