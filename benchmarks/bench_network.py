"""UNet++ vs nnU-Net's PlainConvUNet for the same plans: forward+backward step time, peak memory, parameters;
and UNet++ as-is vs each speed/memory option alone vs all together (issue 9).

    python benchmarks/bench_network.py                          # small CPU config (default)
    python benchmarks/bench_network.py --config task03 -device cuda --amp O1
    python benchmarks/bench_network.py --config issue9 --variants --threads 2   # as-is vs each option vs all

Variants (``--variants``): PlainConvUNet and UNet++ as-is (fp32, contiguous, no checkpointing), then UNet++ with
channels_last_3d (network and batch), bf16 autocast, both (nnpp's CPU default on a CPU with native bf16),
checkpointed nodes (``node``, ``cat_conv1``), and all together. Each row also has the bytes saved for backward by
one forward (``saved_activation_bytes``, batch of the config) and the network's own feature-map count
(``compute_conv_feature_map_size`` x batch, nnU-Net's units).
Memory at Task03's plan (128^3 x 2) is reported as the count only (no forward at that size on a CPU).

Each (network, config) is measured in a fresh subprocess, so the CPU's peak RSS (which cannot be reset) and
allocator state belong to one network only. Writes JSON (``--out``) and prints a markdown table.
Configs: ``cpu-small`` (3D, 5 stages, 16..128 features, 32x64x64 patch, batch 2), ``issue9`` (the issue's small
CPU configuration: 6 stages, base 8 (8..256), 64^3, batch 2) and ``task03`` (nnU-Net's Task03_Liver 3d_fullres
plan: 6 stages, 32..320 features, 128^3 patch, batch 2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from nnpp.nets import plans
from nnpp.nets.plans import PLAIN_UNET_CLASS, UNETPP_CLASS

CONFIGS = {
    "cpu-small": dict(n_stages=5, features=[16, 32, 64, 128, 128], patch=[32, 64, 64], batch=2,
                      strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
    "issue9": dict(n_stages=6, features=[8, 16, 32, 64, 128, 256], patch=[64, 64, 64], batch=2,
                   strides=[[1, 1, 1]] + [[2, 2, 2]] * 5),
    "task03": dict(n_stages=6, features=[32, 64, 128, 256, 320, 320], patch=[128, 128, 128], batch=2,
                   strides=[[1, 1, 1]] + [[2, 2, 2]] * 5),
}
NETWORKS = {"UNetPlusPlus": UNETPP_CLASS, "PlainConvUNet": PLAIN_UNET_CLASS}
#: --variants: name -> (network, amp, channels_last_3d, checkpoint_nodes); amp None = the --amp flag
VARIANTS = {
    "PlainConvUNet": ("PlainConvUNet", None, False, None),
    "UNet++ as-is": ("UNetPlusPlus", None, False, "none"),
    "UNet++ channels_last_3d": ("UNetPlusPlus", None, True, "none"),
    "UNet++ bf16": ("UNetPlusPlus", "bf16", False, "none"),
    "UNet++ channels_last_3d + bf16": ("UNetPlusPlus", "bf16", True, "none"),
    "UNet++ ckpt node": ("UNetPlusPlus", None, False, "node"),
    "UNet++ ckpt cat_conv1": ("UNetPlusPlus", None, False, "cat_conv1"),
    "UNet++ all (channels_last + bf16 + ckpt node)": ("UNetPlusPlus", "bf16", True, "node"),
}


def arch_kwargs(cfg: dict) -> dict:
    return plans.arch_kwargs(cfg["features"], cfg["strides"])


def measure(network: str, config: str, device_name: str, amp_mode: str, warmup: int, steps: int,
            channels_last: bool = False, checkpoint_nodes: str | None = None, variant: str | None = None) -> dict:
    """One network, one config (one variant), in this process."""
    import torch

    from nnpp import device as dev
    from nnpp.nets.unetpp import saved_activation_bytes

    cfg = CONFIGS[config]
    device = dev.resolve_device(device_name)
    amp = dev.make_amp(amp_mode, device)
    dev.configure_backends(device)
    kwargs = dict(arch_kwargs(cfg), **({"checkpoint_nodes": checkpoint_nodes} if checkpoint_nodes else {}))
    net = plans.build_network(NETWORKS[network], kwargs, 1, 3).to(device)
    x = torch.randn(cfg["batch"], 1, *cfg["patch"], device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    count = int(net.compute_conv_feature_map_size(cfg["patch"])) * cfg["batch"]
    with amp.autocast():
        saved = saved_activation_bytes(net, x)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    y = torch.randint(0, 3, (cfg["batch"], *cfg["patch"]), device=device)
    ce = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with amp.autocast():
            out = net(x)
            # every head at the target's resolution: UNet++ heads are full-res; PlainConvUNet's lower heads
            # are upsampled so that both networks pay for a full-resolution loss on each output
            loss = sum(ce(torch.nn.functional.interpolate(o.float(), size=cfg["patch"]) if o.shape[2:] != x.shape[2:]
                          else o.float(), y) for o in out)
        amp.backward_and_step(loss, opt)

    for _ in range(warmup):
        step()
    dev.synchronize(device)
    dev.reset_peak_memory(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        dev.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"variant": variant or network, "channels_last_3d": channels_last, "checkpoint_nodes": checkpoint_nodes,
            "saved_activation_MiB": saved / 2 ** 20, "feature_map_count": count,
            "network": network, "config": config, "device": dev.device_name(device), "amp": amp.mode,
            "batch": cfg["batch"], "patch": cfg["patch"], "params": sum(p.numel() for p in net.parameters()),
            "step_s_median": statistics.median(times), "step_s_mean": statistics.fmean(times), "steps": steps,
            "peak_memory_MiB": dev.peak_memory_bytes(device) / 2 ** 20,
            "peak_memory_kind": "device allocated" if device.type in ("cuda", "npu") else "process peak RSS"}


def task03_counts() -> dict:
    """Feature-map counts (nnU-Net's units, x batch 2) at Task03's plan, 128^3: no forward, the networks' own count."""
    cfg, out = CONFIGS["task03"], {}
    for name, (network, _, _, ckpt) in VARIANTS.items():
        if name.startswith("UNet++ all") or "channels_last" in name or "bf16" in name:
            continue
        kwargs = dict(arch_kwargs(cfg), **({"checkpoint_nodes": ckpt} if ckpt else {}))
        net = plans.build_network(NETWORKS[network], kwargs, 1, 3, allow_init=False)
        out[name] = int(net.compute_conv_feature_map_size(cfg["patch"])) * cfg["batch"]
    return out


def param_counts(config: str) -> dict:
    out = {}
    for name, cls in NETWORKS.items():
        net = plans.build_network(cls, arch_kwargs(CONFIGS[config]), 1, 3, allow_init=False)
        out[name] = sum(p.numel() for p in net.parameters())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cpu-small", choices=CONFIGS)
    p.add_argument("-device", default="cpu")
    p.add_argument("--amp", default="O0")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/network_<config>_<device>.json)")
    p.add_argument("--variants", action="store_true", help="UNet++ as-is vs each option vs all (issue 9)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one network, print JSON
    a = p.parse_args()

    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.one:
        if a.one in VARIANTS:
            network, amp, cl, ckpt = VARIANTS[a.one]
            r = measure(network, a.config, a.device, amp or a.amp, a.warmup, a.steps, cl, ckpt, a.one)
        else:
            r = measure(a.one, a.config, a.device, a.amp, a.warmup, a.steps)
        print("RESULT " + json.dumps(r))
        return

    rows = []
    for name in (VARIANTS if a.variants else NETWORKS):
        cmd = [sys.executable, __file__, "--one", name, "--config", a.config, "-device", a.device, "--amp", a.amp,
               "--warmup", str(a.warmup), "--steps", str(a.steps), "--threads", str(a.threads)]
        print(f"[bench_network] {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"bench_network: {name} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(line[0][7:]))
    result = {"config": a.config, "arch": arch_kwargs(CONFIGS[a.config]), "runs": rows,
              "task03_params": param_counts("task03"), "task03_feature_map_counts": task03_counts(),
              "host_cpus": os.cpu_count(), "threads": a.threads or os.cpu_count()}
    suffix = "_variants" if a.variants else ""
    out = a.out or os.path.join(os.path.dirname(__file__), "results",
                                f"network_{a.config}_{a.device}_{a.amp}{suffix}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)

    if a.variants:
        base = next(r for r in rows if r["variant"] == "UNet++ as-is")
        print("| variant | AMP | step (median s) | x as-is | saved for backward (MiB) | x as-is | count x batch "
              "(M elements) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['amp']} | {r['step_s_median']:.3f} | "
                  f"{r['step_s_median'] / base['step_s_median']:.2f} | {r['saved_activation_MiB']:.0f} | "
                  f"{r['saved_activation_MiB'] / base['saved_activation_MiB']:.2f} | "
                  f"{r['feature_map_count'] / 1e6:.1f} |")
        print("Task03 plan, 128^3 x 2, feature-map count (M elements; nnU-Net's 8 GB reference: 560 M): "
              + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in result["task03_feature_map_counts"].items()))
        print(f"JSON: {out}")
        return

    print("| network | config | device | AMP | batch x patch | params | step (median s) | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['config']} | {r['device']} | {r['amp']} | {r['batch']} x "
              f"{'x'.join(map(str, r['patch']))} | {r['params'] / 1e6:.2f} M | {r['step_s_median']:.3f} | "
              f"{r['peak_memory_MiB']:.0f} ({r['peak_memory_kind']}) |")
    print("Task03-like 3D plan (6 stages, 32..320 features) parameters: "
          + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in result["task03_params"].items()))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
