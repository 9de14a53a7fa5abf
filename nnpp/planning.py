"""A small-network variant of nnU-Net's default ExperimentPlanner (demo, tests, CPU benchmarks).

Same planning logic; only the UNet width and the largest patch differ. Real tasks use nnU-Net's planner
(``nnUNetv2_plan_and_preprocess``) unchanged.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner


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
