"""nnpp_distill: distil nnU-Net model folders (one teacher or an ensemble) into a small U-Net or UNet++ student.

    nnpp_distill DATASET CONFIG FOLD -t TEACHER_MODEL_FOLDER [-t FOLDER2 ...] [-tf FOLD ...] [-tchk CHECKPOINT]
                 [--kd soft cwd at sp mgd] [-a A] [-T T] [-r R] [--student unet|unetpp] [--allow_val_leak]
                 [--replace_student_plans] [--da5] [per-method weights/temperatures] [every nnpp_train flag:
                 -device --amp --c --val --epochs --iters --val_iters --other_use --dbs ...]

The student is an ordinary nnU-Net model folder,
``$nnUNet_results/DatasetXXX/nnUNetTrainerKD__nnUNetPlans_kd_unet_r2__CONFIG/fold_F`` by default
(``nnUNetPlusPlusTrainerKD`` and ``nnUNetPlans_kd_r2`` for ``--student unetpp``; ``...KDDDP`` trainer names for
multi-process runs): ``nnpp_predict -tr nnUNetTrainerKD -p nnUNetPlans_kd_unet_r2`` predicts with it. ``-p`` names
the plans the student is derived from (default nnUNetPlans). ``--c``/``--val`` without ``-r``/``--student``
continue/validate the run they find; ``--val`` needs no teacher.
"""
from __future__ import annotations

import argparse
import os

from nnpp import NnppError
from nnpp.run import train
from nnpp.cli import add_option, entry_point, positive_int
from nnpp.dataset_ids import dataset_name

STUDENT_TRAINERS = {"unetpp": "nnUNetPlusPlusTrainerKD", "unet": "nnUNetTrainerKD"}
#: multi-process runs: their own trainer names (as nnpp_train's DDP variants), never over a 1-device run
STUDENT_TRAINERS_DDP = {"unetpp": "nnUNetPlusPlusTrainerKDDDP", "unet": "nnUNetTrainerKDDDP"}
#: the trainer of each student kind without KD (the no-KD baseline of the same student, in a folder of its own)
NO_KD_TRAINERS = {"unetpp": "nnUNetPlusPlusTrainer", "unet": "nnUNetTrainerNoKD"}
#: the default student: nnU-Net's PlainConvUNet at half width. Measured (benchmarks/RESULTS.md, bench_distill): 0.08x
#: a UNet++ teacher's FLOPs per patch and 0.15x its time per case through nnpp_predict (0.25x / 0.44x a plain U-Net
#: teacher's); a UNet++ student at r=2 keeps 0.25x a UNet++ teacher's FLOPs and 0.48x its time per case (its
#: full-resolution nested nodes)
DEFAULT_R = 2
DEFAULT_STUDENT = "unet"


