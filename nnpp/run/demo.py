"""nnpp_demo: the whole pipeline on a built-in synthetic Task03_Liver-like dataset, end to end.

Generates an MSD-layout task, converts it with nnU-Net's MSD converter, fingerprints, plans (small UNet,
small patch) and preprocesses it, trains UNet++ briefly on the auto device, validates fold 0 and prints
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
from nnpp.run.common import entry_point, positive_int

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
    from nnpp.run import train
    from nnpp.tools.get_dice_result import label_names, read_dice

    print(f"[nnpp_demo] 1/3 writing a synthetic Task03_Liver-like MSD task ({args.cases} training cases) "
          f"under {work}", flush=True)
    msd = make_msd_task(os.path.join(work, "msd"), args.dataset_id, n_train=args.cases, n_test=2)
    print("[nnpp_demo] 2/3 nnU-Net: MSD conversion, fingerprint, planning, preprocessing", flush=True)
    name = prepare_dataset(msd, args.dataset_id, num_processes=args.np)
    print(f"[nnpp_demo] 3/3 training UNet++ on {name}, fold 0: {args.epochs} epochs x {args.iters} iterations",
          flush=True)
    train_args = train.build_parser().parse_args(
        [str(args.dataset_id), "3d_fullres", "0", "-device", args.device, "--amp", args.amp,
         "--epochs", str(args.epochs), "--iters", str(args.iters), "--val_iters", str(args.val_iters)])
    trainer = train.run(train_args)

    summary = os.path.join(trainer.output_folder, "validation", "summary.json")
    dice = read_dice(summary)
    names = label_names(trainer.dataset_json)
    result = {"dice": {names.get(k, k): v for k, v in dice.items()}, "train_fps": train.training_fps(trainer),
              "device": str(trainer.device), "amp": trainer.amp.mode, "seconds": time.time() - t0,
              "output_folder": trainer.output_folder}
    print("\n[nnpp_demo] done in {:.0f} s on {} (AMP {}): ".format(result["seconds"], result["device"], result["amp"])
          + ", ".join(f"{k} Dice {v:.4f}" for k, v in result["dice"].items())
          + f", training FPS {result['train_fps']:.2f} img/s")
    print(f"[nnpp_demo] results: {trainer.output_folder}")
    return result


@entry_point("nnpp_demo")
def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
