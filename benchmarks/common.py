"""What the benchmark scripts share: the machine line and the validation cases of a trained model, staged as input."""
from __future__ import annotations

import json
import os
import tempfile


def machine_line() -> str:
    """e.g. "Intel(R) Xeon(R) Processor, 2 cores visible, CPU capability AVX512, native bf16" (nnpp.device)."""
    from nnpp.device import machine_info
    m = machine_info()
    return f"{m['cpu']}, {m['cores']} cores visible, CPU capability {m['cpu_capability']}"


def stage_val_cases(dataset_name: str, fold, n: int, file_ending: str, prefix: str) -> tuple[str, str, list]:
    """The first ``n`` validation cases of ``fold`` (splits_final.json) as a prediction input folder of symlinks to
    the raw images. Returns (work folder to delete afterwards, input folder, case ids)."""
    raw = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    with open(os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "splits_final.json")) as f:
        cases = sorted(json.load(f)[int(fold)]["val"])[:n]
    work = tempfile.mkdtemp(prefix=prefix)
    inputs = os.path.join(work, "in")
    os.makedirs(inputs)
    images = os.path.join(raw, "imagesTr")
    for c in cases:
        for f in os.listdir(images):
            if f.startswith(c + "_") and f.endswith(file_ending):
                os.symlink(os.path.join(images, f), os.path.join(inputs, f))
    return work, inputs, cases


def synthetic_plans(network_class: str, arch_kwargs: dict, requires_import: list, patch: list, case_shape: list,
                    labels: dict) -> tuple:
    """(PlansManager, ConfigurationManager, dataset_json) of a 1-channel dataset at spacing 1 whose 3d_fullres
    configuration is ``patch`` with this network (import strings in ``arch_kwargs``) and ``labels``: what nnU-Net's
    predictor needs to predict preprocessed arrays."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    resampling = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                  "resampling_fn_seg": "resample_data_or_seg_to_shape",
                  "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                  "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                         "force_separate_z": None}}
    conf = {"data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch), "median_image_size_in_voxels": list(case_shape),
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            **resampling, "batch_dice": False,
            "architecture": {"network_class_name": network_class, "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": list(requires_import)}}
    plans = {"dataset_name": "Dataset999_Bench", "plans_name": "bench", "original_median_spacing_after_transp":
             [1.0, 1.0, 1.0], "original_median_shape_after_transp": list(case_shape), "image_reader_writer":
             "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": conf}, "experiment_planner_used": "bench", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": {"max": 4.0, "mean": 0.0, "median": 0.0, "min": -4.0,
                                                                   "percentile_00_5": -3.0, "percentile_99_5": 3.0,
                                                                   "std": 1.0}}}
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    pm = PlansManager(plans)
    return pm, pm.get_configuration("3d_fullres"), dataset_json
