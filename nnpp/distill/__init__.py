"""Knowledge distillation: nnU-Net model folders (teachers, one or an ensemble) into a small UNet++ or U-Net
student that is itself an ordinary nnU-Net model folder.

* :mod:`nnpp.distill.losses`   soft KD, CWD, AT, SP, MGD with exact reductions; the log-space probability ensemble
* :mod:`nnpp.distill.teachers` teachers rebuilt the predictor's way, compatibility and leak checks
* :mod:`nnpp.distill.student`  the student's plans file (features // r)
* :mod:`nnpp.distill.trainer`  nnUNetPlusPlusTrainerKD (UNet++ student), nnUNetTrainerKD (U-Net student)

The command is ``nnpp_distill`` (:mod:`nnpp.run.distill`). Importing this package (or ``losses``) imports no
nnU-Net module; ``teachers`` and ``trainer`` do.
"""
