"""ONNX export of a trained model folder, checked against torch before it is written.

One ``fold_F.onnx`` per fold, each built the predictor's way (:func:`nnpp.model_folder.load_trained_model`:
plans.json + trainer class, weights loaded strictly), deep supervision off, optionally pruned to depth k.
Input ``input`` (batch, C, *patch): static spatial size = the plans' patch (nnU-Net's predictor only feeds
patch-sized tiles), dynamic batch. Output ``logits`` (batch, classes, *patch), float32.

Exporter: torch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``) by
default; the TorchScript one (``dynamo=False``, deprecated in torch) on request. Both were checked on 3D UNet++
and nnU-Net's U-Net (Conv, ConvTranspose, InstanceNormalization, LeakyRelu, Concat); the exported op set is
checked anyway: a training-mode BatchNormalization (what instance norm has been lowered to before, and what
ONNX Runtime's CUDA provider rejects) or an op outside the standard ONNX domain fails the export.

Beside the models: ``plans.json``, ``dataset.json`` (copies from the model folder) and ``nnpp_onnx.json``
(patch size, channels, classes, mirroring axes, depth and how it was obtained, opset, exporter, op set, source checkpoints with their
SHA-256, each fold's parity figures and the ``.onnx`` files' SHA-256), so inference re-types nothing. All of it is
written into a temp folder and renamed into place once every fold passed (:mod:`nnpp.deploy.export_folder`).

Reduced precision (``precision`` fp16 / int8, :func:`_reduced`): the checked fp32 model is converted / quantized,
kept only past the Dice guard, and its latency per patch is measured against fp32 on this machine (printed, in the
metadata, a warning when it is slower). ``quantizer`` ``ort`` (default): ONNX Runtime's QDQ ``fold_F.onnx``.
``nncf``: NNCF's int8 for OpenVINO, written as OpenVINO IR ``fold_F.xml`` + ``fold_F.bin`` instead of the
``.onnx`` (both with their SHA-256; metadata ``"runtime": "openvino"``), which only ``--ort_provider openvino`` runs.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import warnings

import numpy as np
import torch

from nnpp import NnppError
from nnpp.model_folder import TrainedModel, check_depth, set_depth, sha256_file
from nnpp.deploy.export_folder import check_output_folder, guard_report_path, move_into_place, temp_folder_beside
from nnpp.deploy.ort import METADATA_FILE, make_session, require

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
DEFAULT_TOL = 1e-4
PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZERS = ("ort", "nncf")  # int8 by ONNX Runtime's quantize_static (QDQ .onnx) or NNCF (OpenVINO IR)
DEFAULT_LATENCY_RUNS = 5  # timed forward passes per model (after 2 warm-up passes) for the fp32 vs reduced latency
DEFAULT_MAX_DICE_DROP = 0.01
DEFAULT_CALIB_TILES = 32
DEFAULT_GUARD_CASES = 8  # validation cases the Dice guard scores (the first in sorted order)


INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_network(network: torch.nn.Module, path: str, num_input_channels: int, patch_size, opset: int = DEFAULT_OPSET,
                   exporter: str = "dynamo") -> None:
    """Write ``network`` (eval mode, single-tensor output) to ``path`` as one self-contained ``.onnx`` file
    (no external data), input (batch, C, *patch) with a dynamic batch axis."""
    if exporter not in EXPORTERS:
        raise NnppError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo":
        require("onnxscript")
    network = network.eval()
    x = torch.randn(2, num_input_channels, *patch_size)  # batch 2: a batch of 1 could be specialised to a constant
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; dynamo's fallbacks
        try:
            if exporter == "dynamo":
                torch.onnx.export(network, (x,), path, dynamo=True, external_data=False, verbose=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), **kwargs)
            else:
                torch.onnx.export(network, (x,), path, dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs)
        except Exception as e:
            raise NnppError(f"torch.onnx.export ({exporter}, opset {opset}) failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}; try --exporter "
                            f"{'torchscript' if exporter == 'dynamo' else 'dynamo'} or another --opset") from None


def check_ops(path: str) -> list:
    """``onnx.checker`` on the file, then the op set: returns the sorted op types; raises NnppError for a
    training-mode BatchNormalization or an op outside the standard ONNX domain."""
    onnx = require("onnx")
    model = onnx.load(path)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise NnppError(f"the exported model {path} is not valid ONNX ({str(e).splitlines()[0]})") from None
    ops, bad = set(), []
    for node in model.graph.node:
        ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
        if node.domain not in ("", "ai.onnx"):
            bad.append(f"{node.domain}::{node.op_type} (non-standard domain)")
        if node.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in node.attribute):
            bad.append(f"{node.name or 'BatchNormalization'} in training mode")
    if bad:
        raise NnppError(f"the exported graph has ops ONNX Runtime cannot run as inference: {', '.join(sorted(set(bad))[:3])}; "
                        f"try the other --exporter")
    return sorted(ops)


def parity(network: torch.nn.Module, path: str, num_input_channels: int, patch_size, seed: int = 0,
           batch: int = 2) -> dict:
    """Torch (fp32, CPU, eval) vs ONNX Runtime (CPU provider) on one seeded N(0, 1) input of ``batch`` x patch.

    Returns ``max_abs_diff`` (max over all logits of |ort - torch|), ``max_abs_logit`` (max |torch logit|, the
    scale the difference is judged against) and ``argmax_agreement`` (fraction of voxels whose arg-max class is
    the same in both, over batch and voxels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_input_channels, *patch_size, generator=g)
    with torch.no_grad():
        ref = network.eval().to("cpu")(x).float().numpy()
    session = make_session(path, "cpu")
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if out.shape != ref.shape:
        raise NnppError(f"{path}: ONNX Runtime returns shape {out.shape}, torch {ref.shape}")
    return {"max_abs_diff": float(np.abs(out - ref).max()), "max_abs_logit": float(np.abs(ref).max()),
            "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).mean()), "input_shape": list(x.shape),
            "seed": seed}


