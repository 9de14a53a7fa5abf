"""Teachers: nnU-Net v2 model folders rebuilt exactly as nnU-Net's predictor rebuilds them, frozen; their
ensemble target; the start-up checks (compatibility with the student's data, leaks of validation cases).

A model folder is ``$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG`` with ``plans.json``,
``dataset.json`` and ``fold_F/CHECKPOINT``. The checkpoint's ``trainer_name`` names the trainer class, whose
static ``build_network_architecture(plans_manager, configuration_manager, n_in, n_out, False)`` builds the
network (nnpp's UNet++, nnU-Net's PlainConvUNet, ResEnc, ...); the weights are loaded with ``strict=True``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from nnpp import NnppError
from nnpp.file_safety import load_json_file
from nnpp.distill.losses import Target, ensemble_log_probs, ensemble_log_probs_binary


@dataclass
class Teacher:
    """One frozen teacher network (eval mode, no parameter requires grad) and where it came from."""
    network: nn.Module
    folder: str = ""
    fold: object = 0
    plans_manager: object = None
    configuration_manager: object = None
    dataset_json: dict = field(default_factory=dict)
    trainer_name: str = ""
    training_cases: list | None = None  # set by check_leaks: every case the teacher's weights have seen

    def __post_init__(self):
        self.network.eval()
        self.network.requires_grad_(False)

    @property
    def name(self) -> str:
        return f"{os.path.basename(self.folder.rstrip(os.sep)) or 'teacher'}/fold_{self.fold}"

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    def forward(self, x: torch.Tensor, amp, features: bool = False, logits: bool = True, stages=None):
        """(logits, skips) of one forward pass: ``logits`` (fp32, full resolution) unless ``logits=False`` (then
        the decoder is not run: feature-only KD needs the encoder alone), and with ``features`` the encoder stage
        outputs, only ``stages`` (indices; None: all) cast to fp32 and the others None. Runs under
        ``torch.no_grad()`` (not inference_mode: the KD losses keep these tensors for backward) and the run's
        autocast (``amp``, an :class:`nnpp.device.Amp`)."""
        net = self.network
        out = skips = None
        with torch.no_grad(), amp.autocast():
            if features or not logits:
                skips = net.encoder(x)
                if logits:
                    out = net.decoder(skips)
            else:
                out = net(x)
        if isinstance(out, (list, tuple)):  # deep supervision left on: full resolution is output[0]
            out = out[0]
        if skips is not None:
            skips = [s.float() if (stages is None or i in stages) else None for i, s in enumerate(skips)] \
                if features else None
        return (None if out is None else out.float()), skips


def load_teacher(folder: str, fold, checkpoint_name: str = "checkpoint_final.pth",
                 device: torch.device = torch.device("cpu")) -> Teacher:
    """Rebuild the network of ``folder/fold_{fold}/{checkpoint_name}`` the predictor's way, strictly loaded,
    frozen, on ``device`` (:func:`nnpp.model_folder.load_trained_model`, which also checks plans.json and the
    labels against the checkpoint). Bad folders, missing checkpoints and mismatching weights are one-line errors."""
    from nnpp.model_folder import load_trained_model

    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise NnppError(f"teacher folder {folder} does not exist; -t takes an nnU-Net model folder "
                        f"($nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG)")
    ckpt_path = os.path.join(folder, f"fold_{fold}", checkpoint_name)
    if not os.path.isfile(ckpt_path):
        raise NnppError(f"teacher checkpoint {ckpt_path} does not exist; train that fold, or choose the teacher "
                        f"folds with -tf and the checkpoint with -tchk (e.g. checkpoint_best.pth)")
    model = load_trained_model(folder, [fold], checkpoint_name)
    return Teacher(model.build_network(0).to(device), folder, fold, model.plans_manager, model.configuration_manager,
                   model.dataset_json, model.trainer_name)


def ensemble_target(teacher_logits: list, T: float, binary: bool) -> Target:
    """The KD target of several teachers: mean of their probabilities at temperature T (log space)."""
    return (ensemble_log_probs_binary if binary else ensemble_log_probs)(teacher_logits, T)


# --------------------------------------------------------------------------------------------- checks
def check_compatible(teacher: Teacher, plans_manager, configuration_manager, dataset_json: dict) -> None:
    """Same labels/regions and number of output heads, same spacing and intensity normalisation (the same
    preprocessed data), and a student patch divisible by the teacher's total stride. One line per mismatch."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    t_lm = teacher.plans_manager.get_label_manager(teacher.dataset_json)
    s_lm = plans_manager.get_label_manager(dataset_json)
    who = f"teacher {teacher.name}"
    if (teacher.dataset_json.get("labels") != dataset_json.get("labels")
            or t_lm.has_regions != s_lm.has_regions or t_lm.regions_class_order != s_lm.regions_class_order):
        raise NnppError(f"{who} has labels {teacher.dataset_json.get('labels')}, the student's dataset "
                        f"{dataset_json.get('labels')}: teachers must be trained on the same labels/regions")
    if t_lm.num_segmentation_heads != s_lm.num_segmentation_heads:
        raise NnppError(f"{who} predicts {t_lm.num_segmentation_heads} output channels, the student "
                        f"{s_lm.num_segmentation_heads}: teachers must be trained on the same labels/regions")
    tc = teacher.configuration_manager
    n_t = determine_num_input_channels(teacher.plans_manager, tc, teacher.dataset_json)
    n_s = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    if n_t != n_s:
        raise NnppError(f"{who} takes {n_t} input channels, the student's data has {n_s}")
    sc = configuration_manager
    if len(tc.patch_size) != len(sc.patch_size) or len(tc.spacing) != len(sc.spacing):
        raise NnppError(f"{who} is a {len(tc.patch_size)}D model (spacing {list(tc.spacing)}), the student's "
                        f"configuration is {len(sc.patch_size)}D (spacing {list(sc.spacing)}): distil into the "
                        f"configuration the teacher was trained on (a 2d teacher into 2d, a 3d one into 3d_fullres)")
    if not np.allclose(tc.spacing, configuration_manager.spacing, rtol=1e-4, atol=1e-6):
        raise NnppError(f"{who} was trained at spacing {list(tc.spacing)}, the student's configuration uses "
                        f"{list(configuration_manager.spacing)}: distil on the same preprocessed data (same "
                        f"configuration and spacing)")
    t_norm = (tc.normalization_schemes, tc.use_mask_for_norm,
              teacher.plans_manager.foreground_intensity_properties_per_channel)
    s_norm = (configuration_manager.normalization_schemes, configuration_manager.use_mask_for_norm,
              plans_manager.foreground_intensity_properties_per_channel)
    if json.dumps(t_norm, sort_keys=True) != json.dumps(s_norm, sort_keys=True):
        raise NnppError(f"{who} normalises its input differently ({tc.normalization_schemes} with its own "
                        f"intensity statistics) than the student's data ({configuration_manager.normalization_schemes}): "
                        f"distil on the same preprocessed data")
    strides = teacher.configuration_manager.pool_op_kernel_sizes
    total = np.prod(np.array(strides), axis=0)
    patch = np.array(configuration_manager.patch_size)
    if len(total) != len(patch) or np.any(patch % total):
        raise NnppError(f"student patch {patch.tolist()} is not divisible by {who}'s total stride {total.tolist()}; "
                        f"the teacher cannot run on the student's patches (choose a configuration whose patch "
                        f"fits both)")


