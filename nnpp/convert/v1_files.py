"""Reading nnU-Net v1 artifacts without nnU-Net v1 installed: pickles (plans, model info) and checkpoints.

v1 wrote its plans (``plans.pkl``) and model info (``model_*.model.pkl``) with :mod:`pickle`; they hold
dicts, OrderedDicts, lists, strings and numpy arrays/scalars. :class:`V1Unpickler` rebuilds exactly these and
refuses anything else (a pickle can name any callable), so reading a v1 folder never runs foreign code.
Objects of nnU-Net v1 classes (``nnunet.*``), which v1 itself never puts in these files but forks might,
come back as :class:`V1Object` placeholders that keep their class name and state. Numpy written by numpy 1.x
(``numpy.core``) or 2.x (``numpy._core``) both load.

Checkpoints (``model_*.model``) are ``torch.save`` archives: read with ``torch.load(weights_only=True)``,
allowing the numpy scalars v1 keeps in its plot data.
"""
from __future__ import annotations

import collections
import importlib
import os
import pickle

from nnpp import NnppError

#: (module, name) a v1 pickle may reference, besides numpy's own (see _numpy_global)
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): set,
}
_NUMPY_NAMES = {"_reconstruct", "scalar", "ndarray", "dtype", "_frombuffer"}


class V1Object:
    """Stand-in for an instance of an nnU-Net v1 class found in a pickle (v1 is not installed)."""

    v1_class = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<v1 {self.v1_class}>"


def _numpy_global(module: str, name: str):
    if name not in _NUMPY_NAMES:
        return None
    if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        if module == "numpy":
            import numpy
            return getattr(numpy, name, None)
        for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
    return None


def _numpy_dtype_class(module: str, name: str):
    """numpy >= 1.25 pickles dtypes with their class (numpy.dtypes.Float64DType)."""
    if module == "numpy.dtypes":
        import numpy.dtypes
        return getattr(numpy.dtypes, name, None)
    return None


class V1Unpickler(pickle.Unpickler):
    """pickle.Unpickler that rebuilds only containers, numpy data and v1 placeholders (see module doc)."""

    def __init__(self, file, what: str):
        super().__init__(file, encoding="latin1")  # latin1: pickles written by Python 2 with numpy arrays
        self.what = what

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name)) or _numpy_global(module, name) or _numpy_dtype_class(module, name)
        if found is not None:
            return found
        if module == "nnunet" or module.startswith("nnunet."):
            return type(name, (V1Object,), {"v1_class": f"{module}.{name}"})
        raise NnppError(f"{self.what} references {module}.{name}, which an nnU-Net v1 plans/model pickle never "
                        f"holds; refusing to unpickle it (is it really a v1 file?)")


def load_v1_pickle(path: str, what: str):
    """Unpickle a v1 ``.pkl`` safely (see module doc); a missing or unreadable file -> NnppError."""
    if not os.path.isfile(path):
        raise NnppError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            return V1Unpickler(f, f"{what} {path}").load()
    except NnppError:
        raise
    except Exception as e:  # truncated, not a pickle, ...
        raise NnppError(f"{what} {path} is unreadable ({type(e).__name__}: {e}); copy it again from the "
                        f"machine that trained the model") from None


def load_v1_checkpoint(path: str) -> dict:
    """``torch.load`` of a v1 ``model_*.model`` on the CPU, tensors and plain data only."""
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise NnppError(f"v1 checkpoint not found: {path}")
    extra = [np.dtype, np.ndarray, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
    scalar = _numpy_global("numpy._core.multiarray", "scalar")
    reconstruct = _numpy_global("numpy._core.multiarray", "_reconstruct")
    extra += [g for g in (scalar, reconstruct) if g is not None]
    try:
        with torch.serialization.safe_globals(extra):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NnppError(f"v1 checkpoint {path} is unreadable as tensor data ({first}); it is truncated, corrupt "
                        f"or not a v1 model_*.model file") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise NnppError(f"{path} has no 'state_dict'; it is not an nnU-Net v1 checkpoint (model_*.model)")
    return checkpoint