def parity_ok(result: dict, tol: float) -> bool:
    """Accept when max |ort - torch| <= tol * max(1, max |torch logit|) (a relative bound for large logits)."""
    return result["max_abs_diff"] <= tol * max(1.0, result["max_abs_logit"])


def _write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)


def _reduced(model: TrainedModel, fold, path: str, precision: str, max_dice_drop: float, calib_tiles: int, out: str,
             log, guard_cases: int = DEFAULT_GUARD_CASES, quantizer: str = "ort", nncf_preset: str | None = None,
             latency_runs: int = DEFAULT_LATENCY_RUNS) -> dict:
    """Turn the checked fp32 ``path`` into ``precision`` (int8: static quantization calibrated on the fold's
    training tiles, by ONNX Runtime or, ``quantizer`` nncf, by NNCF for OpenVINO; fp16: converted weights and
    arithmetic) after the Dice guard on the fold's validation cases (:mod:`nnpp.deploy.quantize`): in place, or
    for nncf as ``fold_F.xml`` + ``.bin`` beside ``path``, which is then removed. Then fp32 vs reduced latency per
    patch on this machine (:func:`_latency`, ``latency_runs`` 0: not measured). Returns the figures for the
    metadata, with ``files``: the model file(s) now standing for ``path``."""
    from nnpp.deploy import quantize as q
    from nnpp.deploy.ort import OpenVinoSession
    qpath = path + f".{precision}.onnx"
    extra = {}
    nncf = precision == "int8" and quantizer == "nncf"
    if precision == "int8":
        reader = q.TileReader(model, fold, INPUT_NAME, calib_tiles)
        log(f"[nnpp_export] fold {fold}: int8 calibration on {len(reader.tiles)} tiles of {len(reader.cases)} "
            f"training case(s){' (NNCF, OpenVINO IR)' if nncf else ''} ...")
        if nncf:
            qpath = os.path.splitext(path)[0] + ".xml"
            settings = q.quantize_nncf(path, qpath, reader, nncf_preset or q.NNCF_PRESET)
        else:
            settings = q.quantize_int8(path, qpath, reader)
        extra = {"calibration_tiles": len(reader.tiles), "calibration_cases": reader.cases}
    else:
        settings = q.convert_fp16(path, qpath)
    reduced = OpenVinoSession(qpath) if nncf else make_session(qpath, "cpu")
    fp32 = make_session(path, "cpu")
    scores = q.score(model, fold, {"fp32": fp32, precision: reduced}, max_cases=guard_cases)
    drop = q.dice_drop(scores, "fp32", precision)
    if all(d is None for d in drop.values()):
        raise NnppError(f"fold {fold}: no label occurs in the {len(scores['cases'])} validation case(s), so the "
                        f"{precision} model's Dice cannot be checked against fp32; export fp32")
    worst_label, worst = max(((lab, d) for lab, d in drop.items() if d is not None), key=lambda t: t[1],
                             default=(None, 0.0))
    text = ", ".join(f"label {lab} {scores['dice']['fp32'][lab]:.4f} -> {scores['dice'][precision][lab]:.4f}"
                     for lab in drop if drop[lab] is not None)
    log(f"[nnpp_export] fold {fold}: Dice fp32 -> {precision} on {len(scores['cases'])} validation case(s): "
        f"{text or 'no labels'}; masks agree on {100 * scores['agreement']:.3f}% of voxels; largest drop {worst:.4f} "
        f"(--max_dice_drop {max_dice_drop:g}) -> {'OK' if worst <= max_dice_drop else 'REFUSED'}")
    if worst > max_dice_drop:
        report = guard_report_path(out)
        _write_json({"refused": True, "fold": fold, "precision": precision, "max_dice_drop": max_dice_drop,
                     "worst_label": worst_label, "dice_drop": drop, "dice_fp32": scores["dice"]["fp32"],
                     f"dice_{precision}": scores["dice"][precision], "mask_agreement": scores["agreement"],
                     "score_cases": scores["cases"], **settings, **extra}, report + ".tmp")
        os.replace(report + ".tmp", report)
        raise NnppError(f"fold {fold}: {precision} lowers the Dice of label {worst_label} by {worst:.4f} (> "
                        f"--max_dice_drop {max_dice_drop:g}); nothing was written to {out} (scores in {report}): "
                        f"{'try --nncf_preset mixed or ' if nncf and settings.get('preset') != 'mixed' else ''}"
                        f"export fp32")
    latency = _latency(model, fold, path, qpath, precision, nncf, (fp32, reduced), latency_runs, log)
    del fp32, reduced
    if nncf:
        os.remove(path)  # the IR stands for it
        files = [os.path.basename(qpath), os.path.basename(os.path.splitext(qpath)[0] + ".bin")]
    else:
        os.replace(qpath, path)
        files = [os.path.basename(path)]
    runtime = "OpenVINO (CPU)" if nncf else "ONNX Runtime's CPU provider"
    return {**settings, **extra, "score_cases": scores["cases"], "dice_fp32": scores["dice"]["fp32"],
            f"dice_{precision}": scores["dice"][precision], "dice_drop": drop, "mask_agreement": scores["agreement"],
            "max_dice_drop": max_dice_drop, "guard_cases": guard_cases, "latency": latency, "files": files,
            "scored_as": "nnU-Net's predictor (Gaussian sliding window, mirroring) on the preprocessed validation "
                         "cases, arg-max vs the preprocessed labels; fp32 with ONNX Runtime's CPU provider, "
                         f"{precision} with {runtime}"}


