"""Does KD beat no KD? The same student trained with each KD method and without KD, for the same budget and several
seeds, against a longer-trained UNet++ teacher, on a synthetic task whose labels the teacher learns.

    python benchmarks/bench_kd.py --work /tmp/bench_kd                       # the full table (hours on 2 CPU cores)
    python benchmarks/bench_kd.py --work /tmp/kd_smoke --cases 6 --teacher_epochs 1 --student_epochs 1 --iters 2 \
        --val_iters 1 --seeds 0 --methods none soft                          # a smoke test of the pipeline

The task (``--task_id``, MSD layout, converted and planned by nnU-Net's pipeline, ``nnUNetPlans``): 3D volumes with
an ellipsoid organ (label 1) holding 1-3 large, contrasted lesions (label 2, radius >= ``--lesion_radius``
voxels), so that a UNet++ trained for ``--teacher_epochs`` learns both labels while a short-budget student does
not. The configuration (``--configuration``, default ``2d``) is nnU-Net's own, with the batch size set to ``--batch``
(nnpp's change_bs).

Runs, each a separate nnpp command in a results tree of its own (``WORK/results/<run>``), fold 0:

* the teacher: ``nnpp_train -tr nnUNetPlusPlusTrainer --epochs TEACHER_EPOCHS --seed 0``;
* per seed and method: ``nnpp_distill -t TEACHER --kd ... --seed S --epochs STUDENT_EPOCHS`` with nnpp_distill's
  default student, or for ``none`` the same student without KD (``nnpp_train -tr nnUNetTrainerNoKD -p
  nnUNetPlans_kd_unet_r2``). Methods: ``none``, ``soft``, ``soft+cwd``, ``cwd+feat`` (``--kd cwd --cwd_feat``),
  ``at``, ``sp``, ``mgd``.

``--unlabeled N`` (unlabeled scans as the transfer set): the labeled cases are split by hand, ``--labeled K`` for
training (teacher and students) and the rest for validation (``splits_final.json`` fold 0), and N more cases of the same generator (another
seed) are written without labels to ``WORK/unlabeled``; the methods ``unl_hard`` (the teacher's pseudo-labels,
predicted once), ``unl_soft`` (online soft KD on the unlabeled patches) and ``unl_both`` train on them too::

    python benchmarks/bench_kd.py --work /tmp/kd_unl --cases 10 --labeled 4 --unlabeled 32 \
        --methods none soft unl_hard unl_soft --seeds 0 1 2

``--task ts_example_ct`` (real data): the shared real CT (``../shared/datasets/ts_example_ct.py``: spleen,
liver, stomach, aorta, 3 mm) cut into ``--chunks`` z-slabs, planned as ``bench_convergence.py --task ts_example_ct``
(``SmallUNetPlanner``, base 8 features, 2d, the planner's batch). Slabs ``--train_slabs`` are the labeled training
cases, ``--val_slabs`` the held-out validation cases (fold 0), and every other slab is written WITHOUT its labels to
``WORK/unlabeled`` (the transfer set: other anatomy levels of the same patient, never a validation slab). With
``--unseen`` every model is also scored on a second patient (TotalSegmentator's DICOM example CT, another scanner),
predicted by ``nnpp_predict`` and scored by nnU-Net's metrics::

    python benchmarks/bench_kd.py --work /tmp/kd_ts --task ts_example_ct --unseen --teacher_epochs 40 \
        --student_epochs 40 --iters 40 --methods none soft unl_hard unl_both --seeds 0 1 2

Every run's fold-0 validation Dice per label is read from its ``summary.json``. A finished run (its summary.json
exists) is not run again, so the benchmark can be run in pieces. The JSON (``--out``, default
``WORK/bench_kd.json``) and the printed table give per method the mean and standard deviation of the Dice per
label over the seeds and the fraction of the teacher-student gap closed, (KD - no KD) / (teacher - no KD), per
label, flagged when the difference to no KD exceeds one standard deviation of the no-KD runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import md_row, md_table, nnunet_dirs, write_json  # noqa: E402
from common import run_logged as run  # noqa: E402  (python -m CMD with its log; a failure stops the benchmark)

METHODS = {"none": None, "soft": ["--kd", "soft"], "soft+cwd": ["--kd", "soft", "cwd"],
           "cwd+feat": ["--kd", "cwd", "--cwd_feat"], "at": ["--kd", "at"], "sp": ["--kd", "sp"],
           "mgd": ["--kd", "mgd"],
           # with --unlabeled N: the unlabeled cases as the transfer set (nnpp_distill --unlabeled WORK/unlabeled)
           "unl_hard": ["--pseudo", "hard"], "unl_soft": ["--kd", "soft", "--pseudo", "soft"],
           "unl_both": ["--kd", "soft", "--pseudo", "both"]}
UNLABELED_METHODS = ("unl_hard", "unl_soft", "unl_both")
LABELS = {"0": "background", "1": "organ", "2": "lesion"}


def make_task(root: str, task_id: int, n_cases: int, seed: int, shape=(32, 96, 96), lesion_radius: int = 6) -> str:
    """An MSD-layout task: noisy background, an ellipsoid organ (intensity ~100) with 1-3 spherical lesions
    (intensity ~40, radius lesion_radius..1.6x) inside it. Spacing 1 x 1 x 1 mm."""
    import numpy as np

    from nnpp.data.synthetic import write_msd_task
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")

    def cases():
        for _ in range(n_cases):
            center = np.array(shape) / 2 + rng.uniform(-0.1, 0.1, 3) * np.array(shape)
            radii = np.array(shape) * rng.uniform(0.28, 0.4, 3)
            organ = ((zz - center[0]) / radii[0]) ** 2 + ((yy - center[1]) / radii[1]) ** 2 + \
                ((xx - center[2]) / radii[2]) ** 2 <= 1
            label = organ.astype(np.uint8)
            for _ in range(rng.integers(1, 4)):
                r = lesion_radius * rng.uniform(1.0, 1.6)
                c = center + rng.uniform(-0.5, 0.5, 3) * np.maximum(radii - r, 1)
                lesion = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r ** 2) & organ
                label[lesion] = 2
            image = rng.normal(0, 20, shape) + np.where(label == 1, 100, 0) + np.where(label == 2, 40, 0)
            yield image.astype(np.int16), label, (1.0, 1.0, 1.0)
    return write_msd_task(root, task_id, "KDBench", "nnpp synthetic KD benchmark task", LABELS, cases(), n_cases,
                          "kd")


def dice_of(summary: str, names: dict | None = None) -> dict:
    """{label name: Dice} of an nnU-Net ``summary.json`` (``names``: label value -> name; default the synthetic's)."""
    from nnpp.dice import read_dice
    names = names or LABELS
    return {names.get(k, k): v for k, v in read_dice(summary).items()}


def prepare_ts(work: str, chunks: int, train: list, val: list) -> str:
    """The real CT in ``chunks`` slabs through bench_convergence's preparation (its real-CT plans), fold 0 = ``train``
    vs ``val`` slabs. Returns the dataset name."""
    from bench_convergence import TS_BUILDER, TS_ID, prepare_ts as prepare_ts_dataset
    bad = [c for c in train + val if not 0 <= c < chunks]
    if bad or set(train) & set(val):
        raise SystemExit(f"bench_kd: --train_slabs {train} / --val_slabs {val}: each slab once, in 0..{chunks - 1}")
    name = prepare_ts_dataset(work, chunks, TS_BUILDER)
    assert name == f"Dataset{TS_ID}_TSExampleCT", name
    with open(os.path.join(os.environ["nnUNet_preprocessed"], name, "splits_final.json"), "w") as f:
        json.dump([{"train": [f"ts_example_{c:02d}" for c in train],
                    "val": [f"ts_example_{c:02d}" for c in val]}], f, indent=1)
    return name


def write_unlabeled_slabs(folder: str, name: str, slabs: list) -> None:
    """The images of ``slabs`` (never their labels) as ``unl_slabNN_0000.nii.gz`` in ``folder``, written once."""
    import shutil
    if os.path.isdir(folder):
        return
    images = os.path.join(os.environ["nnUNet_raw"], name, "imagesTr")
    partial = f"{folder}.partial{os.getpid()}"  # runs started side by side each write their own
    os.makedirs(partial, exist_ok=True)
    for c in slabs:
        shutil.copy(os.path.join(images, f"ts_example_{c:02d}_0000.nii.gz"),
                    os.path.join(partial, f"unl_slab{c:02d}_0000.nii.gz"))
    try:
        os.replace(partial, folder)
    except OSError:  # another run's folder got there first: the same files
        shutil.rmtree(partial)


def score_unseen(work: str, model: str, fold_dir: str, env: dict, names: dict, log: str) -> dict:
    """``model``'s Dice per label on the second patient (``WORK/unseen``): nnpp_predict (torch, mirroring, fp32 on
    the CPU) into ``fold_dir/unseen``, nnU-Net's ``compute_metrics_on_folder_simple`` against its labels; kept
    until the model's checkpoint or the patient's labels are newer."""
    from bench_convergence import TS_ID
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple
    out = os.path.join(fold_dir, "unseen")
    summary = os.path.join(out, "summary.json")
    sources = (os.path.join(fold_dir, "checkpoint_final.pth"), os.path.join(work, "unseen", "labelsTs",
                                                                         "dicom_patient.nii.gz"))
    if not os.path.isfile(summary) or os.path.getmtime(summary) < max(map(os.path.getmtime, sources)):
        trainer, plans, configuration = os.path.basename(model).split("__")
        run(["nnpp.run.predict", "-i", os.path.join(work, "unseen", "imagesTs"), "-o", out, "-d", str(TS_ID), "-c",
             configuration, "-tr", trainer, "-p", plans, "-f", "0", "-device", "cpu", "--amp", "O0",
             "--disable_progress_bar"], env, log)
        compute_metrics_on_folder_simple(os.path.join(work, "unseen", "labelsTs"), out,
                                         [int(v) for v in names if int(v)], summary, num_processes=1)
    return dice_of(summary, names)


def write_unlabeled(folder: str, task_root: str, task_id: int, n: int, lesion_radius: int) -> None:
    """``n`` cases of the benchmark's generator (seed 1: not the labeled ones) as raw images without labels,
    ``unl_XXX_0000.nii.gz`` (nnU-Net's naming)."""
    import shutil
    msd = make_task(task_root, task_id, n, seed=1, lesion_radius=lesion_radius)
    os.makedirs(folder, exist_ok=True)
    images = os.path.join(msd, "imagesTr")
    for i, f in enumerate(sorted(os.listdir(images))):
        shutil.copy(os.path.join(images, f), os.path.join(folder, f"unl_{i:03d}_0000.nii.gz"))
    shutil.rmtree(task_root)


def write_split(pre: str, n_train: int) -> None:
    """fold 0 of ``splits_final.json``: the first ``n_train`` cases train, the others validate."""
    cases = sorted(f[:-len(".pkl")] for f in os.listdir(os.path.join(pre, "nnUNetPlans_2d" if os.path.isdir(
        os.path.join(pre, "nnUNetPlans_2d")) else "nnUNetPlans_3d_fullres")) if f.endswith(".pkl"))
    with open(os.path.join(pre, "splits_final.json"), "w") as f:
        json.dump([{"train": cases[:n_train], "val": cases[n_train:]}], f, indent=1)


def summarise(result: dict) -> dict:
    """Mean/sd per method and label, gap closed vs no KD, and whether the difference exceeds one no-KD sd."""
    teacher = result["teacher"]["dice"]
    runs = result["runs"]
    table = {}
    for method in METHODS:
        dices = [r["dice"] for r in runs.get(method, {}).values()]
        if not dices:
            continue
        table[method] = {lab: {"mean": statistics.mean(d[lab] for d in dices),
                               "sd": statistics.stdev(d[lab] for d in dices) if len(dices) > 1 else 0.0,
                               "n": len(dices)} for lab in teacher}
    base = table.get("none")
    for method, labs in table.items():
        for lab, row in labs.items():
            if base and method != "none":
                gap = teacher[lab] - base[lab]["mean"]
                row["gap_closed"] = (row["mean"] - base[lab]["mean"]) / gap if abs(gap) > 1e-9 else None
                row["beyond_1sd"] = abs(row["mean"] - base[lab]["mean"]) > base[lab]["sd"] and base[lab]["n"] > 1
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="working folder (nnU-Net folders, runs, logs, JSON)")
    p.add_argument("--task", choices=("synthetic", "ts_example_ct"), default="synthetic",
                   help="synthetic: make_task's generator; ts_example_ct: the shared real CT in z-slabs (see above)")
    p.add_argument("--task_id", type=int, default=905, help="synthetic: the dataset id")
    p.add_argument("--chunks", type=int, default=16, help="ts_example_ct: z-slabs of the CT (cases)")
    p.add_argument("--train_slabs", type=int, nargs="+", default=[2, 6, 10, 14],
                   help="ts_example_ct: labeled training slabs (the organs lie in slabs 8-15 of 16)")
    p.add_argument("--val_slabs", type=int, nargs="+", default=[11, 13, 15],
                   help="ts_example_ct: validation slabs; all others are the unlabeled transfer set")
    p.add_argument("--unlabeled_slabs", type=int, nargs="+", default=None,
                   help="ts_example_ct: the unlabeled slabs (default: every slab neither trained on nor validated; "
                        "others go to WORK/unlabeled_sNN-NN.. and need a --variant)")
    p.add_argument("--unseen", action="store_true", help="ts_example_ct: score every model on a second patient too")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--lesion_radius", type=int, default=6)
    p.add_argument("--configuration", default="2d")
    p.add_argument("--teacher_epochs", type=int, default=40)
    p.add_argument("--student_epochs", type=int, default=8)
    p.add_argument("--iters", type=int, default=50, help="training iterations per epoch (teacher and students)")
    p.add_argument("--batch", type=int, default=16,
                   help="batch size set in the plans with change_bs (nnU-Net's 2d planner gives this small task 128)")
    p.add_argument("--val_iters", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="student seeds (none: the teacher only)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--unlabeled", type=int, default=0, help="N unlabeled cases (see above; 0: none)")
    p.add_argument("--labeled", type=int, default=4, help="with --unlabeled: labeled training cases (the rest of "
                   "--cases validate)")
    p.add_argument("--unlabeled_fraction", type=float, default=None,
                   help="nnpp_distill --unlabeled_fraction for the unl_* rows (default: nnpp_distill's)")
    p.add_argument("--variant", default=None, help="students under results/METHOD@VARIANT (another --student_epochs "
                   "or --unlabeled_fraction in the same WORK, whose teacher and data are reused)")
    p.add_argument("-device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--table_only", action="store_true",
                   help="train nothing: the table of the finished runs of --seeds x --methods (e.g. after running "
                        "seeds or methods in separate processes)")
    a = p.parse_args(argv)

    work = os.path.abspath(a.work)
    dirs = nnunet_dirs(work, results=os.path.join(work, "results", "teacher"))
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    os.environ.update(dirs)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_compile", "false")
    ts = a.task == "ts_example_ct"
    unlabeled = os.path.join(work, "unlabeled")
    if ts:
        rest = sorted(set(range(a.chunks)) - set(a.train_slabs) - set(a.val_slabs))
        slabs = sorted(a.unlabeled_slabs or rest)
        if set(slabs) - set(rest):
            p.error(f"--unlabeled_slabs {slabs}: only slabs neither trained on nor validated ({rest})")
        if slabs != rest:
            if not a.variant:
                p.error("--unlabeled_slabs other than the default: name the runs with --variant")
            unlabeled += "_s" + "-".join(f"{c:02d}" for c in slabs)
        a.task_id, a.unlabeled = 950, len(slabs)
    # what WORK's data is made with, claimed before any data is written (os.link: exactly one of the runs started side
    # by side creates it, complete); a run with other numbers is refused
    stamp = os.path.join(work, "task.json")
    made = {"cases": a.cases, "labeled": a.labeled if a.unlabeled else None, "unlabeled": a.unlabeled,
            "lesion_radius": a.lesion_radius, "task_id": a.task_id} if not ts else \
        {"task": a.task, "chunks": a.chunks, "train_slabs": a.train_slabs, "val_slabs": a.val_slabs}
    if any(m in UNLABELED_METHODS for m in a.methods) and not a.unlabeled:
        p.error("methods unl_* need --unlabeled N")
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=work, prefix=".task.json.")
    with os.fdopen(fd, "w") as f:
        json.dump(made, f)
    try:
        try:
            os.link(tmp, stamp)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: exclusive create instead
            with open(stamp, "x") as f:
                json.dump(made, f)
    except FileExistsError:
        if json.load(open(stamp)) != made:
            raise SystemExit(f"bench_kd: {work} holds a task made with {json.load(open(stamp))}, not {made}: use "
                             f"another --work")
    finally:
        os.remove(tmp)
    name = f"Dataset{a.task_id:03d}_" + ("TSExampleCT" if ts else "KDBench")
    pre = os.path.join(dirs["nnUNet_preprocessed"], name)
    if ts and not os.path.isfile(os.path.join(pre, "splits_final.json")):
        prepare_ts(work, a.chunks, a.train_slabs, a.val_slabs)
    if ts:
        write_unlabeled_slabs(unlabeled, name, slabs)
    if ts and a.unseen:
        from bench_convergence import TS_BUILDER, prepare_unseen
        prepare_unseen(work, TS_BUILDER, json.load(open(os.path.join(pre, "dataset.json")))["labels"])
    if not ts and not os.path.isfile(os.path.join(pre, "nnUNetPlans.json")):
        from nnpp.data.synthetic import prepare_dataset
        msd = make_task(os.path.join(work, "msd"), a.task_id, a.cases, seed=0, lesion_radius=a.lesion_radius)
        name = prepare_dataset(msd, a.task_id, configurations=(a.configuration,), num_processes=1)
        from nnpp.tools.change_bs import change_batch_size
        change_batch_size(os.path.join(pre, "nnUNetPlans.json"), a.batch, a.configuration)
        if a.unlabeled:
            write_split(pre, a.labeled)
    if a.unlabeled and not ts and not os.path.isdir(unlabeled):
        write_unlabeled(unlabeled + ".partial", os.path.join(work, "msd_unlabeled"), a.task_id + 1, a.unlabeled,
                        a.lesion_radius)
        os.replace(unlabeled + ".partial", unlabeled)
    out = a.out or os.path.join(work, "bench_kd.json")
    result = {"settings": vars(a), "runs": {}}
    budget = ["-device", a.device, "--iters", str(a.iters), "--val_iters", str(a.val_iters)]
    common = [str(a.task_id), a.configuration, "0"]

    def env_for(results: str) -> dict:
        return {**os.environ, "nnUNet_results": results}

    teacher_results = os.path.join(work, "results", "teacher")
    teacher = os.path.join(teacher_results, name, f"nnUNetPlusPlusTrainer__nnUNetPlans__{a.configuration}")
    summary = os.path.join(teacher, "fold_0", "validation", "summary.json")
    if not os.path.isfile(summary) and a.table_only:
        raise SystemExit(f"bench_kd: --table_only: no trained teacher in {teacher}")
    if not os.path.isfile(summary):
        print(f"[bench_kd] teacher: UNet++, {a.teacher_epochs} epochs x {a.iters} iterations", flush=True)
        run(["nnpp.run.train", *common, "-tr", "nnUNetPlusPlusTrainer", "--epochs", str(a.teacher_epochs),
             "--seed", "0", *budget], env_for(teacher_results), os.path.join(work, "logs", "teacher.log"))
    names = {str(v): k for k, v in json.load(open(os.path.join(pre, "dataset.json")))["labels"].items()}

    def scores(summary: str, model: str, env: dict, log: str) -> dict:
        """Validation Dice per label, and with --unseen the second patient's as 'unseen <label>'."""
        dice = dice_of(summary, names)
        if ts and a.unseen:
            unseen = score_unseen(work, model, os.path.dirname(os.path.dirname(summary)), env, names, log)
            dice.update({f"unseen {k}": v for k, v in unseen.items()})
        return dice
    result["teacher"] = {"folder": teacher, "dice": scores(summary, teacher, env_for(teacher_results),
                                                           os.path.join(work, "logs", "teacher_unseen.log"))}
    print(f"[bench_kd] teacher Dice {result['teacher']['dice']}", flush=True)

    from nnpp.distill.student import write_student_plans
    from nnpp.run.distill import DEFAULT_R, DEFAULT_STUDENT, NO_KD_TRAINERS, STUDENT_TRAINERS
    plans = write_student_plans(pre, "nnUNetPlans", a.configuration, DEFAULT_R, DEFAULT_STUDENT)
    for seed in a.seeds:
        for method in a.methods:
            run_name = method + (f"@{a.variant}" if a.variant else "")  # results/RUN_NAME/seedS, logs/RUN_NAME_seedS*
            results = os.path.join(work, "results", run_name, f"seed{seed}")
            trainer = NO_KD_TRAINERS[DEFAULT_STUDENT] if method == "none" else STUDENT_TRAINERS[DEFAULT_STUDENT]
            fold = os.path.join(results, name, f"{trainer}__{plans}__{a.configuration}", "fold_0")
            summary = os.path.join(fold, "validation", "summary.json")
            if not os.path.isfile(summary) and a.table_only:
                continue
            if not os.path.isfile(summary):
                print(f"[bench_kd] {method}, seed {seed}: {a.student_epochs} epochs x {a.iters} iterations",
                      flush=True)
                if method == "none":
                    cmd = ["nnpp.run.train", *common, "-tr", trainer, "-p", plans]
                else:
                    cmd = ["nnpp.run.distill", *common, "-t", teacher, *METHODS[method]]
                    if method in UNLABELED_METHODS:
                        cmd += ["--unlabeled", unlabeled]
                        if a.unlabeled_fraction is not None:
                            cmd += ["--unlabeled_fraction", str(a.unlabeled_fraction)]
                wall = run(cmd + ["--epochs", str(a.student_epochs), "--seed", str(seed), *budget],
                           env_for(results), os.path.join(work, "logs", f"{run_name}_seed{seed}.log"))
                write_json(os.path.join(results, "wall_s.json"), wall, indent=None)  # read back by --table_only
            wall_file = os.path.join(results, "wall_s.json")
            wall = json.load(open(wall_file)) if os.path.isfile(wall_file) else None
            dice = scores(summary, os.path.dirname(fold), env_for(results),
                          os.path.join(work, "logs", f"{run_name}_seed{seed}_unseen.log"))
            result["runs"].setdefault(method, {})[str(seed)] = {"folder": fold, "dice": dice,
                                                                "wall_s": wall}
            result["summary"] = summarise(result)
            write_json(out, result)

    labels = list(result["teacher"]["dice"])
    print(f"\nwritten {out}\n")
    print("\n".join(md_table(
        ["method", *(c for lab in labels for c in (f"{lab} Dice (mean ± sd)", f"{lab} gap closed")), "wall s per run"],
        [["teacher (UNet++)", *(c for lab in labels for c in (f"{result['teacher']['dice'][lab]:.4f}", "")), ""]])))
    for method, labs in result.get("summary", {}).items():
        cells = []
        for lab in labels:
            row = labs[lab]
            gap = row.get("gap_closed")
            cells += [f"{row['mean']:.4f} ± {row['sd']:.4f} (n={row['n']})",
                      "" if gap is None else f"{100 * gap:.0f}%" + (" *" if row.get("beyond_1sd") else "")]
        walls = [r["wall_s"] for r in result["runs"][method].values() if r.get("wall_s")]
        print(md_row(method, *cells, f"{statistics.mean(walls):.0f}" if walls else ""))
    print("\n* = the difference to no KD exceeds one standard deviation of the no-KD runs")


if __name__ == "__main__":
    main()
