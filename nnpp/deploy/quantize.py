"""Reduced-precision exports (int8: ONNX Runtime's post-training static quantization or NNCF's for OpenVINO, both
calibrated on the model's own training data; fp16 for GPU providers), shipped only with their Dice measured against
fp32 and a guard, and their latency measured against fp32 on the exporting machine.

* **Calibration** (:class:`TileReader`, an ``onnxruntime.quantization.CalibrationDataReader``): patch-sized tiles
  cropped at seeded random positions from the fold's *training* cases, preprocessed as nnU-Net trained on them
  (``nnUNet_preprocessed/DATASET/DATA_IDENTIFIER``, the split in ``splits_final.json``).
* **Quantization** (:func:`quantize_int8`): ``onnxruntime.quantization.quantize_static``, QDQ format, int8 weights
  per output channel, uint8 activations, MinMax calibration; convolutions only (normalisation stays fp32), after ONNX Runtime's ``quant_pre_process``.
* **NNCF** (:func:`quantize_nncf`, ``--quantizer nncf``): ``nncf.quantize`` on the OpenVINO model read from the
  fp32 ``.onnx``, OpenVINO's CPU quantization rules (``target_device=CPU``, preset :data:`NNCF_PRESET`), the same
  tiles as calibration set; saved as OpenVINO IR (``.xml`` + ``.bin``, fp32 weights where not int8), which only
  OpenVINO runs (``nnpp_predict --ort_provider openvino``).
* **Score** (:func:`score`): fp32 and int8 sessions each inside nnU-Net's predictor (:class:`nnppPredictor`,
  Gaussian sliding window, mirroring) on the fold's *validation* cases, preprocessed; arg-max masks at the
  preprocessed resolution against the preprocessed labels: Dice per foreground label for both, the drop
  (fp32 - int8) and the share of voxels where the masks agree. The export refuses a drop beyond ``max_dice_drop``.
  ``sessions`` are anything with ``get_inputs()`` / ``run()``: ONNX Runtime's, or :class:`OpenVinoSession` for IR.
* **Latency** (:func:`measure_latency`): fp32 and the reduced model on the backend the reduced one is meant for,
  batch 1 at the patch size, median of a few interleaved runs after warm-up.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from nnpp import NnppError
from nnpp.deploy.ort import require


QUANTIZED_OPS = ("Conv", "ConvTranspose")  # instance normalisation and the rest stay fp32


def _preprocessed(model) -> tuple[str, dict]:
    """(folder of the configuration's preprocessed cases, splits_final.json) for ``model``."""
    root = os.environ.get("nnUNet_preprocessed")
    name = model.plans.get("dataset_name")
    if not root or not name:
        raise NnppError("int8 calibration needs the model's preprocessed training data: set nnUNet_preprocessed")
    folder = os.path.join(root, name, model.configuration_manager.data_identifier)
    splits_path = os.path.join(root, name, "splits_final.json")
    if not os.path.isdir(folder) or not os.path.isfile(splits_path):
        raise NnppError(f"int8 calibration needs {folder} and {splits_path} (the data the model was trained on); "
                        f"run nnpp_plan_and_preprocess for {name}, or export fp32")
    with open(splits_path) as f:
        return folder, json.load(f)


def _cases(model, fold, part: str) -> tuple[object, list]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder, splits = _preprocessed(model)
    index = int(fold) if str(fold) != "all" else None
    if index is None or index >= len(splits):
        raise NnppError(f"reduced-precision export of fold {fold}: splits_final.json has no such fold to calibrate "
                        f"and score on (fold 'all' has no validation cases); export fp32")
    fold = index
    keys = sorted(splits[fold][part])
    return infer_dataset_class(folder)(folder, keys), keys


class TileReader:
    """``CalibrationDataReader`` over ``n_tiles`` patch-sized tiles from the fold's training cases (round robin over
    the cases, seeded random crop positions; cases smaller than the patch are zero-padded as the predictor pads)."""

    def __init__(self, model, fold, input_name: str, n_tiles: int = 32, seed: int = 0):
        dataset, keys = _cases(model, fold, "train")
        rng = np.random.default_rng(seed)
        patch = model.patch_size
        self.cases = keys
        self.tiles = [None] * n_tiles
        for c, k in enumerate(keys[:n_tiles]):  # case by case: only the tiles stay in memory, never the cases
            img = np.asarray(dataset.load_case(k)[0][:], dtype=np.float32)
            spatial = img.shape[-len(patch):]
            pad = [(0, 0)] * (img.ndim - len(patch)) + [(0, max(0, p - s)) for p, s in zip(patch, spatial)]
            img = np.pad(img, pad) if any(p[1] for p in pad) else img
            for i in range(c, n_tiles, len(keys)):  # tile i comes from case i % cases (round robin)
                sl = img[:, rng.integers(img.shape[1])] if len(patch) == img.ndim - 2 else img  # 2D: one slice
                starts = [rng.integers(0, s - p + 1) for s, p in zip(sl.shape[1:], patch)]
                tile = sl[(slice(None), *[slice(a, a + p) for a, p in zip(starts, patch)])]
                self.tiles[i] = {input_name: np.array(tile[None], dtype=np.float32, order="C")}  # a copy: img is freed
            del img
        self._it = iter(self.tiles)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.tiles)


