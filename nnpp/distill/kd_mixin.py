"""Everything distillation adds to an nnpp trainer, as one mixin: :class:`KDMixin` (``configure_kd`` before
``initialize``). Its parts, one concern each:

* :class:`nnpp.distill.kd_step.KDStepMixin`: the step (teachers' outputs, KD terms, the loss);
* :class:`nnpp.distill.kd_network.KDModulesMixin`: stage pairs, KD modules, the
  :class:`~nnpp.distill.kd_network.KDStudent` wrapper;
* :class:`nnpp.distill.mixed_batches.MixedBatchesMixin`: unlabeled cases in the training batches;
* :class:`nnpp.distill.cost.CostReportMixin`: params, FLOPs and latency of student and teachers.

This module holds the rest: the KD settings (saved as run settings), the record of the run (``kd_config.json`` and
``checkpoint['nnpp_kd']``: settings, teachers, leaks, every case the student's weights have seen), checkpoints
(the KD modules saved beside the student's weights and restored by ``--c`` with the optimizer state; ``--val``
validates the student alone) and nnU-Net's DA5 augmentation (``--da5``). No two parts define the same method, so
each nnU-Net hook they override runs its part and then nnpp's trainer, as one class would.
"""
from __future__ import annotations

import json
import os

from nnpp import NnppError
from nnpp.distill.cost import CostReportMixin
from nnpp.distill.kd_network import KDModulesMixin
from nnpp.distill.kd_step import KDStepMixin
from nnpp.distill.mixed_batches import MixedBatchesMixin
from nnpp.distill.settings import FEATURE_METHODS, KD_DEFAULTS, KD_IDENTITY, METHODS
from nnpp.distributed import world
from nnpp.file_safety import replace_atomically