def build_parser() -> argparse.ArgumentParser:
    """nnpp_train's parser (every flag) plus the distillation group. KD flags default to None: on ``--c`` the
    run's saved value is used, otherwise the default in ``nnpp.distill.settings.KD_DEFAULTS``."""
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
                   help=f"channel reduction of the student: features_per_stage // r, never below 8 (default {DEFAULT_R}; "
                   f"--c/--val: the run's)")
    g.add_argument("--student", default=None, help="unet (default: nnU-Net's PlainConvUNet) or unetpp (nnpp's UNet++; "
                   "r=2: 0.25x a UNet++ teacher's FLOPs, about 0.5x its time per case); --c/--val: the run's")
    add_option(g, "--allow_val_leak", "--allow-val-leak", action="store_true", default=None,
                   help="accept teachers trained on the student's validation cases; the run is marked leaky")
    add_option(g, "--replace_student_plans", "--replace-student-plans", action="store_true",
                   help="re-derive this configuration in the student plans file even if the file's differs (e.g. a "
                   "batch size set with nnpp_change_bs); by default the file's configuration is kept and used")
    g.add_argument("--da5", action="store_true", default=None, help="nnU-Net's DA5 data augmentation")
    add_option(g, "--soft_weight", "--soft-weight", type=float, default=None, help="default 1")
    add_option(g, "--cwd_weight", "--cwd-weight", type=float, default=None, help="default 1")
    add_option(g, "--cwd_tau", "--cwd-tau", type=float, default=None, help="CWD temperature (default 4)")
    add_option(g, "--cwd_feat", "--cwd-feat", action="store_true", default=None,
                   help="CWD also on the matched encoder stages (through 1x1x1 adapters)")
    add_option(g, "--at_weight", "--at-weight", type=float, default=None, help="default 1")
    add_option(g, "--sp_weight", "--sp-weight", type=float, default=None, help="default 1")
    add_option(g, "--sp_pool", "--sp-pool", type=positive_int, default=None,
                   help="SP: voxels per axis of the pooled map (default 4)")
    add_option(g, "--mgd_weight", "--mgd-weight", type=float, default=None, help="default 1")
    add_option(g, "--mgd_ratio", "--mgd-ratio", type=float, default=None, help="MGD mask ratio (default 0.75)")
    add_option(g, "--mgd_all_stages", "--mgd-all-stages", action="store_true", default=None,
                   help="MGD on every matched encoder stage (default: the deepest matched stage, as the paper)")
    u = p.add_argument_group("unlabeled cases (the transfer set)")
    u.add_argument("--unlabeled", nargs="+", default=None, metavar="FOLDER",
                   help="folders of raw images without labels (nnU-Net naming, CASE_0000 + the dataset's file "
                   "ending), preprocessed once with the student's plans into PREPROCESSED/DATASET/nnpp_unlabeled/")
    u.add_argument("--unlabeled_fraction", type=float, default=None,
                   help="share of each batch that is unlabeled patches (default 0.5; at least one of each kind)")
    u.add_argument("--pseudo", default=None, choices=("soft", "hard", "both"),
                   help="what an unlabeled patch learns: hard = the teacher's pseudo-labels, predicted once before "
                   "training, through the segmentation loss (no teacher in the step; default); soft = the KD terms "
                   "of the online teachers; both")
    return p


def normalise_args(args) -> None:
    """Checks that need no data, and canonical forms (so that --c compares like with like)."""
    from nnpp.distill.student import STUDENTS
    from nnpp.distill.settings import METHODS

    if args.tr != train.DEFAULT_TRAINER:
        raise NnppError(f"-tr {args.tr}: nnpp_distill picks the student's trainer from --student "
                        f"({', '.join(f'{k}: {v}' for k, v in STUDENT_TRAINERS.items())})")
    if args.r is not None and args.r < 1:
        raise NnppError(f"-r {args.r}: the channel reduction must be an integer >= 1 (2 halves every stage)")
    if args.student is not None and args.student not in STUDENTS:
        raise NnppError(f"--student {args.student}: choose one of {', '.join(STUDENTS)}")
    if args.kd is not None:
        unknown = [m for m in args.kd if m not in METHODS]
        if unknown:
            raise NnppError(f"unknown KD method(s) {', '.join(unknown)}; choose from {' '.join(METHODS)}")
        args.kd = [m for m in METHODS if m in args.kd]
    if args.t is not None:
        args.t = [os.path.abspath(t) for t in args.t]
    if args.unlabeled is not None:
        args.unlabeled = [os.path.abspath(f) for f in args.unlabeled]
    elif (args.unlabeled_fraction is not None or args.pseudo is not None) and not (args.c or args.val):
        raise NnppError("--unlabeled_fraction/--pseudo apply to unlabeled cases: pass --unlabeled FOLDER")
    if args.unlabeled_fraction is not None and not 0 < args.unlabeled_fraction < 1:
        raise NnppError(f"--unlabeled_fraction {args.unlabeled_fraction}: must be in (0, 1) (the share of each "
                        f"batch that is unlabeled)")
    if args.tf is not None:
        args.tf = [str(f) for f in args.tf]
    for name, ok, rule in (("a", lambda v: 0 <= v <= 1, "in [0, 1]"), ("T", lambda v: v > 0, "> 0"),
                           ("cwd_tau", lambda v: v > 0, "> 0"), ("mgd_ratio", lambda v: 0 <= v < 1, "in [0, 1)")):
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise NnppError(f"--{name} {value}: must be {rule}")
    for name in ("soft_weight", "cwd_weight", "at_weight", "sp_weight", "mgd_weight"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise NnppError(f"--{name} {getattr(args, name)}: weights must be >= 0")


def kd_config(args, trainer) -> dict:
    """The resolved KD settings: given flags, else (after --c resolution) the run's, else the defaults."""
    from nnpp.distill.settings import KD_DEFAULTS

    config = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in KD_DEFAULTS.items()}
    if args.t is None:
        raise NnppError("no teacher: pass -t TEACHER_MODEL_FOLDER (an nnU-Net model folder, "
                        "$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG)")
    config.update(t=list(args.t), tf=list(args.tf or [str(trainer.fold)]), r=args.r, student=args.student)
    if config["unlabeled"] and config["pseudo"] == "hard":
        if args.kd:  # (an explicit --kd; a resumed hard run has kd [])
            raise NnppError(f"--kd {' '.join(args.kd)} with --pseudo hard: the hard mode trains on the teacher's "
                            f"pseudo-labels without the teacher in the step (no KD terms); use --pseudo soft or both "
                            f"for online KD terms")
        config["kd"] = []  # no KD terms, no KD modules: the step is an ordinary training step
    return config


