"""The student's plans: the dataset's plans with ``features_per_stage // r`` (never below 8), written as a plans file
of its own (``nnUNetPlans_kd_r2``; ``nnUNetPlans_kd_unet_r2`` for a plain U-Net student) that reuses the same
preprocessed data (same ``data_identifier``, spacing, normalisation). The architecture class is written into the
plans, so nnU-Net's predictor and ``nnpp_predict`` rebuild the student from ``plans.json`` + trainer class.

The file is never silently rewritten: distilling another configuration merges it in, and a configuration already
in the file that differs from the derived one (e.g. a batch size set with ``nnpp_change_bs``) is kept and used,
with one line saying so, unless ``--replace_student_plans`` asks to re-derive it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time

from nnpp import NnppError
from nnpp.file_safety import write_atomic

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


def unet_rejects(arch_kwargs: dict) -> list:
    """The keys of ``arch_kwargs`` that nnU-Net's PlainConvUNet does not accept (nnpp's UNet++ options such as
    ``checkpoint_nodes`` and the v1 conversion's ``upsample_bias``/``seg_bias``/``decoder_kernels``)."""
    import inspect

    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    accepted = set(inspect.signature(PlainConvUNet.__init__).parameters)
    return sorted(k for k in arch_kwargs if k not in accepted)


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
    if conf.get("previous_stage"):
        raise NnppError(f"configuration '{configuration}' is a cascade stage (previous_stage "
                        f"'{conf['previous_stage']}': its networks take the previous stage's segmentation as input); "
                        f"nnpp_distill distils single-stage configurations: choose 3d_fullres, 3d_lowres or 2d")
    arch = conf["architecture"]
    kwargs = arch["arch_kwargs"]
    if "n_conv_per_stage" not in kwargs or "features_per_stage" not in kwargs:
        raise NnppError(f"the student is built from PlainConvUNet-style plans (n_conv_per_stage, features_per_stage); "
                        f"{plans.get('plans_name')} describes {arch.get('network_class_name')}: pass -p with nnU-Net's "
                        f"default plans (nnUNetPlans)")
    if student == "unet":
        foreign = unet_rejects(kwargs)
        if foreign:
            raise NnppError(f"--student unet: the plans' arch kwargs {', '.join(foreign)} are options of nnpp's UNet++ "
                            f"that nnU-Net's PlainConvUNet does not take; derive the student from plans without them "
                            f"(-p nnUNetPlans) or distil into --student unetpp")
    kwargs["features_per_stage"] = reduce_features(list(kwargs["features_per_stage"]), r)
    arch["network_class_name"] = STUDENTS[student]
    out = copy.deepcopy(plans)
    out["plans_name"] = student_plans_name(source_plans, r, student)
    out["configurations"] = {configuration: conf}
    out["nnpp_kd"] = {"source_plans": source_plans, "r": r, "student": student}
    return out


def _differences(a: dict, b: dict, prefix: str = "") -> list:
    """Dotted keys whose values differ between two configurations (JSON-normalised)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif json.dumps(va, sort_keys=True) != json.dumps(vb, sort_keys=True):
            out.append(f"{prefix}{k}")
    return out


def merge_student_plans(existing: dict | None, derived: dict, configuration: str,
                        replace: bool = False) -> tuple[dict, str | None]:
    """The student plans to use: ``existing`` (the file's content, or None) with ``derived``'s ``configuration``
    merged in. Every other configuration of ``existing`` stays as it is. An existing ``configuration`` that differs
    from the derived one is kept (the user may have edited it, e.g. its batch size with ``nnpp_change_bs``) unless
    ``replace``. Returns (plans, one-line note or None)."""
    if existing is None:
        return copy.deepcopy(derived), None
    plans = copy.deepcopy(existing)
    plans.setdefault("configurations", {})
    for key, value in derived.items():  # top-level keys the file lacks (never overwrites the file's own)
        if key != "configurations":
            plans.setdefault(key, copy.deepcopy(value))
    new = derived["configurations"][configuration]
    old = plans["configurations"].get(configuration)
    note = None
    if old is None:
        plans["configurations"][configuration] = copy.deepcopy(new)
    elif json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
        diff = _differences(old, new)
        shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        if replace:
            plans["configurations"][configuration] = copy.deepcopy(new)
            note = (f"configuration '{configuration}' re-derived from the source plans (--replace_student_plans; "
                    f"it differed in {shown})")
        else:
            note = (f"configuration '{configuration}' kept as it is in the file (differs from what -r/--student "
                    f"derive in {shown}); --replace_student_plans re-derives it")
    return plans, note


@contextlib.contextmanager
def _folder_lock(folder: str):
    """An exclusive ``flock`` on ``folder`` itself (no lock file left behind), so that runs writing student plans
    into the same preprocessed folder at the same time (e.g. two configurations distilled at once) read, merge
    and write one after the other instead of losing each other's configuration. No-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_plans(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise NnppError(f"student plans {path} are not valid JSON ({e}); repair or remove the file") from None


def write_student_plans(preprocessed_dataset_dir: str, source_plans: str, configuration: str, r: int,
                        student: str = "unetpp", replace: bool = False, log=print, writer: bool = True,
                        wait_s: float = 600.0) -> str:
    """Merge the student's ``configuration`` into the student plans file next to the source plans (created if
    absent; other configurations, and an existing differing ``configuration`` unless ``replace``, are kept; see
    :func:`merge_student_plans`), write it atomically only if its content changed, and return its identifier.
    ``log`` gets one line when an existing configuration is kept or replaced. Read, merge and write happen under
    an exclusive lock on the folder (concurrent runs do not lose each other's configurations).

    Under DDP only one rank writes (``writer=True``, rank 0): the others (``writer=False``) write nothing and wait,
    up to ``wait_s`` seconds, until the file holds what rank 0 writes."""
    src = os.path.join(preprocessed_dataset_dir, source_plans + ".json")
    try:
        with open(src) as f:
            plans = json.load(f)
    except FileNotFoundError:
        raise NnppError(f"plans '{source_plans}' not found: {src} (run nnUNetv2_plan_and_preprocess)") from None
    except json.JSONDecodeError as e:
        raise NnppError(f"plans {src} are not valid JSON ({e})") from None
    derived = make_student_plans(plans, configuration, r, student, source_plans)
    name = derived["plans_name"]
    path = os.path.join(preprocessed_dataset_dir, name + ".json")
    deadline = time.monotonic() + wait_s
    while True:
        with _folder_lock(preprocessed_dataset_dir):
            existing = _read_plans(path)
            merged, note = merge_student_plans(existing, derived, configuration, replace)
            if writer:
                if note and log is not None:
                    log(f"[nnpp_distill] student plans {name}: {note}")
                if merged != existing:
                    write_atomic(path, json.dumps(merged, indent=2, sort_keys=False))
                return name
        if merged == existing:  # rank 0 has written it
            return name
        if time.monotonic() > deadline:
            raise NnppError(f"student plans {path}: waited {wait_s:.0f} s for rank 0 to write configuration "
                            f"'{configuration}'; is rank 0 running with the same -p/-r/--student?")
        time.sleep(0.5)
