"""nnU-Net's own commands on nnpp model folders: point ``nnUNet_extTrainer`` at this folder.

    export nnUNet_extTrainer=$(nnpp_ext_trainer_path)

nnU-Net 2.8 looks for a trainer class it does not ship in the folders listed in ``nnUNet_extTrainer``, importing
each module there as a top-level module. This folder holds one such module, :mod:`nnpp_trainers`, which re-exports
every trainer nnpp defines (:data:`nnpp.model_folder.NNPP_TRAINER_MODULES`: the UNet++ trainers and the
distillation students), so ``nnUNetv2_predict``, ``nnUNetv2_find_best_configuration``, ``nnUNetv2_ensemble`` (and
``nnUNetv2_train``) work on nnpp model folders. This package itself imports nothing.
"""
import os

#: the folder to put into nnUNet_extTrainer
EXT_TRAINER_PATH = os.path.dirname(os.path.abspath(__file__))