def setup(trainer, args) -> None:
    """nnpp.run.train's hook: load and check the teachers, hand them and the KD settings to the trainer."""
    from nnunetv2.paths import nnUNet_preprocessed

    from nnpp.distill.teachers import check_compatible, check_leaks, load_teacher, split_cases
    from nnpp.distill.settings import KD_DEFAULTS, KD_IDENTITY

    if args.val:  # --val validates the student alone: the run's KD settings name the teachers for the report
        final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
        for key, value in train.saved_run_settings(final).items():
            if key in (*KD_DEFAULTS, *KD_IDENTITY) and getattr(args, key, None) is None:
                setattr(args, key, value)
        trainer.kd_validate_only = True
        trainer.kd_report_teachers = [(folder, str(fold)) for folder in (args.t or [])
                                      for fold in (args.tf or [trainer.fold])]
        return
    config = kd_config(args, trainer)
    teachers = [load_teacher(folder, fold, config["tchk"], trainer.device)
                for folder in config["t"] for fold in config["tf"]]
    for t in teachers:
        check_compatible(t, trainer.plans_manager, trainer.configuration_manager, trainer.dataset_json)
    _, student_val = split_cases(trainer.preprocessed_dataset_folder_base, trainer.fold)
    leaks = check_leaks(teachers, str(nnUNet_preprocessed), trainer.fold, student_val, config["allow_val_leak"])
    if leaks and int(os.environ.get("RANK", 0)) == 0:
        from nnpp.distill.teachers import describe_leak
        print("[nnpp_distill] WARNING: leaky run (--allow_val_leak): "
              + "; ".join(describe_leak(n, c) for n, c in leaks)
              + '; kd_config.json records "leaky": true', flush=True)
    trainer.configure_kd(teachers, config, leaks)
    if config["unlabeled"] and int(os.environ.get("RANK", 0)) == 0:
        print(f"[nnpp_distill] {unlabeled_choice(config, 'pseudo' in getattr(args, 'given', ()))}", flush=True)
    if config["unlabeled"]:
        trainer.unlabeled_dir = prepare_unlabeled(trainer, config, student_val)


def unlabeled_choice(config: dict, given: bool) -> str:
    """The start-up line saying what ``--unlabeled`` trains with: the ``--pseudo`` mode, whether it was asked for
    or is the default, and which terms every patch then gets."""
    kd = " + ".join(config["kd"]) or "none"
    what = {"hard": "unlabeled patches learn the teacher's pseudo-labels through the segmentation loss; no teacher "
                    "in the step, so no KD terms on any patch",
            "soft": f"unlabeled patches learn only the online teachers' KD terms ({kd}); labeled ones labels + KD",
            "both": f"unlabeled patches learn the teacher's pseudo-labels and the online KD terms ({kd}); labeled ones "
                    f"labels + KD"}[config["pseudo"]]
    origin = "given" if given else "the default with --unlabeled; --pseudo soft|both keeps online KD terms"
    return f"--unlabeled: --pseudo {config['pseudo']} ({origin}): {what}"