def quantize_int8(fp32_path: str, out_path: str, reader) -> dict:
    """``quantize_static`` of ``fp32_path`` into ``out_path`` (QDQ, per-channel int8 weights, uint8 activations,
    MinMax); returns the settings for the metadata."""
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

    prepared = out_path + ".pre.onnx"
    try:
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(QUANTIZED_OPS))
    except Exception as e:
        raise NnppError(f"ONNX Runtime's quantize_static failed on {os.path.basename(fp32_path)} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); export fp32") from None
    finally:
        for f in (prepared, prepared + ".data"):
            if os.path.exists(f):
                os.remove(f)
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8 per channel",
            "activations": "uint8", "calibration": "MinMax", "quantized_ops": list(QUANTIZED_OPS)}


# symmetric int8 activations and weights. Demo model (2-core AMD EPYC, AVX512 VNNI, OpenVINO 2026.4): performance
# 3.44x OpenVINO fp32 per patch, liver Dice -0.0011 on the guard's cases; mixed 1.75x, -0.00002 (within the guard).
NNCF_PRESET = "performance"


def quantize_nncf(fp32_path: str, xml_path: str, reader, preset: str = NNCF_PRESET) -> dict:
    """NNCF post-training quantization for OpenVINO's CPU plugin: ``openvino.Core().read_model(fp32_path)``,
    ``nncf.quantize(model, nncf.Dataset(tiles), preset, target_device=CPU, subset_size=len(tiles))``, saved as IR
    ``xml_path`` + its ``.bin`` (``compress_to_fp16=False``: the weights NNCF leaves in float stay fp32).
    ``preset``: ``performance`` (symmetric activations: what OpenVINO's CPU int8 kernels run fastest) or ``mixed``
    (asymmetric activations, for inputs that are far from zero-centred). Returns the settings for the metadata."""
    ov = require("openvino", extra="openvino")
    nncf = require("nncf", extra="openvino")
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    if preset not in presets:
        raise NnppError(f"NNCF preset '{preset}': choose one of {', '.join(presets)}")
    tiles = list(reader.tiles)
    try:
        model = ov.Core().read_model(fp32_path)
        quantized = nncf.quantize(model, nncf.Dataset(tiles), preset=presets[preset],
                                  target_device=nncf.TargetDevice.CPU, subset_size=len(tiles))
        ov.save_model(quantized, xml_path, compress_to_fp16=False)
    except Exception as e:
        raise NnppError(f"NNCF's quantize failed on {os.path.basename(fp32_path)} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); export fp32 or use --quantizer ort") from None
    return {"tool": "nncf.quantize", "format": "OpenVINO IR", "preset": preset, "target_device": "CPU",
            "subset_size": len(tiles), "fast_bias_correction": True, "nncf": nncf.__version__,
            "openvino": ov.__version__}


def measure_latency(sessions: dict, input_shape, warmup: int = 2, runs: int = 5, seed: int = 0) -> dict:
    """Median wall time (ms) of ``run`` on one seeded N(0, 1) input of ``input_shape`` for each of ``sessions``
    ({name: session}), after ``warmup`` calls each; the sessions take turns run by run, so a load that comes and
    goes hits each alike. Returns {name: median ms}."""
    import statistics
    import time
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape), dtype=np.float32)
    feeds = {n: {s.get_inputs()[0].name: x} for n, s in sessions.items()}
    for n, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[n])
    times = {n: [] for n in sessions}
    for _ in range(runs):
        for n, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[n])
            times[n].append(1e3 * (time.perf_counter() - t))
    return {n: statistics.median(v) for n, v in times.items()}