def split_cases(preprocessed_dataset_dir: str, fold) -> tuple[list, list]:
    """(training cases, validation cases) of ``fold`` from the dataset's splits_final.json; fold 'all': every
    case for both (nnU-Net trains and 'validates' on all). A missing dataset folder, or one with no cases, is an
    error: no cases must never pass a leak check as leak-free."""
    splits_file = os.path.join(preprocessed_dataset_dir, "splits_final.json")
    if not os.path.isdir(preprocessed_dataset_dir):
        raise NnppError(f"cannot find the cases of fold {fold}: the preprocessed dataset folder "
                        f"{preprocessed_dataset_dir} does not exist (check nnUNet_preprocessed, or run "
                        f"nnUNetv2_plan_and_preprocess for that dataset)")
    if str(fold) == "all":
        if os.path.isfile(splits_file):
            splits = load_json_file(splits_file, "splits file")
            cases = sorted(set(splits[0]["train"]) | set(splits[0]["val"]))
        else:
            cases = sorted(f[:-len(".pkl")] for f in _case_files(preprocessed_dataset_dir))
        if not cases:
            raise NnppError(f"no cases found in {preprocessed_dataset_dir} (no splits_final.json, no preprocessed "
                            f"cases): the leak check needs the cases of fold all; preprocess the dataset first")
        return cases, cases
    if not os.path.isfile(splits_file):
        raise NnppError(f"cannot check teachers for validation leaks: {splits_file} does not exist (nnU-Net writes "
                        f"it at the first training of the dataset); train a teacher with nnU-Net/nnpp first")
    splits = load_json_file(splits_file, "splits file")
    fold = int(fold)
    if fold >= len(splits):
        raise NnppError(f"fold {fold} is not in {splits_file} ({len(splits)} folds)")
    if not splits[fold]["train"]:
        raise NnppError(f"fold {fold} of {splits_file} has no training cases: cannot check teachers for leaks")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def _case_files(preprocessed_dataset_dir: str) -> list:
    for name in sorted(os.listdir(preprocessed_dataset_dir)):
        sub = os.path.join(preprocessed_dataset_dir, name)
        if os.path.isdir(sub):
            found = [f for f in os.listdir(sub) if f.endswith(".pkl")]
            if found:
                return found
    return []


