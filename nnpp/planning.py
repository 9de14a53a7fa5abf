"""Planners: nnU-Net's ExperimentPlanner sized for UNet++, and small-network variants (demo, tests, CPU).

* :class:`UNetPlusPlusPlanner`: nnU-Net's default planning logic (spacing, topology, patch shrinking to the
  memory target, batch size) with ``nnpp.nets.unetpp.UNetPlusPlus`` as the network, so the patch and batch are
  sized from UNet++'s own feature-map count (``compute_conv_feature_map_size``: every nested node, its
  concatenation and all L heads) under the same ``gpu_memory_target_in_gb``. Plans name ``nnppUNetPlusPlusPlans``;
  2d and 3d_fullres keep nnU-Net's spacing, so they name ``nnUNetPlans_2d`` / ``nnUNetPlans_3d_fullres``
  preprocessed data (as nnU-Net's ResEnc planners do); ``nnpp_plan_and_preprocess`` keeps that only where nnU-Net's
  folder verifiably holds the same data and otherwise moves the configuration to nnpp's own identifier, so nnpp
  never preprocesses into (deletes, rewrites) a folder of nnU-Net's. ``checkpoint_nodes`` ("node", "cat_conv1") is written into
  the plans' ``network_arch_init_kwargs`` and used in the estimate, so a larger patch fits.
* :class:`SmallUNetPlanner`: nnU-Net's planner with a small UNet width and a capped patch (PlainConvUNet plans).
* :class:`SmallUNetPlusPlusPlanner`: both (tests, demo).

``nnpp_plan_and_preprocess`` (nnpp.run.plan_and_preprocess) runs them through nnU-Net's planning API.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnpp.nets.unetpp import UNetPlusPlus, checkpoint_mode

UNETPP_PLANS = "nnppUNetPlusPlusPlans"


class UNetPlusPlusPlanner(ExperimentPlanner):
    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = UNETPP_PLANS,
                 overwrite_target_spacing: Optional[Union[List[float], Tuple[float, ...]]] = None,
                 suppress_transpose: bool = False, checkpoint_nodes="none"):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_class = UNetPlusPlus
        self.checkpoint_nodes = checkpoint_mode(checkpoint_nodes)

    def generate_data_identifier(self, configuration_name: str) -> str:
        # 2d and 3d_fullres spacing is nnU-Net's default planner's: share its preprocessed data; 3d_lowres
        # spacing follows the (UNet++-sized) patch, so it gets its own
        if configuration_name in ("2d", "3d_fullres"):
            return "nnUNetPlans_" + configuration_name
        return self.plans_identifier + "_" + configuration_name

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import):
        """nnU-Net's estimate (the network's ``compute_conv_feature_map_size``) with this planner's checkpointing."""
        if self.checkpoint_nodes != "none":
            arch_kwargs = {**arch_kwargs, "checkpoint_nodes": self.checkpoint_nodes}
        return ExperimentPlanner.static_estimate_VRAM_usage(patch_size, input_channels, output_channels,
                                                            arch_class_name, arch_kwargs, arch_kwargs_req_import)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if self.checkpoint_nodes != "none":  # absent by default: such plans equal nnU-Net's form
            plan["architecture"]["arch_kwargs"]["checkpoint_nodes"] = self.checkpoint_nodes
        return plan


class SmallUNetPlanner(ExperimentPlanner):
    def __init__(self, dataset_name_or_id, base_features: int = 8, max_features: int = 64,
                 max_patch=(32, 48, 48), n_conv_per_stage: int = 2, **kwargs):
        super().__init__(dataset_name_or_id, **kwargs)
        self.UNet_base_num_features = base_features
        self.UNet_max_features_3d = self.UNet_max_features_2d = max_features
        self.UNet_blocks_per_stage_encoder = (n_conv_per_stage,) * 14
        self.UNet_blocks_per_stage_decoder = (n_conv_per_stage,) * 13
        self.max_patch = tuple(max_patch)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        # nnU-Net starts from the median shape and shrinks the patch to its memory target; start from a capped one
        cap = self.max_patch[-len(median_shape):]
        plan = super().get_plans_for_configuration(spacing, np.minimum(median_shape, cap), data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        plan["median_image_size_in_voxels"] = median_shape
        return plan


class SmallUNetPlusPlusPlanner(SmallUNetPlanner, UNetPlusPlusPlanner):
    """UNet++ plans with a small width and a capped patch (tests, demo): SmallUNetPlanner's knobs on
    UNetPlusPlusPlanner (its plans name, data reuse, estimate and ``checkpoint_nodes``)."""
