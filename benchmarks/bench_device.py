"""What a lent accelerator (CUDA; NPU alike) must show, in one run: the real training step, the predictor at real
size, resampling on the device. Writes JSON and prints markdown tables.

    python benchmarks/bench_device.py --prepare .gpu/data             # on any machine (CPU): the dataset below
    python benchmarks/bench_device.py --data .gpu/data -device cuda --out results/device_cuda.json

Rows (``--parts``, all by default):

* ``train``: ``nnpp_train --other_use fps`` (the trainer's real step: nnU-Net's loader and augmentation, deep
  supervision over every UNet++ head, GradScaler) on Task03_Liver's 3d_fullres plan (6 stages, 32..320 features,
  128^3 patch, batch 2) over a synthetic dataset preprocessed by nnU-Net, in fp16 autocast (O1), bf16 and fp32,
  in one process and under torchrun with one rank (the DDP path: nccl/hccl): images/s, step time, the share of it
  spent waiting for data, peak device memory.
* ``predict``: nnU-Net's ``nnUNetPredictor`` vs ``nnppPredictor`` on a volume of real size (``--volume``, default
  a full-size CT's 220 x 380 x 460) with a ``--classes``-class (default 105) UNet++ of the Task03 plan (random
  weights, fixed seed), mirroring on, fp16 autocast, logits on the device: seconds per case, peak device memory,
  voxels whose argmax agrees.
* ``resample``: nnpp's segmentation export of those logits (the sparse trilinear argmax) with nnU-Net's
  ``resample_torch_fornnunet`` on the device (``nnpp_predict --resample torch``) to a grid 2x finer on every axis,
  seconds and peak device memory.

``--prepare`` needs SimpleITK (nnU-Net's reader); the run itself reads only the preprocessed data.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import (CONFIGS, RESULTS, arch_kwargs, latest_fps_perf, machine, md_table, nnunet_env,  # noqa: E402
                    seed_all, synthetic_plans, torchrun, write_json)
DATASET_ID, DATASET_NAME = 991, "Dataset991_DeviceSynth"
PLANS, CONFIG = "nnppUNetPlusPlusPlans", "3d_task03"
TASK03 = CONFIGS["task03"]  # Task03_Liver's 3d_fullres plan: 6 stages, 32..320 features, 128^3 patch, batch 2


def prepare(root: str, n_cases: int, size_scale: float) -> None:
    """Synthetic liver CTs (nnpp.data.synthetic, ~``size_scale`` x the test size), nnU-Net's conversion, fingerprint,
    UNet++ planning and preprocessing, then configuration ``3d_task03`` = 3d_fullres with Task03's architecture,
    patch and batch (same preprocessed data)."""
    os.environ.update(nnunet_env(root, short=True, make=False))
    from nnpp.data import synthetic
    msd = synthetic.make_msd_task(os.path.join(root, "msd"), task_id=DATASET_ID, name="DeviceSynth",
                                  n_train=n_cases, n_test=0, seed=0, size_scale=size_scale)
    synthetic.prepare_dataset(msd, DATASET_ID, planner="UNetPlusPlusPlanner")
    path = os.path.join(root, "preprocessed", DATASET_NAME, PLANS + ".json")
    with open(path) as f:
        plans = json.load(f)
    base = plans["configurations"]["3d_fullres"]
    kwargs = dict(base["architecture"]["arch_kwargs"])
    kwargs.update({k: v for k, v in arch_kwargs(TASK03).items()
                   if k in ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                            "n_conv_per_stage_decoder")})
    plans["configurations"][CONFIG] = {
        "inherits_from": "3d_fullres", "patch_size": TASK03["patch"], "batch_size": TASK03["batch"],
        "architecture": dict(base["architecture"], arch_kwargs=kwargs)}
    with open(path, "w") as f:
        json.dump(plans, f, indent=2)
    shutil.rmtree(os.path.join(root, "msd"))
    shutil.rmtree(os.path.join(root, "raw"))  # the run reads only the preprocessed data
    print(f"prepared {root}: {n_cases} cases, plans {PLANS} configuration {CONFIG}")


def run_train(root: str, device: str, amps: list, warmup: int, steps: int, with_torchrun: bool, config: str,
              compile_: bool = False) -> list:
    rows = []
    env = nnunet_env(root, short=True, make=False)
    env.setdefault("nnUNet_n_proc_DA", str(max(2, min(12, (os.cpu_count() or 2) - 2))))
    env["nnUNet_compile"] = "t" if compile_ else "f"  # nnU-Net compiles by default on cuda (minutes per run)
    for amp in amps:
        for ddp in ([False, True] if with_torchrun else [False]):
            if ddp and amp != amps[0]:
                continue
            args = [str(DATASET_ID), config, "0", "-p", PLANS, "-device", device, "--amp", amp, "--other_use", "fps",
                    "--warmup", str(warmup), "--steps", str(steps)]
            cmd = torchrun(1, "nnpp.run.train", *args, port=29533) if ddp else \
                [sys.executable, "-m", "nnpp.run.train", *args]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)  # a failure is a row of the table
            wall = time.perf_counter() - t0
            perf = latest_fps_perf(env["nnUNet_results"])
            row = {"part": "train", "config": config, "amp": amp, "compiled": compile_,
                   "launch": "torchrun 1 rank" if ddp else "1 process", "rc": proc.returncode, "wall_s": wall}
            if proc.returncode == 0 and perf:
                with open(perf) as f:
                    row.update(json.load(f))
            else:
                row["error"] = (proc.stdout + proc.stderr)[-3000:]
            print(json.dumps({k: row.get(k) for k in ("amp", "launch", "rc", "images_per_s_total", "step_s_median",
                                                      "data_wait_share", "peak_memory_MiB")}), flush=True)
            rows.append(row)
    return rows


def task03_unetpp(classes: int, device):
    from nnpp.nets import plans as nets_plans
    seed_all(0)
    net = nets_plans.build_network(nets_plans.UNETPP_CLASS, arch_kwargs(TASK03), 1, classes, deep_supervision=False)
    return net.to(device).eval()


def run_predict(device_name: str, classes: int, volume: list, resample: bool, patch: list, tta_batches: list,
                no_nnunet: bool = False) -> list:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnpp import device as dev
    from nnpp.nets import plans as nets_plans
    from nnpp.predictor.build import inference_amp
    from nnpp.predictor.tiles import nnppPredictor

    device = dev.resolve_device(device_name)
    dev.configure_backends(device)
    net = task03_unetpp(classes, device)
    pm, cm, dataset_json = synthetic_plans(
        nets_plans.UNETPP_CLASS, arch_kwargs(TASK03),
        nets_plans.REQUIRES_IMPORT, patch, volume, {"background": 0, **{f"c{i}": i for i in range(1, classes)}})
    seed_all(1)
    data = torch.randn(1, *volume)
    rows, ref = [], None
    runs = ([] if no_nnunet else [("nnUNetPredictor", 1)]) + [("nnppPredictor", tb) for tb in tta_batches]
    for name, tta_batch in runs:
        if name == "nnppPredictor":
            pred = nnppPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=device,
                                 allow_tqdm=False, amp=inference_amp("auto", device), tta_batch=tta_batch)
        else:
            pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=device,
                                   allow_tqdm=False)
        pred.manual_initialization(net, pm, cm, [net.state_dict()], dataset_json, "nnUNetPlusPlusTrainer", (0, 1, 2))
        dev.synchronize(device)
        dev.empty_cache(device)
        dev.reset_peak_memory(device)
        t0 = time.perf_counter()
        logits = pred.predict_logits_from_preprocessed_data(data)
        dev.synchronize(device)
        seconds = time.perf_counter() - t0
        row = {"part": "predict", "predictor": name, "classes": classes, "volume": volume, "s_per_case": seconds,
               "peak_device_GiB": dev.peak_memory_bytes(device) / 2 ** 30, "logits_device": str(logits.device),
               "logits_dtype": str(logits.dtype), "tta_batch": pred.tta_batch if name == "nnppPredictor" else 1,
               "tta_batch_flag": "auto" if tta_batch is None else tta_batch}
        if name == "nnUNetPredictor":
            ref = logits.cpu()  # off the device while the next rows are measured (8 GB at 105 classes)
        elif ref is not None:
            row.update(agreement(ref.to(device), logits.to(device)))
        print(json.dumps(row), flush=True)
        rows.append(row)
        if resample and name == "nnppPredictor" and not any(r["part"] == "resample" for r in rows):
            rows.append(export_on_device(pred, logits, device, volume, classes))
            print(json.dumps(rows[-1]), flush=True)
        del logits, pred
    return rows


def agreement(ref, logits) -> dict:
    """nnpp's logits against nnU-Net's (both on the device): voxels whose argmax agrees, over all voxels and over
    those whose top-2 margin in nnU-Net's logits exceeds twice the largest logit difference (where rounding cannot
    flip the class: a random-weight network with 105 classes has many near ties)."""
    import torch
    max_diff = max(float((ref[c:c + 8].float() - logits[c:c + 8].float()).abs().max()) for c in range(0, len(ref), 8))
    top = torch.topk(ref, 2, dim=0).values
    clear = (top[0] - top[1]).float() > 2 * max_diff
    same = ref.argmax(0) == logits.argmax(0)
    return {"max_abs_logit_diff": max_diff, "masks_equal_to_nnunet": float(same.float().mean()),
            "clear_voxel_share": float(clear.float().mean()),
            "masks_equal_where_clear": float(same[clear].float().mean()) if bool(clear.any()) else None}


def export_on_device(pred, logits, device, volume: list, classes: int) -> dict:
    """nnpp's export of a segmentation (:func:`nnpp.predictor.segmentation_from_logits`: the sparse trilinear argmax) with
    nnU-Net's torch resampling on ``device`` (``nnpp_predict --resample torch``), from the network's grid (spacing 1)
    to a grid twice as fine on every axis (spacing 0.5: 8x the voxels), as a model planned at a coarse spacing
    predicts a fine CT."""
    import numpy as np

    from nnpp import device as dev
    from nnpp.predictor.resample import segmentation_from_logits, use_torch_resampling
    use_torch_resampling(pred, device)
    target = [2 * v for v in volume]
    props = {"shape_after_cropping_and_before_resampling": target, "shape_before_cropping": target,
             "bbox_used_for_cropping": [[0, t] for t in target], "spacing": [0.5, 0.5, 0.5]}
    logits = logits.to(device)
    dev.synchronize(device)
    dev.reset_peak_memory(device)
    t0 = time.perf_counter()
    seg = segmentation_from_logits(logits, props, pred.configuration_manager, pred.plans_manager,
                                   pred.plans_manager.get_label_manager(pred.dataset_json))
    seconds = time.perf_counter() - t0
    return {"part": "resample", "classes": classes, "from": volume, "to": target, "s": seconds,
            "peak_device_GiB": dev.peak_memory_bytes(device) / 2 ** 30, "seg_dtype": str(seg.dtype),
            "labels_present": int(len(np.unique(seg[::4, ::4, ::4])))}


def table(rows: list, info: dict) -> str:
    out = [f"Device: {info.get('device')}; torch {info.get('torch')}", ""]
    train = [r for r in rows if r["part"] == "train"]

    def train_cells(r):
        if r.get("rc") != 0 or "images_per_s_total" not in r:
            return [r["launch"], r["config"], r["amp"], f"failed (rc {r['rc']})", "", "", ""]
        return [f"{r['launch']}{', compiled' if r.get('compiled') else ''}",
                f"{r['config']}, {'x'.join(map(str, r['patch_size']))} x {r['batch_per_rank']}", r["amp"],
                f"{r['images_per_s_total']:.2f}", f"{r['step_s_median']:.3f}",
                f"{100 * r.get('data_wait_share', 0):.0f}%", f"{r.get('peak_memory_MiB', 0):.0f}"]
    if train:
        out += md_table(["nnpp_train --other_use fps (UNet++)", "config, patch x batch", "AMP", "images/s",
                         "median step s", "data wait", "peak device MiB"], map(train_cells, train))
        out.append("")
    pred = [r for r in rows if r["part"] == "predict"]
    if pred:
        out += md_table(["predictor (fp16, mirroring, logits on device)", "classes", "volume", "s/case",
                         "peak device GiB"],
                        ([f"{r['predictor']} (tta_batch {r['tta_batch']})", r["classes"],
                          "x".join(map(str, r["volume"])), f"{r['s_per_case']:.1f}", f"{r['peak_device_GiB']:.1f}"]
                         for r in pred))
        for r in pred:
            if "masks_equal_to_nnunet" in r:
                clear = r["masks_equal_where_clear"]
                out.append(f"\ntta_batch {r['tta_batch']}: masks equal to nnU-Net's {r['masks_equal_to_nnunet']:.4%} of "
                           f"voxels; {'n/a' if clear is None else f'{clear:.4%}'} of the {r['clear_voxel_share']:.1%} "
                           f"whose top-2 margin > 2 x the largest logit difference ({r['max_abs_logit_diff']:.3g})")
        out.append("")
    for r in rows:
        if r["part"] == "resample":
            out.append(f"segmentation export, resample_torch_fornnunet on the device, {r['classes']} classes "
                       f"{'x'.join(map(str, r['from']))} -> {'x'.join(map(str, r['to']))}: {r['s']:.2f} s, "
                       f"peak {r['peak_device_GiB']:.1f} GiB")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", default=None, metavar="DIR", help="build the dataset into DIR and stop")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--size_scale", type=float, default=2.2)
    p.add_argument("--data", default=None, help="folder made by --prepare (needed by the train part)")
    p.add_argument("-device", default="cuda")
    p.add_argument("--parts", nargs="+", default=["predict", "train"], choices=["predict", "train"])
    p.add_argument("--amps", nargs="+", default=["O1", "bf16", "O0"])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--no_torchrun", action="store_true")
    p.add_argument("--compile", action="store_true", help="train part with torch.compile (nnU-Net's cuda default); "
                   "eager by default: compiling takes minutes per run")
    p.add_argument("--config", default=CONFIG, help="train part's configuration (3d_fullres: the planner's own)")
    p.add_argument("--classes", type=int, default=105)
    p.add_argument("--volume", type=int, nargs=3, default=[220, 380, 460])
    p.add_argument("--patch", type=int, nargs=3, default=TASK03["patch"], help="predict part's patch (Task03's)")
    p.add_argument("--no_resample", action="store_true")
    p.add_argument("--tta_batches", type=lambda v: None if v == "auto" else int(v), nargs="+", default=[None],
                   help="nnppPredictor rows, one per --tta_batch (auto: nnpp_predict's default, chosen per case)")
    p.add_argument("--no_nnunet", action="store_true", help="no nnUNetPredictor row")
    p.add_argument("--out", default=os.path.join(RESULTS, "device.json"))
    a = p.parse_args(argv)
    if a.prepare:
        prepare(os.path.abspath(a.prepare), a.cases, a.size_scale)
        return
    from nnpp import device as dev
    info = machine(device=dev.device_name(dev.resolve_device(a.device)))
    rows = []

    def save():
        write_json(a.out, {"machine": info, "rows": rows}, indent=1)
    if "predict" in a.parts:
        rows += run_predict(a.device, a.classes, a.volume, not a.no_resample, a.patch, a.tta_batches, a.no_nnunet)
        save()
    if "train" in a.parts:
        if not a.data:
            p.error("the train part needs --data (a folder made by --prepare)")
        rows += run_train(os.path.abspath(a.data), a.device, a.amps, a.warmup, a.steps, not a.no_torchrun, a.config,
                          a.compile)
        save()
    print(table(rows, info))


if __name__ == "__main__":
    main()
