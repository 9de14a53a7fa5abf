"""Prediction at real size, side by side on the same model and case: nnU-Net's own predictor vs
``nnpp_predict --resample plans`` (the plans' scipy resampling) and ``--resample torch`` (nnU-Net's torch one);
nnpp's export never holds every class at the original grid (``nnpp.predictor.segmentation_from_logits``: the
sparse trilinear argmax with torch resampling, a few classes at a time with the plans' function).

    python benchmarks/bench_resample.py --model_folder RESULTS/Dataset950_TSExampleCT/TRAINER__nnUNetPlans__2d -f all \\
        --real_size --workdir /tmp/resample --out benchmarks/results/resample_cpu.json

``--real_size``: the shared real CT (``../shared/datasets/ts_example_ct.py``'s TotalSegmentator example, 3 mm) resampled
with SimpleITK (linear) to 0.8 x 0.8 x 1.5 mm (about 460 x 380 x 224 voxels), as a scanner's CT would come: a model
planned at 3 mm predicts on its 3 mm grid and the export resamples every class's logits up to that grid.
``--image`` takes any other case (``CASE_0000.nii.gz``).

``--make_model N --workdir W``: the model for it, made once in W (nnU-Net folders W/raw, W/preprocessed, W/results):
the shared CT with every structure TotalSegmentator labels in it (61 + background), its dataset.json padded with
unused labels up to N classes (N = 105: a TotalSegmentator-sized output), planned for a small 3D UNet++ at the
CT's 3 mm (``SmallUNetPlusPlusPlanner``, base 8 features, patch capped at 128^3: 112 x 112 x 128, the whole CT in
one tile), trained 1 x 12 iterations on fold ``all`` on 64^3 patches of the same architecture (105 classes x four
full-resolution deep-supervision heads at 112 x 112 x 128 need over 20 GB to train: the 24 GB machine killed it),
then the planned patch written back into the model's plans.json and its checkpoint's (the weights do not depend
on the patch; nnpp refuses a plans.json that differs from the checkpoint's). Enough
for time and memory, not for Dice. Prints the model folder.

Every run is a fresh process, everything in it (nnpp_predict ``-npp 0 -nps 0``: the time split is exact; nnU-Net's
``predict_from_files_sequential``), mirroring on, fp32, CPU, nnpp's default ``--tta_batch``; the modes (``--modes``)
alternate for ``--rounds``; per run: wall time, nnpp's split read+preprocess / network / resample+export (its own
lines), the process's peak RSS, and the masks' agreement with the first mode's. Mode ``torchrun2``: ``torchrun
--nproc_per_node 2 -m nnpp.run.predict`` on two copies of the case with torchrun's own environment (its
OMP_NUM_THREADS=1, no thread flags): the threads each rank took (its log line), cases/min against ``torch``'s one
process, and the larger rank's peak RSS. Writes ``--out``
(JSON) and the same name with .md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import (RESULTS, TS_BUILDER, load_builder, machine, machine_line, md_row, md_table,  # noqa: E402
                    model_id, nnunet_dirs, run_checked, torchrun, write_json, write_text)

SPLIT = re.compile(r"time per case over \d+ case\(s\): read\+preprocess ([\d.]+) s, network ([\d.]+) s, "
                   r"resample\+export ([\d.]+) s")

NNUNET_CHILD = """import os, resource, sys, time
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
model, fold, images, out = sys.argv[1:5]
p = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
p.initialize_from_trained_model_folder(model, (fold if fold == "all" else int(fold),), "checkpoint_final.pth")
os.makedirs(out, exist_ok=True)
p.predict_from_files_sequential(images, out, save_probabilities=False, overwrite=True)
print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
"""

CHILD = """import resource, sys
from nnpp.run import predict
rc = predict.main(sys.argv[1:])
print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
sys.exit(rc)
"""


def real_size_case(work: str, builder: str, spacing=(0.8, 0.8, 1.5)) -> str:
    """The shared builder's CT resampled to ``spacing`` (x, y, z mm) as ``work/images/ts_real_size_0000.nii.gz``."""
    import tarfile

    import SimpleITK as sitk
    out = os.path.join(work, "images", "ts_real_size_0000.nii.gz")
    if os.path.isfile(out):
        return out
    mod = load_builder(builder)
    member = f"totalsegmentator-{mod.VERSION}/tests/reference_files/example_ct.nii.gz"
    with tarfile.open(mod.sdist(None)) as tar:
        tar.extract(member, os.path.join(mod.CACHE, "src"), filter="data")
    img = sitk.ReadImage(os.path.join(mod.CACHE, "src", member))
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    res = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing, img.GetDirection(),
                        -1024, sitk.sitkInt16)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    sitk.WriteImage(res, out)
    return out


