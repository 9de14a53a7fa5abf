"""nnU-Net checkpoints on disk: checked before loading, written atomically, loaded with one-line errors."""
from __future__ import annotations

import os
import zipfile

import torch

from nnpp import NnppError
from nnpp.file_safety import replace_atomically


def check_checkpoint_file(path: str) -> None:
    """torch.save writes a zip archive: a truncated or corrupt file fails the zip check (cheap, no unpickling)."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise NnppError(f"checkpoint {path} is unreadable ({e}); it is truncated or corrupt: delete it "
                        f"(or restore a backup) and run again") from None
    if bad is not None:
        raise NnppError(f"checkpoint {path} is corrupt (bad member {bad}); delete it and run again")


def load_checkpoint(path: str) -> dict:
    """torch.load of an nnU-Net checkpoint on the CPU, with one-line errors for missing/corrupt/foreign files."""
    if not os.path.isfile(path):
        raise NnppError(f"checkpoint not found: {path}; train that fold or pass -f with the trained folds")
    check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling errors come in many types
        raise NnppError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); it is corrupt") from None
    missing = [k for k in ("network_weights", "trainer_name", "init_args") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise NnppError(f"{path} is not an nnU-Net checkpoint (no {', '.join(missing)}); pass a checkpoint "
                        f"written by nnpp_train / nnUNetv2_train")
    return ckpt


def atomic_torch_save(obj, filename: str) -> None:
    """torch.save to a fresh temp file beside ``filename``, fsync, rename, fsync of the folder
    (:func:`nnpp.file_safety.replace_atomically`): a reader sees the old file or the whole new one, never a part; a
    crash leaves at most a ``.tmp<pid>`` that nothing promotes."""
    with replace_atomically(filename, "wb", durable=True) as f:
        torch.save(obj, f)