def prepare_unlabeled(trainer, config: dict, student_val: list) -> str:
    """The unlabeled cases of ``config["unlabeled"]``, checked against the student's validation cases, pseudo-
    labelled by the teacher (``--pseudo hard|both``; under torchrun every rank predicts its share on its device) and
    preprocessed with the student's plans (by rank 0). The ranks wait for each other by polling files, so
    pseudo-labelling may outlast the process group's timeout. Returns the preprocessed folder."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    from nnpp.distill import unlabeled as U
    from nnpp.distributed import rank0_runs, ranks_run, world
    dataset_json, pm = trainer.dataset_json, trainer.plans_manager
    ending = dataset_json["file_ending"]
    # the batch check before any long work (nnU-Net sets trainer.batch_size in initialize; --dbs splits it)
    batch = trainer.configuration_manager.batch_size
    U.unlabeled_per_batch(config["unlabeled_fraction"], batch // world()[1] if getattr(trainer, "distribute_batch", False)
                          else batch)
    cases = U.find_cases(config["unlabeled"], ending,
                         determine_num_input_channels(pm, trainer.configuration_manager, dataset_json))
    name = os.path.basename(trainer.preprocessed_dataset_folder_base.rstrip(os.sep))
    hard = config["pseudo"] in ("hard", "both")
    teachers = list(dict.fromkeys(config["t"]))  # every -t folder once, in order
    base = trainer.preprocessed_dataset_folder_base
    pseudo_dir = U.pseudo_folder(base, teachers, config["tf"], config["tchk"]) if hard else None

    folder = os.path.join(base, "nnpp_unlabeled")
    rank0_runs(lambda: U.check_leaks(cases, student_val, os.path.join(str(nnUNet_raw), name), dataset_json,
                                     pm.image_reader_writer_class, cache=os.path.join(folder, "digests.json")),
               folder, "checking the unlabeled cases")
    if hard:
        ranks_run(lambda rank, n: U.pseudo_label(teachers, config["tf"], cases, pseudo_dir, trainer.device,
                                                 config["tchk"], ending, part=(rank, n)),
                  folder, "pseudo-labelling the unlabeled cases")
    return rank0_runs(lambda: U.prepare(cases, base, pm, trainer.configuration_manager, trainer.configuration_name,
                                        dataset_json, pseudo_dir), folder, "preparing the unlabeled cases")


def validation_cases(summary_path: str, file_ending: str) -> set:
    """The case ids an nnU-Net ``summary.json`` scored (from ``metric_per_case[*].reference_file``)."""
    from nnpp.file_safety import load_json_file
    cases = set()
    for entry in load_json_file(summary_path, "validation summary").get("metric_per_case", []):
        name = os.path.basename(str(entry.get("reference_file", "")))
        cases.add(name[:-len(file_ending)] if file_ending and name.endswith(file_ending) else name)
    return cases


def report(trainer) -> None:
    """The student's validation Dice beside each teacher's (their fold's validation/summary.json, if present), a
    teacher's only when it was scored on the same validation cases as the student; otherwise the row says which
    cases each saw."""
    from nnpp.dice import dice_table, label_names, read_dice
    from nnpp.file_safety import load_json_file

    names = label_names(trainer.dataset_json)
    ending = trainer.dataset_json.get("file_ending", "")
    model = os.path.basename(os.path.dirname(os.path.abspath(trainer.output_folder)))
    teachers = ([(t.folder, str(t.fold), t.name) for t in trainer.teachers] if trainer.teachers else
                [(folder, fold, f"{os.path.basename(folder.rstrip(os.sep))}/fold_{fold}")
                 for folder, fold in getattr(trainer, "kd_report_teachers", [])])
    rows = [(f"student {model}/fold_{trainer.fold}",
             os.path.join(trainer.output_folder, "validation", "summary.json"))]
    rows += [(f"teacher {name}", os.path.join(folder, f"fold_{fold}", "validation", "summary.json"))
             for folder, fold, name in teachers]
    dice = {name: read_dice(path) if os.path.isfile(path) else None for name, path in rows}
    cases = {name: validation_cases(path, ending) if os.path.isfile(path) else None for name, path in rows}
    student_cases = cases[rows[0][0]]
    record = os.path.join(trainer.output_folder, "kd_config.json")
    leaky = trainer.leaky or (os.path.isfile(record) and bool(load_json_file(record, "kd_config.json").get("leaky")))
    table = []
    for name, _ in rows:
        d, seen = dice[name], cases[name]
        if not d:
            d = "(no summary.json)"
        elif name != rows[0][0] and student_cases is not None and seen != student_cases:
            shown = ", ".join(sorted(seen)[:3]) + (" ..." if len(seen) > 3 else "")
            d = f"(not comparable: scored on {len(seen)} case(s) ({shown}), the student on {len(student_cases)})"
        table.append((name, d))
    print(dice_table("[nnpp_distill] validation Dice" + (" (LEAKY: teachers saw the student's validation cases)"
                                                         if leaky else ""), table, names), flush=True)


def find_student_runs(results_dataset_dir: str, configuration: str, fold, source_plans: str, trainers: dict,
                      checkpoints: tuple) -> list:
    """``[(student, r, folder)]`` of the distillations of ``configuration``/``fold`` from ``source_plans`` in
    ``results_dataset_dir`` that hold one of ``checkpoints``; student and r from the fold's kd_config.json (else
    the student plans' ``nnpp_kd`` record)."""
    import glob

    from nnpp.file_safety import load_json_file
    found = []
    for student, trainer_name in trainers.items():
        pattern = os.path.join(results_dataset_dir, f"{trainer_name}__{source_plans}_kd_*__{configuration}")
        for model in sorted(glob.glob(pattern)):
            fold_dir = os.path.join(model, f"fold_{fold}")
            if not any(os.path.isfile(os.path.join(fold_dir, c)) for c in checkpoints):
                continue
            record_path = os.path.join(fold_dir, "kd_config.json")
            if os.path.isfile(record_path):
                record = load_json_file(record_path, "kd_config.json")
            elif os.path.isfile(os.path.join(model, "plans.json")):
                record = load_json_file(os.path.join(model, "plans.json"), "plans.json").get("nnpp_kd", {})
            else:
                continue
            if record.get("student") == student and isinstance(record.get("r"), int):
                found.append((student, record["r"], model))
    return found


def resolve_student(args, results_dataset_dir: str, trainers: dict) -> None:
    """--c / --val without -r or --student: the run they find (one distillation of this configuration and fold,
    matching what was given) supplies them, so that they never start another folder; several are an error
    naming them. Otherwise (and when none exists) the defaults."""
    if (args.c or args.val) and (args.r is None or args.student is None):
        checkpoints = ("checkpoint_final.pth",) if args.val else \
            ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
        runs = [(st, r, m) for st, r, m in find_student_runs(results_dataset_dir, args.configuration, args.fold,
                                                              args.p, trainers, checkpoints)
                if args.r in (None, r) and args.student in (None, st)]
        if len(runs) > 1:
            raise NnppError(f"{'--c' if args.c else '--val'}: {len(runs)} distillations of {args.configuration} fold "
                            f"{args.fold} match ({'; '.join(os.path.basename(m) for _, _, m in runs)}); choose one "
                            f"with -r and --student")
        if runs:
            args.student, args.r, model = runs[0]
            print(f"[nnpp_distill] {'--c' if args.c else '--val'}: the run in {model} (--student {args.student} "
                  f"-r {args.r})", flush=True)
    args.student = args.student or DEFAULT_STUDENT
    args.r = DEFAULT_R if args.r is None else args.r


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
    trainers = STUDENT_TRAINERS_DDP if int(os.environ.get("WORLD_SIZE", "1")) > 1 else STUDENT_TRAINERS
    resolve_student(args, os.path.join(paths["nnUNet_results"], name), trainers)
    args.p = write_student_plans(pre_dir, args.p, args.configuration, args.r, args.student,
                                 replace=args.replace_student_plans, writer=int(os.environ.get("RANK", 0)) == 0)
    args.tr = trainers[args.student]
    trainer = train.run(args, setup=setup)
    if not args.other_use and int(os.environ.get("RANK", 0)) == 0 and trainer is not None:
        report(trainer)
    return trainer


@entry_point("nnpp_distill")
def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
