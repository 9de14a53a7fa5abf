"""nnpp_distill: distil nnU-Net model folders (one teacher or an ensemble) into a small UNet++ or U-Net student.

    nnpp_distill DATASET CONFIG FOLD -t TEACHER_MODEL_FOLDER [-t FOLDER2 ...] [-tf FOLD ...] [-tchk CHECKPOINT]
                 [--kd soft cwd at sp mgd] [-a A] [-T T] [-r R] [--student unetpp|unet] [--allow-val-leak]
                 [--da5] [per-method weights/temperatures] [every nnpp_train flag: -device --amp --c --val
                 --epochs --iters --val_iters --other_use --dbs ...]

The student is an ordinary nnU-Net model folder,
``$nnUNet_results/DatasetXXX/nnUNetPlusPlusTrainerKD__nnUNetPlans_kd_r2__CONFIG/fold_F`` (``nnUNetTrainerKD`` and
``nnUNetPlans_kd_unet_r2`` for ``--student unet``): ``nnpp_predict -tr nnUNetPlusPlusTrainerKD -p nnUNetPlans_kd_r2``
predicts with it. ``-p`` names the plans the student is derived from (default nnUNetPlans).
"""
from __future__ import annotations

import argparse
import os

from nnpp import NnppError
from nnpp.run import train
from nnpp.cli import dataset_name, entry_point, positive_int

STUDENT_TRAINERS = {"unetpp": "nnUNetPlusPlusTrainerKD", "unet": "nnUNetTrainerKD"}
DEFAULT_R = 2
DEFAULT_STUDENT = "unetpp"


def build_parser() -> argparse.ArgumentParser:
    """nnpp_train's parser (every flag) plus the distillation group. KD flags default to None: on ``--c`` the
    run's saved value is used, otherwise the default in ``nnpp.distill.trainer.KD_DEFAULTS``."""
    p = train.build_parser()
    p.prog = "nnpp_distill"
    p.description = ("Distil nnU-Net model folders (teachers) into a small UNet++ or U-Net student on cuda, npu, "
                     "mps or cpu. -p names the plans the student is derived from; the trainer follows --student.")
    g = p.add_argument_group("distillation")
    g.add_argument("-t", action="append", default=None, metavar="TEACHER_MODEL_FOLDER",
                   help="teacher model folder ($nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG); repeat for an "
                   "ensemble (required, except with --c/--val, which reuse the run's)")
    g.add_argument("-tf", nargs="+", default=None, metavar="FOLD",
                   help="teacher folds (default: the student's fold); every -t folder x every fold is a teacher")
    g.add_argument("-tchk", default=None, help="teacher checkpoint name (default checkpoint_final.pth)")
    g.add_argument("--kd", nargs="+", default=None, metavar="METHOD",
                   help="one or more of: soft (Hinton KL), cwd (channel-wise), at (attention transfer), sp "
                   "(similarity preserving), mgd (masked generative); default soft")
    g.add_argument("-a", type=float, default=None,
                   help="KD weight a: loss = (1-a)*seg + a*(soft + cwd) + feature terms (default 0.5)")
    g.add_argument("-T", type=float, default=None, help="soft-KD temperature (default 2)")
    g.add_argument("-r", type=int, default=None,
                   help=f"channel reduction of the student: features_per_stage // r, never below 8 (default {DEFAULT_R})")
    g.add_argument("--student", default=None, help="unetpp (default) or unet (nnU-Net's PlainConvUNet)")
    g.add_argument("--allow-val-leak", dest="allow_val_leak", action="store_true", default=None,
                   help="accept teachers trained on the student's validation cases; the run is marked leaky")
    g.add_argument("--replace-student-plans", dest="replace_student_plans", action="store_true",
                   help="re-derive this configuration in the student plans file even if the file's differs (e.g. a "
                   "batch size set with nnpp_change_bs); by default the file's configuration is kept and used")
    g.add_argument("--da5", action="store_true", default=None, help="nnU-Net's DA5 data augmentation")
    g.add_argument("--soft-weight", dest="soft_weight", type=float, default=None, help="default 1")
    g.add_argument("--cwd-weight", dest="cwd_weight", type=float, default=None, help="default 1")
    g.add_argument("--cwd-tau", dest="cwd_tau", type=float, default=None, help="CWD temperature (default 4)")
    g.add_argument("--cwd-feat", dest="cwd_feat", action="store_true", default=None,
                   help="CWD also on the matched encoder stages (through 1x1x1 adapters)")
    g.add_argument("--at-weight", dest="at_weight", type=float, default=None, help="default 1")
    g.add_argument("--sp-weight", dest="sp_weight", type=float, default=None, help="default 1")
    g.add_argument("--sp-pool", dest="sp_pool", type=positive_int, default=None,
                   help="SP: voxels per axis of the pooled map (default 4)")
    g.add_argument("--mgd-weight", dest="mgd_weight", type=float, default=None, help="default 1")
    g.add_argument("--mgd-ratio", dest="mgd_ratio", type=float, default=None, help="MGD mask ratio (default 0.75)")
    return p


