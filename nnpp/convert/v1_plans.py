"""nnU-Net v1 plans (``plans.pkl``) and ``dataset.json`` -> nnU-Net v2 ``plans.json`` / ``dataset.json``.

What carries over, field by field (v1 -> v2 configuration):

* ``plans_per_stage[stage]``: ``current_spacing`` -> ``spacing`` (2D: the in-plane two), ``patch_size``,
  ``batch_size``, ``median_patient_size_in_voxels`` -> ``median_image_size_in_voxels``,
  ``pool_op_kernel_sizes`` -> ``strides`` (``[1, ..]`` for stage 0, then the pool kernels),
  ``conv_kernel_sizes`` -> ``kernel_sizes``; ``original_spacing`` -> ``original_median_spacing_after_transp``.
* ``base_num_features`` and the v1 maximum (320 in 3D, 480 in 2D, or the checkpoint's own cap, see
  :func:`features_per_stage`) -> ``features_per_stage``; ``conv_per_stage`` -> ``n_conv_per_stage`` and
  ``n_conv_per_stage_decoder``; v1's network ops (conv bias, InstanceNorm eps 1e-5 affine, LeakyReLU 0.01,
  no dropout) -> the PlainConvUNet arguments; for UNet++ the v1 options of :class:`nnpp.nets.UNetPlusPlus`.
* ``transpose_forward/backward`` as they are; ``normalization_schemes`` (``CT`` -> CTNormalization,
  ``nonCT`` -> ZScoreNormalization, ``noNorm`` -> NoNormalization) and ``use_mask_for_norm`` in channel order;
  ``dataset_properties.intensityproperties`` -> ``foreground_intensity_properties_per_channel`` with v1's
  names mapped (``sd`` -> ``std``, ``mn`` -> ``min``, ``mx`` -> ``max``).
* Resampling: v2's defaults, which are v1's values (data order 3, segmentation order 1, along z order 0 for
  anisotropic spacing; probabilities order 1).

What cannot carry over is refused (v1 ``CT2`` normalisation, 2D/3D mismatches) or reported in the returned
notes (v1 post-processing, ``do_dummy_2D_data_aug``), never silently dropped.
"""
from __future__ import annotations

import numpy as np

from nnpp import NnppError
from nnpp.nets.plans import PLAIN_UNET_CLASS, UNETPP_CLASS

NORMALIZATION = {"CT": "CTNormalization", "nonCT": "ZScoreNormalization", "noNorm": "NoNormalization"}
INTENSITY_NAMES = {"max": "mx", "mean": "mean", "median": "median", "min": "mn",
                   "percentile_00_5": "percentile_00_5", "percentile_99_5": "percentile_99_5", "std": "sd"}
V1_MAX_FEATURES = {2: 480, 3: 320}  # Generic_UNet(PlusPlus).MAX_FILTERS_2D / MAX_NUM_FILTERS_3D
#: the options of nnpp's UNet++ that make it the official v1 Generic_UNetPlusPlus
V1_UNETPP_OPTIONS = {"upsample_bias": False, "seg_bias": False, "decoder_kernels": "level_below"}


def _ints(x) -> list:
    return [int(v) for v in np.asarray(x).ravel()] if np.ndim(x) <= 1 else [_ints(r) for r in x]


def _floats(x) -> list:
    return [float(v) for v in np.asarray(x, dtype=float).ravel()]


def pick_stage(v1_plans: dict, configuration: str, init_stage=None) -> int:
    """The v1 stage a configuration trained on: the model.pkl's ``init`` stage when recorded, else v1's rule
    (3d_fullres: the last stage, 3d_lowres and 2d: stage 0)."""
    stages = sorted(int(k) for k in v1_plans.get("plans_per_stage", {}))
    if not stages:
        raise NnppError("v1 plans have no 'plans_per_stage'; the plans.pkl is not an nnU-Net v1 plans file")
    if init_stage is not None and int(init_stage) in stages:
        return int(init_stage)
    return stages[-1] if configuration == "3d_fullres" else stages[0]


def features_per_stage(base: int, n_stages: int, cap: int) -> list[int]:
    """v1's feature rule: base, then doubled per stage (rounded), at most ``cap``."""
    out, f = [], base
    for _ in range(n_stages):
        out.append(int(f))
        f = min(int(np.round(f * 2)), cap)
    return out


