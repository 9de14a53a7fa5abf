"""Distillation costs and gains: student/teacher parameter and latency ratios (r = 2, 4; UNet++ and U-Net
students), and the step-time and memory cost of KD with 1 and 3 teachers.

    python benchmarks/bench_distill.py                          # small CPU config (default)
    python benchmarks/bench_distill.py --config task03 -device cuda --amp O1

Teacher: UNet++ at the config's full width. Students: the student plans' rule (features // r, never below 8)
built as nnpp's UNet++ or nnU-Net's PlainConvUNet (nnpp.distill.student). Latency: forward of one patch
(batch 1, no grad, the AMP mode's autocast), median over ``--steps`` after ``--warmup``. KD step: a training
step of the r=2 UNet++ student (forward, Dice-free CE on every head, backward, SGD) without KD and with
``soft + cwd`` KD from 1 or 3 teachers (teacher forwards under no_grad, KD in fp32, as nnpp's KD trainer does);
each KD configuration runs in a fresh subprocess so the CPU's peak RSS belongs to it alone (on cuda/npu: peak
allocated device memory). Writes JSON (``--out``) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_network import CONFIGS, arch_kwargs  # noqa: E402

NETWORKS = {"unetpp": "nnpp.nets.unetpp.UNetPlusPlus",
            "unet": "dynamic_network_architectures.architectures.unet.PlainConvUNet"}
REQ = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def build(kind: str, config: str, r: int, device, deep_supervision: bool):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnpp.distill.student import reduce_features
    kwargs = arch_kwargs(CONFIGS[config])
    kwargs["features_per_stage"] = reduce_features(kwargs["features_per_stage"], r)
    return get_network_from_plans(NETWORKS[kind], kwargs, REQ, 1, 3, allow_init=True,
                                  deep_supervision=deep_supervision).to(device)


def timed(fn, device, warmup: int, steps: int) -> float:
    from nnpp import device as dev
    times = []
    for i in range(warmup + steps):
        dev.synchronize(device)
        t0 = time.perf_counter()
        fn()
        dev.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sizes(config: str, device_name: str, amp_mode: str, warmup: int, steps: int) -> list:
    import torch

    from nnpp import device as dev
    device = dev.resolve_device(device_name)
    amp = dev.make_amp(amp_mode, device)
    x = torch.randn(1, 1, *CONFIGS[config]["patch"], device=device)
    rows = []
    for kind, r in (("unetpp", 1), ("unetpp", 2), ("unetpp", 4), ("unet", 1), ("unet", 2), ("unet", 4)):
        net = build(kind, config, r, device, False).eval()
        with torch.no_grad(), amp.autocast():
            ms = 1000 * timed(lambda: net(x), device, warmup, steps)
        rows.append({"network": kind, "r": r, "parameters": sum(p.numel() for p in net.parameters()),
                     "latency_ms": ms})
        print(f"  {kind} r={r}: {rows[-1]['parameters']:,} parameters, {ms:.1f} ms/patch", flush=True)
    teacher = rows[0]
    for row in rows:
        row["param_ratio_vs_teacher"] = row["parameters"] / teacher["parameters"]
        row["latency_ratio_vs_teacher"] = row["latency_ms"] / teacher["latency_ms"]
    return rows


def kd_step(config: str, teachers: int, device_name: str, amp_mode: str, warmup: int, steps: int) -> dict:
    """One KD configuration in this process: step time and peak memory of the r=2 UNet++ student."""
    import torch
    import torch.nn.functional as F

    from nnpp import device as dev
    from nnpp.distill import losses as L
    cfg = CONFIGS[config]
    device = dev.resolve_device(device_name)
    amp = dev.make_amp(amp_mode, device)
    dev.configure_backends(device)
    student = build("unetpp", config, 2, device, True)
    nets = [build("unetpp", config, 1, device, False).eval().requires_grad_(False) for _ in range(teachers)]
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(cfg["batch"], 1, *cfg["patch"], device=device)
    y = torch.randint(0, 3, (cfg["batch"], *cfg["patch"]), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad(), amp.autocast():
            t_logits = [t(x).float() for t in nets]
        with amp.autocast():
            out = student(x)
            seg = sum(F.cross_entropy(o, y) for o in out) / len(out)
        loss = seg
        if nets:
            with dev.Amp("O0", device).autocast(exclusive=True):
                target = L.ensemble_log_probs(t_logits, 2.0)
                soft = sum(L.soft_kd(o, target, 2.0) for o in out) / len(out)
                c = L.cwd(out[0], L.ensemble_spatial_log_probs(t_logits, 4.0), 4.0)
                loss = 0.5 * seg.float() + 0.5 * (soft + c)
        amp.backward_and_step(loss, opt)

    dev.reset_peak_memory(device)
    seconds = timed(step, device, warmup, steps)
    return {"teachers": teachers, "step_s": seconds, "peak_memory_mb": dev.peak_memory_bytes(device) / 2 ** 20,
            "device": str(device), "amp": amp.mode}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cpu-small", choices=sorted(CONFIGS))
    p.add_argument("-device", default="cpu")
    p.add_argument("--amp", default="O0")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/distill_CONFIG_DEVICE_AMP.json)")
    p.add_argument("--_kd_step", type=int, default=None, help=argparse.SUPPRESS)  # internal: one KD config
    a = p.parse_args(argv)
    if a._kd_step is not None:
        print(json.dumps(kd_step(a.config, a._kd_step, a.device, a.amp, a.warmup, a.steps)))
        return
    print(f"[bench_distill] sizes and latency, config {a.config}, {a.device}, AMP {a.amp}", flush=True)
    size_rows = sizes(a.config, a.device, a.amp, a.warmup, a.steps)
    kd_rows = []
    for n in (0, 1, 3):
        out = subprocess.run([sys.executable, __file__, "--config", a.config, "-device", a.device, "--amp", a.amp,
                              "--warmup", str(a.warmup), "--steps", str(a.steps), "--_kd_step", str(n)],
                             capture_output=True, text=True, check=True)
        kd_rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  KD with {n} teacher(s): {kd_rows[-1]['step_s']:.3f} s/step, "
              f"peak {kd_rows[-1]['peak_memory_mb']:.0f} MB", flush=True)
    base = kd_rows[0]
    for row in kd_rows:
        row["step_ratio"] = row["step_s"] / base["step_s"]
        row["memory_ratio"] = row["peak_memory_mb"] / base["peak_memory_mb"]
    result = {"config": a.config, "cfg": CONFIGS[a.config], "device": a.device, "amp": a.amp, "warmup": a.warmup,
              "steps": a.steps, "sizes": size_rows, "kd_step": kd_rows}
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"distill_{a.config}_{a.device}_{a.amp}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)
    print(f"\nwritten {out}\n")
    print("| network | r | parameters | x teacher | latency (ms/patch) | x teacher |\n|---|---|---|---|---|---|")
    for r in size_rows:
        print(f"| {r['network']} | {r['r']} | {r['parameters']:,} | {r['param_ratio_vs_teacher']:.3f} | "
              f"{r['latency_ms']:.1f} | {r['latency_ratio_vs_teacher']:.2f} |")
    print("\n| KD teachers | step (s) | x no KD | peak memory (MB) | x no KD |\n|---|---|---|---|---|")
    for r in kd_rows:
        print(f"| {r['teachers']} | {r['step_s']:.3f} | {r['step_ratio']:.2f} | {r['peak_memory_mb']:.0f} | "
              f"{r['memory_ratio']:.2f} |")


if __name__ == "__main__":
    main()
