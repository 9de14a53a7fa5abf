"""nnpp trainers and the trainer lookup used by nnpp_train and nnpp_predict."""
from nnpp import NnppError
from nnpp.training.nnUNetPlusPlusTrainer import DDP_VARIANTS, nnUNetPlusPlusTrainer, nnUNetPlusPlusTrainerV2

TRAINERS = {cls.__name__: cls for cls in (nnUNetPlusPlusTrainer, nnUNetPlusPlusTrainerV2, *DDP_VARIANTS.values())}


def find_trainer_class(name: str):
    """An nnpp trainer by name, else any trainer nnU-Net itself can find (its package, nnUNet_extTrainer)."""
    if name in TRAINERS:
        return TRAINERS[name]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        raise NnppError(f"unknown trainer '{name}'; use one of {', '.join(TRAINERS)} or an nnU-Net trainer "
                        f"class name (e.g. nnUNetTrainer)") from None


__all__ = ["DDP_VARIANTS", "TRAINERS", "find_trainer_class", "nnUNetPlusPlusTrainer", "nnUNetPlusPlusTrainerV2"]

# distillation students (nnpp.distill imports this package first, so either import order resolves)
from nnpp.distill.trainer import nnUNetPlusPlusTrainerKD, nnUNetTrainerKD  # noqa: E402

TRAINERS.update({cls.__name__: cls for cls in (nnUNetPlusPlusTrainerKD, nnUNetTrainerKD)})
