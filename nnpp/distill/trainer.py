"""The distillation trainers, the classes nnU-Net and nnpp find by name
(:data:`nnpp.model_folder.NNPP_TRAINER_MODULES`): nnpp's trainer with frozen teachers and KD terms in the loss
(:class:`nnpp.distill.kd_mixin.KDMixin`).

* ``nnUNetPlusPlusTrainerKD``: UNet++ student (all heads full resolution, nnpp_train's head weights and shallow heads).
* ``nnUNetTrainerKD``: plain U-Net student (nnU-Net's PlainConvUNet, nnU-Net's deep-supervision scales and
  weights; the soft-KD target is pooled to each head's scale).
* ``nnUNetPlusPlusTrainerKDDDP``, ``nnUNetTrainerKDDDP``: the same students under the names of multi-process runs.
* ``nnUNetTrainerNoKD``: the U-Net student without teachers (its no-KD baseline).

The student is an ordinary nnU-Net model: the static ``build_network_architecture`` builds the class named in the
student plans (``nnpp.distill.student``), and ``network_weights`` holds the student network only; its KD-only
modules are saved under ``checkpoint['nnpp_kd']`` (:mod:`nnpp.distill.kd_network`). The loss of a step:
:mod:`nnpp.distill.kd_step`.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnpp.distill.kd_mixin import KDMixin
from nnpp.training.nnUNetPlusPlusTrainer import nnUNetPlusPlusTrainer


class nnUNetPlusPlusTrainerKD(KDMixin, nnUNetPlusPlusTrainer):
    """UNet++ student distilled from nnU-Net model folders (see the module docstring)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return nnUNetPlusPlusTrainer.build_network_architecture(plans_manager, configuration_manager,
                                                                num_input_channels, num_output_channels,
                                                                enable_deep_supervision)


class nnUNetTrainerKD(KDMixin, nnUNetPlusPlusTrainer):
    """Plain U-Net student (nnU-Net's PlainConvUNet from the student plans) with nnU-Net's deep supervision:
    heads at 1, 1/2, 1/4, ... resolution, weights 1/2^i normalised, the lowest head 0 (1e-6 under DDP, whose
    reducer needs every parameter in the graph)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    @property
    def num_heads(self) -> int:
        return self.configuration_manager.network_arch_init_kwargs["n_stages"] - 1

    def _get_deep_supervision_scales(self):
        return nnUNetTrainer._get_deep_supervision_scales(self)

    def deep_supervision_weights(self) -> np.ndarray:
        weights = np.array([1 / (2 ** i) for i in range(self.num_heads)])
        weights[-1] = 1e-6 if self.is_ddp else 0
        return weights / weights.sum()


class nnUNetPlusPlusTrainerKDDDP(nnUNetPlusPlusTrainerKD):
    """The UNet++ student of a multi-process distillation: its own name, so it never overwrites a 1-device run."""


class nnUNetTrainerKDDDP(nnUNetTrainerKD):
    """The U-Net student of a multi-process distillation: its own name, so it never overwrites a 1-device run."""


class nnUNetTrainerNoKD(nnUNetTrainerKD):
    """The U-Net student trained without KD (same network, plans and deep supervision as ``nnUNetTrainerKD``, no
    teachers): the no-KD baseline of a U-Net student (``nnpp_train -tr nnUNetTrainerNoKD -p nnUNetPlans_kd_unet_r2``),
    in a folder of its own. A UNet++ student's baseline is ``nnUNetPlusPlusTrainer``."""
