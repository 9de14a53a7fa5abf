"""nnpp_export: a trained model folder -> one checked ``.onnx`` per fold + what inference needs.

    nnpp_export DATASET CONFIG -f FOLD [FOLD ...] [-tr TRAINER] [-p PLANS] [-chk checkpoint_final.pth]
                [-o OUT] [--overwrite] [--depth k [--allow_untrained_depth]] [--opset N] [--exporter dynamo|torchscript] [--tol T]
                [--precision fp32|fp16|int8] [--quantizer ort|nncf] [--max_dice_drop D] [--calib_tiles N]
                [--nncf_preset performance|mixed] [--guard_cases N] [--latency_runs N]

The network is built as nnU-Net's predictor builds it (plans.json + the checkpoint's trainer class, weights
loaded strictly; plans/labels compared with those stored in the checkpoint), deep supervision off, pruned to
depth k with ``--depth`` (UNet++ only). Each fold is checked with ONNX Runtime (CPU) against torch on a random
patch-sized input; the export fails (exit 2, nothing written) when the max abs difference exceeds
``--tol`` x max(1, max |logit|). Default OUT: ``MODEL_FOLDER/onnx`` (``onnx_depthK`` when pruned). OUT must be
new or empty, or a previous export of the same model with ``--overwrite`` (replaced whole: no stale fold files).
``--precision int8``: each checked fp32 model is quantized by ONNX Runtime's post-training static quantization
(QDQ, per-channel int8 weights, uint8 activations) calibrated on ``--calib_tiles`` patch-sized tiles of the fold's
preprocessed training cases (needs nnUNet_preprocessed), then fp32 and int8 are both run through nnU-Net's
predictor on the fold's validation cases: the Dice per label of each, the drop and the mask agreement go into
nnpp_onnx.json, and a drop beyond ``--max_dice_drop`` (default 0.01) refuses the export (exit 2, nothing written).
``--quantizer nncf`` (with ``--precision int8``; the [openvino] extra: openvino + nncf): NNCF's post-training
quantization for OpenVINO's CPU plugin instead: ``nncf.quantize`` on the OpenVINO model read from the checked fp32
.onnx, CPU target, the same calibration tiles, ``--nncf_preset`` performance (default: symmetric activations,
2x faster than mixed on the demo model) or mixed (asymmetric activations: for a model the guard refuses under
performance). Written as OpenVINO IR ``fold_F.xml`` + ``fold_F.bin`` (both SHA-256-checked on load) in place of
``fold_F.onnx``; default OUT ``MODEL_FOLDER/onnx_int8_nncf``. It runs only with ``nnpp_predict --onnx OUT
--ort_provider openvino``; the guard scores it with OpenVINO against the fp32 model with ONNX Runtime.
``--precision fp16`` (for GPU providers: cuda, tensorrt): fp16 weights and arithmetic, fp32 input/output, scored
and guarded the same way (with ONNX Runtime's CPU provider, which runs fp16 models too).
After the guard, each fold's fp32 and reduced models are timed on this machine with the backend the reduced one is
meant for (int8 QDQ: ONNX Runtime CPU; NNCF int8: OpenVINO, fp32 .onnx and int8 IR; fp16: ONNX Runtime CUDA, if
present): batch 1 at the patch size, median of ``--latency_runs`` passes after 2 warm-up passes, one line
``latency per patch fp32 X ms, int8 Y ms (Z.ZZx)`` (Z = fp32 time / int8 time: > 1 is faster) and a warning when
the reduced model is slower; the figures go into nnpp_onnx.json (fold ``latency``).
Predict with ``nnpp_predict -i IN -o OUT --onnx OUT_OF_THIS_COMMAND``.
"""
from __future__ import annotations

import argparse
import sys

from nnpp.paths import setup_paths
from nnpp.cli import entry_point, non_negative_float, non_negative_int, positive_float, positive_int
from nnpp.dataset_ids import dataset_name
from nnpp import DEFAULT_TRAINER


