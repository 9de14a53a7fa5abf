"""nnpp: UNet++ with deep supervision on nnU-Net v2, portable across CUDA, Ascend NPU and CPU.

Importing the package does not import nnunetv2: nnunetv2 reads its path variables at import time,
so entry points set them first (see :mod:`nnpp.paths`).
"""
__version__ = "0.1.0"

#: the trainer nnpp_train, nnpp_predict and nnpp_export use when -tr is not given
DEFAULT_TRAINER = "nnUNetPlusPlusTrainer"


class NnppError(Exception):
    """A user-facing error: one line saying what is wrong and what to do. Entry points print it
    without a stack trace and exit with status 2."""
