"""change_bs: set the batch size in nnU-Net plans (the seed's ``python change_bs.py -path ENV_ROOT -size N``).

Edits nnU-Net v2 plans JSON (``DatasetXXX_Name/<plans>.json``, one configuration) and nnU-Net v1 plans
(``TaskXXX_Name/nnUNetPlansv2.1_plans_3D.pkl``, or ``..._2D.pkl`` for ``-c 2d``; the stage v1 trains for the
configuration). ROOT is any folder above the plans: the nnU-Net base folder, ``nnUNet_preprocessed`` or the
dataset folder itself. Before the first change the file is kept as ``<file>.bak`` (never overwritten later: a
further change keeps the state before it as ``<file>.bak.1``, ``.bak.2``, ...); the new file is written to a
temp file, then renamed. v1 pickles are written with a protocol nnU-Net v1's Pythons (3.6+) can read.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import pickletools
import shutil
import tempfile

from nnpp import NnppError
from nnpp.cli import entry_point, positive_int
from nnpp.tools import one_dataset, require_folder

V1_PLANS_3D = "nnUNetPlansv2.1_plans_3D.pkl"
V1_PLANS_2D = "nnUNetPlansv2.1_plans_2D.pkl"
V1_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
# nnU-Net v1 ran on Python 3.6+: protocol 4 is readable from 3.4, protocol 5 only from 3.8.
V1_PICKLE_PROTOCOL = 4


def v1_plans_file(configuration: str) -> str:
    """The v1 plans file name a configuration trains from (2d: the 2D plans, every 3d_*: the 3D plans)."""
    return V1_PLANS_2D if configuration == "2d" else V1_PLANS_3D


def find_plans(root: str, dataset: str | None = None, plans: str = "nnUNetPlans",
               configuration: str = "3d_fullres") -> list[str]:
    """Plans files under ``root``: v2 ``<plans>.json`` in DatasetXXX_* folders and the v1 pkl for
    ``configuration`` in TaskXXX_* folders."""
    require_folder(root, "nnUNet_preprocessed")
    v1 = v1_plans_file(configuration)
    found = glob.glob(os.path.join(root, "**", f"{plans}.json"), recursive=True) + \
        glob.glob(os.path.join(root, "**", v1), recursive=True)
    found = one_dataset(found, lambda f: os.path.basename(os.path.dirname(f)), root, dataset)
    if not found:
        raise NnppError(f"no plans ({plans}.json or {v1}) found under {root}"
                        + (f" for dataset {dataset}" if dataset else "") + "; run nnU-Net's planning first")
    return found


def pickle_protocol(data: bytes) -> int:
    """The protocol a pickle was written with (its PROTO opcode; 0 for protocols 0 and 1, which have none)."""
    try:
        op, arg, _ = next(pickletools.genops(data))
    except (StopIteration, ValueError):
        return 0
    return arg if op.name == "PROTO" else 0


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path`` (never half-written)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def backup(path: str) -> str:
    """Copy ``path`` to the first free name of ``<path>.bak``, ``<path>.bak.1``, ``<path>.bak.2``, ... and return
    it: ``.bak`` always holds the file as it was before the first change, later backups never replace it."""
    name, n = path + ".bak", 0
    while os.path.exists(name):
        n += 1
        name = f"{path}.bak.{n}"
    with open(path, "rb") as f:
        _write_atomic(name, f.read())
    shutil.copystat(path, name)
    return name


def _v1_stage(stages: dict, configuration: str, path: str):
    """The stage key v1 trains ``configuration`` with (v1's default_configuration: 2d and 3d_lowres stage 0,
    3d_fullres / 3d_cascade_fullres the last stage; lowres and cascade need two stages)."""
    if configuration not in V1_CONFIGURATIONS:
        raise NnppError(f"configuration '{configuration}' is not an nnU-Net v1 configuration ({path}); "
                        f"use one of {', '.join(V1_CONFIGURATIONS)}")
    keys = sorted(stages)
    if configuration in ("3d_lowres", "3d_cascade_fullres") and len(keys) < 2:
        raise NnppError(f"{path} has one stage only: this task has no {configuration}; use -c 3d_fullres")
    return keys[0] if configuration in ("2d", "3d_lowres") else keys[-1]


def change_batch_size(path: str, size: int, configuration: str = "3d_fullres",
                      copy_to: str | None = None) -> tuple[int, str | None]:
    """Set the batch size of ``configuration`` in one plans file; returns (old value, file written besides the
    plans: the backup, or with ``copy_to`` the new plans; None when nothing was written). Nothing is written when
    the batch size already is ``size``. ``copy_to``: write the result as new v2 plans
    ``<copy_to>.json`` beside it (same preprocessed data) and leave the original untouched; an existing
    ``<copy_to>.json`` is never overwritten (an identical one is accepted, so the same command can run again)."""
    if path.endswith(".json"):
        return _change_v2(path, size, configuration, copy_to)
    if copy_to:
        raise NnppError("--copy_to works on nnU-Net v2 plans (JSON) only")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        plans = pickle.loads(raw)
        stages = plans["plans_per_stage"]
        key = _v1_stage(stages, configuration, path)
        stage = stages[key]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise NnppError(f"{path} is not an nnU-Net v1 plans file ({type(e).__name__}: {e})") from None
    if not isinstance(stage, dict) or "batch_size" not in stage:
        raise NnppError(f"stage {key} ({configuration}) of {path} has no batch_size; is it an nnU-Net v1 plans file? "
                        f"re-run v1's planning")
    old = stage["batch_size"]
    if old == size:
        return old, None
    stage["batch_size"] = size
    found = pickle_protocol(raw)
    protocol = min(found, V1_PICKLE_PROTOCOL) if found >= 2 else V1_PICKLE_PROTOCOL
    saved = backup(path)
    _write_atomic(path, pickle.dumps(plans, protocol=protocol))
    return old, saved


def _change_v2(path: str, size: int, configuration: str, copy_to: str | None) -> tuple[int, str | None]:
    try:
        with open(path) as f:
            plans = json.load(f)
    except json.JSONDecodeError as e:
        raise NnppError(f"{path} is not valid JSON ({e})") from None
    configs = plans.get("configurations", {}) if isinstance(plans, dict) else {}
    if configuration not in configs:
        raise NnppError(f"configuration '{configuration}' not in {path}; available: {', '.join(configs)}")
    if "batch_size" not in configs[configuration]:  # inherits from another configuration
        parent = configs[configuration].get("inherits_from")
        if parent is None:
            raise NnppError(f"configuration '{configuration}' in {path} has no batch_size and inherits from none; "
                            f"re-run nnU-Net's planning")
        raise NnppError(f"configuration '{configuration}' in {path} inherits its batch size from "
                        f"'{parent}'; change that one")
    old = configs[configuration]["batch_size"]
    if copy_to:
        target = _copy_target(path, copy_to)
        configs[configuration]["batch_size"] = size
        plans["plans_name"] = copy_to
        data = (json.dumps(plans, indent=4) + "\n").encode()
        if os.path.exists(target):
            with open(target, "rb") as f:
                if f.read() == data:
                    return old, None  # the same copy, made before
            raise NnppError(f"--copy_to: {target} already exists (with other contents); choose another plans "
                            f"name or remove that file")
        _write_atomic(target, data)
        return old, target
    if old == size:
        return old, None
    configs[configuration]["batch_size"] = size
    saved = backup(path)
    _write_atomic(path, (json.dumps(plans, indent=4) + "\n").encode())
    return old, saved


def _copy_target(path: str, copy_to: str) -> str:
    """``<copy_to>.json`` beside ``path``; a name with a folder or a .json, or the source's own, is refused."""
    if not copy_to or os.sep in copy_to or "/" in copy_to or copy_to.endswith(".json"):
        raise NnppError(f"--copy_to '{copy_to}' must be a plans identifier such as nnUNetPlans_bs4 "
                        f"(no folder, no .json)")
    target = os.path.join(os.path.dirname(path), copy_to + ".json")
    if os.path.abspath(target) == os.path.abspath(path):
        raise NnppError(f"--copy_to {copy_to} names the plans being read ({path}); choose a new plans name, "
                        f"or leave --copy_to out to edit them in place")
    return target


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnpp_change_bs", description=__doc__.split("\n\n")[0])
    p.add_argument("-path", required=True, help="folder containing the plans (searched recursively)")
    p.add_argument("-size", required=True, type=positive_int, help="new batch size")
    p.add_argument("-d", "--dataset", default=None, help="dataset id or name when ROOT holds several")
    p.add_argument("-c", "--configuration", default="3d_fullres",
                   help="configuration (default 3d_fullres); for v1 plans 2d edits nnUNetPlansv2.1_plans_2D.pkl, "
                        "3d_fullres/3d_lowres the stage v1 trains them with")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="v2 plans identifier (default nnUNetPlans)")
    p.add_argument("--copy_to", default=None, help="write new v2 plans with this identifier instead of editing "
                   "(e.g. nnUNetPlans_bs4; train with -p nnUNetPlans_bs4); an existing different file is refused")
    return p


@entry_point("change_bs")
def main(argv=None):
    args = build_parser().parse_args(argv)
    for path in find_plans(args.path, args.dataset, args.plans, args.configuration):
        old, saved = change_batch_size(path, args.size, args.configuration, args.copy_to)
        if args.copy_to:
            print(f"{path}: batch size {old} -> {args.size} " + (f"written as plans '{args.copy_to}'" if saved else
                  f"already in plans '{args.copy_to}' (identical, left as it was)"))
        elif saved is None:
            print(f"{path}: batch size already {args.size}; nothing changed")
        else:
            print(f"{path}: batch size {old} -> {args.size} (backup: {os.path.basename(saved)})")


if __name__ == "__main__":
    main()