def architecture(v1_plans: dict, stage: int, num_dims: int, unetpp: bool, features: list[int]) -> dict:
    """v2 ``architecture`` block (class name, arch_kwargs, _kw_requires_import) of a v1 stage."""
    sp = v1_plans["plans_per_stage"][stage]
    pools = _ints(sp["pool_op_kernel_sizes"])
    kernels = _ints(sp["conv_kernel_sizes"])
    n_stages = len(pools) + 1
    if len(kernels) != n_stages:
        raise NnppError(f"v1 plans stage {stage}: {len(kernels)} conv kernels for {n_stages} stages "
                        f"({len(pools)} pool kernels); the plans.pkl is inconsistent")
    if any(len(k) != num_dims for k in kernels + pools):
        raise NnppError(f"v1 plans stage {stage} mixes kernel dimensions ({kernels}, {pools}); expected "
                        f"{num_dims}D kernels for this configuration")
    n_conv = int(v1_plans.get("conv_per_stage", 2))
    nd = f"{num_dims}d"
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": list(features),
        "conv_op": f"torch.nn.modules.conv.Conv{nd}",
        "kernel_sizes": kernels,
        "strides": [[1] * num_dims] + pools,
        "n_conv_per_stage": [n_conv] * n_stages,
        "n_conv_per_stage_decoder": [n_conv] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{nd}",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},  # negative_slope 0.01 = v1's 1e-2
    }
    if unetpp:
        kwargs.update(V1_UNETPP_OPTIONS)
    return {"network_class_name": UNETPP_CLASS if unetpp else PLAIN_UNET_CLASS, "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _per_channel(mapping, n: int, what: str) -> list:
    mapping = dict(mapping or {})
    missing = [c for c in range(n) if c not in mapping and str(c) not in mapping]
    if missing:
        raise NnppError(f"v1 plans give no {what} for channel(s) {missing}; the plans.pkl is incomplete")
    return [mapping[c] if c in mapping else mapping[str(c)] for c in range(n)]


def intensity_properties(v1_plans: dict, n_channels: int) -> dict:
    props = (v1_plans.get("dataset_properties") or {}).get("intensityproperties") or {}
    out = {}
    for c in range(n_channels):
        p = props.get(c, props.get(str(c)))
        if p is None:
            continue
        missing = [v1 for v1 in INTENSITY_NAMES.values() if v1 not in p]
        if missing:
            raise NnppError(f"v1 intensity properties of channel {c} lack {', '.join(missing)}; the plans.pkl is "
                            f"incomplete")
        out[str(c)] = {v2: float(p[v1]) for v2, v1 in INTENSITY_NAMES.items()}
    return out


def convert_plans(v1_plans: dict, *, stage: int, configuration: str, dataset_name: str, plans_name: str,
                  unetpp: bool, features: list[int], batch_dice: bool, source: str) -> tuple[dict, list[str]]:
    """v2 plans dict (one configuration) and the list of notes on what did not carry over."""
    notes = []
    sp = v1_plans["plans_per_stage"][stage]
    num_dims = len(_ints(sp["patch_size"]))
    if configuration.startswith("2d") != (num_dims == 2):
        raise NnppError(f"configuration '{configuration}' does not fit the v1 plans' {num_dims}D stage {stage}; "
                        f"pass -c {'2d' if num_dims == 2 else '3d_fullres'}")
    n_channels = int(v1_plans.get("num_modalities", len(v1_plans.get("modalities", {})) or 1))
    schemes_v1 = _per_channel(v1_plans.get("normalization_schemes"), n_channels, "normalization scheme")
    schemes = []
    for c, s in enumerate(schemes_v1):
        if s not in NORMALIZATION:
            raise NnppError(f"v1 normalization scheme '{s}' of channel {c} has no nnU-Net v2 equivalent "
                            f"(convertible: {', '.join(NORMALIZATION)}); the model would see differently "
                            f"normalised inputs, so it is not converted")
        schemes.append(NORMALIZATION[s])
    use_mask = [bool(v) for v in _per_channel(v1_plans.get("use_mask_for_norm") or {c: False for c in range(
        n_channels)}, n_channels, "use_mask_for_norm")]
    intensities = intensity_properties(v1_plans, n_channels)
    if "CTNormalization" in schemes and any(str(c) not in intensities for c, s in enumerate(schemes)
                                            if s == "CTNormalization"):
        raise NnppError("v1 plans use CT normalisation but have no intensity properties for that channel; "
                        "the plans.pkl is incomplete")
    spacing = _floats(sp["current_spacing"])
    original = _floats(sp.get("original_spacing", sp["current_spacing"]))
    median_shape = _ints(sp.get("median_patient_size_in_voxels", sp["patch_size"]))
    if num_dims == 2 and len(spacing) == 3:
        spacing = spacing[1:]
    if num_dims == 2 and len(median_shape) == 3:
        median_shape = median_shape[1:]
    if sp.get("do_dummy_2D_data_aug"):
        notes.append("v1 stage used dummy-2D augmentation (do_dummy_2D_data_aug); nnU-Net v2 decides it itself "
                     "from the patch anisotropy when training (only matters for fine-tuning)")
    for key in ("keep_only_largest_region", "min_region_size_per_class", "min_size_per_class"):
        if v1_plans.get(key) not in (None, [], {}):
            notes.append(f"v1 plans field '{key}' = {v1_plans[key]!r} (v1 post-processing) is not carried over; "
                         f"nnU-Net v2 decides post-processing with nnUNetv2_determine_postprocessing after "
                         f"validation")
    resample = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None}}
    config = {
        "data_identifier": f"{plans_name}_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(sp["batch_size"]),
        "patch_size": _ints(sp["patch_size"]),
        "median_image_size_in_voxels": median_shape,
        "spacing": spacing,
        "normalization_schemes": schemes,
        "use_mask_for_norm": use_mask,
        **resample,
        "architecture": architecture(v1_plans, stage, num_dims, unetpp, features),
        "batch_dice": bool(batch_dice),
    }
    plans = {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": original,
        "original_median_shape_after_transp": _ints(sp.get("median_patient_size_in_voxels", sp["patch_size"])),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": _ints(v1_plans.get("transpose_forward", list(range(3)))),
        "transpose_backward": _ints(v1_plans.get("transpose_backward", list(range(3)))),
        "configurations": {configuration: config},
        "experiment_planner_used": f"nnU-Net v1 plans '{v1_plans.get('data_identifier', '?')}' stage {stage}, "
                                   f"converted by nnpp_convert_v1_model",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensities,
        "nnpp_v1_source": source,
    }
    return plans, notes


