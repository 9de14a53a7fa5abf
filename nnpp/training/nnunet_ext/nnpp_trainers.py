"""Every nnpp trainer, for nnU-Net's ``nnUNet_extTrainer`` lookup (see this folder's ``__init__``).

nnU-Net imports this file as the top-level module ``nnpp_trainers``; the classes it exposes are nnpp's own (imported
from their modules, not redefined), so checkpoints, ``isinstance`` and pickling see one class per name.
"""
import importlib

from nnpp.model_folder import NNPP_TRAINER_MODULES

for _name, _module in NNPP_TRAINER_MODULES.items():
    globals()[_name] = getattr(importlib.import_module(_module), _name)

__all__ = sorted(NNPP_TRAINER_MODULES)
