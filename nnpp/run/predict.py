"""nnpp_predict: nnUNetv2_predict with nnpp trainers (and nnU-Net's own), any dataset id form, device auto.

Same flags as nnUNetv2_predict (-i -o -d -c -p -tr -f -chk -step_size --disable_tta --save_probabilities ...);
-tr defaults to nnUNetPlusPlusTrainer and -device to auto. nnU-Net's predictor only finds trainers inside its
own package; nnpp points its trainer lookup at :func:`nnpp.training.find_trainer_class` (which falls back to
nnU-Net's lookup) and then runs nnU-Net's own predict entry point.
"""
from __future__ import annotations

import argparse
import os
import sys

from nnpp import NnppError
from nnpp.paths import setup_paths
from nnpp.run.common import dataset_name, entry_point
from nnpp.run.train import DEFAULT_TRAINER

PREDICT_DEVICES = ("auto", "cuda", "mps", "cpu")  # nnU-Net's predict entry point supports these


def _our_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-i")
    p.add_argument("-d")
    p.add_argument("-c")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-tr", default=DEFAULT_TRAINER)
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"])
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-device", default="auto")
    return p


@entry_point("nnpp_predict")
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = _our_flags().parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
    setup_paths(required=("nnUNet_results",))

    import nnunetv2.inference.predict_from_raw_data as nnunet_predict

    from nnpp import device as dev
    from nnpp.training import find_trainer_class

    if ours.device not in PREDICT_DEVICES:
        raise NnppError(f"-device {ours.device}: nnU-Net's predictor supports {', '.join(PREDICT_DEVICES)}")
    device = dev.resolve_device(ours.device)
    find_trainer_class(ours.tr)  # unknown trainer -> clear error before nnU-Net starts
    args = rest + ["-tr", ours.tr, "-p", ours.p, "-f", *ours.f, "-chk", ours.chk, "-device", device.type]
    if ours.i is not None:
        if not os.path.isdir(ours.i):
            raise NnppError(f"input folder '{ours.i}' does not exist; -i takes a folder of CASE_0000.nii.gz images")
        args += ["-i", ours.i]
    if ours.d is not None and ours.c is not None:
        from nnunetv2.utilities.file_path_utilities import get_output_folder
        name = dataset_name(ours.d)
        model = get_output_folder(name, ours.tr, ours.p, ours.c)
        missing = [f for f in ours.f if not os.path.isfile(os.path.join(model, f"fold_{f}", ours.chk))]
        if missing:
            raise NnppError(f"no {ours.chk} for fold(s) {', '.join(missing)} in {model}; train them or pass "
                            f"-f with the trained folds")
        args += ["-d", name, "-c", ours.c]

    nnunet_predict.recursive_find_trainer_class_by_name = find_trainer_class
    sys.argv = ["nnpp_predict"] + args
    nnunet_predict.predict_entry_point()


if __name__ == "__main__":
    main()
