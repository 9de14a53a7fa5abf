"""nnpp_train: nnU-Net v2's training command for nnpp trainers, on any device, with AMP and short runs.

    nnpp_train DATASET CONFIG FOLD [-tr TRAINER] [-p PLANS] [-device auto|cuda|npu|mps|cpu] [--amp MODE]
               [--c] [--val] [--val_best] [--npz] [--epochs N] [--iters N] [--val_iters N] [--save_every N]
"""
from __future__ import annotations

import argparse
import os
import statistics

from nnpp import NnppError
from nnpp.device import AMP_CHOICES, DEVICE_CHOICES
from nnpp.paths import setup_paths
from nnpp.run.common import check_fold, dataset_name, entry_point, load_json_file, positive_int

DEFAULT_TRAINER = "nnUNetPlusPlusTrainer"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnpp_train", description="Train UNet++ (or any nnU-Net trainer) with "
                                "nnU-Net v2 on cuda, npu, mps or cpu.")
    p.add_argument("dataset_name_or_id", help="3, 003, Dataset003_Liver or Task003_Liver")
    p.add_argument("configuration", help="plans configuration, e.g. 3d_fullres")
    p.add_argument("fold", help="0..4 (or as many folds as splits_final.json has) or 'all'")
    p.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer class (default {DEFAULT_TRAINER}; the seed's "
                   "nnUNetPlusPlusTrainerV2 and nnU-Net's own trainers work too)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-device", default="auto", choices=DEVICE_CHOICES, help="default auto: npu, cuda, mps, cpu")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="O0 fp32 | O1 fp16 autocast + loss scaling | bf16 | auto (O1 on cuda/npu, O0 on cpu/mps)")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint (fresh start if none)")
    p.add_argument("--val", action="store_true", help="only run the final validation (needs checkpoint_final)")
    p.add_argument("--val_best", action="store_true", help="validate with checkpoint_best instead of final")
    p.add_argument("--npz", action="store_true", help="also save softmax outputs of the validation")
    p.add_argument("--disable_checkpointing", action="store_true")
    p.add_argument("-pretrained_weights", default=None, help="checkpoint to initialise the network from")
    p.add_argument("--epochs", type=positive_int, help="number of epochs (nnU-Net default 1000)")
    p.add_argument("--iters", type=positive_int, help="training iterations per epoch (default 250)")
    p.add_argument("--val_iters", type=positive_int, help="pseudo-Dice iterations per epoch (default 50)")
    p.add_argument("--save_every", type=positive_int, help="write checkpoint_latest every N epochs (default 50)")
    p.add_argument("--dbs", action="store_true", help="DDP: the plans batch size is the global batch, split "
                   "across ranks (default: every rank uses the plans batch)")
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by python -m torch.distributed.launch
    p.add_argument("--other_use", choices=("fps", "prof"), default=None,
                   help="performance mode instead of training: fps (throughput, perf.json) or prof (torch.profiler "
                   "trace output.prof); results go to $nnUNet_results/nnpp_perf/, never to the real run")
    p.add_argument("--warmup", type=positive_int, default=None, help="fps/prof warm-up steps (default 10 / 5)")
    p.add_argument("--steps", type=positive_int, default=None, help="fps/prof measured steps (default 100 / 5)")
    p.add_argument("--preprocessed", help="overrides $nnUNet_preprocessed")
    p.add_argument("--results", help="overrides $nnUNet_results (v1: $RESULTS_FOLDER)")
    return p


def configure_run(trainer, epochs=None, iters=None, val_iters=None, save_every=None) -> None:
    """Short runs without a trainer class per epoch count (nnU-Net needs nnUNetTrainer_5epochs etc.)."""
    for attr, value in (("num_epochs", epochs), ("num_iterations_per_epoch", iters),
                        ("num_val_iterations_per_epoch", val_iters), ("save_every", save_every)):
        if value is not None:
            setattr(trainer, attr, value)


