"""A memory saving without recomputation, tried and measured beside checkpointing: split each nested node's first conv
per input (X^{i,0..j-1} and the upsampled X^{i+1,j-1}) and sum the partial convolutions, so the concatenation buffer
is never built. Same parameters as the node's conv (its weight sliced along the input channels).

    python benchmarks/bench_split_conv.py --threads 2      # cpu-deep config: as-is vs split vs ckpt node, one process

Not a mode of ``nnpp.nets.unetpp`` (it measured worse than ``checkpoint_nodes="node"``: benchmarks/RESULTS.md);
this script patches the decoder's node function for the measurement only. Writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import CONFIGS, RESULTS, add_config_arg, arch_kwargs, md_table, seed_all, write_json  # noqa: E402

from nnpp.nets import plans  # noqa: E402
from nnpp.nets.plans import UNETPP_CLASS  # noqa: E402
from nnpp.nets.unetpp import saved_activation_bytes  # noqa: E402


def split_node(self, i: int, j: int, below: torch.Tensor, *same_row: torch.Tensor) -> torch.Tensor:
    """X^{i,j} with its first conv applied to each input separately (weight slices) and summed."""
    up = self.up[self.key(i, j)](below)
    block = self.nodes[self.key(i, j)]
    first = block.convs[0]
    conv = first.conv
    conv_fn = {3: F.conv3d, 2: F.conv2d}[conv.weight.ndim - 2]
    x, start = None, 0
    for part in (*same_row, up):
        w = conv.weight[:, start:start + part.shape[1]]
        start += part.shape[1]
        y = conv_fn(part, w, None, conv.stride, conv.padding, conv.dilation)
        x = y if x is None else x + y
    if conv.bias is not None:
        x = x + conv.bias.view(1, -1, *([1] * (x.ndim - 2)))
    for module in list(first.all_modules)[1:]:
        x = module(x)
    for later in block.convs[1:]:
        x = later(x)
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arg(p, "cpu-deep")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="variants are measured in turn, this many rounds")
    p.add_argument("--out", default=os.path.join(RESULTS, "split_conv.json"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = CONFIGS[a.config]
    seed_all(0)
    nets = {}
    for name, mode in (("as-is", "none"), ("split first conv", "none"), ("ckpt node", "node")):
        net = plans.build_network(UNETPP_CLASS, dict(arch_kwargs(cfg), checkpoint_nodes=mode), 1, 3)
        if name == "split first conv":
            net.decoder._node = split_node.__get__(net.decoder)
        nets[name] = net
    x = torch.randn(cfg["batch"], 1, *cfg["patch"])
    y = torch.randint(0, 3, (cfg["batch"], *cfg["patch"]))
    ce = torch.nn.CrossEntropyLoss()
    ref_state = nets["as-is"].state_dict()
    for net in nets.values():
        net.load_state_dict(ref_state)
    # same function: the split node gives the as-is outputs
    with torch.no_grad():
        diff = max((o1 - o2).abs().max().item() for o1, o2 in zip(nets["as-is"](x), nets["split first conv"](x)))
    times = {k: [] for k in nets}
    for _ in range(a.rounds):
        for name, net in nets.items():
            for s in range(a.steps + 1):
                t0 = time.perf_counter()
                net.zero_grad(set_to_none=True)
                sum(ce(o, y) for o in net(x)).backward()
                if s:  # first step of each round: warm-up
                    times[name].append(time.perf_counter() - t0)
    rows = []
    for name, net in nets.items():
        rows.append({"variant": name, "step_s_median": statistics.median(times[name]),
                     "saved_activation_MiB": saved_activation_bytes(net, x) / 2 ** 20})
    result = {"config": a.config, "threads": a.threads or os.cpu_count(), "max_output_difference": diff, "runs": rows}
    write_json(a.out, result)
    base = rows[0]
    print(f"max |as-is - split| over the outputs: {diff:.2e}")
    print("\n".join(md_table(
        ["variant", "step (median s)", "x as-is", "saved for backward (MiB)", "x as-is"],
        ([r["variant"], f"{r['step_s_median']:.3f}", f"{r['step_s_median'] / base['step_s_median']:.2f}",
          f"{r['saved_activation_MiB']:.0f}", f"{r['saved_activation_MiB'] / base['saved_activation_MiB']:.2f}"]
         for r in rows))))
    print(f"JSON: {a.out}")


if __name__ == "__main__":
    main()
