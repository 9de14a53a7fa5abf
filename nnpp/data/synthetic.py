"""A small synthetic task in Medical Segmentation Decathlon layout, shaped like Task03_Liver, and the
nnU-Net pipeline that turns it into a trainable dataset (MSD conversion, fingerprint, planning, preprocessing).

Cases are CT-like volumes in Hounsfield units: air outside an elliptic body, fat and muscle inside, a bright
spine, and an organ (label 1, "liver") made of one or two ellipsoid lobes with 0-3 hypodense lesions
(label 2, "cancer"). Shapes, sizes, intensities and voxel spacings vary per case.
"""
from __future__ import annotations

import json
import os

import numpy as np

LABELS = {"0": "background", "1": "liver", "2": "cancer"}


def _ellipsoid(grid, center, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def synth_case(rng: np.random.Generator, size_scale: float = 1.0):
    """One case: (image float32 HU, label uint8, spacing (z, y, x) in mm), arrays in (z, y, x) order."""
    shape = (int(rng.integers(28, 38) * size_scale), int(rng.integers(52, 66) * size_scale),
             int(rng.integers(52, 66) * size_scale))
    spacing = (float(rng.uniform(2.0, 3.0)), *(2 * [float(rng.uniform(1.3, 1.7))]))
    spacing = tuple(s / size_scale for s in spacing)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    extent = [n * s for n, s in zip(shape, spacing)]
    cy, cx = extent[1] / 2, extent[2] / 2

    body = _ellipsoid(grid[1:], (cy, cx), (extent[1] * rng.uniform(0.40, 0.47), extent[2] * rng.uniform(0.42, 0.48)))
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body] = rng.uniform(-110, -70)  # subcutaneous/visceral fat
    muscle = body & ~_ellipsoid(grid[1:], (cy, cx), (extent[1] * 0.36, extent[2] * 0.40))
    image[muscle] = rng.uniform(35, 55)
    spine = _ellipsoid(grid[1:], (cy + extent[1] * 0.28, cx), (7.0, 7.0))
    image[spine] = rng.uniform(350, 500)

    organ = np.zeros(shape, dtype=bool)
    center = np.array([extent[0] * rng.uniform(0.4, 0.6), cy + rng.uniform(-8, 4), cx - extent[2] * rng.uniform(0.08, 0.16)])
    for _ in range(int(rng.integers(1, 3))):  # one or two lobes
        radii = rng.uniform([14, 14, 16], [24, 22, 28])
        organ |= _ellipsoid(grid, center + rng.uniform(-8, 8, 3), radii)
    organ &= body & ~muscle
    organ_hu = rng.uniform(90, 130)
    image[organ] = organ_hu
    label = organ.astype(np.uint8)

    idx = np.argwhere(organ)
    for _ in range(int(rng.integers(0, 4))):
        c = idx[rng.integers(len(idx))] * np.array(spacing)
        lesion = organ & _ellipsoid(grid, c, rng.uniform(3.5, 8.0, 3))
        image[lesion] = organ_hu - rng.uniform(40, 70)
        label[lesion] = 2

    image += rng.normal(0, 15, shape).astype(np.float32)
    return image, label, spacing


def _write_nifti(array: np.ndarray, spacing_zyx, path: str) -> None:
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))  # SimpleITK wants (x, y, z)
    sitk.WriteImage(img, path)


def write_msd_task(root: str, task_id: int, name: str, description: str, labels: dict, cases, n_train: int,
                   prefix: str) -> str:
    """Write ``root/TaskXX_Name`` in MSD layout (imagesTr, labelsTr, imagesTs, dataset.json) from ``cases``, an
    iterable of ``(image, label, spacing_zyx)``: the first ``n_train`` go to imagesTr/labelsTr, the rest (image
    only) to imagesTs, as ``{prefix}_{i}.nii.gz``. Returns the folder."""
    if "_" in name:
        raise ValueError("the MSD converter splits the folder name on '_': use a name without underscores")
    folder = os.path.join(root, f"Task{task_id:02d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    training, test = [], []
    for i, (image, label, spacing) in enumerate(cases):
        fname = f"{prefix}_{i}.nii.gz"
        if i < n_train:
            _write_nifti(image, spacing, os.path.join(folder, "imagesTr", fname))
            _write_nifti(label, spacing, os.path.join(folder, "labelsTr", fname))
            training.append({"image": f"./imagesTr/{fname}", "label": f"./labelsTr/{fname}"})
        else:
            _write_nifti(image, spacing, os.path.join(folder, "imagesTs", fname))
            test.append(f"./imagesTs/{fname}")
    meta = {"name": name, "description": description, "reference": "synthetic", "licence": "CC-BY-SA 4.0",
            "release": "1.0", "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": labels,
            "numTraining": len(training), "numTest": len(test), "training": training, "test": test}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return folder


def make_msd_task(root: str, task_id: int = 900, name: str = "SynthLiver", n_train: int = 16, n_test: int = 2,
                  seed: int = 0, size_scale: float = 1.0) -> str:
    """Write ``root/TaskXX_Name`` in MSD layout (imagesTr, labelsTr, imagesTs, dataset.json); return its path."""
    rng = np.random.default_rng(seed)

    def cases():
        for _ in range(n_train + n_test):
            image, label, spacing = synth_case(rng, size_scale)
            yield image.astype(np.int16), label, spacing
    return write_msd_task(root, task_id, name, "nnpp synthetic liver/lesion CT task (Task03_Liver-like)", LABELS,
                          cases(), n_train, "liver")


def prepare_dataset(msd_folder: str, dataset_id: int, configurations=("3d_fullres",), num_processes: int = 2,
                    planner: str = "SmallUNetPlanner", **planner_kwargs) -> str:
    """nnU-Net's pipeline on an MSD folder: convert, then :func:`plan_and_preprocess`. nnU-Net path variables must be
    set. Returns the v2 dataset name."""
    from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset

    convert_msd_dataset(msd_folder, overwrite_target_id=dataset_id, num_processes=num_processes)
    return plan_and_preprocess(dataset_id, configurations, num_processes, planner, **planner_kwargs)


def plan_and_preprocess(dataset_id: int, configurations=("3d_fullres",), num_processes: int = 2,
                        planner: str = "SmallUNetPlanner", **planner_kwargs) -> str:
    """nnU-Net's planning API on a raw v2 dataset: fingerprint, plan (``planner``, a class of nnpp.planning: small
    PlainConvUNet plans ``nnUNetPlans`` by default, ``SmallUNetPlusPlusPlanner`` for UNet++-sized plans
    ``nnppUNetPlusPlusPlans``), preprocess. nnU-Net path variables must be set. Returns the v2 dataset name."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset

    from nnpp import planning

    extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=True,
                                verbose=False, show_progress_bar=False)
    planner = getattr(planning, planner)(dataset_id, **planner_kwargs)
    # nnU-Net's VRAM estimate calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (= augment
    # in the main process, a valid training setting): plan with at least 1.
    n_da = os.environ.get("nnUNet_n_proc_DA")
    if n_da is not None and int(n_da) < 1:
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        planner.plan_experiment()
    finally:
        if n_da is not None:
            os.environ["nnUNet_n_proc_DA"] = n_da
    preprocess_dataset(dataset_id, planner.plans_identifier, configurations, (num_processes,),
                       show_progress_bar=False)
    return planner.dataset_name
