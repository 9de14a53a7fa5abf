"""nnU-Net's predictor with what nnpp's device layer knows.

nnU-Net's ``nnUNetPredictor`` keeps sliding-window logits in device memory on CUDA only (on any other device
they go to the host patch by patch) and autocasts to fp16 on CUDA only, whatever the run's precision.
``nnppPredictor`` changes exactly these two things and nothing else: logits stay on any accelerator the device
layer says can hold them (cuda, npu), and the network runs in the given :class:`nnpp.device.Amp` mode (the
innermost autocast wins over nnU-Net's). Preprocessing, sliding window, Gaussian weighting, mirroring,
resampling and export are nnU-Net's.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnpp import device as dev


class nnppPredictor(nnUNetPredictor):
    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device("cuda"),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True,
                 amp: dev.Amp | None = None):
        super().__init__(tile_step_size=tile_step_size, use_gaussian=use_gaussian, use_mirroring=use_mirroring,
                         perform_everything_on_device=perform_everything_on_device, device=device, verbose=verbose,
                         verbose_preprocessing=verbose_preprocessing, allow_tqdm=allow_tqdm)
        self.perform_everything_on_device = perform_everything_on_device and dev.keeps_logits_on_device(device)
        self.amp = amp

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.amp is None:
            return super()._internal_maybe_mirror_and_predict(x)
        with self.amp.autocast(exclusive=True):
            return super()._internal_maybe_mirror_and_predict(x)


@contextlib.contextmanager
def nnunet_validation_uses(amp: dev.Amp):
    """While active, nnU-Net's trainer validation (``perform_actual_validation``) builds an :class:`nnppPredictor`
    in ``amp``'s mode. nnU-Net offers no hook for the predictor class it builds there, so the name it looks up
    is swapped for the duration of the call and restored afterwards (the rest of validation, 130 lines of
    nnU-Net's, stays nnU-Net's)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    original = trainer_module.nnUNetPredictor
    trainer_module.nnUNetPredictor = functools.partial(nnppPredictor, amp=amp)
    try:
        yield
    finally:
        trainer_module.nnUNetPredictor = original
