"""UNet++ (Zhou et al., "UNet++: A Nested U-Net Architecture", DLMIA 2018 / TMI 2019) for nnU-Net v2 plans.

Built from the same keyword arguments nnU-Net v2 plans give ``PlainConvUNet``; 2D or 3D, any depth.
Notation: L = n_stages - 1. X^{i,0} is encoder stage i (nnU-Net's PlainConvEncoder). For j >= 1:

    X^{i,j} = ConvBlock_i( concat[X^{i,0}, ..., X^{i,j-1}, Up_{i,j}(X^{i+1,j-1})] )

Up_{i,j} is a transposed conv with kernel = stride = strides[i+1]; level-i blocks use kernel_sizes[i],
features_per_stage[i] channels and n_conv_per_stage_decoder[L-1-i] convs (nnU-Net indexes its decoder
bottom-up). One 1x1 segmentation head sits on every top-row node X^{0,1..L}, all at full resolution.

Outputs: with deep supervision, ``[X^{0,L}, X^{0,L-1}, ..., X^{0,1}]`` (deepest first, so ``output[0]`` is
what nnU-Net uses for pseudo-Dice and prediction); without, X^{0,L} alone. All heads are always built, so a
checkpoint loads either way. Pruning (the paper's inference-time feature): ``depth=k`` (argument or the
``prune_depth`` attribute) computes only the nodes X^{i,j} with i + j <= k and the encoder stages 0..k, and
returns X^{0,k} (or ``[X^{0,k}, ..., X^{0,1}]`` with deep supervision).

Options for networks trained elsewhere (keyword arguments, so nnU-Net plans carry them in
``network_arch_init_kwargs``; the defaults are nnpp's own UNet++, whose modules, parameters and forward they
leave untouched). ``nnpp_convert_v1_model`` sets them to reproduce the official nnU-Net v1 UNet++
(``Generic_UNetPlusPlus``):

* ``upsample_bias``: bias on the transposed convs Up_{i,j}; ``None`` (default) follows ``conv_bias``, v1: False.
* ``seg_bias``: bias on the 1x1 segmentation heads; default True, v1: False.
* ``decoder_kernels``: ``"own_level"`` (default, nnU-Net v2's convention: level-i nodes use kernel_sizes[i]) or
  ``"level_below"`` (nnU-Net v1's: level-i nodes use kernel_sizes[i + 1]; differs for anisotropic plans).

v1's other differences (heads stored deepest first, each node split in two conv groups, ``loc``/``up``
key names) are storage layouts only: the converter maps them onto these modules.
"""
from __future__ import annotations

from typing import List, Tuple, Type, Union

import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

IntOrSeq = Union[int, List[int], Tuple[int, ...]]

#: ``decoder_kernels`` option -> offset of the level whose kernel size a level-i node uses
DECODER_KERNELS = {"own_level": 0, "level_below": 1}


