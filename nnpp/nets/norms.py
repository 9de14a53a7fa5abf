"""Normalisation that keeps a channels_last input channels_last.

``nn.InstanceNorm3d`` returns a contiguous (NCDHW) tensor for a channels_last_3d (NDHWC) input, so a
channels_last network flips its activations' layout at every normalisation and back at the next convolution (two
copies per block). :class:`ChannelsLastInstanceNorm3d` is the same module (same parameters, state-dict keys and
numbers, ``isinstance`` an ``nn.InstanceNorm3d``); for a channels_last_3d input it computes instance norm as
``group_norm`` with one group per channel, whose CPU kernel keeps the layout. Other inputs take
``nn.InstanceNorm3d``'s own path, unchanged, and so do bfloat16/float16 ones: measured on a 2-core AVX512 CPU with
native bf16 (benchmarks/RESULTS.md), the layout-preserving path made a conv-norm-act-conv block 1.07-1.43x faster in
fp32 but 0.80x at 8 channels in bf16 (group_norm's reduced-precision channels_last kernel), so bf16 keeps the flip.
UNet++ builds its norms with it (nnpp.nets.unetpp).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 5 and x.dtype == torch.float32 and not self.track_running_stats
                and x.shape[1] == self.num_features
                and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()):
            return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(x)


def layout_preserving_norm(norm_op):
    """``norm_op`` itself, or its channels_last-preserving equivalent (nn.InstanceNorm3d exactly)."""
    return ChannelsLastInstanceNorm3d if norm_op is nn.InstanceNorm3d else norm_op
