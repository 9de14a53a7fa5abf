"""nnpp_prune: give a trained UNet++ a usable pruned depth k by self-distillation (:mod:`nnpp.distill.prune`).

    nnpp_prune DATASET CONFIG FOLD --depth K [-tr TRAINER] [-p PLANS] [-chk CHECKPOINT] [-device ...] [--amp MODE]
               [--epochs N] [--iters N] [--val_iters N] [-a A] [-T T] [--seed N] [--c]

The model folder is nnU-Net's ``$nnUNet_results/DATASET/TRAINER__PLANS__CONFIG`` (``-tr``/``-p`` as for
nnpp_predict); its fold's full network (``-chk``, default checkpoint_final.pth) is the teacher and the starting point.
The run lives in ``fold_F/prune_depthK/`` of that folder; afterwards ``nnpp_predict``/``nnpp_export --depth K`` use
it without further flags. Default budget: 20% of the model's own training (its epochs, the same iterations per
epoch). ``--c`` continues an interrupted pruning. One device (no torchrun).
"""
from __future__ import annotations

import argparse
import os

from nnpp import DEFAULT_TRAINER, NnppError
from nnpp.cli import entry_point, non_negative_float, positive_float, positive_int
from nnpp.dataset_ids import dataset_name
from nnpp.device import AMP_CHOICES, DEVICE_CHOICES

TRAINER = "nnUNetPlusPlusTrainerPrune"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnpp_prune", description="Prune a trained UNet++ to depth K by self-distillation: "
                                "the sub-network X^{0,K} fine-tuned on the labels and the full network's soft outputs, "
                                "saved into the model folder for nnpp_predict/nnpp_export --depth K.")
    p.add_argument("dataset_name_or_id", help="3, 003, Dataset003_Liver or Task003_Liver")
    p.add_argument("configuration", help="the model's configuration, e.g. 3d_fullres")
    p.add_argument("fold", help="the model's fold (0..4 or 'all')")
    p.add_argument("--depth", type=positive_int, required=True, help="the depth K to make usable (1..L-1)")
    p.add_argument("-tr", default=DEFAULT_TRAINER, help=f"the model's trainer (default {DEFAULT_TRAINER})")
    p.add_argument("-p", default="nnUNetPlans", help="the model's plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="the full network's checkpoint, teacher and starting "
                   "point (default checkpoint_final.pth)")
    p.add_argument("-device", default="auto", choices=DEVICE_CHOICES, help="default auto: npu, cuda, mps, cpu")
    p.add_argument("--amp", default=None, choices=AMP_CHOICES, help="as nnpp_train (default auto)")
    p.add_argument("--epochs", type=positive_int, help="default: 20%% of the model's epochs")
    p.add_argument("--iters", type=positive_int, help="training iterations per epoch (default: the model's)")
    p.add_argument("--val_iters", type=positive_int, help="pseudo-Dice iterations per epoch (default: the model's)")
    p.add_argument("-a", type=non_negative_float, default=None,
                   help="KD weight in [0, 1]: loss = (1-a)*DiceCE(labels) + a*soft KD (default 0.5; 0: labels only)")
    p.add_argument("-T", type=positive_float, default=None, help="soft-KD temperature (default 2)")
    p.add_argument("--seed", type=int, default=None, help="as nnpp_train")
    p.add_argument("--c", action="store_true", help="continue an interrupted pruning with its saved settings")
    p.add_argument("--preprocessed", help="overrides $nnUNet_preprocessed")
    p.add_argument("--results", help="overrides $nnUNet_results")
    return p


def default_budget(source: str) -> dict:
    """``{"epochs", "iters", "val_iters"}`` for a pruning of the model whose checkpoint is ``source``: 20% of its
    epochs (at least 1) at its iterations per epoch (nnU-Net's defaults, 1000 x 250, for runs that recorded none)."""
    from nnpp.distill.prune import DEFAULT_BUDGET
    from nnpp.run.train import saved_run_settings
    saved = saved_run_settings(source)
    epochs, iters = int(saved.get("epochs") or 1000), int(saved.get("iters") or 250)
    return {"epochs": max(1, round(DEFAULT_BUDGET * epochs)), "iters": iters,
            "val_iters": int(saved.get("val_iters") or 50), "of": (epochs, iters)}