def convert_fp16(fp32_path: str, out_path: str) -> dict:
    """fp16 weights and arithmetic (``onnxruntime.transformers.float16.convert_float_to_float16``), fp32 input and
    output kept (``keep_io_types``) so the predictor feeds and reads it unchanged. Meant for GPU providers (CUDA,
    TensorRT); the export scores it with ONNX Runtime's CPU provider, which runs fp16 models too (slowly)."""
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.transformers.float16 import convert_float_to_float16
    try:
        onnx.save(convert_float_to_float16(onnx.load(fp32_path), keep_io_types=True), out_path)
    except Exception as e:
        raise NnppError(f"fp16 conversion of {os.path.basename(fp32_path)} failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); export fp32") from None
    return {"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}


def _dice(pred: np.ndarray, ref: np.ndarray, label: int, ignore_label: int | None = None) -> float:
    """Dice of ``label`` as nnU-Net's evaluation counts it: voxels whose reference is the ignore label are not
    scored (a prediction there is neither a false positive nor a true one). NaN where neither has the label."""
    p, r = pred == label, ref == label
    if ignore_label is not None:
        p &= ref != ignore_label
    denom = p.sum() + r.sum()
    return float(2 * (p & r).sum() / denom) if denom else float("nan")


def score(model, fold, sessions: dict, mirroring: bool = True, max_cases: int | None = None) -> dict:
    """Each of ``sessions`` ({name: session: ONNX Runtime's, or :class:`OpenVinoSession`}) in nnU-Net's predictor
    on the fold's validation cases
    (preprocessed; at most ``max_cases``, the first in sorted order, one at a time): {name: {label: mean Dice}},
    plus ``cases`` and ``agreement`` (share of voxels where the masks of the first two sessions agree). Dice as
    nnU-Net's evaluation counts it (the ignore label's voxels unscored)."""
    from nnpp.deploy.ort import OrtNetwork
    from nnpp.predictor.tiles import nnppPredictor
    label_manager = model.plans_manager.get_label_manager(model.dataset_json)
    if label_manager.has_regions:
        raise NnppError("reduced-precision exports are scored per label (argmax); this model predicts regions "
                        "(sigmoid), which the Dice guard does not score yet: export fp32")
    dataset, keys = _cases(model, fold, "val")
    keys = keys[:max_cases] if max_cases else keys
    labels = [v for v in label_manager.foreground_labels if v != label_manager.ignore_label]
    names = list(sessions)
    dice = {n: {str(lab): [] for lab in labels} for n in names}
    same = total = 0
    for k in keys:
        data, seg, _, _ = dataset.load_case(k)
        x = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
        ref = np.asarray(seg[:])[0]
        masks = []
        for n in names:
            pred = nnppPredictor(use_mirroring=mirroring, perform_everything_on_device=False,
                                 device=torch.device("cpu"), allow_tqdm=False)
            pred.manual_initialization(OrtNetwork({"0": sessions[n]}), model.plans_manager, model.configuration_manager,
                                       [{"onnx_fold": "0"}], model.dataset_json, model.trainer_name,
                                       model.inference_allowed_mirroring_axes)
            mask = pred.predict_sliding_window_return_logits(x).float().argmax(0).numpy()
            masks.append(mask)
            for lab in labels:
                dice[n][str(lab)].append(_dice(mask, ref, lab, label_manager.ignore_label))
        same += int((masks[0] == masks[-1]).sum())
        total += masks[0].size
    mean = {n: {lab: float(np.nanmean(v)) if not all(np.isnan(v)) else None for lab, v in d.items()}
            for n, d in dice.items()}
    return {"cases": keys, "dice": mean, "agreement": same / total if total else None}


def dice_drop(scores: dict, reference: str, candidate: str) -> dict:
    """{label: reference Dice - candidate Dice} (labels absent from every case: None)."""
    ref, cand = scores["dice"][reference], scores["dice"][candidate]
    return {lab: (ref[lab] - cand[lab]) if ref[lab] is not None and cand[lab] is not None else None for lab in ref}