def make_trainer(dataset: str, configuration: str, fold: str, trainer_name: str = DEFAULT_TRAINER,
                 plans_identifier: str = "nnUNetPlans", device=None, continue_training: bool = False):
    """Resolve and check everything a trainer needs, then construct it (nnU-Net's get_trainer_from_args,
    with nnpp trainers, any dataset id form, and clear errors)."""
    import torch

    from nnpp.training import find_trainer_class
    from nnunetv2.paths import nnUNet_preprocessed

    trainer_class = find_trainer_class(trainer_name)
    name = dataset_name(dataset)
    base = os.path.join(str(nnUNet_preprocessed), name)
    plans = load_json_file(os.path.join(base, plans_identifier + ".json"),
                           f"plans '{plans_identifier}' of {name} (run nnUNetv2_plan_and_preprocess)")
    if configuration not in plans.get("configurations", {}):
        raise NnppError(f"configuration '{configuration}' is not in {plans_identifier}.json of {name}; "
                        f"available: {', '.join(plans.get('configurations', {}))}")
    fold = check_fold(fold, base)
    dataset_json = load_json_file(os.path.join(base, "dataset.json"), f"dataset.json of {name}")
    plans["continue_training"] = continue_training  # nnunetv2 >= 2.8 reads (and pops) this key
    return trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                         device=device if device is not None else torch.device("cpu"))


def run(args) -> object:
    paths = setup_paths(preprocessed=args.preprocessed, results=args.results)
    if args.c and args.val:
        raise NnppError("--c and --val exclude each other: --c continues training, --val only validates")
    if args.other_use and (args.c or args.val):
        raise NnppError(f"--other_use {args.other_use} measures fresh training steps; drop --c/--val")
    if args.other_use:  # performance runs get their own results tree, never the real run's folder
        os.environ["nnUNet_results"] = os.path.join(paths["nnUNet_results"], "nnpp_perf", args.other_use)

    from nnpp import device as dev
    from nnpp import distributed

    env = distributed.dist_env(args.local_rank)
    distributed.bind_children_to_this_process()
    device = dev.resolve_device(args.device, env.local_rank)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # share the cores between local ranks
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        dev.set_cpu_threads(max(1, (os.cpu_count() or 1) // local_world))
    with distributed.process_group(env, dev.dist_backend(device)):
        return _train(args, env, device)


def _train(args, env, device):
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from nnpp import device as dev
    from nnpp.training import DDP_VARIANTS

    trainer_name = DDP_VARIANTS[args.tr].__name__ if env.enabled and args.tr in DDP_VARIANTS else args.tr
    trainer = make_trainer(args.dataset_name_or_id, args.configuration, args.fold, trainer_name, args.p, device,
                           continue_training=args.c)
    if hasattr(trainer, "configure_amp"):
        trainer.configure_amp(args.amp)
        trainer.distribute_batch = args.dbs
    elif args.amp != "auto" or args.dbs or args.other_use:
        raise NnppError(f"--amp, --dbs and --other_use need an nnpp trainer; {args.tr} is nnU-Net's own")
    configure_run(trainer, args.epochs, args.iters, args.val_iters, args.save_every)
    trainer.disable_checkpointing = args.disable_checkpointing
    dev.configure_backends(device)
    if args.other_use:
        from nnpp.training import performance
        return performance.run(trainer, args.other_use, args.warmup, args.steps)

    final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    if args.val and not os.path.isfile(final):
        raise NnppError(f"--val needs a finished training: {final} does not exist; train first")
    maybe_load_checkpoint(trainer, args.c, args.val, args.pretrained_weights)

    if not args.val:
        trainer.run_training()
    if args.val_best:
        trainer.load_checkpoint(os.path.join(trainer.output_folder, "checkpoint_best.pth"))
    trainer.perform_actual_validation(args.npz)
    if env.is_main:
        report(trainer)
    return trainer


def report(trainer) -> None:
    """Per-class Dice from the validation summary.json and the training throughput."""
    from nnpp.tools.get_dice_result import format_dice

    summary = os.path.join(trainer.output_folder, "validation", "summary.json")
    if os.path.isfile(summary):
        print(format_dice(summary, trainer.dataset_json))
    fps = getattr(trainer, "train_fps", [])
    if fps:
        steady = fps[1:] or fps  # the first epoch includes warm-up (cudnn benchmark, compile, caches)
        print(f"Training FPS: {statistics.median(steady):.2f} img/s (median over {len(steady)} epoch(s), "
              f"device {trainer.device}, AMP {trainer.amp.mode})")


@entry_point("nnpp_train")
def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
