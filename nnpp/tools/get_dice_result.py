"""Read per-class Dice from an nnU-Net validation ``summary.json`` (v2 layout, and v1's ``results`` key)."""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import pathlib

from nnpp import NnppError
from nnpp.cli import entry_point
from nnpp.dice import dice_text, label_names, read_dice
from nnpp.file_safety import load_json_file
from nnpp.tools import one_dataset, require_folder


# ------------------------------------------------------------------------------------------------ the CLI
# The seed's ``python get_dice_result.py -path ENV_ROOT -mode 1p|8p``: 1p reads the single-device trainer's
# run, 8p the multi-process trainer's (nnpp_train names DDP runs differently so they never mix).
MODE_TRAINERS = {"1p": ("nnUNetPlusPlusTrainer", "nnUNetPlusPlusTrainerV2"),
                 "8p": ("nnUNetPlusPlusTrainerDDP", "nnUNetPlusPlusTrainerV2_hypDDP")}


def find_summaries(root: str, mode: str = "1p", dataset: str | None = None, fold: str = "0",
                   trainer: str | None = None, configuration: str | None = None) -> list[str]:
    """summary.json files of matching runs (any depth below root):
    v2 ``DatasetXXX/TR__PLANS__CONFIG/fold_F/validation/summary.json`` (fold ``all``: ``fold_all``) and
    v1 ``CONFIG/TaskXXX/TR__PLANS/fold_F/validation_raw/summary.json`` (fold ``all``: folder ``all``; v1 keeps the
    configuration in the folder above the task)."""
    require_folder(root, "results")
    trainers = (trainer,) if trainer else MODE_TRAINERS[mode]
    fold = str(fold)
    v1_fold = "all" if fold == "all" else f"fold_{fold}"
    hits = []
    for fold_dir, sub in ((f"fold_{fold}", "validation"), (v1_fold, "validation_raw")):
        for path in glob.glob(os.path.join(root, "**", fold_dir, sub, "summary.json"), recursive=True):
            trainer_name, config = run_identity(path)
            if trainer_name in trainers and configuration in (None, config):
                hits.append(path)
    hits = one_dataset(sorted(set(hits)), lambda p: _run_dir(p).parent.name, root, dataset)
    if not hits:
        raise NnppError(f"no summary.json for trainer {'/'.join(trainers)}, fold {fold}"
                        + (f", configuration {configuration}" if configuration else "") + f" under {root}; "
                        f"has the validation run (nnpp_train ... --val)?")
    return hits


def run_identity(summary_path: str) -> tuple[str, str | None]:
    """(trainer, configuration) of a run's summary.json: v2 ``TRAINER__PLANS__CONFIG``; v1 ``TRAINER__PLANS``
    below ``CONFIG/TaskXXX_Name/``."""
    run = _run_dir(summary_path)
    parts = run.name.split("__")
    if len(parts) > 2:
        return parts[0], parts[2]
    return parts[0], run.parent.parent.name


def _run_dir(summary_path: str) -> pathlib.PurePath:
    """TRAINER__PLANS[__CONFIG] of ``.../TRAINER__PLANS__CONFIG/fold_F/validation/summary.json``."""
    return pathlib.PurePath(summary_path).parents[2]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnpp_get_dice_result", description="Per-class Dice (x100) of a validated run")
    p.add_argument("-path", required=True, help="nnU-Net base or results folder (searched recursively)")
    p.add_argument("-mode", default="1p", choices=sorted(MODE_TRAINERS), help="1p: one-device run; 8p: DDP run")
    p.add_argument("-d", "--dataset", default=None)
    p.add_argument("-f", "--fold", default="0", help="fold (default 0) or all")
    p.add_argument("-tr", "--trainer", default=None, help="trainer name (overrides -mode)")
    p.add_argument("-c", "--configuration", default=None,
                   help="only runs of this configuration (v2 run folder suffix; v1 folder above the task)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table (NaN Dice as null)")
    return p


def _dataset_json_for(summary_path: str) -> dict | None:
    path = os.path.join(_run_dir(summary_path), "dataset.json")
    return load_json_file(path, "dataset.json") if os.path.isfile(path) else None


@entry_point("get_dice_result")
def main(argv=None):
    args = build_parser().parse_args(argv)
    rows = []
    for path in find_summaries(args.path, args.mode, args.dataset, args.fold, args.trainer, args.configuration):
        names = label_names(_dataset_json_for(path))
        rows.append({"summary": path, "dice": {names.get(k, f"class {k}"): None if math.isnan(v) else round(100 * v, 2)
                                               for k, v in read_dice(path).items()}})
    if args.json:  # strict JSON: NaN Dice is null
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2, allow_nan=False))
        return
    for row in rows:
        print(row["summary"])
        print("| " + " | ".join(row["dice"]) + " |")
        print("|" + "---|" * len(row["dice"]))
        print("| " + " | ".join("nan" if v is None else dice_text(v / 100, percent=True) for v in row["dice"].values())
              + " |")


if __name__ == "__main__":
    main()
