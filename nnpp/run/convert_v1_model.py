"""nnpp_convert_v1_model: an nnU-Net v1 UNet++ model folder -> an nnU-Net v2 model folder.

    nnpp_convert_v1_model V1_MODEL_FOLDER DATASET [-c CONFIG] [-f FOLD ...] [-tr TRAINER] [-p PLANS]
                          [--dataset_json PATH] [--checkpoints final best] [--to_preprocessed] [--overwrite]
                          [--results DIR] [--preprocessed DIR]

V1_MODEL_FOLDER is ``.../nnUNet/3d_fullres/Task003_Liver/nnUNetPlusPlusTrainerV2__nnUNetPlansv2.1`` (plans.pkl,
fold_F/model_final_checkpoint.model + .model.pkl, model_best too). The result lands in
``$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG/`` (plans.json, dataset.json, fold_F/checkpoint_final.pth,
checkpoint_best.pth), loadable by nnpp_predict, nnpp_train --val and nnU-Net's own predictor.
"""
from __future__ import annotations

import argparse

from nnpp.paths import setup_paths
from nnpp.cli import entry_point

STEMS = {"final": "model_final_checkpoint", "best": "model_best"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnpp_convert_v1_model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("v1_folder", metavar="V1_MODEL_FOLDER", help="v1 TRAINER__PLANS folder (plans.pkl, fold_F/)")
    p.add_argument("dataset", metavar="DATASET", help="target dataset: 3, 003, Dataset003_Liver or Task003_Liver "
                   "(a new id takes its name from the v1 TaskXXX_Name folder)")
    p.add_argument("-c", dest="configuration", help="configuration (default: the v1 folder's, e.g. 3d_fullres)")
    p.add_argument("-f", dest="folds", nargs="+", help="folds to convert (default: every fold_F found)")
    p.add_argument("-tr", dest="trainer", help="nnpp trainer the v2 folder is named after and built with "
                   "(default: the v1 trainer's nnpp name, nnUNetPlusPlusTrainerV2)")
    p.add_argument("-p", dest="plans_name", help="v2 plans identifier (default: the v1 one, nnUNetPlansv2.1)")
    p.add_argument("--dataset_json", help="v1 dataset.json for label and channel names (default: looked up in "
                   "nnUNet_raw_data_base/nnUNet_raw_data/TaskXXX, nnUNet_preprocessed/TaskXXX, and beside the "
                   "v1 RESULTS_FOLDER)")
    p.add_argument("--checkpoints", nargs="+", choices=sorted(STEMS), default=["final", "best"],
                   help="which v1 checkpoints to convert when present (default: final best)")
    p.add_argument("--to_preprocessed", action="store_true", help="also write the plans to "
                   "$nnUNet_preprocessed/DatasetXXX/PLANS.json, for nnUNetv2_preprocess and nnpp_train --val")
    p.add_argument("--overwrite", action="store_true", help="replace existing converted files")
    p.add_argument("--results", help="nnUNet_results folder (default: $nnUNet_results or $RESULTS_FOLDER)")
    p.add_argument("--preprocessed", help="nnUNet_preprocessed folder (default: $nnUNet_preprocessed)")
    return p


@entry_point("nnpp_convert_v1_model")
def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_paths(preprocessed=args.preprocessed, results=args.results, required=("nnUNet_results",))
    from nnpp.convert import convert_v1_model
    out = convert_v1_model(args.v1_folder, args.dataset, args.configuration, args.folds, args.trainer,
                           args.plans_name, args.dataset_json, tuple(STEMS[c] for c in args.checkpoints),
                           args.to_preprocessed, args.overwrite,
                           log=lambda msg: print(f"[nnpp_convert_v1_model] {msg}", flush=True))
    print(f"[nnpp_convert_v1_model] done: {out}")
    return 0


if __name__ == "__main__":
    main()
