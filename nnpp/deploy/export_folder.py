"""The output folder of nnpp_export: where it goes, what it may replace, and how it comes into place.

A new or empty folder, or a previous export of the same model (``--overwrite``), checked by
:func:`check_output_folder`; everything is written into a temp folder beside it (named after its owner process, so a
killed export's leftovers are known: :func:`remove_stale_temp_folders`) and renamed into place at the end
(:func:`move_into_place`), so a failed export leaves the folder as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from nnpp import NnppError
from nnpp.deploy.ort import METADATA_FILE
from nnpp.file_safety import owner_alive, owner_suffix
from nnpp.model_folder import TrainedModel

TMP_PREFIX = ".nnpp_export_"  # temp folders beside the output: .nnpp_export_[old_]RANDOM.ownerPID-SPACE


def default_output_folder(model_folder: str, depth: int | None = None, precision: str = "fp32",
                          quantizer: str = "ort") -> str:
    """MODEL_FOLDER/onnx[_depthK][_fp16|_int8|_int8_nncf]: every depth, precision and quantizer in a folder of its
    own."""
    name = "onnx" + (f"_depth{depth}" if depth else "") + (f"_{precision}" if precision != "fp32" else "") + \
        ("_nncf" if precision == "int8" and quantizer == "nncf" else "")
    return os.path.join(model_folder, name)


def guard_report_path(out: str) -> str:
    """Where a refused reduced-precision export writes its scores: beside the output folder, never into it."""
    return os.path.abspath(out).rstrip(os.sep) + ".guard.json"


def remove_stale_temp_folders(parent: str) -> list:
    """Temp folders of exports whose process is gone (killed: no cleanup ran; :func:`nnpp.file_safety.owner_alive`);
    returns their paths. Folders of running exports and of other hosts are left alone."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    removed = [os.path.join(parent, d) for d in entries if d.startswith(TMP_PREFIX) and not owner_alive(d)]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def _temp_folder(parent: str, kind: str = "") -> str:
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{kind}", suffix=owner_suffix(), dir=parent)


def temp_folder_beside(out: str, log) -> str:
    """A new temp folder in ``out``'s parent (created if missing), after removing those of killed exports there."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    for stale in remove_stale_temp_folders(parent):
        log(f"[nnpp_export] removed {stale} (left by an export that was killed)")
    return _temp_folder(parent)


def check_output_folder(out: str, model: TrainedModel, overwrite: bool = False, precision: str = "fp32",
                        depth: int | None = None, quantizer: str = "ort") -> bool:
    """``out`` must be a new or empty folder, or (with ``overwrite``) a previous nnpp export of the same model
    folder at the same precision, quantizer and depth (its ``nnpp_onnx.json`` says so: an int8 export never
    silently replaces an fp32 one, nor an NNCF int8 export an ONNX Runtime one). Anything else is one line:
    nnpp_export never writes into a folder it did not make (pointed at a model folder it would replace that model's plans.json and dataset.json).
    Returns whether ``out`` holds a previous export to replace."""
    if not os.path.exists(out):
        return False
    if not os.path.isdir(out):
        raise NnppError(f"-o {out} is a file; give a new or empty folder")
    entries = os.listdir(out)
    if not entries:
        return False
    meta_path = os.path.join(out, METADATA_FILE)
    previous = None
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
    same = isinstance(previous, dict) and previous.get("format") == "nnpp-onnx" and \
        previous.get("source", {}).get("model_folder") == os.path.abspath(model.folder) and \
        previous.get("source", {}).get("configuration") == model.configuration
    if same and (previous.get("precision", "fp32"), previous.get("pruned") and previous.get("depth") or None) != \
            (precision, depth if depth and depth != previous.get("full_depth") else None):
        raise NnppError(f"-o {out} holds a {previous.get('precision', 'fp32')} export of this model (depth "
                        f"{previous.get('depth')}), not {precision} (depth {depth or previous.get('full_depth')}); "
                        f"give another folder (the default is one per precision and depth)")
    if same and precision == "int8" and (previous.get("quantizer") or "ort") != quantizer:
        raise NnppError(f"-o {out} holds an int8 export of this model by --quantizer {previous.get('quantizer') or 'ort'}, "
                        f"not {quantizer}; give another folder (the default is one per quantizer)")
    if same and overwrite:
        return True
    if same:
        raise NnppError(f"-o {out} holds a previous export of this model; add --overwrite to replace it "
                        f"(or give a new folder)")
    what = (f"an export of another model ({previous.get('source', {}).get('model_folder')})" if isinstance(previous, dict)
            else f"{len(entries)} file(s) that are not an nnpp export of this model")
    raise NnppError(f"-o {out} is not empty: it holds {what}; give a new or empty folder (--overwrite only replaces "
                    f"a previous export of the same model)")


def move_into_place(tmp: str, out: str, replace: bool) -> None:
    """``tmp`` becomes ``out`` by rename: a previous export is moved aside first and deleted after, so no file of
    it (e.g. a fold that is not exported again) is ever left beside the new ones."""
    if os.path.isdir(out) and not replace:
        os.rmdir(out)  # empty (checked)
    if not replace:
        os.rename(tmp, out)
        return
    old = _temp_folder(os.path.dirname(os.path.abspath(out)), "old_")
    os.rename(out, os.path.join(old, "previous"))
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(os.path.join(old, "previous"), out)  # put the previous export back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
