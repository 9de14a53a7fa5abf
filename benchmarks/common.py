"""What the benchmark scripts share: the machine line and the validation cases of a trained model, staged as input."""
from __future__ import annotations

import json
import os
import tempfile


def machine_line() -> str:
    """e.g. "Intel(R) Xeon(R) Processor, 2 cores visible, CPU capability AVX512, native bf16" (nnpp.device)."""
    from nnpp.device import machine_info
    m = machine_info()
    return f"{m['cpu']}, {m['cores']} cores visible, CPU capability {m['cpu_capability']}"


def stage_val_cases(dataset_name: str, fold, n: int, file_ending: str, prefix: str) -> tuple[str, str, list]:
    """The first ``n`` validation cases of ``fold`` (splits_final.json) as a prediction input folder of symlinks to
    the raw images. Returns (work folder to delete afterwards, input folder, case ids)."""
    raw = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    with open(os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "splits_final.json")) as f:
        cases = sorted(json.load(f)[int(fold)]["val"])[:n]
    work = tempfile.mkdtemp(prefix=prefix)
    inputs = os.path.join(work, "in")
    os.makedirs(inputs)
    images = os.path.join(raw, "imagesTr")
    for c in cases:
        for f in os.listdir(images):
            if f.startswith(c + "_") and f.endswith(file_ending):
                os.symlink(os.path.join(images, f), os.path.join(inputs, f))
    return work, inputs, cases
