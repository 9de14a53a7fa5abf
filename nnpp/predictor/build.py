"""Building a predictor: the precision, the predictor itself, a trained model folder's network in it, and the
predictor of nnU-Net's own final validation.

The library home of what nnpp_predict, the benchmarks, distillation's pseudo-labels and the trainer need; an
nnpp_export folder (ONNX Runtime, OpenVINO) goes into a predictor by :func:`nnpp.deploy.ort.init_onnx`.
"""
from __future__ import annotations

import contextlib
import functools

from nnpp import device as dev
from nnpp.predictor.tiles import nnppPredictor


def inference_amp(mode: str, device):
    """The torch precision of nnpp_predict: ``auto`` is nnU-Net's inference choice (fp16 autocast on cuda, and on
    npu alike; fp32 elsewhere), not the training default (which picks bf16 on CPUs with native bf16)."""
    if mode == "auto":
        mode = "O1" if device.type in ("cuda", "npu") else "O0"
    return dev.make_amp(mode, device)


AMP_TEXT = {"O0": "fp32", "O1": "fp16 autocast", "bf16": "bf16 autocast"}


def make_predictor(device, step_size: float = 0.5, mirroring: bool = True, on_device: bool = True,
                   verbose: bool = False, progress: bool = True, amp=None, tta_batch: int | None = None):
    """nnU-Net's predictor on ``device`` (a torch.device: cpu, cuda, mps, npu...) with Gaussian weighting;
    :class:`nnpp.predictor.tiles.nnppPredictor`: logits stay on npu as they do on cuda (``on_device``), mirrored copies
    go through the network in batches of ``tta_batch``, the network runs in ``amp`` (an nnpp.device.Amp)."""
    return nnppPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirroring,
                         perform_everything_on_device=on_device, device=device, verbose=verbose,
                         verbose_preprocessing=verbose, allow_tqdm=progress, amp=amp,
                         tta_batch=tta_batch)


def undo_compile(predictor, compile_ok: bool) -> None:
    """nnU-Net compiles the network when nnUNet_compile is set; undo that where compiling is not supported
    (ONNX Runtime adapters, devices other than cuda)."""
    from torch._dynamo.eval_frame import OptimizedModule
    if not compile_ok and isinstance(predictor.network, OptimizedModule):
        predictor.network = predictor.network._orig_mod


def init_torch(predictor, model_folder: str, folds, checkpoint_name: str = "checkpoint_final.pth",
               depth: int | None = None, allow_untrained_depth: bool = False):
    """Initialise ``predictor`` with the torch network of ``model_folder`` (built by the checkpoint's trainer
    class, every fold loaded strictly, pruned to ``depth``; an untrained depth refused unless
    ``allow_untrained_depth``, see :func:`nnpp.model_folder.check_depth`). Returns the :class:`TrainedModel`."""
    from nnpp.model_folder import check_depth, load_trained_model, set_depth
    model = load_trained_model(model_folder, folds, checkpoint_name, depth)
    network = set_depth(model.build_network(0), depth)
    check_depth(model, depth, getattr(network, "depth", None), allow_untrained_depth,
                lambda line: print(f"[nnpp_predict] {line}", flush=True))
    # the memory format the trainer ran (and validated) this network in: channels_last_3d for 3D on the CPU (faster
    # there, and the same float sums as the final validation's, so nnpp_predict writes validation's masks)
    network.to(memory_format=dev.memory_format(predictor.device, len(model.configuration_manager.patch_size)))
    predictor.manual_initialization(network, model.plans_manager, model.configuration_manager, model.parameters,
                                    model.dataset_json, model.trainer_name, model.inference_allowed_mirroring_axes)
    undo_compile(predictor, dev.compile_supported(predictor.device))
    return model


@contextlib.contextmanager
def nnunet_validation_uses(amp: dev.Amp, tta_batch: int | None = None):
    """While active, nnU-Net's trainer validation (``perform_actual_validation``) builds an :class:`nnppPredictor`
    in ``amp``'s mode with batched mirroring. nnU-Net offers no hook for the predictor class it builds there, so
    the name it looks up is swapped for the duration of the call and restored afterwards (the rest of validation,
    130 lines of nnU-Net's, stays nnU-Net's; the swap is pinned by tests/test_nnunet_pins.py)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    original = trainer_module.nnUNetPredictor
    trainer_module.nnUNetPredictor = functools.partial(nnppPredictor, amp=amp, tta_batch=tta_batch)
    try:
        yield
    finally:
        trainer_module.nnUNetPredictor = original