def run(args):
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnpp.model_folder import pruned_checkpoint
    from nnpp.paths import setup_paths
    from nnpp.run import train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NnppError("nnpp_prune runs on one device (a short fine-tune): start it without torchrun")
    if args.a is not None and args.a > 1:
        raise NnppError(f"-a {args.a}: the KD weight must be in [0, 1]")
    setup_paths(preprocessed=args.preprocessed, results=args.results)
    name = dataset_name(args.dataset_name_or_id)
    model = get_output_folder(name, args.tr, args.p, args.configuration)
    source = os.path.join(model, f"fold_{args.fold}", args.chk)
    if not os.path.isfile(source):
        raise NnppError(f"no {args.chk} in {os.path.dirname(source)}: train fold {args.fold} first (nnpp_train "
                        f"{args.dataset_name_or_id} {args.configuration} {args.fold} -tr {args.tr} -p {args.p}), or "
                        f"check -tr/-p/-chk")
    folder = os.path.dirname(pruned_checkpoint(model, args.fold, args.depth))
    targs = train.build_parser().parse_args([args.dataset_name_or_id, args.configuration, str(args.fold),
                                             "-tr", TRAINER, "-p", args.p, "-device", args.device])
    for key in ("amp", "c", "epochs", "iters", "val_iters", "seed", "preprocessed", "results", "a", "T", "depth"):
        setattr(targs, key, getattr(args, key))
    if not (args.c and train.checkpoint_to_resume(folder)):  # a fresh pruning: the default budget
        budget = default_budget(source)
        for key in ("epochs", "iters", "val_iters"):
            if getattr(targs, key) is None:
                setattr(targs, key, budget[key])
        print(f"[nnpp_prune] depth {args.depth} of {model} fold {args.fold}: {targs.epochs} epochs x {targs.iters} "
              f"iterations (the model trained {budget['of'][0]} x {budget['of'][1]}) into {folder}", flush=True)

    def place(trainer):
        move_run(trainer, folder)

    def setup(trainer, targs):
        configure(trainer, model, source, targs)

    trainer = train.run(targs, setup=setup, place=place)
    if trainer is not None:
        report(trainer, model)
    return trainer


def move_run(trainer, folder: str) -> None:
    """Move the freshly constructed trainer's run into ``folder``: nnU-Net made ``TRAINER__PLANS__CONFIG/fold_F`` (and
    its log file) under $nnUNet_results for the pruning trainer's name; the log moves along and the folders nnU-Net
    made, now empty, are removed."""
    made_fold, made_base = trainer.output_folder, trainer.output_folder_base
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, os.path.basename(trainer.log_file))
    if os.path.isfile(trainer.log_file):
        os.replace(trainer.log_file, log)
    trainer.log_file, trainer.output_folder, trainer.output_folder_base = log, folder, folder
    for d in (made_fold, made_base):
        try:
            os.rmdir(d)
        except OSError:  # not empty (another run's) or gone: not ours to remove
            pass


def configure(trainer, model: str, source: str, args) -> None:
    """nnpp.run.train's setup hook: the full network of ``source`` as the frozen teacher and as the start, soft KD."""
    from nnpp.distill.settings import KD_DEFAULTS
    from nnpp.distill.teachers import check_compatible, load_teacher
    from nnpp.model_folder import sha256_file

    chk = os.path.basename(source)
    teacher = load_teacher(model, trainer.fold, chk, trainer.device)
    full = getattr(teacher.network, "depth", None)
    if full is None or not hasattr(teacher.network, "prune_depth"):
        raise NnppError(f"{model} holds a {type(teacher.network).__name__}, not a UNet++: only UNet++ has pruned depths")
    if not 1 <= args.depth < full:
        raise NnppError(f"--depth {args.depth}: this UNet++ has depth L = {full}; prune to 1..{full - 1} (depth {full} "
                        f"is the full network)")
    check_compatible(teacher, trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json)
    config = {**KD_DEFAULTS, "kd": ["soft"], "a": 0.5 if args.a is None else args.a,
              "T": 2.0 if args.T is None else args.T, "tchk": chk, "t": [model], "tf": [str(trainer.fold)],
              "r": None, "student": f"depth{args.depth}"}
    trainer.configure_kd([teacher], config)
    trainer.prune_depth = args.depth
    trainer.prune_source = {"checkpoint": os.path.abspath(source), "sha256": sha256_file(source),
                            "weights": teacher.network.state_dict()}  # the same checkpoint, strictly loaded


def report(trainer, model: str) -> None:
    """The pruned network's validation Dice beside the full network's (its fold's validation/summary.json), when both
    were scored on the same cases."""
    from nnpp.dice import dice_table, label_names, read_dice
    from nnpp.run.distill import validation_cases

    ending = trainer.dataset_json.get("file_ending", "")
    rows = [(f"depth {trainer.prune_depth} (distilled)", os.path.join(trainer.output_folder, "validation", "summary.json")),
            ("full network", os.path.join(model, f"fold_{trainer.fold}", "validation", "summary.json"))]
    if not all(os.path.isfile(path) for _, path in rows):
        return
    if validation_cases(rows[0][1], ending) != validation_cases(rows[1][1], ending):
        print("[nnpp_prune] the full network's validation scored other cases; compare with nnpp_predict --depth", flush=True)
        return
    print(dice_table("[nnpp_prune] validation Dice", [(name, read_dice(path)) for name, path in rows],
                     label_names(trainer.dataset_json)), flush=True)


@entry_point("nnpp_prune")
def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
