"""What the library and the commands share: dataset ids and names, JSON files with one-line errors, Dice read from
nnU-Net's summary.json and its formatting. Library code imports these from here, never from :mod:`nnpp.cli`
(the commands' module: argument types and the error boundary)."""
from __future__ import annotations

import json
import math
import os
import re

from nnpp import NnppError

DATASET_ID_RE = re.compile(r"(?:Dataset|Task)?0*(\d{1,3})(?:_\w+)?")
OWNER_RE = re.compile(r"\.owner(\d+)-([0-9a-f]{8})$")  # the end of a temp folder's name: its owner


def owner_space() -> str:
    """8 hex digits naming where this process's pid means something: the host name and, on Linux, the pid namespace
    (containers that share a host name but not their pids stay apart)."""
    import hashlib
    import socket
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}:{namespace}".encode()).hexdigest()[:8]


def owner_suffix() -> str:
    """The end of a temp folder's name that names this process as its owner (``.ownerPID-SPACE``; see
    :func:`owner_alive`). Use as ``tempfile.mkdtemp(prefix=..., suffix=owner_suffix(), dir=...)``."""
    return f".owner{os.getpid()}-{owner_space()}"


def owner_alive(name: str) -> bool:
    """Whether the owner named at the end of a temp folder's ``name`` may still be writing it: a live process here
    (same host and pid namespace), any process elsewhere (that machine clears its own: a shared folder), or any
    process where this cannot be asked (Windows). Only a dead owner's folder, or one that names no owner (older
    nnpp), is left over from a killed run; two runs sharing a folder never delete each other's work."""
    m = OWNER_RE.search(name)
    if m is None:
        return False
    if m.group(2) != owner_space() or os.name == "nt":
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: alive, another user's
        return True
    return True


def parse_dataset_id(text: str) -> int:
    """``3``, ``003``, ``Dataset003_Liver`` or the v1/MSD forms ``Task003_Liver``, ``Task03_Liver`` -> 3."""
    m = DATASET_ID_RE.fullmatch(str(text).strip())
    if not m:
        raise NnppError(f"'{text}' is not a dataset id; use 3, 003, Dataset003_Name or Task003_Name")
    return int(m.group(1))


def dataset_name(text: str) -> str:
    """Resolve a dataset id to its nnU-Net v2 folder name (DatasetXXX_Name), looking in the nnU-Net folders."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets
    dataset_id = parse_dataset_id(text)
    found = list(find_candidate_datasets(dataset_id))
    if not found:
        raise NnppError(f"unknown dataset '{text}': no Dataset{dataset_id:03d}_* folder in nnUNet_raw, "
                        f"nnUNet_preprocessed or nnUNet_results ({os.environ.get('nnUNet_preprocessed')}); "
                        f"convert and preprocess it first (nnUNetv2_convert_MSD_dataset, "
                        f"nnUNetv2_plan_and_preprocess)")
    if len(found) > 1:
        raise NnppError(f"dataset id {dataset_id} is ambiguous ({', '.join(found)}); pass the full DatasetXXX_Name")
    return str(found[0])


def load_json_file(path: str, what: str, missing_hint: str = "", fix: str = "regenerate it"):
    """``json.load`` with one-line errors: ``{what} not found: {path}[; missing_hint]`` and
    ``{what} is not valid JSON (...); {fix}``."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise NnppError(f"{what} not found: {path}" + (f"; {missing_hint}" if missing_hint else "")) from None
    except json.JSONDecodeError as e:
        raise NnppError(f"{what} is not valid JSON ({path}: {e}); {fix}") from None


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


def format_dice(summary_path: str, dataset_json: dict | None = None) -> str:
    dice = read_dice(summary_path)
    names = label_names(dataset_json)
    lines = [f"Dice {names.get(k, 'class ' + k)} (label {k}): {dice_text(v)}" for k, v in dice.items()]
    valid = [v for v in dice.values() if not math.isnan(v)]
    if valid:  # nnU-Net's foreground_mean: the mean over classes, NaN classes left out
        lines.append(f"Dice mean foreground: {dice_text(sum(valid) / len(valid))}")
    return "\n".join(lines)