def convert_dataset_json(v1_dataset: dict | None, v1_plans: dict, file_ending: str = ".nii.gz") -> tuple[dict, list]:
    """v2 dataset.json (channel_names, labels name -> id, numTraining, file_ending) from a v1 dataset.json,
    or from the plans (modalities, all_classes; generic label names) when there is none."""
    notes = []
    n_classes = int(v1_plans.get("num_classes", len(v1_plans.get("all_classes", [])))) + 1
    if v1_dataset is not None:
        modality = v1_dataset.get("modality") or {}
        labels_v1 = v1_dataset.get("labels") or {}
        try:
            channel_names = {str(int(k)): str(v) for k, v in modality.items()}
            labels = {str(v): int(k) for k, v in labels_v1.items()}
        except (TypeError, ValueError):
            raise NnppError("the v1 dataset.json has non-numeric 'modality'/'labels' keys; is it a v2 "
                            "dataset.json? Pass the v1 one with --dataset_json") from None
        if sorted(labels.values()) != list(range(n_classes)):
            raise NnppError(f"the v1 dataset.json labels {labels_v1} do not match the model's {n_classes} "
                            f"classes (0..{n_classes - 1}); pass the dataset.json of the task the model was "
                            f"trained on with --dataset_json")
        num_training = int(v1_dataset.get("numTraining", 0))
        name = v1_dataset.get("name")
    else:
        modalities = v1_plans.get("modalities") or {}
        channel_names = {str(int(k)): str(v) for k, v in modalities.items()}
        labels = {"background": 0, **{f"label_{c}": c for c in range(1, n_classes)}}
        num_training = 0
        name = None
        notes.append("no v1 dataset.json found: channel names from the plans, labels named label_1.."
                     f"label_{n_classes - 1} (pass --dataset_json for the real names)")
    n_channels = int(v1_plans.get("num_modalities", len(channel_names)))
    if len(channel_names) != n_channels:
        raise NnppError(f"the dataset.json names {len(channel_names)} modalities, the model takes {n_channels} "
                        f"input channels; pass the matching v1 dataset.json with --dataset_json")
    dataset = {"channel_names": channel_names, "labels": labels, "numTraining": num_training,
               "file_ending": file_ending}
    if name:
        dataset["name"] = name
    return dataset, notes
