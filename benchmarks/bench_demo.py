"""The demo end to end (``nnpp_demo``: synthetic data, nnU-Net preprocessing, UNet++ training, validation) under
several AMP modes, side by side in one run: wall time, training FPS, per-class Dice.

    python benchmarks/bench_demo.py                       # --amp O0 vs bf16 (the CPU's auto on native-bf16 CPUs)
    python benchmarks/bench_demo.py --amp O0 bf16 --epochs 6 --iters 40

Each mode runs in a fresh subprocess, one after the other, in its own work folder (removed afterwards). Writes JSON
(``--out``) and prints a markdown table. What else the demo does by default (UNet++ planner, memory format from the
device layer) is the same for every row.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import RESULTS, md_table, print_result, run_for_result, write_json  # noqa: E402


def one(amp: str, epochs: int, iters: int, workdir: str) -> dict:
    from nnpp.run import demo
    args = demo.build_parser().parse_args(["--workdir", workdir, "--amp", amp, "--epochs", str(epochs),
                                           "--iters", str(iters)])
    result = demo.run(args)
    return {k: result[k] for k in ("dice", "train_fps", "device", "amp", "seconds")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--amp", nargs="+", default=["O0", "bf16"])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--out", default=os.path.join(RESULTS, "demo.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one mode, print JSON
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print_result(one(a.one, a.epochs, a.iters, a.workdir))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="nnpp_bench_demo_") as tmp:
        for amp in a.amp:
            print(f"[bench_demo] nnpp_demo --amp {amp} --epochs {a.epochs} --iters {a.iters} ...", file=sys.stderr,
                  flush=True)
            cmd = [sys.executable, __file__, "--one", amp, "--epochs", str(a.epochs), "--iters", str(a.iters),
                   "--workdir", os.path.join(tmp, amp)]
            rows.append(run_for_result(cmd, f"--amp {amp}"))
    write_json(a.out, {"epochs": a.epochs, "iters": a.iters, "host_cpus": os.cpu_count(), "runs": rows})

    labels = list(rows[0]["dice"])
    print("\n".join(md_table(
        ["AMP", "wall time (s)", "training FPS (img/s)", *(f"{k} Dice" for k in labels)],
        ([r["amp"], f"{r['seconds']:.0f}", f"{r['train_fps']:.2f}",
          *(f"{r['dice'][k]:.4f}" if r["dice"][k] is not None else "n/a" for k in labels)] for r in rows))))
    print(f"JSON: {a.out}")


if __name__ == "__main__":
    main()
