"""Knowledge distillation: nnU-Net model folders (teachers, one or an ensemble) into a small UNet++ or U-Net
student that is itself an ordinary nnU-Net model folder.

* :mod:`nnpp.distill.losses`        soft KD, CWD, AT, SP, MGD with exact reductions; the log-space probability ensemble
* :mod:`nnpp.distill.teachers`      teachers rebuilt the predictor's way, compatibility and leak checks
* :mod:`nnpp.distill.student`       the student's plans file (features // r)
* :mod:`nnpp.distill.unlabeled`     unlabeled scans as the transfer set: pseudo-labels, preprocessing, mixed batches
* :mod:`nnpp.distill.settings`      the KD methods and settings with their defaults
* :mod:`nnpp.distill.trainer`       the trainer classes found by name: nnUNetPlusPlusTrainerKD (UNet++ student),
  nnUNetTrainerKD (U-Net student), their DDP names, nnUNetTrainerNoKD
* :mod:`nnpp.distill.kd_mixin`      what distillation adds to nnpp's trainer (settings, record, checkpoints), from
  its parts: :mod:`~nnpp.distill.kd_step` (the step and its loss), :mod:`~nnpp.distill.kd_network` (the student
  wrapped with its KD modules), :mod:`~nnpp.distill.mixed_batches` (unlabeled cases in the batches),
  :mod:`~nnpp.distill.cost` (params, FLOPs, latency per patch)

The command is ``nnpp_distill`` (:mod:`nnpp.run.distill`). Importing this package, or any of its modules but
``unlabeled`` and ``trainer``, imports no nnU-Net module (their nnU-Net parts are imported where they run).
"""