class KDMixin(KDStepMixin, KDModulesMixin, MixedBatchesMixin, CostReportMixin):
    """Everything distillation adds to an nnpp trainer (its parts: the module docstring). ``configure_kd`` before
    ``initialize``."""
    teachers: list = []
    kd_config: dict | None = None
    kd_leaks: list = []

    def configure_kd(self, teachers: list, config: dict, leaks: list | None = None) -> None:
        """Teachers (:class:`nnpp.distill.teachers.Teacher`, frozen, on this trainer's device), the resolved KD
        settings (``KD_DEFAULTS`` keys plus ``t``, ``tf``, ``r``, ``student``) and the accepted leaks."""
        unknown = [m for m in config["kd"] if m not in METHODS]
        if unknown:
            raise NnppError(f"unknown KD method(s) {', '.join(unknown)}; choose from {' '.join(METHODS)}")
        self.teachers = list(teachers)
        self.kd_config = dict(config)
        self.kd_leaks = list(leaks or [])
        self.kd_pairs: list = []
        self._kd_terms: list = []
        if self.kd_leaks:
            from nnpp.distill.teachers import describe_leak
            self.print_to_log_file("WARNING: leaky distillation (--allow_val_leak): " + "; ".join(
                describe_leak(name, cases) for name, cases in self.kd_leaks)
                + ". The student's validation Dice may be optimistic.")

    def _configure_network(self) -> None:
        # the teachers see the student's batches: same memory format (else every teacher conv re-lays its input)
        super()._configure_network()
        for t in self.teachers:
            t.network.to(memory_format=self.memory_format)

    # ------------------------------------------------------------------------------------------ settings
    @property
    def kd_on(self) -> bool:
        return self.kd_config is not None

    @property
    def leaky(self) -> bool:
        return bool(self.kd_leaks)

    def kd_needs_features(self) -> bool:
        c = self.kd_config
        return bool(set(c["kd"]) & set(FEATURE_METHODS) or ("cwd" in c["kd"] and c["cwd_feat"]))

    def kd_needs_logits(self) -> bool:
        """Whether the teachers' decoders must run: a logit method (soft, cwd) is asked for."""
        return bool({"soft", "cwd"} & set(self.kd_config["kd"]))

    def run_settings(self) -> dict:
        settings = super().run_settings()
        if self.kd_on:
            settings.update({k: self.kd_config[k] for k in (*KD_DEFAULTS, *KD_IDENTITY) if k in self.kd_config})
        return settings

    # ------------------------------------------------------------------------------------------ record
    def kd_training_cases(self) -> list | None:
        """The student's training cases plus every teacher's (None when a teacher's are unknown)."""
        from nnpp.distill.teachers import split_cases
        try:
            cases = set(split_cases(self.preprocessed_dataset_folder_base, self.fold)[0])
        except NnppError:
            return None
        for t in self.teachers:
            if t.training_cases is None:
                return None
            cases |= set(t.training_cases)
        return sorted(cases | set(self.unlabeled_cases()))

    def kd_record(self) -> dict:
        """What ``kd_config.json`` and the checkpoint record about this distillation."""
        return {**self.kd_config, "leaky": self.leaky,
                "leaks": [{"teacher": n, "cases": c} for n, c in self.kd_leaks],
                "teachers_resolved": [{"name": t.name, "folder": t.folder, "fold": t.fold, "trainer": t.trainer_name,
                                       "parameters": t.num_parameters, "training_cases": t.training_cases}
                                      for t in self.teachers],
                # every case the student's weights have seen (its own training cases and its teachers'): a later
                # leak check with this student as a teacher reads it (nnpp.distill.teachers.teacher_training_cases)
                "training_cases": self.kd_training_cases(),
                "stage_pairs": self.kd_pairs, "sizes": getattr(self, "kd_sizes", None),
                "unlabeled_preprocessed": getattr(self, "unlabeled_dir", None),
                "unlabeled_cases": self.unlabeled_cases()}

    def on_train_start(self):
        super().on_train_start()
        if self.kd_on and world()[0] == 0:
            self.kd_sizes = self.size_report()
            self.report_sizes(self.kd_sizes)
            self._write_kd_record()

    def _write_kd_record(self) -> None:
        path = os.path.join(self.output_folder, "kd_config.json")
        with replace_atomically(path) as f:
            json.dump(self.kd_record(), f, indent=2)
        self.print_to_log_file(f"KD configuration ({'LEAKY' if self.leaky else 'leak-free'}, \"leaky\": "
                               f"{str(self.leaky).lower()}): {path}")

    # -------------------------------------------------------------------------------------- checkpoints
    def checkpoint_extras(self) -> dict:
        extras = super().checkpoint_extras()
        if self.kd_on and self.kd_modules is not None:
            extras["nnpp_kd"] = {"config": self.kd_record(), "modules": self.kd_modules.state_dict()}
        return extras

    #: --val: validate the student alone (no teachers, no KD modules); the checkpoint's optimizer state, which
    #: covers the KD modules too, is not loaded
    kd_validate_only: bool = False

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.kd_validate_only:
            return super().load_checkpoint(filename_or_checkpoint)
        if not self.was_initialized:
            self.initialize()
        self.optimizer.load_state_dict = lambda state: None  # validation needs the weights, not the optimizer
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            del self.optimizer.load_state_dict

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        super().load_checkpoint_extras(checkpoint)
        saved = checkpoint.get("nnpp_kd")
        if not self.kd_on or saved is None:
            return
        ours = {k: self.kd_config.get(k, v) for k, v in KD_DEFAULTS.items()}
        theirs = {k: saved["config"].get(k, v) for k, v in KD_DEFAULTS.items()}  # settings added later: defaults
        diff = [k for k in KD_DEFAULTS if ours[k] != theirs[k]]
        if diff:
            raise NnppError("the checkpoint was distilled with another KD configuration (" + ", ".join(
                f"{k}: {theirs[k]} there, {ours[k]} now" for k in diff) + "); continue with the same settings or "
                "train into a new folder")
        try:
            self.kd_modules.load_state_dict(saved["modules"], strict=True)
        except RuntimeError as e:
            raise NnppError(f"the checkpoint's KD modules do not fit this run ({str(e).splitlines()[0]}); "
                            f"continue with the same teachers and methods") from None
        self.print_to_log_file(f"KD: restored {len(saved['modules'])} KD-module tensors and the KD configuration "
                               f"from the checkpoint")

    # ------------------------------------------------------------------------------------ augmentation
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        if self.kd_on and self.kd_config.get("da5"):
            from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
            return nnUNetTrainerDA5.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
        return super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()

    def get_training_transforms(self, *args, **kwargs):
        if self.kd_on and self.kd_config.get("da5"):  # nnU-Net's DA5 pipeline (its own static method)
            from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
            return nnUNetTrainerDA5.get_training_transforms(*args, **kwargs)
        return super().get_training_transforms(*args, **kwargs)