def make_model(work: str, builder: str, classes: int, dataset_id: int = 952) -> str:
    """The ``--make_model`` recipe (module docstring); returns the model folder (reused when it exists)."""
    env = nnunet_dirs(work, short=True, make=False)
    os.environ.update(env)
    name = f"Dataset{dataset_id:03d}_TSExampleCT"
    model = os.path.join(env["nnUNet_results"], name, "nnUNetPlusPlusTrainer__nnppUNetPlusPlusPlans__3d_fullres")
    if os.path.isfile(os.path.join(model, "fold_all", "checkpoint_final.pth")):
        return model
    if not os.path.isdir(os.path.join(env["nnUNet_raw"], name)):
        subprocess.run([sys.executable, builder, env["nnUNet_raw"], "--all", "--id", str(dataset_id)], check=True)
        path = os.path.join(env["nnUNet_raw"], name, "dataset.json")
        with open(path) as f:
            ds = json.load(f)
        for i in range(len(ds["labels"]), classes):
            ds["labels"][f"unused_{i}"] = i
        with open(path, "w") as f:
            json.dump(ds, f, indent=1)
    from nnpp.data.synthetic import plan_and_preprocess
    plan_and_preprocess(dataset_id, ("3d_fullres",), 2, "SmallUNetPlusPlusPlanner", base_features=8,
                        max_patch=(128, 128, 128))

    def set_patch(path, patch=None):
        with open(path) as f:
            plans = json.load(f)
        planned = plans["configurations"]["3d_fullres"]["patch_size"]
        plans["configurations"]["3d_fullres"]["patch_size"] = patch or planned
        with open(path, "w") as f:
            json.dump(plans, f, indent=1)
        return planned
    planned = set_patch(os.path.join(env["nnUNet_preprocessed"], name, "nnppUNetPlusPlusPlans.json"), [64, 64, 64])
    subprocess.run([sys.executable, "-m", "nnpp.run.train", str(dataset_id), "3d_fullres", "all", "-p",
                    "nnppUNetPlusPlusPlans", "-device", "cpu", "--epochs", "1", "--iters", "12", "--val_iters", "1"],
                   check=True, env=dict(os.environ, nnUNet_n_proc_DA="1"))
    set_patch(os.path.join(model, "plans.json"), planned)
    import torch
    path = os.path.join(model, "fold_all", "checkpoint_final.pth")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["init_args"]["plans"]["configurations"]["3d_fullres"]["patch_size"] = planned
    torch.save(checkpoint, path)
    return model


def run(model_folder: str, fold: str, images: str, out: str, mode: str, threads: int) -> dict:
    """One prediction in a fresh process: ``mode`` plans / torch = nnpp_predict --resample MODE; nnunet = nnU-Net's
    own nnUNetPredictor (predict_from_files_sequential: everything in the process, its scipy export), whose time is
    not split."""
    from nnpp.training.nnunet_ext import EXT_TRAINER_PATH
    dataset, trainer, plans, config = model_id(model_folder)
    env = dict(os.environ, nnUNet_results=os.path.dirname(os.path.dirname(os.path.abspath(model_folder))),
               OMP_NUM_THREADS=str(threads), nnUNet_def_n_proc=str(threads), nnUNet_extTrainer=EXT_TRAINER_PATH)
    if mode == "nnunet":
        p, wall = run_checked([sys.executable, "-c", NNUNET_CHILD, model_folder, fold, images, out],
                              "nnU-Net's predictor", env)
        return {"mode": mode, "wall_s": wall, "read_preprocess_s": None, "network_s": None,
                "resample_export_s": None, "peak_rss_gb": peak_rss_gb(p.stdout), "load": os.getloadavg()[0]}
    flags = ["-i", images, "-o", out, "-d", dataset, "-c", config, "-p", plans, "-tr", trainer, "-f", fold,
             "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"]
    if mode == "torchrun2":
        return run_torchrun(flags, env, images)
    p, wall = run_checked([sys.executable, "-c", CHILD, *flags, "--resample", mode],
                          f"nnpp_predict --resample {mode}", env)
    split = SPLIT.search(p.stdout)
    return {"mode": mode, "wall_s": wall, "read_preprocess_s": float(split[1]), "network_s": float(split[2]),
            "resample_export_s": float(split[3]), "peak_rss_gb": peak_rss_gb(p.stdout), "load": os.getloadavg()[0]}


