"""Seed-era tools (change_bs, get_dice_result) as importable functions with CLIs."""
from __future__ import annotations

import os
from collections.abc import Callable

from nnpp import NnppError
from nnpp.dataset_ids import parse_dataset_id


def one_dataset(paths: list[str], dataset_dir: Callable[[str], str], root: str,
                dataset: str | None = None) -> list[str]:
    """The files among ``paths`` that lie in an nnU-Net dataset folder (``DatasetXXX_*`` / v1 ``TaskXXX_*``,
    named by ``dataset_dir(path)``), of ``dataset`` when given (an exact folder name, else its id); sorted.
    Files of several datasets is an error: without ``dataset`` it asks for -d, with one (an id that several
    folders share, e.g. ``Dataset003_Liver`` and ``Task003_Liver``) it asks for the full folder name. An empty
    result is the caller's to report (it knows what it looked for)."""
    paths = [p for p in paths if dataset_dir(p).startswith(("Dataset", "Task"))]
    if dataset is not None:
        if any(dataset_dir(p) == dataset for p in paths):
            paths = [p for p in paths if dataset_dir(p) == dataset]
        else:
            wanted = parse_dataset_id(dataset)
            paths = [p for p in paths if parse_dataset_id(dataset_dir(p)) == wanted]
    datasets = sorted({dataset_dir(p) for p in paths})
    if len(datasets) > 1:
        if dataset is None:
            raise NnppError(f"several datasets under {root} ({', '.join(datasets)}); choose one with -d")
        raise NnppError(f"-d {dataset} matches several datasets under {root} ({', '.join(datasets)}); "
                        f"pass the full folder name, e.g. -d {datasets[0]}")
    return sorted(paths)


def require_folder(root: str, what: str) -> None:
    if not os.path.isdir(root):
        raise NnppError(f"-path {root} is not a folder; pass the nnU-Net base or {what} folder")