def normalise_args(args) -> None:
    """Checks that need no data, and canonical forms (so that --c compares like with like)."""
    from nnpp.distill.student import STUDENTS
    from nnpp.distill.trainer import METHODS

    if args.tr != train.DEFAULT_TRAINER:
        raise NnppError(f"-tr {args.tr}: nnpp_distill picks the student's trainer from --student "
                        f"({', '.join(f'{k}: {v}' for k, v in STUDENT_TRAINERS.items())})")
    args.r = DEFAULT_R if args.r is None else args.r
    if args.r < 1:
        raise NnppError(f"-r {args.r}: the channel reduction must be an integer >= 1 (2 halves every stage)")
    args.student = args.student or DEFAULT_STUDENT
    if args.student not in STUDENTS:
        raise NnppError(f"--student {args.student}: choose one of {', '.join(STUDENTS)}")
    if args.kd is not None:
        unknown = [m for m in args.kd if m not in METHODS]
        if unknown:
            raise NnppError(f"unknown KD method(s) {', '.join(unknown)}; choose from {' '.join(METHODS)}")
        args.kd = [m for m in METHODS if m in args.kd]
    if args.t is not None:
        args.t = [os.path.abspath(t) for t in args.t]
    if args.tf is not None:
        args.tf = [str(f) for f in args.tf]
    for name, ok, rule in (("a", lambda v: 0 <= v <= 1, "in [0, 1]"), ("T", lambda v: v > 0, "> 0"),
                           ("cwd_tau", lambda v: v > 0, "> 0"), ("mgd_ratio", lambda v: 0 <= v < 1, "in [0, 1)")):
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise NnppError(f"--{name} {value}: must be {rule}")
    for name in ("soft_weight", "cwd_weight", "at_weight", "sp_weight", "mgd_weight"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise NnppError(f"--{name.replace('_', '-')} {getattr(args, name)}: weights must be >= 0")


def kd_config(args, trainer) -> dict:
    """The resolved KD settings: given flags, else (after --c resolution) the run's, else the defaults."""
    from nnpp.distill.trainer import KD_DEFAULTS

    config = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in KD_DEFAULTS.items()}
    if args.t is None:
        raise NnppError("no teacher: pass -t TEACHER_MODEL_FOLDER (an nnU-Net model folder, "
                        "$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG)")
    config.update(t=list(args.t), tf=list(args.tf or [str(trainer.fold)]), r=args.r, student=args.student)
    return config