def peak_rss_gb(output: str) -> float:
    """The peak RSS a child printed (``PEAK_RSS_KB n``), in GB."""
    return int(re.search(r"PEAK_RSS_KB (\d+)", output)[1]) / 2 ** 20


TORCHRUN_WRAPPER = """import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", flush=True)
sys.exit(rc)
"""


def run_torchrun(flags: list, env: dict, images: str) -> dict:
    """``torchrun --nproc_per_node 2 -m nnpp.run.predict`` on two copies of the case (a folder of links beside
    ``images``), torchrun's environment as a user gets it (no OMP_NUM_THREADS of ours: torchrun sets 1 per process);
    peak RSS of the largest process under torchrun (RUSAGE_CHILDREN of a wrapper that only runs torchrun)."""
    two = images.rstrip(os.sep) + "_x2"
    os.makedirs(two, exist_ok=True)
    for f in os.listdir(images):
        for tag in ("", "copy_"):
            link = os.path.join(two, tag + f)
            if not os.path.exists(link):
                os.symlink(os.path.join(images, f), link)
    flags = list(flags)
    flags[flags.index("-i") + 1] = two
    env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    p, wall = run_checked([sys.executable, "-c", TORCHRUN_WRAPPER, *torchrun(2, "nnpp.run.predict", *flags, port=None)],
                          "torchrun nnpp_predict", env)
    threads = {int(r): int(t) for r, t in re.findall(r"\[nnpp_predict\] rank (\d+): torch (\d+) CPU thread", p.stdout)}
    why = re.search(r"\[nnpp_predict\] rank 0: .* per case \((.+)\)\s*$", p.stdout, re.MULTILINE)
    total = re.search(r"all 2 processes done: (\d+) case\(s\) in ([\d.]+) s, ([\d.]+) cases/min", p.stdout)
    splits = [SPLIT.search(line) for line in p.stdout.splitlines() if "time per case over" in line]
    splits = [s for s in splits if s]
    mean = lambda i: statistics.mean(float(s[i]) for s in splits) if splits else None  # noqa: E731
    return {"mode": "torchrun2", "wall_s": wall, "cases": int(total[1]), "ranks_s": float(total[2]),
            "cases_per_min": float(total[3]), "threads_per_rank": threads, "threads_why": why[1] if why else None,
            "read_preprocess_s": mean(1), "network_s": mean(2), "resample_export_s": mean(3),
            "peak_rss_gb": peak_rss_gb(p.stdout), "load": os.getloadavg()[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_folder", help="RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG")
    p.add_argument("-f", default="0")
    p.add_argument("--make_model", type=int, metavar="CLASSES", default=None,
                   help="make the model first (module docstring) in --workdir and use it (--model_folder not needed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="a case to predict (CASE_0000.nii.gz)")
    src.add_argument("--real_size", action="store_true", help="the shared real CT at 0.8 x 0.8 x 1.5 mm")
    p.add_argument("--builder", default=TS_BUILDER)
    p.add_argument("--workdir", default="bench_resample_work")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["nnunet", "plans", "torch"],
                   choices=["nnunet", "plans", "torch", "torchrun2"])
    p.add_argument("--out", default=os.path.join(RESULTS, "resample_cpu.json"))
    a = p.parse_args(argv)
    work = os.path.abspath(a.workdir)
    if a.make_model:
        a.model_folder, a.f = make_model(work, a.builder, a.make_model), "all"
        print(f"[bench_resample] model: {a.model_folder}", flush=True)
    elif not a.model_folder:
        p.error("give --model_folder or --make_model CLASSES")
    import numpy as np
    import SimpleITK as sitk
    if a.real_size:
        image = real_size_case(work, a.builder)
    else:
        image = os.path.abspath(a.image)
        os.makedirs(os.path.join(work, "images"), exist_ok=True)
        link = os.path.join(work, "images", os.path.basename(image))
        if not os.path.exists(link):
            os.symlink(image, link)
    images = os.path.dirname(image)
    shape = sitk.ReadImage(image).GetSize()
    runs, masks = [], {}
    for r in range(a.rounds):
        for mode in a.modes:
            out = os.path.join(work, f"pred_{mode}")
            res = run(os.path.abspath(a.model_folder), a.f, images, out, mode, a.threads)
            seg = next(f for f in sorted(os.listdir(out)) if f.endswith(".nii.gz") and not f.startswith("copy_"))
            masks[mode] = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, seg)))
            runs.append({**res, "round": r})
            print(f"[bench_resample] round {r} {mode}: {json.dumps(res)}", flush=True)
    first = a.modes[0]
    agreement = {m: float((masks[first] == masks[m]).mean()) for m in a.modes[1:]}
    labels = np.unique(masks[first])
    summary = {}
    for mode in a.modes:
        mine = [x for x in runs if x["mode"] == mode]
        summary[mode] = {k: statistics.median(x[k] for x in mine) if mine[0].get(k) is not None else None for k in
                         ("wall_s", "read_preprocess_s", "network_s", "resample_export_s", "peak_rss_gb",
                          "cases_per_min")}
        if mode == "torchrun2":
            summary[mode]["threads_per_rank"] = mine[-1]["threads_per_rank"]
        if summary[mode]["network_s"] is not None:
            case = summary[mode]["read_preprocess_s"] + summary[mode]["network_s"] + summary[mode]["resample_export_s"]
            summary[mode]["resample_export_share"] = summary[mode]["resample_export_s"] / case
    result = {"machine": machine(), "model_folder": os.path.abspath(a.model_folder), "fold": a.f,
              "image": image, "image_size": list(shape), "classes_in_masks": int(len(labels)), "threads": a.threads,
              "mask_agreement": agreement, "summary": summary, "runs": runs}
    lines = [f"Machine: {machine_line(result['machine'])}; {a.threads} threads; case {os.path.basename(image)} "
             f"{'x'.join(map(str, shape))} voxels; median of {a.rounds} run(s) each, fresh processes, -npp 0 -nps 0.",
             "", *md_table(["predictor", "case (s)", "read+preprocess", "network", "resample+export", "share of case",
                            "peak RSS (GB)", "vs nnU-Net: time, RSS"])]
    base = summary.get("nnunet")
    for mode, s in summary.items():
        ratio = (f"{base['wall_s'] / s['wall_s']:.2f}x faster, {s['peak_rss_gb'] / base['peak_rss_gb']:.2f}x"
                 if base and mode not in ("nnunet", "torchrun2") else "")
        if s["network_s"] is None:
            lines.append(md_row("nnU-Net's nnUNetPredictor", f"{s['wall_s']:.1f}", "", "", "", "",
                                f"{s['peak_rss_gb']:.2f}", ""))
            continue
        name = (f"torchrun 2 ranks, 2 cases ({', '.join(f'rank {r}: {t} thread(s)' for r, t in sorted(s['threads_per_rank'].items()))}; "
                f"{s['cases_per_min']:.2f} cases/min vs {60 / summary['torch']['wall_s'] if 'torch' in summary else float('nan'):.2f} "
                f"for one process's wall time)" if mode == "torchrun2" else f"nnpp_predict --resample {mode}")
        lines.append(md_row(name, f"{s['wall_s']:.1f}", f"{s['read_preprocess_s']:.1f}", f"{s['network_s']:.1f}",
                            f"{s['resample_export_s']:.1f}", f"{100 * s['resample_export_share']:.0f}%",
                            f"{s['peak_rss_gb']:.2f}", ratio))
    lines += ["", "Masks vs " + first + ": " + ", ".join(f"{m} {100 * v:.4f}%" for m, v in agreement.items())
              + f" of voxels equal ({len(labels)} labels present in {first}'s)."]
    write_json(a.out, result, indent=1)
    write_text(os.path.splitext(a.out)[0] + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
