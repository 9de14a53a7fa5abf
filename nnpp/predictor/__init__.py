"""nnpp's predictor: nnU-Net's, with batched test-time mirroring and what nnpp's device layer knows.

tiles.py (nnppPredictor: mirroring, sliding window), cases.py (file to file), resample.py (resampling, export),
build.py (make_predictor, init_torch, inference_amp, the trainer's validation). ONNX Runtime / OpenVINO sessions
go in with nnpp.deploy.ort.init_onnx: nothing here imports nnpp.deploy.
"""
from nnpp.predictor.tiles import (DEFAULT_TTA_BATCH, TTA_MEMORY_FLOOR, TTA_MEMORY_FRACTION, network_memory_format,
                                  nnppPredictor)
from nnpp.predictor.resample import (DEFAULT_RESAMPLE, EXPORT_CLASSES_PER_CHUNK, RESAMPLE_CHOICES, argmax_of_trilinear,
                                     export_case, segmentation_from_logits, use_torch_resampling)
from nnpp.predictor.build import AMP_TEXT, inference_amp, init_torch, make_predictor, nnunet_validation_uses

__all__ = ["DEFAULT_TTA_BATCH", "TTA_MEMORY_FLOOR", "TTA_MEMORY_FRACTION", "network_memory_format", "nnppPredictor",
           "DEFAULT_RESAMPLE", "EXPORT_CLASSES_PER_CHUNK", "RESAMPLE_CHOICES", "argmax_of_trilinear", "export_case",
           "segmentation_from_logits", "use_torch_resampling",
           "AMP_TEXT", "inference_amp", "init_torch", "make_predictor", "nnunet_validation_uses"]