def setup(trainer, args) -> None:
    """nnpp.run.train's hook: load and check the teachers, hand them and the KD settings to the trainer."""
    from nnunetv2.paths import nnUNet_preprocessed

    from nnpp.distill.teachers import check_compatible, check_leaks, load_teacher, split_cases
    from nnpp.distill.trainer import KD_DEFAULTS, KD_IDENTITY

    if args.val:  # --val reuses the distillation's settings, as --c does (nnpp_train resolves them on --c only)
        final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
        for key, value in train.saved_run_settings(final).items():
            if key in (*KD_DEFAULTS, *KD_IDENTITY) and getattr(args, key, None) is None:
                setattr(args, key, value)
    config = kd_config(args, trainer)
    teachers = [load_teacher(folder, fold, config["tchk"], trainer.device)
                for folder in config["t"] for fold in config["tf"]]
    for t in teachers:
        check_compatible(t, trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json)
    _, student_val = split_cases(trainer.preprocessed_dataset_folder_base, trainer.fold)
    leaks = check_leaks(teachers, str(nnUNet_preprocessed), trainer.fold, student_val, config["allow_val_leak"])
    if leaks and int(os.environ.get("RANK", 0)) == 0:
        from nnpp.distill.teachers import describe_leak
        print("[nnpp_distill] WARNING: leaky run (--allow-val-leak): " + "; ".join(describe_leak(n, c) for n, c in leaks)
              + '; kd_config.json records "leaky": true', flush=True)
    trainer.configure_kd(teachers, config, leaks)


def report(trainer) -> None:
    """The student's validation Dice beside each teacher's (their fold's validation/summary.json, if present)."""
    from nnpp.cli import dice_text, label_names, read_dice

    names = label_names(trainer.dataset_json)
    model = os.path.basename(os.path.dirname(os.path.abspath(trainer.output_folder)))
    rows = [(f"student {model}/fold_{trainer.fold}",
             os.path.join(trainer.output_folder, "validation", "summary.json"))]
    rows += [(f"teacher {t.name}", os.path.join(t.folder, f"fold_{t.fold}", "validation", "summary.json"))
             for t in trainer.teachers]
    dice = {name: read_dice(path) if os.path.isfile(path) else None for name, path in rows}
    labels = next((list(d) for d in dice.values() if d), [])
    width = max(len(n) for n, _ in rows) + 2
    lines = ["[nnpp_distill] validation Dice" + (" (LEAKY: teachers saw the student's validation cases)"
                                                 if trainer.leaky else ""),
             "".ljust(width) + "".join(f"{names.get(k, k):>12}" for k in labels)]
    for name, _ in rows:
        d = dice[name]
        lines.append(name.ljust(width) + ("".join(dice_text(d.get(k, float("nan"))).rjust(12) for k in labels)
                                          if d else "   (no summary.json)"))
    print("\n".join(lines), flush=True)


def run(args):
    from nnpp.paths import setup_paths

    paths = setup_paths(preprocessed=args.preprocessed, results=args.results)
    normalise_args(args)
    if args.t is None and not (args.c or args.val):
        raise NnppError("no teacher: pass -t TEACHER_MODEL_FOLDER (an nnU-Net model folder, "
                        "$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG)")
    for folder in args.t or []:
        if not os.path.isdir(folder):
            raise NnppError(f"teacher folder {folder} does not exist; -t takes an nnU-Net model folder "
                            f"($nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG)")
    from nnpp.distill.student import write_student_plans

    name = dataset_name(args.dataset_name_or_id)
    pre_dir = os.path.join(paths["nnUNet_preprocessed"], name)
    args.p = write_student_plans(pre_dir, args.p, args.configuration, args.r, args.student,
                                 replace=args.replace_student_plans,
                                 log=print if int(os.environ.get("RANK", 0)) == 0 else None)
    args.tr = STUDENT_TRAINERS[args.student]
    trainer = train.run(args, setup=setup)
    if not args.other_use and int(os.environ.get("RANK", 0)) == 0 and trainer is not None:
        report(trainer)
    return trainer


@entry_point("nnpp_distill")
def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
