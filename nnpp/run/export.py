"""nnpp_export: a trained model folder -> one checked ``.onnx`` per fold + what inference needs.

    nnpp_export DATASET CONFIG -f FOLD [FOLD ...] [-tr TRAINER] [-p PLANS] [-chk checkpoint_final.pth]
                [-o OUT] [--overwrite] [--depth k] [--opset N] [--exporter dynamo|torchscript] [--tol T]

The network is built as nnU-Net's predictor builds it (plans.json + the checkpoint's trainer class, weights
loaded strictly; plans/labels compared with those stored in the checkpoint), deep supervision off, pruned to
depth k with ``--depth`` (UNet++ only). Each fold is checked with ONNX Runtime (CPU) against torch on a random
patch-sized input; the export fails (exit 2, nothing written) when the max abs difference exceeds
``--tol`` x max(1, max |logit|). Default OUT: ``MODEL_FOLDER/onnx`` (``onnx_depthK`` when pruned). OUT must be
new or empty, or a previous export of the same model with ``--overwrite`` (replaced whole: no stale fold files).
Predict with ``nnpp_predict -i IN -o OUT --onnx OUT_OF_THIS_COMMAND``.
"""
from __future__ import annotations

import argparse
import os
import sys

from nnpp.paths import setup_paths
from nnpp.cli import dataset_name, entry_point, positive_int
from nnpp.run.train import DEFAULT_TRAINER


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'")
    return value


def parser() -> argparse.ArgumentParser:
    from nnpp.deploy.export import DEFAULT_OPSET, DEFAULT_TOL, EXPORTERS
    p = argparse.ArgumentParser(prog="nnpp_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="dataset id: 3, 003, Dataset003_Liver or Task003_Liver")
    p.add_argument("configuration", help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-f", nargs="+", required=True, help="fold(s) to export, e.g. -f 0 1 2 3 4 (or 'all')")
    p.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer of the model folder (default {DEFAULT_TRAINER})")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name (default checkpoint_final.pth)")
    p.add_argument("-o", default=None, help="output folder (default MODEL_FOLDER/onnx or onnx_depthK)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it holds a previous export of this model (its nnpp_onnx.json says so)")
    p.add_argument("--depth", type=positive_int, default=None,
                   help="UNet++ pruning depth k (1..L): export X^{0,k}'s sub-network (default: full depth)")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="torch.onnx exporter: dynamo (default, needs onnxscript) or torchscript (deprecated by torch)")
    p.add_argument("--tol", type=_positive_float, default=DEFAULT_TOL,
                   help=f"parity tolerance: max |ORT - torch| <= tol x max(1, max |logit|) (default {DEFAULT_TOL:g})")
    return p


@entry_point("nnpp_export")
def main(argv=None):
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_paths(required=("nnUNet_results",))

    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnpp.deploy.export import export_model
    from nnpp.model_folder import load_trained_model
    from nnpp.deploy.ort import require
    from nnpp.model_folder import find_trainer_class

    for module in ("onnx", "onnxruntime") + (("onnxscript",) if args.exporter == "dynamo" else ()):
        require(module)
    find_trainer_class(args.tr)  # unknown trainer -> clear error
    name = dataset_name(args.dataset)
    folder = get_output_folder(name, args.tr, args.p, args.configuration)
    model = load_trained_model(folder, args.f, args.chk)
    out = args.o or os.path.join(folder, f"onnx_depth{args.depth}" if args.depth else "onnx")
    meta = export_model(model, out, depth=args.depth, opset=args.opset, exporter=args.exporter, tol=args.tol,
                        source={"dataset": name, "plans_identifier": args.p}, overwrite=args.overwrite)
    print(f"[nnpp_export] wrote {len(meta['folds'])} model(s) to {out} (patch {'x'.join(map(str, meta['patch_size']))}, "
          f"depth {meta['depth']}, opset {meta['opset']}, ops: {', '.join(meta['ops'])})")
    return 0


if __name__ == "__main__":
    main()
