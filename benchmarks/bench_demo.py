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
import json
import os
import subprocess
import sys
import tempfile


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
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "demo.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one mode, print JSON
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.epochs, a.iters, a.workdir)))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="nnpp_bench_demo_") as tmp:
        for amp in a.amp:
            print(f"[bench_demo] nnpp_demo --amp {amp} --epochs {a.epochs} --iters {a.iters} ...", file=sys.stderr,
                  flush=True)
            cmd = [sys.executable, __file__, "--one", amp, "--epochs", str(a.epochs), "--iters", str(a.iters),
                   "--workdir", os.path.join(tmp, amp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"bench_demo: --amp {amp} failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(line[0][7:]))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp_out = a.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump({"epochs": a.epochs, "iters": a.iters, "host_cpus": os.cpu_count(), "runs": rows}, f, indent=2)
    os.replace(tmp_out, a.out)

    labels = list(rows[0]["dice"])
    print("| AMP | wall time (s) | training FPS (img/s) | " + " | ".join(f"{k} Dice" for k in labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    for r in rows:
        print(f"| {r['amp']} | {r['seconds']:.0f} | {r['train_fps']:.2f} | "
              + " | ".join(f"{r['dice'][k]:.4f}" if r["dice"][k] is not None else "n/a" for k in labels) + " |")
    print(f"JSON: {a.out}")


if __name__ == "__main__":
    main()