def _latency(model: TrainedModel, fold, path: str, qpath: str, precision: str, nncf: bool, sessions: tuple,
             runs: int, log) -> dict | None:
    """fp32 ``path`` vs reduced ``qpath``: latency per patch (batch 1, the plans' patch; median of ``runs`` after 2
    warm-up passes, :func:`nnpp.deploy.quantize.measure_latency`) with the backend the reduced model is meant for:
    ONNX Runtime's CPU provider for a QDQ int8 ``.onnx`` (``sessions``, the guard's, are reused), OpenVINO for an
    NNCF IR (the fp32 ``.onnx`` in OpenVINO too), ONNX Runtime's CUDA provider for fp16 (not measured without it).
    Each runtime's default threads. Prints one line, and a warning when the reduced model is slower."""
    from nnpp.deploy import quantize as q
    from nnpp.deploy.ort import OpenVinoSession
    from nnpp.device import machine_info
    if not runs:
        return None
    if precision == "fp16":
        ort = require("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            log(f"[nnpp_export] fold {fold}: fp16 latency not measured (fp16 is for GPU providers; this onnxruntime "
                f"has no CUDA)")
            return None
        backend, pair = "ONNX Runtime (CUDA)", (make_session(path, "cuda"), make_session(qpath, "cuda"))
    elif nncf:
        backend, pair = "OpenVINO (CPU)", (OpenVinoSession(path), sessions[1])
    else:
        backend, pair = "ONNX Runtime (CPU)", sessions
    shape = (1, model.num_input_channels, *model.patch_size)
    ms = q.measure_latency({"fp32": pair[0], precision: pair[1]}, shape, warmup=2, runs=runs)
    speedup = ms["fp32"] / ms[precision]
    log(f"[nnpp_export] fold {fold}: latency per patch fp32 {ms['fp32']:.1f} ms, {precision} {ms[precision]:.1f} ms "
        f"({speedup:.2f}x) with {backend} on this machine")
    if speedup < 1:
        log(f"[nnpp_export] warning: fold {fold}: {precision} is slower than fp32 with {backend} on this machine "
            f"({ms[precision]:.1f} vs {ms['fp32']:.1f} ms per patch); fp32 serves this machine better"
            + ("; with OpenVINO try --quantizer nncf" if precision == "int8" and not nncf else ""))
    return {"backend": backend, "fp32_ms": ms["fp32"], f"{precision}_ms": ms[precision], "speedup": speedup,
            "slower": speedup < 1, "input_shape": list(shape), "warmup": 2, "runs": runs, "statistic": "median",
            "threads": "the runtime's default", "machine": machine_info()}


def check_quantizer(precision: str, quantizer: str, nncf_preset: str | None = None) -> None:
    """One line for a precision / quantizer / NNCF preset nnpp cannot make, or a quantizer whose packages are missing
    (NNCF needs openvino and nncf: the [openvino] extra)."""
    if nncf_preset and quantizer != "nncf":
        raise NnppError("--nncf_preset is NNCF's: use it with --precision int8 --quantizer nncf")
    if precision not in PRECISIONS:
        raise NnppError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if quantizer not in QUANTIZERS:
        raise NnppError(f"--quantizer {quantizer}: choose one of {', '.join(QUANTIZERS)}")
    if quantizer == "nncf":
        if precision != "int8":
            raise NnppError(f"--quantizer nncf makes int8 models for OpenVINO: use it with --precision int8 (not "
                            f"{precision})")
        require("openvino", extra="openvino")
        require("nncf", extra="openvino")


def export_model(model: TrainedModel, out: str, depth: int | None = None, opset: int = DEFAULT_OPSET,
                 exporter: str = "dynamo", tol: float = DEFAULT_TOL, source: dict | None = None, log=print,
                 overwrite: bool = False, precision: str = "fp32", max_dice_drop: float = DEFAULT_MAX_DICE_DROP,
                 calib_tiles: int = DEFAULT_CALIB_TILES, guard_cases: int = DEFAULT_GUARD_CASES,
                 quantizer: str = "ort", nncf_preset: str | None = None, latency_runs: int = DEFAULT_LATENCY_RUNS,
                 allow_untrained_depth: bool = False) -> dict:
    """Export every fold of ``model`` to ``out`` (``fold_F.onnx``, ``plans.json``, ``dataset.json``,
    ``nnpp_onnx.json``), each checked by :func:`check_ops` and :func:`parity` (fails above ``tol``).
    ``out`` must be new or empty, or a previous export of this model with ``overwrite``
    (:func:`nnpp.deploy.export_folder.check_output_folder`). ``precision`` int8 / fp16: each fold's checked fp32 model is quantized (ONNX
    Runtime's static quantization calibrated on ``calib_tiles`` training tiles; ``quantizer`` nncf: NNCF's for
    OpenVINO, written as IR ``fold_F.xml`` + ``.bin``) / converted to fp16, kept only when no label's validation Dice
    drops by more than ``max_dice_drop``, then timed against fp32 (``latency_runs`` runs; :func:`_reduced`). A depth
    whose head never trained is refused unless ``allow_untrained_depth`` (:func:`nnpp.model_folder.check_depth`; how
    the depth was obtained is recorded as ``depth_from``). Everything is written to a temporary folder beside ``out`` and renamed into
    place only when all folds pass; a failed export leaves ``out`` as it was. Returns the metadata."""
    ort = require("onnxruntime")
    onnx = require("onnx")
    check_quantizer(precision, quantizer, nncf_preset)
    replace = check_output_folder(out, model, overwrite, precision, depth, quantizer)
    tmp = temp_folder_beside(out, log)
    try:
        folds, ops, full_depth, depth_from = [], set(), None, None
        for i, fold in enumerate(model.folds):
            network, full_depth = _fold_network(model, i, depth)
            if i == 0:
                depth_from = check_depth(model, depth, full_depth, allow_untrained_depth,
                                         lambda line: log(f"[nnpp_export] {line}"))
            path = os.path.join(tmp, f"fold_{fold}.onnx")
            ops |= _export_fold(network, model, fold, path, depth, opset, exporter, log)
            entry = {"fold": fold, "file": os.path.basename(path), "checkpoint": os.path.abspath(model.checkpoints[i]),
                     "checkpoint_sha256": model.checkpoint_sha256[i],
                     "parity": _checked_parity(network, model, fold, path, tol, exporter, out, log)}
            if precision != "fp32":  # the fp32 model passed parity; the reduced one must pass the Dice guard
                _take_reduced(entry, tmp, _reduced(model, fold, path, precision, max_dice_drop, calib_tiles, out, log,
                                                   guard_cases, quantizer, nncf_preset, latency_runs))
            entry["sha256"] = sha256_file(os.path.join(tmp, entry["file"]))
            folds.append(entry)
        meta = _metadata(model, folds, ops, source, depth, full_depth, opset, exporter, tol, precision, quantizer,
                         _versions(ort, onnx, quantizer == "nncf"), depth_from)
        # activations per sample of the exported network (nnU-Net's count, elements at the patch): what the
        # predictor's memory rule counts for --onnx (nnpp.deploy.ort.exported_feature_map_size)
        meta["feature_map_size"] = int(network.compute_conv_feature_map_size(model.patch_size)) \
            if hasattr(network, "compute_conv_feature_map_size") else None
        _write_json(model.plans, os.path.join(tmp, "plans.json"))
        _write_json(model.dataset_json, os.path.join(tmp, "dataset.json"))
        _write_json(meta, os.path.join(tmp, METADATA_FILE))
        check_output_folder(out, model, overwrite, precision, depth, quantizer)  # unchanged while we exported
        move_into_place(tmp, out, replace)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fold_network(model: TrainedModel, i: int, depth: int | None) -> tuple:
    """The network of the model's ``i``-th fold pruned to ``depth``, and its full depth (None for a network that
    cannot be pruned)."""
    network = model.build_network(i)
    full_depth = getattr(network, "depth", None) if hasattr(network, "prune_depth") else None
    set_depth(network, depth)
    return network, full_depth


def _export_fold(network, model: TrainedModel, fold, path: str, depth: int | None, opset: int, exporter: str,
                 log) -> set:
    """``network`` written to ``path`` (:func:`export_network`); returns its op set (:func:`check_ops`)."""
    log(f"[nnpp_export] fold {fold}: exporting ({exporter}, opset {opset}"
        f"{f', depth {depth}' if depth else ''}) ...")
    export_network(network, path, model.num_input_channels, model.patch_size, opset, exporter)
    return set(check_ops(path))


def _checked_parity(network, model: TrainedModel, fold, path: str, tol: float, exporter: str, out: str, log) -> dict:
    """:func:`parity` of ``path`` against ``network``, logged; one line (nothing written to ``out``) above ``tol``."""
    check = parity(network, path, model.num_input_channels, model.patch_size)
    ok = parity_ok(check, tol)
    log(f"[nnpp_export] fold {fold}: parity ONNX Runtime vs torch on {'x'.join(map(str, check['input_shape']))}: "
        f"max abs diff {check['max_abs_diff']:.3g} (max |logit| {check['max_abs_logit']:.3g}, tolerance "
        f"{tol:g} x max(1, max |logit|)), argmax agreement {100 * check['argmax_agreement']:.4f}% "
        f"-> {'OK' if ok else 'FAILED'}")
    if not ok:
        raise NnppError(f"fold {fold}: ONNX Runtime differs from torch by {check['max_abs_diff']:.3g} "
                        f"(> {tol:g} x max(1, {check['max_abs_logit']:.3g})); nothing was written to {out}: "
                        f"try --exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'} or another --opset")
    return check


def _take_reduced(entry: dict, tmp: str, quantization: dict) -> None:
    """The fold's metadata ``entry`` names the reduced model (:func:`_reduced`'s figures) instead of the fp32 one."""
    entry["quantization"] = quantization
    entry["latency"] = quantization.pop("latency")
    files = quantization.pop("files")
    entry["file"] = files[0]
    if len(files) > 1:  # OpenVINO IR: the .xml and its weights, each checked on load
        entry["weights_file"] = files[1]
        entry["weights_sha256"] = sha256_file(os.path.join(tmp, files[1]))


def _versions(ort, onnx, nncf: bool) -> dict:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            **({"openvino": require("openvino").__version__, "nncf": require("nncf").__version__} if nncf else {})}


