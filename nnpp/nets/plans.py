"""Network arguments in nnU-Net plans form (``network_arch_init_kwargs``), for benchmarks, tests and tools that
describe a network without a dataset. Classes are import strings, as in ``plans.json``; build with
:func:`build_network` (nnU-Net's ``get_network_from_plans``)."""
from __future__ import annotations

UNETPP_CLASS = "nnpp.nets.unetpp.UNetPlusPlus"
PLAIN_UNET_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


def arch_kwargs(features_per_stage: list[int], strides: list[list[int]], kernel_sizes: list[list[int]] | None = None,
                n_conv: int = 2, conv_bias: bool = True) -> dict:
    """PlainConvUNet/UNetPlusPlus arguments as nnU-Net's default planner writes them: conv + InstanceNorm (affine)
    + LeakyReLU, ``n_conv`` convs per encoder and decoder stage, 3x..x3 kernels unless given. 2D or 3D follows
    the length of ``strides[0]``."""
    n, dim = len(features_per_stage), len(strides[0])
    return {"n_stages": n, "features_per_stage": list(features_per_stage),
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": kernel_sizes or [[3] * dim] * n, "strides": strides, "n_conv_per_stage": [n_conv] * n,
            "n_conv_per_stage_decoder": [n_conv] * (n - 1), "conv_bias": conv_bias,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


def build_network(arch_class: str, kwargs: dict, input_channels: int, num_classes: int,
                  deep_supervision: bool = True, allow_init: bool = True):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans(arch_class, kwargs, list(REQUIRES_IMPORT), input_channels, num_classes,
                                  allow_init=allow_init, deep_supervision=deep_supervision)
