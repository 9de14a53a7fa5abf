"""UNet++ vs nnU-Net's PlainConvUNet for the same plans: forward+backward step time, peak memory, parameters;
and UNet++ as-is vs each speed/memory option (channels_last_3d, bf16, checkpointed nodes) alone vs all together.

    python benchmarks/bench_network.py                          # small CPU config (default)
    python benchmarks/bench_network.py --config task03 -device cuda --amp O1
    python benchmarks/bench_network.py --config cpu-deep --variants --threads 2   # as-is vs each option vs all
    python benchmarks/bench_network.py --config cpu-deep --variants --rounds 2 --only "UNet++ channels_last_3d" \
        "UNet++ channels_last_3d, stock InstanceNorm3d"                             # two rows, interleaved

Variants (``--variants``): PlainConvUNet and UNet++ as-is (fp32, contiguous, no checkpointing), then UNet++ with
channels_last_3d (network and batch), bf16 autocast, both (nnpp's CPU default on a CPU with native bf16),
checkpointed nodes (``node``, ``cat_conv1``), and all together. Each row also has the bytes saved for backward by
one forward (``saved_activation_bytes``, batch of the config) and the network's own feature-map count
(``compute_conv_feature_map_size`` x batch, nnU-Net's units). The ``stock InstanceNorm3d`` rows put torch's own
norm back (it returns a contiguous tensor for a channels_last_3d input: a layout flip at every norm) to measure
what UNet++'s layout-preserving norm (nnpp.nets.norms) saves. On a CPU without native bf16 the bf16 rows are
skipped (emulated bf16 is many times slower; ``--emulated_bf16`` runs them with 0 warm-up and 1 step). Every result
names the CPU (``cpu_capability``: torch's kernel level and native bf16 or not). ``--rounds N`` interleaves N rounds
(alternating order) and reports the median.
Memory at Task03's plan (128^3 x 2) is reported as the count only (no forward at that size on a CPU).

Each (network, config) is measured in a fresh subprocess, so the CPU's peak RSS (which cannot be reset) and
allocator state belong to one network only. Writes JSON (``--out``) and prints a markdown table.
Configs (benchmarks/common.py): ``cpu-small`` (3D, 5 stages, 16..128 features, 32x64x64 patch, batch 2),
``cpu-deep`` (the deeper small CPU configuration: 6 stages, base 8 (8..256), 64^3, batch 2; an earlier name of it is
still read: common.CONFIG_ALIASES) and ``task03`` (nnU-Net's Task03_Liver 3d_fullres plan: 6 stages, 32..320
features, 128^3 patch, batch 2).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import (CONFIGS, RESULTS, add_step_args, arch_kwargs, md_table, print_result,  # noqa: E402
                    run_for_result, timed_in_turns, write_json)

from nnpp.nets import plans  # noqa: E402
from nnpp.nets.plans import PLAIN_UNET_CLASS, UNETPP_CLASS  # noqa: E402

NETWORKS = {"UNetPlusPlus": UNETPP_CLASS, "PlainConvUNet": PLAIN_UNET_CLASS}
#: --variants: name -> (network, amp, channels_last_3d, checkpoint_nodes[, "stock_norm"]); amp None = the --amp
#: flag; "stock_norm": torch's nn.InstanceNorm3d in place of UNet++'s layout-preserving one (nnpp.nets.norms), which
#: turns a channels_last_3d activation contiguous at every norm (a layout flip at every norm and back at the next
#: conv; fp32 only: bf16 activations take torch's path either way)
VARIANTS = {
    "PlainConvUNet": ("PlainConvUNet", None, False, None),
    "UNet++ as-is": ("UNetPlusPlus", None, False, "none"),
    "UNet++ channels_last_3d": ("UNetPlusPlus", None, True, "none"),
    "UNet++ channels_last_3d, stock InstanceNorm3d": ("UNetPlusPlus", None, True, "none", "stock_norm"),
    "UNet++ bf16": ("UNetPlusPlus", "bf16", False, "none"),
    "UNet++ channels_last_3d + bf16": ("UNetPlusPlus", "bf16", True, "none"),
    "UNet++ ckpt node": ("UNetPlusPlus", None, False, "node"),
    "UNet++ ckpt cat_conv1": ("UNetPlusPlus", None, False, "cat_conv1"),
    "UNet++ all (channels_last + bf16 + ckpt node)": ("UNetPlusPlus", "bf16", True, "node"),
}


def variant_amp(name: str, amp_flag: str) -> str:
    return VARIANTS[name][1] or amp_flag


def plan_variants(names, amp_flag: str, device_type: str, native_bf16: bool, emulated_bf16: bool):
    """(variants to run, {skipped variant: reason}). On a CPU without native bf16 (AVX2-only, or AVX-512 without
    AVX512-BF16/AMX) bf16 autocast is emulated and many times slower than fp32: such rows are skipped unless
    ``--emulated_bf16`` asks for them (then measured with 0 warm-up and 1 step)."""
    run, skipped = [], {}
    for name in names:
        if (device_type == "cpu" and not native_bf16 and not emulated_bf16
                and variant_amp(name, amp_flag) == "bf16"):
            skipped[name] = "bf16 is emulated on this CPU (no AVX512-BF16/AMX); --emulated_bf16 to measure it"
        else:
            run.append(name)
    return run, skipped


def measure(network: str, config: str, device_name: str, amp_mode: str, warmup: int, steps: int,
            channels_last: bool = False, checkpoint_nodes: str | None = None, variant: str | None = None,
            stock_norm: bool = False) -> dict:
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
    if stock_norm:  # torch's own InstanceNorm3d forward (same parameters): the layout flips back
        from nnpp.nets.norms import ChannelsLastInstanceNorm3d
        for m in net.modules():
            if type(m) is ChannelsLastInstanceNorm3d:
                m.__class__ = torch.nn.InstanceNorm3d
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
    times = timed_in_turns({"step": step}, steps, sync=lambda: dev.synchronize(device))["step"]
    return {"variant": variant or network, "channels_last_3d": channels_last, "checkpoint_nodes": checkpoint_nodes,
            "saved_activation_MiB": saved / 2 ** 20, "feature_map_count": count,
            "network": network, "config": config, "device": dev.device_name(device), "amp": amp.mode,
            "cpu_capability": dev.cpu_capability(), "stock_norm": stock_norm,
            "batch": cfg["batch"], "patch": cfg["patch"], "params": sum(p.numel() for p in net.parameters()),
            "step_s_median": statistics.median(times), "step_s_mean": statistics.fmean(times), "steps": steps,
            "peak_memory_MiB": dev.peak_memory_bytes(device) / 2 ** 20,
            "peak_memory_kind": "device allocated" if device.type in ("cuda", "npu") else "process peak RSS"}


def task03_counts() -> dict:
    """Feature-map counts (nnU-Net's units, x batch 2) at Task03's plan, 128^3: no forward, the networks' own count."""
    cfg, out = CONFIGS["task03"], {}
    for name, (network, _, _, ckpt, *_) in VARIANTS.items():
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
    add_step_args(p, warmup=2, steps=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/network_<config>_<device>.json)")
    p.add_argument("--variants", action="store_true", help="UNet++ as-is vs each speed/memory option vs all")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                   help="--variants: measure only these (names as in the table)")
    p.add_argument("--rounds", type=int, default=1,
                   help="--variants: interleaved rounds (each round runs every variant, in alternating order); "
                        "the table reports the median over rounds")
    p.add_argument("--emulated_bf16", action="store_true",
                   help="--variants on a CPU without native bf16: measure the bf16 rows anyway (0 warm-up, 1 step)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one network, print JSON
    a = p.parse_args()

    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.one:
        if a.one in VARIANTS:
            network, amp, cl, ckpt, *extra = VARIANTS[a.one]
            r = measure(network, a.config, a.device, amp or a.amp, a.warmup, a.steps, cl, ckpt, a.one,
                        stock_norm="stock_norm" in extra)
        else:
            r = measure(a.one, a.config, a.device, a.amp, a.warmup, a.steps)
        print_result(r)
        return

    from nnpp import device as dev
    names, skipped = list(VARIANTS if a.variants else NETWORKS), {}
    if a.variants:
        unknown = [n for n in a.only or () if n not in VARIANTS]
        if unknown:
            sys.exit(f"bench_network: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        names, skipped = plan_variants(a.only or names, a.amp, dev.resolve_device(a.device).type,
                                       dev.cpu_has_native_bf16(), a.emulated_bf16)
        for name, why in skipped.items():
            print(f"[bench_network] {name}: skipped ({why})", file=sys.stderr, flush=True)
        if not names:
            sys.exit("bench_network: every requested variant was skipped (see above)")
    emulated = a.variants and a.emulated_bf16 and not dev.cpu_has_native_bf16()
    per_name = {n: [] for n in names}
    for rnd in range(max(1, a.rounds)):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            short = emulated and variant_amp(name, a.amp) == "bf16"
            cmd = [sys.executable, __file__, "--one", name, "--config", a.config, "-device", a.device, "--amp",
                   a.amp, "--warmup", "0" if short else str(a.warmup), "--steps", "1" if short else str(a.steps),
                   "--threads", str(a.threads)]
            print(f"[bench_network] round {rnd + 1}: {name} ...", file=sys.stderr, flush=True)
            per_name[name].append(run_for_result(cmd, name))
    rows = []
    for name in names:
        runs = per_name[name]
        row = dict(runs[0], step_s_median=statistics.median(r["step_s_median"] for r in runs),
                   step_s_rounds=[r["step_s_median"] for r in runs])
        rows.append(row)
    result = {"config": a.config, "arch": arch_kwargs(CONFIGS[a.config]), "runs": rows, "skipped": skipped,
              "cpu_capability": dev.cpu_capability(), "rounds": max(1, a.rounds),
              "task03_params": param_counts("task03"), "task03_feature_map_counts": task03_counts(),
              "host_cpus": os.cpu_count(), "threads": a.threads or os.cpu_count()}
    suffix = "_variants" if a.variants else ""
    out = write_json(a.out or os.path.join(RESULTS, f"network_{a.config}_{a.device}_{a.amp}{suffix}.json"), result)

    if a.variants:
        print(f"CPU: {result['cpu_capability']}, {result['threads']} thread(s), {result['rounds']} round(s)")
        base = next((r for r in rows if r["variant"] == "UNet++ as-is"), rows[0])
        ref = "as-is" if base["variant"] == "UNet++ as-is" else base["variant"]
        print("\n".join(md_table(
            ["variant", "AMP", "step (median s)", f"x {ref}", "saved for backward (MiB)", f"x {ref}",
             "count x batch (M elements)"],
            ([r["variant"], r["amp"], f"{r['step_s_median']:.3f}", f"{r['step_s_median'] / base['step_s_median']:.2f}",
              f"{r['saved_activation_MiB']:.0f}", f"{r['saved_activation_MiB'] / base['saved_activation_MiB']:.2f}",
              f"{r['feature_map_count'] / 1e6:.1f}"] for r in rows))))
        print("Task03 plan, 128^3 x 2, feature-map count (M elements; nnU-Net's 8 GB reference: 560 M): "
              + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in result["task03_feature_map_counts"].items()))
        print(f"JSON: {out}")
        return

    print("\n".join(md_table(
        ["network", "config", "device", "AMP", "batch x patch", "params", "step (median s)", "peak memory (MiB)"],
        ([r["network"], r["config"], r["device"], r["amp"], f"{r['batch']} x {'x'.join(map(str, r['patch']))}",
          f"{r['params'] / 1e6:.2f} M", f"{r['step_s_median']:.3f}",
          f"{r['peak_memory_MiB']:.0f} ({r['peak_memory_kind']})"] for r in rows))))
    print("Task03-like 3D plan (6 stages, 32..320 features) parameters: "
          + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in result["task03_params"].items()))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
