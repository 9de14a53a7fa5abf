"""nnpp_demo: the whole pipeline on a built-in synthetic Task03_Liver-like dataset, end to end.

Generates an MSD-layout task, converts it with nnU-Net's MSD converter, fingerprints, plans it with nnpp's UNet++
planner (small width, small patch: plans ``nnppUNetPlusPlusPlans``) and preprocesses it, trains UNet++ briefly on
the auto device (``--amp auto``: bf16 on CPUs with native bf16), validates fold 0 and prints
per-class Dice and training FPS. Everything lives under --workdir (its own nnUNet_raw / nnUNet_preprocessed /
nnUNet_results; your own nnU-Net folders are never touched).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

from nnpp import NnppError
from nnpp.device import AMP_CHOICES, DEVICE_CHOICES
from nnpp.cli import entry_point, positive_int
from nnpp.dice import dice_text

MARKER = ".nnpp_demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnpp_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="nnpp_demo", help="demo folder, recreated on each run (default ./nnpp_demo)")
    p.add_argument("--dataset_id", type=positive_int, default=900)
    p.add_argument("--cases", type=positive_int, default=16, help="training cases (fold 0 validates on a fifth)")
    p.add_argument("--epochs", type=positive_int, default=6)
    p.add_argument("--iters", type=positive_int, default=40, help="training iterations per epoch")
    p.add_argument("--val_iters", type=positive_int, default=5, help="pseudo-Dice iterations per epoch")
    p.add_argument("-device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES)
    p.add_argument("-np", type=positive_int, default=2, help="processes for conversion and preprocessing")
    p.add_argument("--distill", action="store_true", help="then distil the trained UNet++ into nnpp_distill's "
                   "default student, train the same student without KD for the same budget, and compare Dice and latency")
    return p


def fresh_workdir(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise NnppError(f"{path} exists and was not made by nnpp_demo; pass another --workdir or remove it")
        shutil.rmtree(path)
    os.makedirs(path)
    open(os.path.join(path, MARKER), "w").close()
    return path


def run(args) -> dict:
    t0 = time.time()
    work = fresh_workdir(args.workdir)
    # nnU-Net's worker pools (conversion, validation export) default to 8 processes: size them to the machine
    os.environ.setdefault("nnUNet_def_n_proc", str(args.np))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = os.path.join(work, var)
        os.makedirs(os.environ[var])

    from nnpp.data.synthetic import make_msd_task, prepare_dataset
    from nnpp.planning import UNETPP_PLANS
    from nnpp.run import train
    from nnpp.dice import label_names, read_dice

    print(f"[nnpp_demo] 1/3 writing a synthetic Task03_Liver-like MSD task ({args.cases} training cases) "
          f"under {work}", flush=True)
    msd = make_msd_task(os.path.join(work, "msd"), args.dataset_id, n_train=args.cases, n_test=2)
    print("[nnpp_demo] 2/3 nnU-Net: MSD conversion, fingerprint, planning, preprocessing", flush=True)
    name = prepare_dataset(msd, args.dataset_id, num_processes=args.np, planner="SmallUNetPlusPlusPlanner")
    print(f"[nnpp_demo] 3/3 training UNet++ on {name}, fold 0: {args.epochs} epochs x {args.iters} iterations",
          flush=True)
    train_args = train.build_parser().parse_args(
        [str(args.dataset_id), "3d_fullres", "0", "-p", UNETPP_PLANS, "-device", args.device, "--amp", args.amp,
         "--epochs", str(args.epochs), "--iters", str(args.iters), "--val_iters", str(args.val_iters)])
    trainer = train.run(train_args)

    summary = os.path.join(trainer.output_folder, "validation", "summary.json")
    dice = read_dice(summary)
    names = label_names(trainer.dataset_json)
    result = {"dice": {names.get(k, k): v for k, v in dice.items()}, "train_fps": train.training_fps(trainer),
              "device": str(trainer.device), "amp": trainer.amp.mode, "seconds": time.time() - t0,
              "output_folder": trainer.output_folder}
    print("\n[nnpp_demo] done in {:.0f} s on {} (AMP {}): ".format(result["seconds"], result["device"], result["amp"])
          + ", ".join(f"{k} Dice {dice_text(v)}" for k, v in result["dice"].items())
          + f", training FPS {result['train_fps']:.2f} img/s")
    print(f"[nnpp_demo] results: {trainer.output_folder}")
    if args.distill:
        result["distill"] = run_distill(args, trainer)
    return result


def run_distill(args, teacher_trainer) -> list:
    """``--distill``: the trained UNet++ (fold 0) as teacher -> nnpp_distill's default student (soft KD), and the
    same student plans trained by the same student's trainer without KD for the same epochs/iterations. Prints
    the three models' validation Dice, parameters and forward latency per patch side by side."""
    from nnpp.dice import label_names, read_dice
    from nnpp.planning import UNETPP_PLANS
    from nnpp.run import distill, train

    teacher_folder = os.path.dirname(os.path.abspath(teacher_trainer.output_folder))
    budget = ["-device", args.device, "--amp", args.amp, "--epochs", str(args.epochs), "--iters", str(args.iters),
              "--val_iters", str(args.val_iters)]
    common = [str(args.dataset_id), "3d_fullres", "0"]
    print(f"[nnpp_demo] distillation 1/2: nnpp_distill {' '.join(common)} -t {teacher_folder} --kd soft "
          f"-p {UNETPP_PLANS}", flush=True)
    kd = distill.run(distill.build_parser().parse_args(common + ["-t", teacher_folder, "--kd", "soft",
                                                                 "-p", UNETPP_PLANS] + budget))
    student, r = kd.kd_config["student"], kd.kd_config["r"]
    no_kd = distill.NO_KD_TRAINERS[student]
    print(f"[nnpp_demo] distillation 2/2: the same student without KD: nnpp_train {' '.join(common)} -tr {no_kd} "
          f"-p {kd.plans_manager.plans_name}", flush=True)
    plain = train.run(train.build_parser().parse_args(common + ["-tr", no_kd, "-p", kd.plans_manager.plans_name]
                                                      + budget))
    names = label_names(teacher_trainer.dataset_json)
    rows = []
    for what, t in (("teacher UNet++", teacher_trainer), (f"{student} r={r}, KD", kd),
                    (f"{student} r={r}, no KD", plain)):
        net = getattr(t.network, "module", t.network)
        net = getattr(net, "net", net)  # the KD wrapper's student
        dice = read_dice(os.path.join(t.output_folder, "validation", "summary.json"))
        rows.append({"model": what, "parameters": sum(p.numel() for p in net.parameters()),
                     "latency_ms": _latency_ms(net, t), "dice": {names.get(k, k): v for k, v in dice.items()},
                     "output_folder": t.output_folder})
    labels = list(rows[0]["dice"])
    print("\n[nnpp_demo] distillation: " + f"{args.epochs} epochs x {args.iters} iterations each, fold 0 validation")
    print(f"{'model':<22}{'parameters':>12}{'ms/patch':>10}" + "".join(f"{k + ' Dice':>14}" for k in labels))
    for r in rows:
        print(f"{r['model']:<22}{r['parameters']:>12,}{r['latency_ms']:>10.1f}"
              + "".join(dice_text(r["dice"][k]).rjust(14) for k in labels))
    return rows


def _latency_ms(net, trainer) -> float:
    """Forward time per patch of ``net`` (batches of 2 patches, no grad, the run's autocast and memory format; best
    of 3 after 2 warm-up calls): nnpp.distill.cost.patch_cost, as nnpp_distill's start-up report measures it."""
    import torch

    from nnpp.distill.cost import patch_cost
    patch = (trainer.num_input_channels, *trainer.configuration_manager.patch_size)
    return patch_cost(net, patch, trainer.device, trainer.amp,
                      getattr(trainer, "memory_format", torch.contiguous_format))[1]


@entry_point("nnpp_demo")
def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