def parser() -> argparse.ArgumentParser:
    from nnpp.deploy.export import DEFAULT_CALIB_TILES, DEFAULT_GUARD_CASES, DEFAULT_MAX_DICE_DROP, DEFAULT_OPSET, \
        DEFAULT_LATENCY_RUNS, DEFAULT_TOL, EXPORTERS, PRECISIONS, QUANTIZERS
    p = argparse.ArgumentParser(prog="nnpp_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="dataset id: 3, 003, Dataset003_Liver or Task003_Liver")
    p.add_argument("configuration", help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-f", nargs="+", required=True, help="fold(s) to export, e.g. -f 0 1 2 3 4 (or 'all')")
    p.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer of the model folder (default {DEFAULT_TRAINER})")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name (default checkpoint_final.pth)")
    p.add_argument("-o", default=None, help="output folder (default MODEL_FOLDER/onnx[_depthK][_fp16|_int8|_int8_nncf])")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default), fp16 (GPU providers) or int8 (static quantization); fp16/int8 with the Dice guard")
    p.add_argument("--quantizer", choices=QUANTIZERS, default="ort",
                   help="int8: ort (default; ONNX Runtime's QDQ .onnx, any provider) or nncf (NNCF int8 as OpenVINO IR, "
                   "for --ort_provider openvino; the [openvino] extra)")
    p.add_argument("--nncf_preset", choices=("performance", "mixed"), default=None,
                   help="--quantizer nncf: NNCF's quantization preset (default performance; mixed: asymmetric "
                   "activations, slower, for models the guard refuses under performance)")
    p.add_argument("--latency_runs", type=non_negative_int, default=DEFAULT_LATENCY_RUNS,
                   help=f"fp16/int8: timed passes per model for the fp32 vs reduced latency on this machine (default "
                   f"{DEFAULT_LATENCY_RUNS}; 0: not measured)")
    p.add_argument("--max_dice_drop", type=non_negative_float, default=DEFAULT_MAX_DICE_DROP,
                   help=f"int8: largest allowed Dice drop of any label vs fp32 (default {DEFAULT_MAX_DICE_DROP:g})")
    p.add_argument("--calib_tiles", type=positive_int, default=DEFAULT_CALIB_TILES,
                   help=f"int8: calibration tiles from the training cases (default {DEFAULT_CALIB_TILES})")
    p.add_argument("--guard_cases", type=positive_int, default=DEFAULT_GUARD_CASES,
                   help=f"fp16/int8: validation cases the Dice guard scores, the first in sorted order, named in the "
                   f"metadata (default {DEFAULT_GUARD_CASES})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it holds a previous export of this model (its nnpp_onnx.json says so)")
    p.add_argument("--depth", type=positive_int, default=None,
                   help="UNet++ pruning depth k (1..L): export X^{0,k}'s sub-network (default: full depth)")
    p.add_argument("--allow_untrained_depth", action="store_true",
                   help="export a --depth whose head was only a probe (the network never learned for it)")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="torch.onnx exporter: dynamo (default, needs onnxscript) or torchscript (deprecated by torch)")
    p.add_argument("--tol", type=positive_float, default=DEFAULT_TOL,
                   help=f"parity tolerance: max |ORT - torch| <= tol x max(1, max |logit|) (default {DEFAULT_TOL:g})")
    return p


@entry_point("nnpp_export")
def main(argv=None):
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from nnpp.deploy.export import check_quantizer
    from nnpp.deploy.ort import require
    check_quantizer(args.precision, args.quantizer, args.nncf_preset)  # before loading the model
    setup_paths(required=("nnUNet_results", "nnUNet_preprocessed") if args.precision != "fp32" else ("nnUNet_results",))

    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnpp.deploy.export import export_model
    from nnpp.deploy.export_folder import default_output_folder
    from nnpp.model_folder import load_trained_model
    from nnpp.model_folder import find_trainer_class

    for module in ("onnx", "onnxruntime") + (("onnxscript",) if args.exporter == "dynamo" else ()):
        require(module)
    find_trainer_class(args.tr)  # unknown trainer -> clear error
    name = dataset_name(args.dataset)
    folder = get_output_folder(name, args.tr, args.p, args.configuration)
    model = load_trained_model(folder, args.f, args.chk, args.depth)
    out = args.o or default_output_folder(folder, args.depth, args.precision, args.quantizer)
    meta = export_model(model, out, depth=args.depth, opset=args.opset, exporter=args.exporter, tol=args.tol,
                        source={"dataset": name, "plans_identifier": args.p}, overwrite=args.overwrite,
                        precision=args.precision, max_dice_drop=args.max_dice_drop, calib_tiles=args.calib_tiles,
                        guard_cases=args.guard_cases, quantizer=args.quantizer, latency_runs=args.latency_runs,
                        nncf_preset=args.nncf_preset, allow_untrained_depth=args.allow_untrained_depth)
    kind = meta["precision"] + (" OpenVINO IR (NNCF)" if meta.get("runtime") == "openvino" else "")
    print(f"[nnpp_export] wrote {len(meta['folds'])} {kind} model(s) to {out} (patch {'x'.join(map(str, meta['patch_size']))}, "
          f"depth {meta['depth']}, opset {meta['opset']}, ops: {', '.join(meta['ops'])})")
    return 0


if __name__ == "__main__":
    main()
