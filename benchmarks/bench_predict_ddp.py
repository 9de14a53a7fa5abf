"""Distributed prediction: ``torchrun --nproc_per_node=N -m nnpp.run.predict`` with N = 1, 2, ... on the same cases,
cases/min as rank 0 reports it, masks compared with N = 1.

    python benchmarks/bench_predict_ddp.py --model_folder RESULTS/Dataset900_.../TRAINER__PLANS__3d_fullres -n 1 2

Every run predicts the fold's first ``--cases`` validation cases (raw images) into a fresh folder, torch on the CPU,
mirroring on, ``-npp 0 -nps 0``; threads per process = ``--threads`` // N (the machine's cores shared out, as
torchrun's OMP_NUM_THREADS would be set by hand). Runs interleave over ``--rounds``. Writes ``--out`` (JSON) and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import (RESULTS, machine, machine_line, md_table, model_id, read_masks, run_checked,  # noqa: E402
                    stage_val_cases, torchrun, write_json)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_folder", required=True)
    p.add_argument("-f", default="0")
    p.add_argument("-n", type=int, nargs="+", default=[1, 2], help="processes per run")
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads shared out among the processes")
    p.add_argument("--out", default=os.path.join(RESULTS, "predict_ddp_cpu.json"))
    args = p.parse_args(argv)

    import numpy as np

    folder = os.path.abspath(args.model_folder)
    name, trainer, plans, config = model_id(folder)
    ending = json.load(open(os.path.join(folder, "dataset.json")))["file_ending"]
    work, inputs, cases = stage_val_cases(name, args.f, args.cases, ending, "bench_predict_ddp_")
    runs = {n: [] for n in args.n}
    masks = {}
    try:
        for r in range(args.rounds):
            for n in args.n:
                out = os.path.join(work, f"n{n}_{r}")
                env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // n)))
                cmd = torchrun(n, "nnpp.run.predict", "-i", inputs, "-o", out, "-d", name, "-c", config, "-tr", trainer,
                               "-p", plans, "-f", args.f, "-device", "cpu", "-npp", "0", "-nps", "0",
                               "--disable_progress_bar")
                load0 = os.getloadavg()[0]
                proc, wall = run_checked(cmd, f"{n} process(es)", env)
                # N > 1: rank 0's total line; N = 1 (WORLD_SIZE 1 is the one-process path): its summary line
                m = re.search(r"(\d+) case\(s\) in ([\d.]+) s(?:, |: )([\d.]+) cases/min", proc.stdout)
                run = {"wall_s": wall, "cases_per_min_rank0": float(m.group(3)) if m else None,
                       "cases_per_min_wall": 60 * len(cases) / wall, "load_before": load0,
                       "load_after": os.getloadavg()[0], "threads_per_process": max(1, args.threads // n)}
                runs[n].append(run)
                if n not in masks:
                    masks[n] = read_masks(out, cases, ending)
                print(f"[bench_predict_ddp] round {r} N={n}: {run['cases_per_min_rank0']} cases/min (rank 0), "
                      f"{wall:.1f} s wall incl. start-up, load {load0:.1f}->{run['load_after']:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = args.n[0]
    rows = {str(n): {"cases_per_min_rank0": statistics.median(x["cases_per_min_rank0"] for x in rs),
                     "cases_per_min_wall": statistics.median(x["cases_per_min_wall"] for x in rs),
                     "masks_equal_to_N%d" % base: bool(all(np.array_equal(a, b) for a, b in zip(masks[n], masks[base]))),
                     "runs": rs} for n, rs in runs.items()}
    m = machine()
    result = {"machine": f"{machine_line(m)}, CPU only (no GPU)", **m,
              "model_folder": folder, "cases": cases, "threads_total": args.threads, "rows": rows}
    write_json(args.out, result)
    print(f"{result['machine']}; CPU capability {result['cpu_capability']}, native bf16 {result['native_bf16']}; "
          f"{len(cases)} cases, {args.threads} threads shared out")
    print("\n".join(md_table(
        ["processes", "cases/min (rank 0)", "cases/min (wall, incl. start-up)", f"masks = N={base}"],
        ([n, f"{row['cases_per_min_rank0']:.2f}", f"{row['cases_per_min_wall']:.2f}", row[f"masks_equal_to_N{base}"]]
         for n, row in rows.items()))))


if __name__ == "__main__":
    main()
