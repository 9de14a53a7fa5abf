"""Converters from other formats into nnU-Net v2 model folders: nnU-Net v1 UNet++ models (``nnpp_convert_v1_model``).

* :mod:`nnpp.convert.v1_files`: safe reading of v1 pickles and checkpoints (nnU-Net v1 need not be installed)
* :mod:`nnpp.convert.v1_plans`: v1 plans / dataset.json -> v2 plans.json / dataset.json
* :mod:`nnpp.convert.v1_weights`: v1 ``Generic_UNetPlusPlus`` state_dict -> nnpp UNet++ state_dict, checked
* :mod:`nnpp.convert.v1_model`: the whole folder conversion
"""
from nnpp.convert.v1_model import convert_v1_model, inspect_v1_folder

__all__ = ["convert_v1_model", "inspect_v1_folder"]