def teacher_dataset(teacher: Teacher) -> str | None:
    """The ``DatasetXXX_Name`` folder a teacher model folder sits in (nnU-Net's layout), or None."""
    import re
    name = os.path.basename(os.path.dirname(os.path.abspath(teacher.folder)))
    return name if re.fullmatch(r"Dataset\d{3,}_.+", name) else None


def teacher_training_cases(teacher: Teacher, preprocessed_root: str) -> list | None:
    """The case ids ``teacher``'s weights have seen: recorded in its fold's ``kd_config.json`` when it is itself a
    distilled student (its own training cases and its teachers'), else its dataset's splits
    (``preprocessed_root/DatasetXXX_Name/``). None (unknown) when the folder is not inside a DatasetXXX_Name folder,
    or when it is a distilled student whose record does not list them (distilled before they were recorded, or from
    teachers whose cases were unknown): its teachers may have seen any case."""
    record = os.path.join(teacher.folder, f"fold_{teacher.fold}", "kd_config.json")
    if os.path.isfile(record):
        cases = load_json_file(record, "kd_config.json").get("training_cases")
        return list(cases) if cases else None
    dataset = teacher_dataset(teacher)
    if dataset is None:
        return None
    return split_cases(os.path.join(preprocessed_root, dataset), teacher.fold)[0]


def check_leaks(teachers: list, preprocessed_root: str, student_fold, student_val: list,
                allow_val_leak: bool = False) -> list:
    """Refuse teachers whose **training cases** include the student's **validation cases** (compared by case id,
    from the splits_final.json of the teacher's dataset, ``preprocessed_root/DatasetXXX_Name/``, not by fold
    number). ``allow_val_leak``: accept and return the leaks as
    ``[(teacher name, [case ids] or None when its training cases are unknown)]`` so the run can be marked leaky.
    A teacher folder outside ``DatasetXXX_Name`` has unknown training cases: refused, or a leak with
    ``allow_val_leak``. A student on fold 'all' validates on its own training cases, so no teacher can leak into
    it."""
    if str(student_fold) == "all":
        return []
    leaks = []
    val = set(student_val)
    for t in teachers:
        t_train = t.training_cases = teacher_training_cases(t, preprocessed_root)
        if t_train is None:
            if not allow_val_leak:
                why = (f"{t.folder} is not inside a DatasetXXX_Name folder" if teacher_dataset(t) is None else
                       "it is a distilled student whose kd_config.json lists no training cases")
                fix = ("keep nnU-Net's layout ($nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG), or "
                       if teacher_dataset(t) is None else "")
                raise NnppError(f"teacher {t.name}: {why}, so its training cases are unknown and cannot be checked "
                                f"against the student's validation cases; {fix}pass --allow_val_leak to accept it "
                                f"(the run is then marked leaky)")
            leaks.append((t.name, None))
            continue
        leaked = sorted(val & set(t_train))
        if leaked:
            leaks.append((t.name, leaked))
    known = [(n, c) for n, c in leaks if c is not None]
    if known and not allow_val_leak:
        name, cases = known[0]
        shown = ", ".join(cases[:5]) + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")
        raise NnppError(f"teacher {name} was trained on {len(cases)} of the student's fold-{student_fold} validation "
                        f"cases ({shown}): its targets would leak them into the student's validation Dice. Use "
                        f"teachers of fold {student_fold} (-tf {student_fold}, the default), or pass "
                        f"--allow_val_leak to accept it (the run is then marked leaky)")
    return leaks


def describe_leak(name: str, cases: list | None) -> str:
    """One clause for a leak of :func:`check_leaks`."""
    if cases is None:
        return (f"{name}'s training cases are unknown (its folder is not inside DatasetXXX_Name, or its "
                f"kd_config.json lists none)")
    return f"{name} was trained on {len(cases)} of the student's validation cases ({', '.join(cases[:5])})"
