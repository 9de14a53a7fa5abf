"""DDP scaling on the CPU: 1 vs 2 processes (gloo), same per-rank batch, one thread each.

    python benchmarks/bench_ddp.py [--steps 30] [--warmup 5]

Builds a small synthetic Task03-like dataset (nnpp's built-in generator, nnU-Net's pipeline) in a temp
folder, runs ``nnpp_train --other_use fps`` with 1 and 2 processes under torchrun, reads each perf.json and
writes JSON (benchmarks/results/ddp_cpu.json) and a table. On a GPU/NPU box the same script with
``-device cuda`` measures multi-device scaling (set --nproc to the device count).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from nnpp.distributed import free_port


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("-device", default="cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ddp_cpu.json"))
    a = p.parse_args()

    work = tempfile.mkdtemp(prefix="nnpp_bench_ddp_")
    env = dict(os.environ, OMP_NUM_THREADS="1", nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="false")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[k] = os.path.join(work, k)
        os.makedirs(env[k])
    prep = ("from nnpp.data.synthetic import make_msd_task, prepare_dataset\n"
            f"m = make_msd_task({work!r}, 902, n_train=6, n_test=0, seed=2)\n"
            "prepare_dataset(m, 902, num_processes=2, base_features=8, max_features=64, max_patch=(32, 48, 48))\n")
    subprocess.run([sys.executable, "-c", prep], env=env, check=True, capture_output=True)

    rows = []
    for n in a.nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}",
               "-m", "nnpp.run.train", "902", "3d_fullres", "0", "-device", a.device, "--other_use", "fps",
               "--warmup", str(a.warmup), "--steps", str(a.steps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_ddp: {n} process(es) failed:\n{proc.stderr[-3000:]}")
        trainer = "nnUNetPlusPlusTrainerDDP" if n > 1 else "nnUNetPlusPlusTrainer"
        perf_path = os.path.join(env["nnUNet_results"], "nnpp_perf", "fps", "Dataset902_SynthLiver",
                                 f"{trainer}__nnUNetPlans__3d_fullres", "fold_0", "perf.json")
        with open(perf_path) as f:
            rows.append(json.load(f))
    base = rows[0]["images_per_s_total"]
    for r in rows:
        r["speedup_vs_first"] = r["images_per_s_total"] / base
        r["efficiency"] = r["speedup_vs_first"] / (r["world_size"] / rows[0]["world_size"])
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"host_cpus": os.cpu_count(), "threads_per_rank": 1, "runs": rows}, f, indent=2)
    print("| processes | batch/rank | patch | img/s total | img/s/rank | step median (s) | data wait | speed-up | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world_size']} | {r['batch_per_rank']} | {'x'.join(map(str, r['patch_size']))} | "
              f"{r['images_per_s_total']:.2f} | {r['images_per_s_rank']:.2f} | {r['step_s_median']:.3f} | "
              f"{100 * r['data_wait_share']:.1f}% | {r['speedup_vs_first']:.2f}x | {100 * r['efficiency']:.0f}% |")
    print(f"JSON: {a.out}")


if __name__ == "__main__":
    main()
