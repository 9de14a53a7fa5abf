"""Layout flips at UNet++'s norms: a channels_last_3d UNet++ with nnpp's layout-preserving instance norm
(nnpp.nets.norms) vs the same network with torch's InstanceNorm3d (contiguous output: a flip at every norm and
back at the next conv). Paired in one process: both networks (same weights) step alternately, A B A B ..., so a
loaded machine's drift hits both alike; reports the median step of each and the median of the per-pair ratios.

    OMP_NUM_THREADS=2 python benchmarks/bench_norm_layout.py --config cpu-deep --patch 48 --pairs 8 --amp O0 bf16

Writes JSON (``--out``, default benchmarks/results/norm_layout_<config>.json) with the CPU named
(``nnpp.device.cpu_capability``) and the load average before and after.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import CONFIGS, RESULTS, add_config_arg, arch_kwargs, seed_all, write_json  # noqa: E402


def main():
    import torch

    from nnpp import device as dev
    from nnpp.nets import plans
    from nnpp.nets.norms import ChannelsLastInstanceNorm3d
    from nnpp.nets.plans import UNETPP_CLASS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arg(p, "cpu-deep")
    p.add_argument("--patch", type=int, default=None, help="cubic patch edge (default: the config's patch)")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--amp", nargs="+", default=["O0", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = CONFIGS[a.config]
    patch = [a.patch] * 3 if a.patch else cfg["patch"]
    cl = torch.channels_last_3d
    seed_all(0)
    ours = plans.build_network(UNETPP_CLASS, arch_kwargs(cfg), 1, 3).to(memory_format=cl)
    stock = copy.deepcopy(ours)
    for m in stock.modules():
        if type(m) is ChannelsLastInstanceNorm3d:
            m.__class__ = torch.nn.InstanceNorm3d
    x = torch.randn(cfg["batch"], 1, *patch).contiguous(memory_format=cl)
    y = torch.randint(0, 3, (cfg["batch"], *patch))
    ce = torch.nn.CrossEntropyLoss()
    load0 = os.getloadavg()
    result = {"config": a.config, "patch": patch, "batch": cfg["batch"], "threads": a.threads,
              "cpu_capability": dev.cpu_capability(), "torch": torch.__version__, "rows": []}
    for mode in a.amp:
        amp = dev.make_amp(mode, torch.device("cpu"))
        nets = {"layout-preserving norm": ours, "torch InstanceNorm3d": stock}
        opts = {k: torch.optim.SGD(n.parameters(), lr=1e-4) for k, n in nets.items()}

        def step(k):
            opts[k].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with amp.autocast():
                loss = sum(ce(o.float(), y) for o in nets[k](x))
            amp.backward_and_step(loss, opts[k])
            return time.perf_counter() - t0

        for k in nets:  # warm-up
            step(k)
        times = {k: [] for k in nets}
        for i in range(a.pairs):
            order = list(nets) if i % 2 == 0 else list(nets)[::-1]
            for k in order:
                times[k].append(step(k))
        ratios = [s / o for o, s in zip(times["layout-preserving norm"], times["torch InstanceNorm3d"])]
        row = {"amp": amp.mode, "median_s": {k: statistics.median(v) for k, v in times.items()},
               "times_s": times, "stock_over_ours_median_ratio": statistics.median(ratios)}
        result["rows"].append(row)
        print(f"{amp.mode}: layout-preserving {row['median_s']['layout-preserving norm']:.3f} s, torch "
              f"InstanceNorm3d {row['median_s']['torch InstanceNorm3d']:.3f} s, torch/ours per pair (median) "
              f"{row['stock_over_ours_median_ratio']:.2f}x", flush=True)
    result["loadavg_before_after"] = [load0, os.getloadavg()]
    print(f"CPU: {result['cpu_capability']}; load average before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"JSON: {write_json(a.out or os.path.join(RESULTS, f'norm_layout_{a.config}.json'), result)}")


if __name__ == "__main__":
    main()