class UNetPlusPlusDecoder(nn.Module):
    """The nested nodes X^{i,j} (j >= 1) and the top-row heads. ``deep_supervision`` is the attribute
    nnU-Net's trainer flips (``network.decoder.deep_supervision``)."""

    def __init__(self, encoder: PlainConvEncoder, num_classes: int, n_conv_per_stage: IntOrSeq,
                 deep_supervision: bool, nonlin_first: bool = False, upsample_bias: bool | None = None,
                 seg_bias: bool = True, decoder_kernels: str = "own_level"):
        super().__init__()
        f = list(encoder.output_channels)
        self.depth = len(f) - 1
        if self.depth < 1:
            raise ValueError("UNet++ needs at least 2 stages (n_stages >= 2)")
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * self.depth
        if len(n_conv_per_stage) != self.depth:
            raise ValueError(f"n_conv_per_stage_decoder needs n_stages - 1 = {self.depth} entries, "
                             f"got {len(n_conv_per_stage)}")
        if decoder_kernels not in DECODER_KERNELS:
            raise ValueError(f"decoder_kernels must be one of {', '.join(DECODER_KERNELS)}, got {decoder_kernels!r}")
        kernel_level = DECODER_KERNELS[decoder_kernels]  # level-i nodes use kernel_sizes[i + kernel_level]
        if upsample_bias is None:
            upsample_bias = encoder.conv_bias
        self.deep_supervision = deep_supervision
        transpconv = get_matching_convtransp(conv_op=encoder.conv_op)
        block_kwargs = dict(conv_bias=encoder.conv_bias, norm_op=encoder.norm_op,
                            norm_op_kwargs=encoder.norm_op_kwargs, dropout_op=encoder.dropout_op,
                            dropout_op_kwargs=encoder.dropout_op_kwargs, nonlin=encoder.nonlin,
                            nonlin_kwargs=encoder.nonlin_kwargs, nonlin_first=nonlin_first)
        self.up = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                stride = encoder.strides[i + 1]
                self.up[self.key(i, j)] = transpconv(f[i + 1], f[i], stride, stride, bias=upsample_bias)
                self.nodes[self.key(i, j)] = StackedConvBlocks(
                    n_conv_per_stage[self.depth - 1 - i], encoder.conv_op, (j + 1) * f[i], f[i],
                    encoder.kernel_sizes[i + kernel_level], 1, **block_kwargs)
        # seg_layers[j - 1] is the head on X^{0,j}
        self.seg_layers = nn.ModuleList(
            encoder.conv_op(f[0], num_classes, 1, 1, 0, bias=seg_bias) for _ in range(self.depth))

    @staticmethod
    def key(i: int, j: int) -> str:
        return f"{i}_{j}"

    def forward(self, skips: List[torch.Tensor], depth: int | None = None):
        """``skips`` = [X^{0,0}, ..., X^{k,0}] with k = depth (default: full depth)."""
        k = self.depth if depth is None else depth
        rows = [[skips[i]] for i in range(k + 1)]  # rows[i][j] = X^{i,j}
        for j in range(1, k + 1):
            for i in range(k - j + 1):
                up = self.up[self.key(i, j)](rows[i + 1][j - 1])
                rows[i].append(self.nodes[self.key(i, j)](torch.cat(rows[i] + [up], dim=1)))
        if self.deep_supervision:
            return [self.seg_layers[j - 1](rows[0][j]) for j in range(k, 0, -1)]
        return self.seg_layers[k - 1](rows[0][k])


class UNetPlusPlus(AbstractDynamicNetworkArchitectures):
    """UNet++ with the constructor of ``dynamic_network_architectures``' PlainConvUNet."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: IntOrSeq,
                 conv_op: Type[_ConvNd], kernel_sizes: IntOrSeq, strides: IntOrSeq,
                 n_conv_per_stage: IntOrSeq, num_classes: int, n_conv_per_stage_decoder: IntOrSeq,
                 conv_bias: bool = False, norm_op: Union[None, Type[nn.Module]] = None,
                 norm_op_kwargs: dict = None, dropout_op: Union[None, Type[_DropoutNd]] = None,
                 dropout_op_kwargs: dict = None, nonlin: Union[None, Type[nn.Module]] = None,
                 nonlin_kwargs: dict = None, deep_supervision: bool = False, nonlin_first: bool = False,
                 upsample_bias: bool | None = None, seg_bias: bool = True, decoder_kernels: str = "own_level"):
        super().__init__()
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0"
        self.keys_to_in_proj = ("encoder.stages.0.0.convs.0.conv", "encoder.stages.0.0.convs.0.all_modules.0")
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * n_stages
        self.encoder = PlainConvEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes,
                                        strides, n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs,
                                        dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
                                        return_skips=True, nonlin_first=nonlin_first)
        self.decoder = UNetPlusPlusDecoder(self.encoder, num_classes, n_conv_per_stage_decoder,
                                           deep_supervision, nonlin_first=nonlin_first,
                                           upsample_bias=upsample_bias, seg_bias=seg_bias,
                                           decoder_kernels=decoder_kernels)
        self.prune_depth: int | None = None  # None = full depth L

    @property
    def depth(self) -> int:
        """L: the number of nested columns and of deep-supervision heads."""
        return self.decoder.depth

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = enabled

    def forward(self, x: torch.Tensor, depth: int | None = None):
        k = depth if depth is not None else (self.prune_depth or self.depth)
        if not 1 <= k <= self.depth:
            raise ValueError(f"pruning depth must be in 1..{self.depth}, got {k}")
        skips = []
        for stage in self.encoder.stages[:k + 1]:
            x = stage(x)
            skips.append(x)
        return self.decoder(skips, k)

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)
