"""What a network costs per patch (forward FLOPs and latency), and the start-up report of a distillation that
compares the student with its teachers (a part of :class:`nnpp.distill.kd_mixin.KDMixin`): a student must be
cheaper than its teachers."""
from __future__ import annotations

import time

import torch
from torch import nn

from nnpp import device as dev


def patch_cost(network: nn.Module, patch: tuple, device: torch.device, amp: dev.Amp,
               memory_format: torch.memory_format = torch.contiguous_format, repeats: int = 3, warmup: int = 2,
               batch: int = 2) -> tuple[int, float]:
    """(forward FLOPs of one patch, forward time in ms per patch) of ``network`` for patches of shape ``patch``
    (channels, *spatial): ``amp``'s autocast, ``memory_format``, no grad. FLOPs are counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, 2 per multiply-add; device-independent)
    on one patch. The time is that of a batch of ``batch`` patches divided by ``batch``, as nnpp_predict batches
    tiles (a batch of 1 sends few-channel 3D convolutions to torch's slow im2col path on the CPU, which made a narrow
    student look as slow as its teacher), the best of ``repeats`` calls after ``warmup`` untimed ones (other work on
    a shared device only ever adds time: on a loaded 2-core CPU single calls of the same network varied 2 ms to 1 s)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn((batch, *patch), device=device).contiguous(memory_format=memory_format)
    was_training = network.training
    network.eval()
    times = []
    with torch.no_grad(), amp.autocast():
        with FlopCounterMode(display=False) as counter:
            network(x[:1])
        flops = int(counter.get_total_flops())
        for i in range(max(0, warmup - 1) + repeats):
            dev.synchronize(device)
            t0 = time.perf_counter()
            network(x)
            dev.synchronize(device)
            if i >= warmup - 1:
                times.append((time.perf_counter() - t0) * 1000 / batch)
    network.train(was_training)
    return flops, min(times)


class CostReportMixin:
    """Params, FLOPs and latency per patch of the student and every teacher, on the run's device."""

    def measure_cost(self, network: nn.Module) -> tuple[int, float]:
        """:func:`patch_cost` of ``network`` on this run's patch, device, autocast and memory format."""
        return patch_cost(network, (self.num_input_channels, *self.configuration_manager.patch_size), self.device,
                          self.amp, self.memory_format)

    def size_report(self) -> list:
        """``[{"name", "parameters", "flops_per_patch", "ms_per_patch"}]`` for the student (first) and every
        teacher, measured on this run's device with the configuration's patch (:func:`patch_cost`)."""
        nets = [("student", self.student_network)] + [(f"teacher {t.name}", t.network) for t in self.teachers]
        rows = []
        for name, net in nets:
            flops, ms = self.measure_cost(net)
            rows.append({"name": name, "parameters": sum(p.numel() for p in net.parameters()),
                         "flops_per_patch": flops, "ms_per_patch": ms})
        return rows

    def report_sizes(self, rows: list) -> None:
        """One line per network; a one-line WARNING for each teacher the student is not cheaper than (FLOPs or
        latency per patch >= the teacher's)."""
        s = rows[0]
        where = f"per patch {tuple(self.configuration_manager.patch_size)} on {self.device}"
        self.print_to_log_file(f"[nnpp_distill] student: {s['parameters']:,} parameters, "
                               f"{s['flops_per_patch'] / 1e9:.3g} GFLOP and {s['ms_per_patch']:.1f} ms {where}")
        for t in rows[1:]:
            ratios = (s["parameters"] / t["parameters"], s["flops_per_patch"] / max(t["flops_per_patch"], 1),
                      s["ms_per_patch"] / t["ms_per_patch"])
            self.print_to_log_file(f"[nnpp_distill] {t['name']}: {t['parameters']:,} parameters, "
                                   f"{t['flops_per_patch'] / 1e9:.3g} GFLOP and {t['ms_per_patch']:.1f} ms {where}; the "
                                   f"student is {ratios[0]:.2f}x its parameters, {ratios[1]:.2f}x its FLOPs, "
                                   f"{ratios[2]:.2f}x its latency")
            if ratios[1] >= 1 or ratios[2] >= 1:
                self.print_to_log_file(f"[nnpp_distill] WARNING: the student (--student {self.kd_config.get('student')}"
                                       f" -r {self.kd_config.get('r')}) is not cheaper than {t['name']} "
                                       f"({ratios[1]:.2f}x its FLOPs, {ratios[2]:.2f}x its latency per patch); "
                                       f"the default (--student unet -r 2) or a larger -r is")
