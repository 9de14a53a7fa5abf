"""The student's plans: the dataset's plans with ``features_per_stage // r`` (never below 8), written as a plans file
of its own (``nnUNetPlans_kd_r2``; ``nnUNetPlans_kd_unet_r2`` for a plain U-Net student) that reuses the same
preprocessed data (same ``data_identifier``, spacing, normalisation). The architecture class is written into the
plans, so nnU-Net's predictor and ``nnpp_predict`` rebuild the student from ``plans.json`` + trainer class.
"""
from __future__ import annotations

import copy
import json
import os

from nnpp import NnppError

STUDENTS = {
    "unetpp": "nnpp.nets.unetpp.UNetPlusPlus",
    "unet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
}
MIN_FEATURES = 8


def student_plans_name(source_plans: str, r: int, student: str = "unetpp") -> str:
    return f"{source_plans}_kd_r{r}" if student == "unetpp" else f"{source_plans}_kd_{student}_r{r}"


def reduce_features(features: list, r: int) -> list:
    """``f // r`` per stage, never below 8 (nor above f: a stage already narrower than 8 keeps its width)."""
    return [min(f, max(MIN_FEATURES, f // r)) for f in features]


def make_student_plans(plans: dict, configuration: str, r: int, student: str = "unetpp",
                       source_plans: str = "nnUNetPlans") -> dict:
    """A copy of ``plans`` holding the student's ``configuration`` only (resolved, inheritance flattened) with
    narrower stages and the student's architecture class; ``plans['nnpp_kd']`` records where it came from."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if r < 1:
        raise NnppError(f"-r {r}: the channel reduction must be an integer >= 1 (2 halves every stage)")
    if student not in STUDENTS:
        raise NnppError(f"--student {student}: choose one of {', '.join(STUDENTS)}")
    if configuration not in plans.get("configurations", {}):
        raise NnppError(f"configuration '{configuration}' is not in the plans ({', '.join(plans.get('configurations', {}))})")
    conf = copy.deepcopy(PlansManager(plans).get_configuration(configuration).configuration)
    conf.pop("inherits_from", None)
    arch = conf["architecture"]
    kwargs = arch["arch_kwargs"]
    if "n_conv_per_stage" not in kwargs or "features_per_stage" not in kwargs:
        raise NnppError(f"the student is built from PlainConvUNet-style plans (n_conv_per_stage, features_per_stage); "
                        f"{plans.get('plans_name')} describes {arch.get('network_class_name')}: pass -p with nnU-Net's "
                        f"default plans (nnUNetPlans)")
    kwargs["features_per_stage"] = reduce_features(list(kwargs["features_per_stage"]), r)
    arch["network_class_name"] = STUDENTS[student]
    out = copy.deepcopy(plans)
    out["plans_name"] = student_plans_name(source_plans, r, student)
    out["configurations"] = {configuration: conf}
    out["nnpp_kd"] = {"source_plans": source_plans, "r": r, "student": student}
    return out


def write_student_plans(preprocessed_dataset_dir: str, source_plans: str, configuration: str, r: int,
                        student: str = "unetpp") -> str:
    """Write (atomically; unchanged files are left alone) the student plans next to the source plans and return
    their identifier."""
    src = os.path.join(preprocessed_dataset_dir, source_plans + ".json")
    try:
        with open(src) as f:
            plans = json.load(f)
    except FileNotFoundError:
        raise NnppError(f"plans '{source_plans}' not found: {src} (run nnUNetv2_plan_and_preprocess)") from None
    except json.JSONDecodeError as e:
        raise NnppError(f"plans {src} are not valid JSON ({e})") from None
    student_plans = make_student_plans(plans, configuration, r, student, source_plans)
    name = student_plans["plans_name"]
    path = os.path.join(preprocessed_dataset_dir, name + ".json")
    text = json.dumps(student_plans, indent=2, sort_keys=False)
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return name
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return name
