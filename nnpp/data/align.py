"""An image and its labels from different sources (a DICOM series and a NIfTI written by another tool), matched by
world coordinates, and a sanity check that the labels lie on the anatomy they name.

Never copy one header onto the other's array (``CopyInformation``): two files of the same size can still disagree
in direction or origin (a DICOM series read with y = +1 and a NIfTI with y = -1), and the copied labels then lie
mirrored on the image. Resample the labels into the image's grid instead (nearest neighbour, so label values stay
labels), then check each organ's mean intensity.
"""
from __future__ import annotations

import numpy as np

#: plausible mean CT intensity (HU) inside a label, with or without contrast; fatty livers reach about -30 HU, a
#: contrast-filled aorta several hundred. Mirrored or shifted labels land on fat (-100) or air (-1000) and fail.
PLAUSIBLE_MEAN_HU = {
    **{name: (-30.0, 300.0) for name in ("liver", "spleen", "kidney_left", "kidney_right", "pancreas", "gallbladder",
                                         "adrenal_gland_left", "adrenal_gland_right", "heart")},
    **{name: (-30.0, 700.0) for name in ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein",
                                         "iliac_artery_left", "iliac_artery_right")},
}


def labels_onto_image(labels, image):
    """``labels`` (a SimpleITK label image) resampled into ``image``'s grid by world coordinates, nearest
    neighbour; voxels of ``image`` outside the labels' extent get 0. Returns a SimpleITK image with ``image``'s
    size, spacing, origin and direction and ``labels``' pixel type."""
    import SimpleITK as sitk
    return sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def mean_intensity_per_label(image: np.ndarray, labels: np.ndarray, values: dict) -> dict:
    """{name: mean of ``image`` inside ``labels == value``} for each name -> value of ``values`` present in
    ``labels`` (arrays of one grid)."""
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} are not on one grid: resample the labels "
                         "onto the image first (labels_onto_image)")
    return {name: float(image[labels == v].mean()) for name, v in values.items() if v and (labels == v).any()}


def check_ct_labels(image: np.ndarray, labels: np.ndarray, values: dict, what: str = "labels") -> dict:
    """Raise ValueError (one line) when a label with a known plausible range (``PLAUSIBLE_MEAN_HU``) has its mean
    CT intensity outside it -- the labels do not lie on the anatomy they name (mirrored, shifted, another scan).
    Returns the means {name: HU} of every label present."""
    means = mean_intensity_per_label(image, labels, values)
    bad = {n: m for n, m in means.items() if n in PLAUSIBLE_MEAN_HU
           and not PLAUSIBLE_MEAN_HU[n][0] <= m <= PLAUSIBLE_MEAN_HU[n][1]}
    if bad:
        said = ", ".join(f"{n} {m:.0f} HU (expected {PLAUSIBLE_MEAN_HU[n][0]:.0f}..{PLAUSIBLE_MEAN_HU[n][1]:.0f})"
                         for n, m in bad.items())
        raise ValueError(f"{what} do not lie on their anatomy: mean intensity inside {said}; match image and labels "
                         "by world coordinates (labels_onto_image), never by copying one header onto the other")
    return means
