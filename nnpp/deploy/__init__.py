"""Deployment: ONNX export checked against torch, ONNX Runtime inside nnU-Net's predictor, pruned UNet++.

* the model-folder loader itself lives at the bottom of the house: :mod:`nnpp.model_folder`.
* :mod:`nnpp.deploy.export`: ``fold_F.onnx`` + metadata, op-set check, parity check (``nnpp_export``);
  :mod:`nnpp.deploy.export_folder` its output-folder checks, temp folder and final rename.
* :mod:`nnpp.deploy.ort`: ONNX Runtime / OpenVINO sessions, the ``nn.Module`` adapter nnU-Net's predictor runs and
  ``init_onnx``, which puts them into an nnpp predictor (``nnpp_predict --onnx``).

* :mod:`nnpp.deploy.quantize`: fp16 / int8 exports (ONNX Runtime's QDQ, or NNCF's OpenVINO IR with
  ``--quantizer nncf``), their Dice guard and fp32 vs reduced latency.

onnx / onnxruntime / onnxscript are the ``[onnx]`` extra, openvino / nncf the ``[openvino]`` extra; importing this
package does not need them.
"""