def _metadata(model: TrainedModel, folds: list, ops: set, source: dict | None, depth: int | None,
              full_depth: int | None, opset: int, exporter: str, tol: float, precision: str, quantizer: str,
              versions: dict, depth_from: str) -> dict:
    """``nnpp_onnx.json``: what inference reads instead of re-typing it, and how the models were made and checked."""
    mirror = model.inference_allowed_mirroring_axes
    return {
        "format": "nnpp-onnx", "version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"model_folder": os.path.abspath(model.folder), "trainer": model.trainer_name,
                   "configuration": model.configuration, "checkpoint_name": model.checkpoint_name,
                   **(source or {})},
        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
        "input_shape": ["batch", model.num_input_channels, *model.patch_size], "patch_size": model.patch_size,
        "num_input_channels": model.num_input_channels, "num_classes": model.num_output_channels,
        "labels": model.dataset_json.get("labels"),
        "inference_allowed_mirroring_axes": list(mirror) if mirror is not None else None,
        "depth": depth or full_depth, "full_depth": full_depth, "pruned": bool(depth and depth != full_depth),
        "depth_from": depth_from,
        "opset": opset, "exporter": exporter, "ops": sorted(ops), "parity_tolerance": tol, "precision": precision,
        "quantizer": quantizer if precision == "int8" else None,
        "runtime": "openvino" if quantizer == "nncf" else "onnxruntime",
        "versions": versions,
        "folds": folds,
    }
