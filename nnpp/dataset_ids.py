"""Dataset ids as users type them (``3``, ``003``, ``Dataset003_Liver``, the v1/MSD ``Task003_Liver``,
``Task03_Liver``) and the nnU-Net v2 folder name they stand for."""
from __future__ import annotations

import os
import re

from nnpp import NnppError

DATASET_ID_RE = re.compile(r"(?:Dataset|Task)?0*(\d{1,3})(?:_\w+)?")


def parse_dataset_id(text: str) -> int:
    """``3``, ``003``, ``Dataset003_Liver`` or the v1/MSD forms ``Task003_Liver``, ``Task03_Liver`` -> 3."""
    m = DATASET_ID_RE.fullmatch(str(text).strip())
    if not m:
        raise NnppError(f"'{text}' is not a dataset id; use 3, 003, Dataset003_Name or Task003_Name")
    return int(m.group(1))


def dataset_name(text: str) -> str:
    """Resolve a dataset id to its nnU-Net v2 folder name (DatasetXXX_Name), looking in the nnU-Net folders."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets
    dataset_id = parse_dataset_id(text)
    found = list(find_candidate_datasets(dataset_id))
    if not found:
        raise NnppError(f"unknown dataset '{text}': no Dataset{dataset_id:03d}_* folder in nnUNet_raw, "
                        f"nnUNet_preprocessed or nnUNet_results ({os.environ.get('nnUNet_preprocessed')}); "
                        f"convert and preprocess it first (nnUNetv2_convert_MSD_dataset, "
                        f"nnUNetv2_plan_and_preprocess)")
    if len(found) > 1:
        raise NnppError(f"dataset id {dataset_id} is ambiguous ({', '.join(found)}); pass the full DatasetXXX_Name")
    return str(found[0])
