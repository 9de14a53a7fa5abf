"""Prediction at real size, side by side on the same model and case (issue 22): nnU-Net's own predictor vs
``nnpp_predict --resample plans`` (the plans' scipy resampling) and ``--resample torch`` (nnU-Net's torch one);
nnpp's export keeps a few classes at a time (``nnpp.predictor.segmentation_from_logits``).

    python benchmarks/bench_resample.py --model_folder RESULTS/Dataset950_TSExampleCT/TRAINER__nnUNetPlans__2d -f all \\
        --real_size --workdir /tmp/resample --out benchmarks/results/resample_cpu.json

``--real_size``: the shared real CT (``../shared/datasets/ts_example_ct.py``'s TotalSegmentator example, 3 mm) resampled
with SimpleITK (linear) to 0.8 x 0.8 x 1.5 mm (about 460 x 380 x 224 voxels), as a scanner's CT would come: a model
planned at 3 mm predicts on its 3 mm grid and the export resamples every class's logits up to that grid.
``--image`` takes any other case (``CASE_0000.nii.gz``).

Every run is a fresh process, everything in it (nnpp_predict ``-npp 0 -nps 0``: the time split is exact; nnU-Net's
``predict_from_files_sequential``), mirroring on, fp32, CPU; the modes (``--modes``) alternate for ``--rounds``; per
run: wall time, nnpp's split read+preprocess / network / resample+export (its own lines), the process's peak RSS,
and the masks' agreement with the first mode's. Writes ``--out``
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
BUILDER = os.path.join(os.path.dirname(HERE), "..", "shared", "datasets", "ts_example_ct.py")
SPLIT = re.compile(r"time per case over 1 case\(s\): read\+preprocess ([\d.]+) s, network ([\d.]+) s, "
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
    import importlib.util
    import tarfile

    import SimpleITK as sitk
    out = os.path.join(work, "images", "ts_real_size_0000.nii.gz")
    if os.path.isfile(out):
        return out
    spec = importlib.util.spec_from_file_location("ts_example_ct", builder)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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


def run(model_folder: str, fold: str, images: str, out: str, mode: str, threads: int) -> dict:
    """One prediction in a fresh process: ``mode`` plans / torch = nnpp_predict --resample MODE; nnunet = nnU-Net's
    own nnUNetPredictor (predict_from_files_sequential: everything in the process, its scipy export), whose time is
    not split."""
    from nnpp.training.nnunet_ext import EXT_TRAINER_PATH
    parts = os.path.normpath(model_folder).split(os.sep)
    trainer, plans, config = parts[-1].split("__")
    env = dict(os.environ, nnUNet_results=os.sep.join(parts[:-2]), OMP_NUM_THREADS=str(threads),
               nnUNet_def_n_proc=str(threads), nnUNet_extTrainer=EXT_TRAINER_PATH)
    if mode == "nnunet":
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", NNUNET_CHILD, model_folder, fold, images, out], env=env,
                           capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"bench_resample: nnU-Net's predictor failed:\n{p.stderr[-3000:]}")
        rss = re.search(r"PEAK_RSS_KB (\d+)", p.stdout)
        return {"mode": mode, "wall_s": time.perf_counter() - t0, "read_preprocess_s": None, "network_s": None,
                "resample_export_s": None, "peak_rss_gb": int(rss[1]) / 2 ** 20, "load": os.getloadavg()[0]}
    cmd = [sys.executable, "-c", CHILD, "-i", images, "-o", out, "-d", parts[-2], "-c", config, "-p", plans, "-tr",
           trainer, "-f", fold, "-device", "cpu", "-npp", "0", "-nps", "0", "--resample", mode,
           "--disable_progress_bar"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"bench_resample: nnpp_predict --resample {mode} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    split = SPLIT.search(p.stdout)
    rss = re.search(r"PEAK_RSS_KB (\d+)", p.stdout)
    return {"mode": mode, "wall_s": wall, "read_preprocess_s": float(split[1]), "network_s": float(split[2]),
            "resample_export_s": float(split[3]), "peak_rss_gb": int(rss[1]) / 2 ** 20, "load": os.getloadavg()[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_folder", required=True, help="RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG")
    p.add_argument("-f", default="0")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="a case to predict (CASE_0000.nii.gz)")
    src.add_argument("--real_size", action="store_true", help="the shared real CT at 0.8 x 0.8 x 1.5 mm")
    p.add_argument("--builder", default=BUILDER)
    p.add_argument("--workdir", default="bench_resample_work")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["nnunet", "plans", "torch"], choices=["nnunet", "plans", "torch"])
    p.add_argument("--out", default=os.path.join(HERE, "results", "resample_cpu.json"))
    a = p.parse_args(argv)
    import numpy as np
    import SimpleITK as sitk

    from nnpp.device import machine_info
    work = os.path.abspath(a.workdir)
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
            seg = next(f for f in os.listdir(out) if f.endswith(".nii.gz"))
            masks[mode] = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, seg)))
            runs.append({**res, "round": r})
            print(f"[bench_resample] round {r} {mode}: {json.dumps(res)}", flush=True)
    first = a.modes[0]
    agreement = {m: float((masks[first] == masks[m]).mean()) for m in a.modes[1:]}
    labels = np.unique(masks[first])
    summary = {}
    for mode in a.modes:
        mine = [x for x in runs if x["mode"] == mode]
        summary[mode] = {k: statistics.median(x[k] for x in mine) if mine[0][k] is not None else None for k in
                         ("wall_s", "read_preprocess_s", "network_s", "resample_export_s", "peak_rss_gb")}
        if summary[mode]["network_s"] is not None:
            case = summary[mode]["read_preprocess_s"] + summary[mode]["network_s"] + summary[mode]["resample_export_s"]
            summary[mode]["resample_export_share"] = summary[mode]["resample_export_s"] / case
    result = {"machine": machine_info(), "model_folder": os.path.abspath(a.model_folder), "fold": a.f,
              "image": image, "image_size": list(shape), "classes_in_masks": int(len(labels)), "threads": a.threads,
              "mask_agreement": agreement, "summary": summary, "runs": runs}
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, CPU capability {m['cpu_capability']}, "
             f"native bf16: {'yes' if m['native_bf16'] else 'no'}; {a.threads} threads; case {os.path.basename(image)} "
             f"{'x'.join(map(str, shape))} voxels; median of {a.rounds} run(s) each, fresh processes, -npp 0 -nps 0.",
             "", "| predictor | case (s) | read+preprocess | network | resample+export | share of case | peak RSS (GB) |",
             "|---|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        if s["network_s"] is None:
            lines.append(f"| nnU-Net's nnUNetPredictor | {s['wall_s']:.1f} | | | | | {s['peak_rss_gb']:.2f} |")
            continue
        lines.append(f"| nnpp_predict --resample {mode} | {s['wall_s']:.1f} | {s['read_preprocess_s']:.1f} | "
                     f"{s['network_s']:.1f} | {s['resample_export_s']:.1f} | {100 * s['resample_export_share']:.0f}% | "
                     f"{s['peak_rss_gb']:.2f} |")
    lines += ["", "Masks vs " + first + ": " + ", ".join(f"{m} {100 * v:.4f}%" for m, v in agreement.items())
              + f" of voxels equal ({len(labels)} labels present in {first}'s)."]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
