"""nnpp trainers. The trainer lookup by name (:func:`find_trainer_class`, used by nnpp_train, nnpp_predict and the
model-folder loader) lives in :mod:`nnpp.model_folder`, at the bottom of the house; it finds the distillation
students of :mod:`nnpp.distill.trainer` too, without this package importing ``nnpp.distill``."""
from nnpp.model_folder import find_trainer_class
from nnpp.training.nnUNetPlusPlusTrainer import DDP_VARIANTS, nnUNetPlusPlusTrainer, nnUNetPlusPlusTrainerV2

__all__ = ["DDP_VARIANTS", "find_trainer_class", "nnUNetPlusPlusTrainer", "nnUNetPlusPlusTrainerV2"]
