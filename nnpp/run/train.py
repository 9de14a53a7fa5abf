"""nnpp_train: nnU-Net v2's training command for nnpp trainers, on any device, with AMP and short runs.

    nnpp_train DATASET CONFIG FOLD [-tr TRAINER] [-p PLANS] [-device auto|cuda|npu|mps|cpu] [--amp MODE]
               [--checkpoint none|node|cat_conv1] [--ds_weights equal|descending|decay]
               [--shallow_heads probe|trained] [--seed N]
               [--c] [--val] [--val_best] [--npz] [--epochs N] [--iters N] [--val_iters N] [--save_every N]
"""
from __future__ import annotations

import argparse
import os
import statistics

from nnpp import NnppError
from nnpp.device import AMP_CHOICES, DEVICE_CHOICES
from nnpp.nets.unetpp import CHECKPOINT_MODES
from nnpp.paths import setup_paths
from nnpp.cli import check_fold, entry_point, positive_int
from nnpp.dataset_ids import dataset_name
from nnpp.file_safety import load_json_file
from nnpp.saved_settings import DS_WEIGHTS, SHALLOW_HEADS, fill_unrecorded
from nnpp import DEFAULT_TRAINER  # noqa: F401  (also read as train.DEFAULT_TRAINER)


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
    p.add_argument("--amp", default=None, choices=AMP_CHOICES,
                   help="O0 fp32 | O1 fp16 autocast + loss scaling | bf16 | auto (default; O1 on cuda/npu, bf16 on "
                   "CPUs with native bf16 (AVX512-BF16/AMX), O0 on other CPUs and mps)")
    p.add_argument("--checkpoint", default=None, choices=CHECKPOINT_MODES,
                   help="activation checkpointing of UNet++'s nested nodes (recomputed in backward): node (each node; "
                   "about 0.25x the activations) | cat_conv1 | none (default: what the plans say, nnpp_plan_and_"
                   "preprocess --checkpoint)")
    p.add_argument("--ds_weights", default=None, choices=DS_WEIGHTS,
                   help="UNet++ deep-supervision head weights: equal (1/L each) | descending (nnU-Net's halving from "
                   "X^{0,L} down; nnpp's default) | decay (equal, then the shallower heads fade out "
                   "over training); default: the trainer's. Runs saved without it continue with equal (--c)")
    p.add_argument("--shallow_heads", default=None, choices=SHALLOW_HEADS,
                   help="how UNet++'s heads X^{0,1..L-1} learn: probe (default: their loss trains only "
                   "the head, on the node's detached features; the network learns from X^{0,L}'s loss, weight 1) | "
                   "trained (their loss trains the network too: the UNet++ paper's deep supervision). Runs saved "
                   "without it continue with trained (--c)")
    p.add_argument("--seed", type=int, default=None, help="seed python's random, numpy and torch before the network "
                   "is built (rank r of a DDP run: seed + r); with nnUNet_n_proc_DA=0 batches and augmentation are "
                   "seeded too (nnU-Net's worker processes seed themselves from the OS); recorded in the run settings")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint (fresh start if none) "
                   "with the run's saved settings (--epochs/--iters/--val_iters/--amp/--dbs/--checkpoint); a flag "
                   "that contradicts them is an error unless --change_settings is given")
    p.add_argument("--change_settings", action="store_true", help="with --c: apply the given --epochs/--iters/"
                   "--val_iters/--amp/--dbs/--checkpoint instead of the saved ones (logged; a new --epochs changes the "
                   "poly LR schedule from here on, a new --amp drops or starts the grad scaler state)")
    p.add_argument("--val", action="store_true", help="only run the final validation (needs checkpoint_final)")
    p.add_argument("--val_best", action="store_true", help="validate with checkpoint_best instead of final")
    p.add_argument("--tta_batch", type=positive_int, default=None, help="final validation: at most N tiles x "
                   "mirrored copies per network call (default: as nnpp_predict, chosen per case, up to 8; 1 = nnU-Net's "
                   "one call per copy)")
    p.add_argument("--npz", action="store_true", help="also save softmax outputs of the validation")
    p.add_argument("--disable_checkpointing", action="store_true")
    p.add_argument("-pretrained_weights", default=None, help="checkpoint to initialise the network from")
    p.add_argument("--epochs", type=positive_int, help="number of epochs (nnU-Net default 1000)")
    p.add_argument("--iters", type=positive_int, help="training iterations per epoch (default 250)")
    p.add_argument("--val_iters", type=positive_int, help="pseudo-Dice iterations per epoch (default 50)")
    p.add_argument("--save_every", type=positive_int, help="write checkpoint_latest every N epochs (default 50)")
    p.add_argument("--dbs", action="store_true", default=None, help="DDP: the plans batch size is the global batch, split "
                   "across ranks (default: every rank uses the plans batch)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # torch.distributed.launch: --local-rank=N (torch < 2.0: --local_rank=N)
    p.add_argument("--other_use", choices=("fps", "prof"), default=None,
                   help="performance mode instead of training: fps (throughput, perf.json) or prof (torch.profiler "
                   "trace output.prof); results go to $nnUNet_results/nnpp_perf/, never to the real run")
    p.add_argument("--warmup", type=positive_int, default=None, help="fps/prof warm-up steps (default 10 / 5)")
    p.add_argument("--steps", type=positive_int, default=None, help="fps/prof measured steps (default 100 / 5)")
    p.add_argument("--preprocessed", help="overrides $nnUNet_preprocessed")
    p.add_argument("--results", help="overrides $nnUNet_results (v1: $RESULTS_FOLDER)")
    return p


def seed_everything(seed: int) -> None:
    """Python's ``random``, numpy's global generator and torch's (every device): network initialisation and, in the
    main process, nnU-Net's patch sampling and augmentation (batchgenerators draw from numpy and torch)."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


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

    from nnpp.model_folder import find_trainer_class
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


def amp_mode(flag: str | None, device) -> str:
    """``--amp`` resolved for ``device`` (None: auto); under DDP every rank takes rank 0's resolution, so ranks on
    nodes with different CPUs (native bf16 or not) never train in different precisions while rank 0's is saved."""
    from nnpp import distributed
    from nnpp.device import resolve_amp_mode
    return distributed.rank0_choice(resolve_amp_mode(flag or "auto", device))


def checkpoint_to_resume(output_folder: str) -> str | None:
    """The checkpoint ``--c`` continues from: final, else latest, else best (nnU-Net's order); None if none."""
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        path = os.path.join(output_folder, name)
        if os.path.isfile(path):
            return path
    return None


def saved_run_settings(checkpoint: str) -> dict:
    """The ``nnpp_run_settings`` stored in a checkpoint ({} for checkpoints of nnU-Net's own trainers)."""
    import torch

    from nnpp.checkpoints import check_checkpoint_file
    check_checkpoint_file(checkpoint)
    return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("nnpp_run_settings") or {}


def resume_settings(args, saved: dict, checkpoint: str, device, change: bool = False) -> None:
    """``--c``: every saved setting that is a flag of ``args`` is reused when the flag was not given; a given
    flag that contradicts it is an error (the LR schedule, iteration count, loss scaling and batch split of the
    interrupted run must not change silently), or, with ``change`` (--change_settings), applied and logged."""
    from nnpp.device import resolve_amp_mode
    from nnpp.nets.unetpp import checkpoint_mode
    same = {"amp": lambda v: resolve_amp_mode(v, device), "checkpoint": checkpoint_mode}
    for key, value in saved.items():
        if not hasattr(args, key):
            continue
        flag = f"-{key}" if len(key) == 1 else f"--{key}"  # argparse style of our flags: -T, -a, -r, --epochs
        given = getattr(args, key)
        if given is None:
            setattr(args, key, value)
        elif same.get(key, lambda v: v)(given) != same.get(key, lambda v: v)(value):
            if not change:
                raise NnppError(f"--c: {flag} {given} contradicts the run being continued ({flag} {value}, saved "
                                f"in {checkpoint}); drop {flag} to continue as it was started, or add "
                                f"--change_settings to change it deliberately")
            print(f"[nnpp_train] --c --change_settings: {key} {value} -> {given}", flush=True)
    print(f"[nnpp_train] --c: continuing {checkpoint} with its settings "
          + " ".join(f"{k}={getattr(args, k, v)}" for k, v in saved.items()), flush=True)


def run(args, setup=None, place=None) -> object:
    """nnpp_train's whole flow. ``setup(trainer, args)``, if given, runs right after the trainer is constructed
    and configured from the (resume-resolved) arguments, before checkpoints are loaded (nnpp_distill's hook).
    ``place(trainer)``, if given, runs right after construction, before the run's folder is read (nnpp_prune's hook:
    it moves the run into the model folder it prunes)."""
    paths = setup_paths(preprocessed=args.preprocessed, results=args.results)
    if args.c and args.val:
        raise NnppError("--c and --val exclude each other: --c continues training, --val only validates")
    if args.other_use and (args.c or args.val):
        raise NnppError(f"--other_use {args.other_use} measures fresh training steps; drop --c/--val")
    if args.other_use:  # performance runs get their own results tree, never the real run's folder
        os.environ["nnUNet_results"] = os.path.join(paths["nnUNet_results"], "nnpp_perf", args.other_use)

    from nnpp import cpu_threads
    from nnpp import device as dev
    from nnpp import distributed

    env = distributed.dist_env(args.local_rank)
    distributed.bind_children_to_this_process()
    device = dev.resolve_device(args.device, env.local_rank)
    if device.type == "cpu":  # share the cores between local ranks (torchrun's default of 1 thread is not a choice)
        threads, why = cpu_threads.threads_per_rank(cpu_threads.local_ranks() if env.enabled else 1)
        cpu_threads.set_cpu_threads(threads)
        if env.enabled:
            print(f"[nnpp_train] rank {env.rank}: {threads} CPU thread(s) ({why})", flush=True)
    with distributed.process_group(env, dev.dist_backend(device)):
        return _train(args, env, device, setup, place)


def _train(args, env, device, setup=None, place=None):
    from nnpp import device as dev
    from nnpp import distributed
    from nnpp.training import DDP_VARIANTS

    if args.change_settings and not args.c:
        raise NnppError("--change_settings only applies with --c (it changes the settings of a continued run)")
    if args.c and args.pretrained_weights:
        raise NnppError("--c and -pretrained_weights exclude each other: pretrained weights only start a training")
    trainer_name = DDP_VARIANTS[args.tr].__name__ if env.enabled and args.tr in DDP_VARIANTS else args.tr
    if args.seed is not None:
        seed_everything(args.seed + env.rank)
    trainer = make_trainer(args.dataset_name_or_id, args.configuration, args.fold, trainer_name, args.p, device,
                           continue_training=args.c)
    if place is not None:
        place(trainer)
    final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    if args.val and not os.path.isfile(final):
        raise NnppError(f"--val needs a finished training: {final} does not exist; train first")
    resume = final if args.val else checkpoint_to_resume(trainer.output_folder) if args.c else None
    if args.c and resume is None:
        print("WARNING: no checkpoint available to continue from. Starting a new training...", flush=True)
    #: the flags this command line gave (before --c fills the others in from the run): notes speak of these only
    args.given = {k for k, v in vars(args).items() if v is not None and v is not False}
    if resume and args.c:
        saved = saved_run_settings(resume)
        if saved:  # an nnpp run: a setting it did not record is what such runs trained with
            fill_unrecorded(saved)
        resume_settings(args, saved, resume, device, args.change_settings)
    nnpp_trainer = hasattr(trainer, "configure_amp")
    if nnpp_trainer:
        trainer.configure_amp(amp_mode(args.amp, device))
        trainer.distribute_batch = bool(args.dbs)
        trainer.checkpoint_nodes = args.checkpoint
        trainer.seed = args.seed
        trainer.tta_batch = args.tta_batch
        trainer.settings_resolved = True  # flags vs the saved settings, above: load_checkpoint keeps these
        if args.ds_weights is not None:
            trainer.ds_weights = args.ds_weights
        if args.shallow_heads is not None:
            trainer.shallow_heads = args.shallow_heads
        asked = {"ds_weights", "shallow_heads"} & args.given
        if asked and not trainer.uses_ds_weights:
            print(f"[nnpp_train] note: {args.tr} trains with nnU-Net's deep supervision; --ds_weights and "
                  f"--shallow_heads are UNet++ options and change nothing here", flush=True)
        elif "ds_weights" in asked and trainer.probe_heads:
            print(f"[nnpp_train] note: with --shallow_heads probe the network learns from X^{{0,L}}'s loss alone; "
                  f"--ds_weights {args.ds_weights} only scales each probe head's own step", flush=True)
    elif args.amp not in (None, "auto") or args.dbs or args.other_use or args.pretrained_weights or args.checkpoint \
            or args.ds_weights or args.shallow_heads or args.tta_batch:
        raise NnppError(f"--amp, --dbs, --checkpoint, --ds_weights, --shallow_heads, --tta_batch, --other_use and -pretrained_weights "
                        f"need an nnpp "
                        f"trainer; "
                        f"{args.tr} is nnU-Net's own (use nnUNetv2_train for it)")
    configure_run(trainer, args.epochs, args.iters, args.val_iters, args.save_every)
    if args.seed is not None:
        trainer.print_to_log_file(f"seed {args.seed} (+ rank {env.rank})", also_print_to_console=False)
    trainer.disable_checkpointing = args.disable_checkpointing
    if setup is not None:
        setup(trainer, args)
    dev.configure_backends(device)
    if args.other_use:
        from nnpp.training import performance
        return performance.run(trainer, args.other_use, args.warmup, args.steps)

    distributed.check_shared_folder(trainer.output_folder)
    if resume:
        trainer.load_checkpoint(resume)
    elif args.pretrained_weights:
        trainer.load_pretrained_weights(args.pretrained_weights)

    if not args.val:
        trainer.run_training()
    if args.val_best:
        best = os.path.join(trainer.output_folder, "checkpoint_best.pth")
        if not os.path.isfile(best):
            raise NnppError(f"--val_best: {best} does not exist (written when the pseudo-Dice EMA improves, "
                            f"not with --disable_checkpointing); validate checkpoint_final without --val_best")
        trainer.load_checkpoint(best)
        if env.is_main:
            print(f"[nnpp_train] validating with {best} (epoch {trainer.current_epoch})", flush=True)
    trainer.perform_actual_validation(args.npz)
    if env.is_main:
        report(trainer)
    return trainer


def report(trainer) -> None:
    """Per-class Dice from the validation summary.json and the training throughput."""
    from nnpp.dice import format_dice

    summary = os.path.join(trainer.output_folder, "validation", "summary.json")
    if os.path.isfile(summary):
        print(format_dice(summary, trainer.dataset_json))
    fps = training_fps(trainer)
    if fps is not None:
        from nnpp.distributed import world
        n = world()[1]
        print(f"Training FPS: {fps:.2f} img/s total ({n} rank(s) x {fps / n:.2f} img/s/rank; median over "
              f"{len(trainer.train_fps[1:] or trainer.train_fps)} epoch(s), device {trainer.device}, "
              f"AMP {trainer.amp.mode})")


def training_fps(trainer) -> float | None:
    """Median training throughput over the epochs, all ranks together (images/s); the first epoch is left out
    when there are more (it includes warm-up: cudnn benchmark, compile, caches). None for nnU-Net's trainers."""
    fps = getattr(trainer, "train_fps", [])
    return statistics.median(fps[1:] or fps) if fps else None


@entry_point("nnpp_train")
def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
