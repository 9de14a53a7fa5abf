"""nnpp_plan_and_preprocess: nnU-Net's fingerprint -> plan -> preprocess, planned for UNet++.

    nnpp_plan_and_preprocess -d 3 [-c 3d_fullres] [-np 4] [--verify_dataset_integrity]
                             [-gpu_memory_target 8] [--checkpoint [node|cat_conv1]] [-pl UNetPlusPlusPlanner]

nnU-Net's own ``nnUNetv2_plan_and_preprocess -pl`` only finds planners inside nnU-Net's package, so this command
calls nnU-Net's planning API (``extract_fingerprint_dataset``, ``plan_experiment_dataset``,
``preprocess_dataset``) with nnpp's planner class. The plans (default name ``nnppUNetPlusPlusPlans``) name
``nnpp.nets.unetpp.UNetPlusPlus`` and size patch and batch from UNet++'s feature-map count under
``-gpu_memory_target`` GB; train with ``nnpp_train D 3d_fullres F -p nnppUNetPlusPlusPlans``. Configurations whose
data identifier is nnU-Net's (``nnUNetPlans_2d``, ``nnUNetPlans_3d_fullres``) share nnU-Net's preprocessed folder
only when it verifiably holds the same data (``nnUNetPlans.json`` present with the same spacing, normalisation,
resampling and transpose, every training case in the folder); otherwise they are preprocessed into nnpp's own
identifier (``nnppUNetPlusPlusPlans_3d_fullres``). nnpp never writes into nnU-Net's folders or its plans. An
existing fingerprint is reused (``--clean`` recomputes it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nnpp import NnppError
from nnpp.paths import setup_paths
from nnpp.cli import entry_point, positive_int
from nnpp.dataset_ids import parse_dataset_id

PLANNERS = ("UNetPlusPlusPlanner", "SmallUNetPlusPlusPlanner")


def parser() -> argparse.ArgumentParser:
    from nnpp.nets.unetpp import CHECKPOINT_MODES
    p = argparse.ArgumentParser(prog="nnpp_plan_and_preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", nargs="+", required=True, help="dataset id(s): 3, 003, Dataset003_Liver or Task003_Liver")
    p.add_argument("-c", nargs="+", default=["2d", "3d_fullres", "3d_lowres"],
                   help="configurations to preprocess (default 2d 3d_fullres 3d_lowres)")
    p.add_argument("-np", nargs="+", type=positive_int, default=None,
                   help="processes: one number, or one per configuration (default 8 4 8 as nnU-Net); "
                        "the first is also used for the fingerprint")
    p.add_argument("--verify_dataset_integrity", action="store_true", help="nnU-Net's dataset check first")
    p.add_argument("-gpu_memory_target", type=float, default=8.0,
                   help="GPU memory (GB) the plans are sized for (default 8, nnU-Net's)")
    p.add_argument("--checkpoint", nargs="?", const="node", default="none", choices=CHECKPOINT_MODES,
                   help="plan for activation-checkpointed nested nodes (written into the plans; a larger patch "
                        "fits): node (the default when the flag is given alone) or cat_conv1")
    p.add_argument("-pl", default=PLANNERS[0], choices=PLANNERS, help="planner in nnpp.planning (default "
                   f"{PLANNERS[0]}; SmallUNetPlusPlusPlanner: 8..64 features, patch <= 32x48x48, for CPUs)")
    p.add_argument("-overwrite_plans_name", default=None, help="plans name (default nnppUNetPlusPlusPlans)")
    p.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    p.add_argument("--clean", action="store_true", help="recompute the dataset fingerprint even if it exists")
    return p


#: what makes two configurations' preprocessed data the same (the preprocessor's inputs besides the raw images)
_DATA_KEYS = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm",
              "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")
_PLANS_DATA_KEYS = ("transpose_forward", "foreground_intensity_properties_per_channel")


def _shared_data_mismatch(preprocessed: str, plans: dict, configuration: str, cases) -> str | None:
    """None if nnU-Net's own preprocessed data for ``configuration`` verifiably is the data ``plans`` would write:
    ``nnUNetPlans.json`` exists and describes the same preprocessing (data identifier, preprocessor, spacing,
    normalisation, resampling, transpose, intensity properties) and its folder holds every training case (``cases``).
    Else a short reason. nnpp shares such a folder read-only and never preprocesses into it (nnU-Net's
    ``preprocess_dataset`` deletes and rewrites it, under nnU-Net's own plans and trainings)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    ident = f"nnUNetPlans_{configuration}"
    folder = os.path.join(preprocessed, ident)
    default_plans = os.path.join(preprocessed, "nnUNetPlans.json")
    if not os.path.isdir(folder):
        return f"{ident} does not exist"
    if not os.path.isfile(default_plans):
        return "nnUNetPlans.json is missing"
    try:
        with open(default_plans) as f:
            theirs_plans = json.load(f)
        theirs = PlansManager(theirs_plans).get_configuration(configuration).configuration
    except Exception as e:  # unreadable, or no such configuration
        return f"nnUNetPlans.json has no readable {configuration} configuration ({type(e).__name__})"
    ours = PlansManager(plans).get_configuration(configuration).configuration
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731 (tuples -> lists, as in the file)
    for k in _DATA_KEYS:
        if norm(theirs.get(k)) != norm(ours.get(k)):
            return f"nnUNetPlans.json's {configuration} {k} differs ({theirs.get(k)} vs {ours.get(k)})"
    for k in _PLANS_DATA_KEYS:
        if norm(theirs_plans.get(k)) != norm(plans.get(k)):
            return f"nnUNetPlans.json's {k} differs"
    missing = [c for c in cases if not os.path.isfile(os.path.join(folder, c + ".pkl"))]
    if missing:
        return f"{ident} lacks {len(missing)} case(s), e.g. {missing[0]}"
    return None


def _choose_data_identifiers(preprocessed: str, plans: dict, plans_identifier: str, cases) -> dict:
    """Point every configuration that names nnU-Net's data (``nnUNetPlans_<c>``) either at it, when it verifiably
    matches (:func:`_shared_data_mismatch`), or at nnpp's own ``<plans_identifier>_<c>``. Changes ``plans`` in
    place; returns {configuration: reason} for those moved to nnpp's own identifier."""
    moved = {}
    for c, conf in plans["configurations"].items():
        if conf.get("data_identifier") != f"nnUNetPlans_{c}":
            continue
        reason = _shared_data_mismatch(preprocessed, plans, c, cases)
        if reason is not None:
            conf["data_identifier"] = f"{plans_identifier}_{c}"
            moved[c] = reason
    return moved


def plan_and_preprocess(dataset_id: int, configurations, num_processes, planner_name: str = PLANNERS[0],
                        gpu_memory_target: float = 8.0, checkpoint: str = "none", plans_name: str | None = None,
                        verify: bool = False, preprocess: bool = True, clean: bool = False) -> str:
    """Fingerprint (kept if present unless ``clean``), plan with ``nnpp.planning.<planner_name>``, preprocess
    what is not reusable. Returns the plans identifier."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       preprocess_dataset)
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    from nnpp import planning
    try:
        name = convert_id_to_dataset_name(dataset_id)
    except RuntimeError:
        raise NnppError(f"dataset {dataset_id} not found in nnUNet_raw ({os.environ.get('nnUNet_raw')}); "
                        f"convert it first (nnUNetv2_convert_MSD_dataset)") from None
    preprocessed = os.path.join(os.environ["nnUNet_preprocessed"], name)
    if clean or verify or not os.path.isfile(os.path.join(preprocessed, "dataset_fingerprint.json")):
        extract_fingerprint_dataset(dataset_id, num_processes=num_processes[0], check_dataset_integrity=verify,
                                    clean=True, verbose=False)
    kwargs = dict(gpu_memory_target_in_gb=gpu_memory_target, checkpoint_nodes=checkpoint)
    if plans_name:
        kwargs["plans_name"] = plans_name
    planner = getattr(planning, planner_name)(dataset_id, **kwargs)
    # nnU-Net's estimate sets torch's threads to nnUNet_n_proc_DA, which fails for 0 (a valid training setting)
    n_da = os.environ.get("nnUNet_n_proc_DA")
    if n_da is not None and int(n_da) < 1:
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        plans = planner.plan_experiment()
    finally:
        if n_da is not None:
            os.environ["nnUNet_n_proc_DA"] = n_da
    moved = _choose_data_identifiers(preprocessed, plans, planner.plans_identifier, _training_cases(name))
    if moved:
        planner.save_plans(plans)
    for c, conf in plans["configurations"].items():
        if "patch_size" in conf:
            print(f"[nnpp_plan_and_preprocess] {name} {c}: patch {conf['patch_size']}, batch {conf['batch_size']}, "
                  f"checkpoint_nodes {checkpoint} ({gpu_memory_target:g} GB target)", flush=True)
    if preprocess:
        todo, n = [], []
        for i, c in enumerate(configurations):
            ident = plans["configurations"].get(c, {}).get("data_identifier")
            if ident == f"nnUNetPlans_{c}":  # verified above: never preprocess into nnU-Net's own folder
                print(f"[nnpp_plan_and_preprocess] {c}: reusing nnU-Net's preprocessed {ident} (same "
                      f"preprocessing, every case present)", flush=True)
                continue
            if c in moved:
                print(f"[nnpp_plan_and_preprocess] {c}: not sharing nnU-Net's nnUNetPlans_{c} ({moved[c]}); "
                      f"preprocessing into {ident}", flush=True)
            todo.append(c)
            n.append(num_processes[min(i, len(num_processes) - 1)])
        if todo:
            preprocess_dataset(dataset_id, planner.plans_identifier, todo, n, show_progress_bar=True)
    return planner.plans_identifier


def _training_cases(dataset_name: str) -> list:
    """The training case ids of a raw dataset (nnU-Net's listing)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    raw = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    with open(os.path.join(raw, "dataset.json")) as f:
        return sorted(get_filenames_of_train_images_and_targets(raw, json.load(f)))


@entry_point("nnpp_plan_and_preprocess")
def main(argv=None):
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_paths(required=("nnUNet_raw", "nnUNet_preprocessed"))
    if args.np is not None and len(args.np) not in (1, len(args.c)):
        raise NnppError(f"-np takes one number or one per configuration ({len(args.c)}), got {len(args.np)}")
    if not args.gpu_memory_target > 0:
        raise NnppError(f"-gpu_memory_target must be > 0 GB, got {args.gpu_memory_target}")
    num_processes = args.np or [{"2d": 8, "3d_fullres": 4, "3d_lowres": 8}.get(c, 4) for c in args.c]
    for d in args.d:
        plans = plan_and_preprocess(parse_dataset_id(d), args.c, num_processes, args.pl, args.gpu_memory_target,
                                    args.checkpoint, args.overwrite_plans_name, args.verify_dataset_integrity,
                                    not args.no_pp, args.clean)
        print(f"[nnpp_plan_and_preprocess] plans {plans} written; train with: nnpp_train {d} 3d_fullres FOLD "
              f"-p {plans}", flush=True)


if __name__ == "__main__":
    main()
