"""DDP scaling on the CPU: 1 vs 2 processes (gloo), same per-rank batch, one thread each.

    python benchmarks/bench_ddp.py [--steps 30] [--warmup 5]

Builds a small synthetic Task03-like dataset (nnpp's built-in generator, nnU-Net's pipeline) in a temp
folder (removed at the end), runs ``nnpp_train --other_use fps`` with 1 and 2 processes under torchrun, reads
each perf.json and writes JSON (benchmarks/results/ddp_cpu.json) and a table. On a GPU/NPU box the same script
with ``-device cuda`` measures multi-device scaling (set --nproc to the device count).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import RESULTS, latest_fps_perf, md_table, nnunet_env, run_checked, torchrun, write_json  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("-device", default="cpu")
    p.add_argument("--out", default=os.path.join(RESULTS, "ddp_cpu.json"))
    a = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="nnpp_bench_ddp_") as work:  # the synthetic dataset and its runs
        env = nnunet_env(work, serial=True, OMP_NUM_THREADS="1", nnUNet_compile="false")
        prep = ("from nnpp.data.synthetic import make_msd_task, prepare_dataset\n"
                f"m = make_msd_task({work!r}, 902, n_train=6, n_test=0, seed=2)\n"
                "prepare_dataset(m, 902, num_processes=2, base_features=8, max_features=64, max_patch=(32, 48, 48))\n")
        run_checked([sys.executable, "-c", prep], "preparing the dataset", env)

        rows = []
        for n in a.nproc:
            run_checked(torchrun(n, "nnpp.run.train", "902", "3d_fullres", "0", "-device", a.device, "--other_use", "fps",
                                 "--warmup", a.warmup, "--steps", a.steps), f"{n} process(es)", env)
            with open(latest_fps_perf(env["nnUNet_results"])) as f:
                rows.append(json.load(f))
    base = rows[0]["images_per_s_total"]
    for r in rows:
        r["speedup_vs_first"] = r["images_per_s_total"] / base
        r["efficiency"] = r["speedup_vs_first"] / (r["world_size"] / rows[0]["world_size"])
    write_json(a.out, {"host_cpus": os.cpu_count(), "threads_per_rank": 1, "runs": rows})
    print("\n".join(md_table(
        ["processes", "batch/rank", "patch", "img/s total", "img/s/rank", "step median (s)", "data wait", "speed-up",
         "efficiency"],
        ([r["world_size"], r["batch_per_rank"], "x".join(map(str, r["patch_size"])), f"{r['images_per_s_total']:.2f}",
          f"{r['images_per_s_rank']:.2f}", f"{r['step_s_median']:.3f}", f"{100 * r['data_wait_share']:.1f}%",
          f"{r['speedup_vs_first']:.2f}x", f"{100 * r['efficiency']:.0f}%"] for r in rows))))
    print(f"JSON: {a.out}")


if __name__ == "__main__":
    main()
