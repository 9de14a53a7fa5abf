"""Labels from another source land on the image's anatomy: resampled by world coordinates (a DICOM-like image with
y = +1 and a NIfTI-like label map with y = -1 of the same size), and a check that refuses labels off their organ."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnpp.data.align import check_ct_labels, labels_onto_image


def _pair():
    """A 4 x 10 x 6 (z, y, x) CT of air (-1000 HU) holding a 'liver' (60 HU) in rows y = 1..2 at the front, and
    its label map stored with y flipped: direction y = -1 and origin at the image's last row."""
    ct = np.full((4, 10, 6), -1000, np.int16)
    ct[1:3, 1:3, 2:4] = 60
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((0.8, 2.0, 3.0))
    image.SetOrigin((-10.0, -437.5, 5.0))
    lab = np.zeros_like(ct, dtype=np.uint8)
    lab[1:3, 1:3, 2:4] = 1
    flipped = sitk.GetImageFromArray(lab[:, ::-1, :].copy())  # row j of the array is world y of image row 9 - j
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin((-10.0, -437.5 + 9 * 2.0, 5.0))
    flipped.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    return image, flipped, ct, lab


def test_labels_with_opposite_direction_land_on_the_object():
    image, flipped, ct, lab = _pair()
    on_image = labels_onto_image(flipped, image)
    assert on_image.GetSize() == image.GetSize() and on_image.GetDirection() == image.GetDirection()
    assert on_image.GetOrigin() == image.GetOrigin()
    arr = sitk.GetArrayFromImage(on_image)
    np.testing.assert_array_equal(arr, lab)
    assert check_ct_labels(ct, arr, {"background": 0, "liver": 1}) == {"liver": 60.0}


def test_copied_header_mirrors_the_labels_and_the_check_says_so():
    image, flipped, ct, _ = _pair()
    copied = sitk.GetArrayFromImage(flipped)  # what CopyInformation(image) would keep: the array as stored
    assert not (ct[copied == 1] == 60).any()  # mirrored front to back: on air
    with pytest.raises(ValueError, match=r"do not lie on their anatomy: mean intensity inside liver -1000 HU"):
        check_ct_labels(ct, copied, {"liver": 1})


def test_labels_outside_the_other_extent_become_background_and_unknown_names_are_not_judged():
    image, flipped, ct, lab = _pair()
    shifted = sitk.Image(flipped)
    shifted.SetOrigin((-10.0, -437.5 + 9 * 2.0 + 4.0, 5.0))  # two rows further: the labels move by 2 rows
    arr = sitk.GetArrayFromImage(labels_onto_image(shifted, image))
    np.testing.assert_array_equal(arr[:, 3:5], lab[:, 1:3])
    assert arr[:, :3].sum() == 0
    means = check_ct_labels(ct, arr, {"stomach": 1})  # no plausible range known for a stomach: reported only
    assert means == {"stomach": -1000.0}
    with pytest.raises(ValueError, match="not on one grid"):
        check_ct_labels(ct, arr[:, :5], {"liver": 1})
