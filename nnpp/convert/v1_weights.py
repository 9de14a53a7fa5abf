"""Map a v1 ``Generic_UNetPlusPlus`` state_dict onto nnpp's :class:`~nnpp.nets.UNetPlusPlus`.

Notation as in :mod:`nnpp.nets.unetpp`: L = n_stages - 1, n = convs per stage, X^{i,j} the node at level i,
column j. The official v1 layout (MrGiovanni/UNetPlusPlus, ``pytorch/``) and where each piece goes:

===================================================  ============================================
v1 key prefix                                        nnpp key prefix
===================================================  ============================================
``conv_blocks_context.{s}.blocks.{c}`` (s < L)       ``encoder.stages.{s}.0.convs.{c}``
``conv_blocks_context.{L}.0.blocks.{c}`` (c < n-1)   ``encoder.stages.{L}.0.convs.{c}``
``conv_blocks_context.{L}.1.blocks.0``               ``encoder.stages.{L}.0.convs.{n-1}``
``loc{k}.{m}.0.blocks.{c}`` (c < n-1)                ``decoder.nodes["i_j"].convs.{c}``
``loc{k}.{m}.1.blocks.0``                            ``decoder.nodes["i_j"].convs.{n-1}``
``up{k}.{m}``                                        ``decoder.up["i_j"]``
``seg_outputs.{L-j}``                                ``decoder.seg_layers.{j-1}`` (head on X^{0,j})
===================================================  ============================================

with j = m + 1 and i = L - 1 - k - m (``loc{k}`` is v1's k-th nest, built top-down), and inside each conv
layer ``conv`` -> ``conv``, ``instnorm`` -> ``norm``. A DataParallel/DDP ``module.`` prefix is dropped.

:func:`map_state_dict` checks as it goes: every v1 tensor is used exactly once, every nnpp tensor is set,
shapes agree (the first mismatch is named); any failure is an :class:`~nnpp.NnppError`.
"""
from __future__ import annotations

import re

import torch

from nnpp import NnppError

LAYER_RENAMES = {"instnorm": "norm", "conv": "conv"}


def _split_group(prefix: str, c: int, n_conv: int) -> str:
    """v1 stacks a node (and the bottleneck) as two conv groups: n-1 convs, then one."""
    return f"{prefix}.0.blocks.{c}" if c < n_conv - 1 else f"{prefix}.1.blocks.0"


def v1_unetpp_module_map(n_stages: int, n_conv: int) -> dict[str, str]:
    """{v1 module path: nnpp module path} for the official v1 UNet++ (see the module doc's table)."""
    L = n_stages - 1
    m = {}
    for s in range(L):
        for c in range(n_conv):
            m[f"conv_blocks_context.{s}.blocks.{c}"] = f"encoder.stages.{s}.0.convs.{c}"
    for c in range(n_conv):
        m[_split_group(f"conv_blocks_context.{L}", c, n_conv)] = f"encoder.stages.{L}.0.convs.{c}"
    for j in range(1, L + 1):
        for i in range(L - j + 1):
            k, col = L - i - j, j - 1
            for c in range(n_conv):
                m[_split_group(f"loc{k}.{col}", c, n_conv)] = f"decoder.nodes.{i}_{j}.convs.{c}"
            m[f"up{k}.{col}"] = f"decoder.up.{i}_{j}"
        m[f"seg_outputs.{L - j}"] = f"decoder.seg_layers.{j - 1}"
    return m


def v1_unetpp_layout(state_dict: dict) -> tuple[int, int]:
    """(n_stages, convs per stage) read off a v1 UNet++ state_dict: the number of ``seg_outputs`` heads is L,
    the bottleneck's first group holds n - 1 convs."""
    heads = {int(m.group(1)) for k in state_dict if (m := re.match(r"seg_outputs\.(\d+)\.", k))}
    if not heads:
        raise NnppError("the v1 checkpoint has no 'seg_outputs' heads; it is not a v1 UNet++ "
                        "(Generic_UNetPlusPlus) state_dict")
    L = max(heads) + 1
    first = {int(m.group(1)) for k in state_dict
             if (m := re.match(rf"conv_blocks_context\.{L}\.0\.blocks\.(\d+)\.", k))}
    return L + 1, (max(first) + 2) if first else 1


def v1_stage_features(state_dict: dict, n_stages: int, n_conv: int) -> list[int]:
    """Output features of each encoder stage, from the v1 conv weights."""
    L = n_stages - 1
    out = []
    for s in range(n_stages):
        key = (f"conv_blocks_context.{s}.blocks.0.conv.weight" if s < L
               else f"{_split_group(f'conv_blocks_context.{L}', 0, n_conv)}.conv.weight")
        if key not in state_dict:
            raise NnppError(f"the v1 checkpoint lacks {key}; its layout is not the v1 UNet++ the plans describe "
                            f"({n_stages} stages)")
        out.append(int(state_dict[key].shape[0]))
    return out


def strip_module_prefix(state_dict: dict) -> dict:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _target_key(v1_key: str, module_map: dict[str, str]) -> str | None:
    module, leaf = v1_key.rsplit(".", 1)
    if module in module_map:  # up{k}.{m}, seg_outputs.{j}: the conv itself
        return f"{module_map[module]}.{leaf}"
    if "." in module:
        parent, layer = module.rsplit(".", 1)
        if parent in module_map and layer in LAYER_RENAMES:
            return f"{module_map[parent]}.{LAYER_RENAMES[layer]}.{leaf}"
    return None


def map_state_dict(v1_state: dict, module_map: dict[str, str], network: torch.nn.Module) -> dict:
    """A complete state_dict for ``network`` (all aliases included, ready for ``load_state_dict(strict=True)``)
    from ``v1_state``, checked: each v1 tensor used once, each nnpp tensor set, shapes equal."""
    target = network.state_dict(keep_vars=True)
    canonical = {}  # nnpp registers each conv/norm twice (convs.c.conv and convs.c.all_modules.0)
    for key, tensor in target.items():
        canonical.setdefault(id(tensor), key)
    needed = {key: t for key, t in target.items() if canonical[id(t)] == key}
    mapped, unused = {}, []
    for v1_key, tensor in v1_state.items():
        key = _target_key(v1_key, module_map)
        if key is None:
            unused.append(v1_key)
            continue
        if key not in needed:
            raise NnppError(f"v1 tensor {v1_key} maps to {key}, which the converted network does not have; the "
                            f"v1 network and the plans disagree (bias/heads options?)")
        if key in mapped:
            raise NnppError(f"two v1 tensors map to {key} (the second is {v1_key}); the v1 state_dict is not the "
                            f"official UNet++ layout")
        if tuple(tensor.shape) != tuple(needed[key].shape):
            raise NnppError(f"shape mismatch: v1 {v1_key} {tuple(tensor.shape)} vs converted {key} "
                            f"{tuple(needed[key].shape)}; the v1 plans.pkl does not describe this checkpoint")
        mapped[key] = tensor.detach().to(needed[key].dtype)
    if unused:
        raise NnppError(f"{len(unused)} v1 tensor(s) have no place in the converted network, first {unused[0]}; "
                        f"the checkpoint is not the official v1 UNet++ layout")
    unset = [k for k in needed if k not in mapped]
    if unset:
        raise NnppError(f"{len(unset)} tensor(s) of the converted network get no v1 weights, first {unset[0]}; "
                        f"the plans describe a bigger network than the checkpoint holds")
    return {key: mapped[canonical[id(t)]] for key, t in target.items()}
