"""change_bs: set the batch size in nnU-Net plans (the seed's ``python change_bs.py -path ENV_ROOT -size N``).

Edits nnU-Net v2 plans JSON (``DatasetXXX_Name/<plans>.json``, one configuration) and nnU-Net v1 plans
(``TaskXXX_Name/nnUNetPlansv2.1_plans_3D.pkl``, the full-resolution stage). ROOT is any folder above the plans:
the nnU-Net base folder, ``nnUNet_preprocessed`` or the dataset folder itself. The old file is kept as
``<file>.bak`` and the new one is written to a temp file, then renamed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import shutil

from nnpp import NnppError
from nnpp.run.common import entry_point, positive_int
from nnpp.tools import one_dataset, require_folder

V1_PLANS = "nnUNetPlansv2.1_plans_3D.pkl"


def find_plans(root: str, dataset: str | None = None, plans: str = "nnUNetPlans") -> list[str]:
    """Plans files under ``root``: v2 ``<plans>.json`` in DatasetXXX_* folders and v1 pkl in TaskXXX_* folders."""
    require_folder(root, "nnUNet_preprocessed")
    found = glob.glob(os.path.join(root, "**", f"{plans}.json"), recursive=True) + \
        glob.glob(os.path.join(root, "**", V1_PLANS), recursive=True)
    found = one_dataset(found, lambda f: os.path.basename(os.path.dirname(f)), root, dataset)
    if not found:
        raise NnppError(f"no plans ({plans}.json or {V1_PLANS}) found under {root}"
                        + (f" for dataset {dataset}" if dataset else "") + "; run nnU-Net's planning first")
    return found


def _atomic_write(path: str, data: bytes, backup: bool = True) -> None:
    if backup:
        shutil.copy2(path, path + ".bak")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def change_batch_size(path: str, size: int, configuration: str = "3d_fullres", copy_to: str | None = None) -> int:
    """Set the batch size in one plans file; returns the old value. ``copy_to``: write the result as new v2
    plans ``<copy_to>.json`` beside it (same preprocessed data) and leave the original untouched."""
    if copy_to and not path.endswith(".json"):
        raise NnppError("--copy_to works on nnU-Net v2 plans (JSON) only")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                plans = json.load(f)
        except json.JSONDecodeError as e:
            raise NnppError(f"{path} is not valid JSON ({e})") from None
        configs = plans.get("configurations", {})
        if configuration not in configs:
            raise NnppError(f"configuration '{configuration}' not in {path}; available: {', '.join(configs)}")
        if "batch_size" not in configs[configuration]:  # inherits from another configuration
            raise NnppError(f"configuration '{configuration}' in {path} inherits its batch size from "
                            f"'{configs[configuration].get('inherits_from')}'; change that one")
        old = configs[configuration]["batch_size"]
        configs[configuration]["batch_size"] = size
        if copy_to:
            plans["plans_name"] = copy_to
        data = (json.dumps(plans, indent=4) + "\n").encode()
        if copy_to:
            _atomic_write(os.path.join(os.path.dirname(path), copy_to + ".json"), data, backup=False)
        else:
            _atomic_write(path, data)
        return old
    try:
        with open(path, "rb") as f:
            plans = pickle.load(f)
        stages = plans["plans_per_stage"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as e:
        raise NnppError(f"{path} is not an nnU-Net v1 plans file ({e})") from None
    last = max(stages)  # 3d_fullres is the highest stage in v1 3D plans
    old = stages[last]["batch_size"]
    stages[last]["batch_size"] = size
    _atomic_write(path, pickle.dumps(plans))
    return old


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnpp_change_bs", description=__doc__.split("\n\n")[0])
    p.add_argument("-path", required=True, help="folder containing the plans (searched recursively)")
    p.add_argument("-size", required=True, type=positive_int, help="new batch size")
    p.add_argument("-d", "--dataset", default=None, help="dataset id or name when ROOT holds several")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="v2 configuration (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="v2 plans identifier (default nnUNetPlans)")
    p.add_argument("--copy_to", default=None, help="write new v2 plans with this identifier instead of editing "
                   "(e.g. nnUNetPlans_bs4; train with -p nnUNetPlans_bs4)")
    return p


@entry_point("change_bs")
def main(argv=None):
    args = build_parser().parse_args(argv)
    for path in find_plans(args.path, args.dataset, args.plans):
        old = change_batch_size(path, args.size, args.configuration, args.copy_to)
        if args.copy_to:
            print(f"{path}: batch size {old} -> {args.size} written as plans '{args.copy_to}'")
        else:
            print(f"{path}: batch size {old} -> {args.size} (backup: {os.path.basename(path)}.bak)")


if __name__ == "__main__":
    main()
