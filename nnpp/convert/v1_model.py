"""Convert an nnU-Net v1 UNet++ model folder into an nnU-Net v2 model folder.

v1: ``RESULTS_FOLDER/nnUNet/CONFIG/TaskXXX_Name/TRAINER__PLANS/`` with ``plans.pkl`` and
``fold_F/model_final_checkpoint.model`` (+ ``.model.pkl``; ``model_best`` too).
v2: ``$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG/`` with ``plans.json``, ``dataset.json`` and
``fold_F/checkpoint_final.pth`` (``checkpoint_best.pth``), the files nnU-Net's predictor and nnpp load.

The converted network is built the way nnU-Net's predictor builds it (plans -> PlansManager -> configuration
-> the target trainer class's static ``build_network_architecture``) and loaded with ``strict=True``; the
files are written only after that worked, each through a temp file and ``os.replace``.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nnpp import NnppError
from nnpp.checkpoints import atomic_torch_save
from nnpp.convert.v1_files import load_v1_checkpoint, load_v1_pickle
from nnpp.convert.v1_plans import V1_MAX_FEATURES, convert_dataset_json, convert_plans, features_per_stage, pick_stage
from nnpp.convert.v1_weights import (map_state_dict, strip_module_prefix, v1_stage_features, v1_unetpp_layout,
                                     v1_unetpp_module_map)

#: v1 trainers whose network is the official Generic_UNetPlusPlus -> default nnpp trainer name
V1_UNETPP_TRAINERS = {"nnUNetPlusPlusTrainerV2": "nnUNetPlusPlusTrainerV2",
                      "nnUNetPlusPlusTrainerV2_DDP": "nnUNetPlusPlusTrainerV2",
                      "nnUNetPlusPlusTrainerV2_hypDDP": "nnUNetPlusPlusTrainerV2"}
V1_CONFIGURATIONS = ("2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres")
#: v1 checkpoint file stem -> v2 checkpoint file name
CHECKPOINTS = {"model_final_checkpoint": "checkpoint_final.pth", "model_best": "checkpoint_best.pth"}


@dataclass
class V1Folder:
    path: Path
    trainer: str
    plans_name: str
    configuration: str | None
    task: str | None
    folds: dict = field(default_factory=dict)  # fold -> {v1 stem: path of .model}


def inspect_v1_folder(path: str) -> V1Folder:
    """Check that ``path`` is a v1 model folder (plans.pkl, fold_F/*.model) and describe it."""
    p = Path(path).resolve()
    if not p.is_dir():
        raise NnppError(f"v1 model folder '{path}' does not exist")
    if (p / "plans.json").is_file() or glob.glob(str(p / "fold_*" / "checkpoint_*.pth")):
        raise NnppError(f"'{path}' is an nnU-Net v2 model folder (plans.json / checkpoint_*.pth), nothing to convert")
    folds = {}
    for d in sorted(p.glob("fold_*")):
        models = {stem: d / f"{stem}.model" for stem in CHECKPOINTS if (d / f"{stem}.model").is_file()}
        if models:
            folds[d.name[len("fold_"):]] = models
    if not folds:
        inner = sorted(q.name for q in p.iterdir() if q.is_dir() and "__" in q.name) if p.is_dir() else []
        hint = (f"; it holds {', '.join(inner)}: pass one of them" if inner else
                "; pass .../nnUNet/3d_fullres/TaskXXX_Name/TRAINER__PLANS")
        raise NnppError(f"'{path}' is not an nnU-Net v1 model folder (no fold_F/model_final_checkpoint.model "
                        f"or model_best.model){hint}")
    if not (p / "plans.pkl").is_file():
        raise NnppError(f"plans.pkl missing in {p}: v1 writes it beside the fold_F folders; copy it from the "
                        f"training machine (or nnUNet_preprocessed/TaskXXX/nnUNetPlansv2.1_plans_3D.pkl)")
    trainer, _, plans_name = p.name.partition("__")
    config = p.parent.parent.name if p.parent.parent.name in V1_CONFIGURATIONS else None
    task = p.parent.name if re.fullmatch(r"Task\d+_\w+", p.parent.name) else None
    return V1Folder(p, trainer, plans_name or "nnUNetPlansv2.1", config, task, folds)


def find_v1_dataset_json(folder: V1Folder, explicit: str | None) -> tuple[dict | None, str | None]:
    """The v1 dataset.json: ``explicit``, else the v1 raw or preprocessed task folder (v1 environment
    variables, then beside the v1 RESULTS_FOLDER), else (None, None)."""
    if explicit:
        from nnpp.file_safety import load_json_file
        return load_json_file(explicit, "dataset.json"), explicit
    if not folder.task:
        return None, None
    candidates = []
    for var, sub in (("nnUNet_raw_data_base", ("nnUNet_raw_data", folder.task)),
                     ("nnUNet_preprocessed", (folder.task,))):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var], *sub, "dataset.json"))
    parents = folder.path.parents  # [Task, CONFIG, nnUNet, RESULTS_FOLDER, base, ...]
    if len(parents) > 4:
        base = parents[4]
        for sub in (("nnUNet_raw_data_base", "nnUNet_raw_data"), ("nnUNet_raw", "nnUNet_raw_data"),
                    ("nnUNet_raw_data",), ("nnUNet_preprocessed",)):
            candidates.append(base.joinpath(*sub, folder.task, "dataset.json"))
    for c in candidates:
        if c.is_file():
            from nnpp.file_safety import load_json_file
            data = load_json_file(str(c), "v1 dataset.json")
            if "modality" in data or "channel_names" in data:
                return data, str(c)
    return None, None


def resolve_dataset_name(text: str, v1_task: str | None) -> str:
    """Target v2 dataset name: an existing DatasetXXX_* with that id, else DatasetXXX_Name from the argument
    (``Dataset003_Liver``, ``Task003_Liver``) or from the v1 task folder's name."""
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

    from nnpp.dataset_ids import parse_dataset_id
    dataset_id = parse_dataset_id(text)
    existing = sorted(set(find_candidate_datasets(dataset_id)))
    explicit = re.fullmatch(r"Dataset\d{3}_\w+", text.strip())
    if explicit:
        if existing and text.strip() not in existing:
            raise NnppError(f"dataset id {dataset_id} already exists as {', '.join(existing)}; convert into that "
                            f"name or choose another id")
        return text.strip()
    if len(existing) > 1:
        raise NnppError(f"dataset id {dataset_id} is ambiguous ({', '.join(existing)}); pass the full DatasetXXX_Name")
    if existing:
        return existing[0]
    for source in (text.strip(), v1_task or ""):
        m = re.fullmatch(r"Task\d+_(\w+)", source)
        if m:
            return f"Dataset{dataset_id:03d}_{m.group(1)}"
    raise NnppError(f"dataset {text} does not exist in the nnU-Net folders and the v1 folder names no TaskXXX_Name; "
                    f"pass the full target name, e.g. Dataset{dataset_id:03d}_Liver")


def _write_json_atomic(obj: dict, path: str, overwrite: bool) -> bool:
    """Write ``obj`` to ``path`` (temp + rename). An existing different file is an error unless ``overwrite``;
    an identical one is left alone. Returns True when written."""
    text = json.dumps(obj, indent=2, sort_keys=False)
    if os.path.isfile(path):
        with open(path) as f:
            try:
                same = json.load(f) == json.loads(text)
            except json.JSONDecodeError:
                same = False
        if same:
            return False
        if not overwrite:
            raise NnppError(f"{path} exists and differs from the converted one; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def build_network(plans: dict, dataset_json: dict, configuration: str, trainer_class, deep_supervision=True):
    """The network exactly as nnU-Net's predictor builds it from a model folder's plans and dataset.json."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnpp.model_folder import build_network as build, io_channels
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    return build(trainer_class, pm, cm, *io_channels(pm, cm, dataset_json), deep_supervision)


def v2_checkpoint(network, weights: dict, plans: dict, dataset_json: dict, configuration: str, fold,
                  trainer_name: str, epoch: int) -> dict:
    """The dict nnU-Net v2's trainer saves (``nnUNetTrainer.save_checkpoint``): fresh optimizer state (SGD as
    nnUNetTrainer configures it, no momentum) and empty logs, so ``--val`` / ``--c`` can load it too."""
    import torch
    from nnunetv2.training.logging.nnunet_logger import LocalLogger
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    ndim = len(plans["configurations"][configuration]["patch_size"])
    return {
        "network_weights": weights,
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": None,
        "logging": LocalLogger().get_checkpoint(),
        "_best_ema": None,
        "current_epoch": int(epoch),
        "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset_json,
                      "device": torch.device("cpu")},
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": tuple(range(ndim)),  # v1 nnUNetTrainerV2 mirrored every axis
    }


def _prepare_preprocessed_dataset_json(dataset_name: str, ds_json: dict, log) -> None:
    """nnUNetv2_preprocess reads ``nnUNet_preprocessed/DATASET/dataset.json`` (nnU-Net's fingerprint step copies
    it from nnUNet_raw): copy it when missing, after checking the raw dataset has the model's labels/channels."""
    import shutil

    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    raw = os.path.join(nnUNet_raw, dataset_name, "dataset.json") if nnUNet_raw else None
    if not raw or not os.path.isfile(raw):
        log(f"note: no v2 raw dataset {dataset_name} in nnUNet_raw; to validate, convert the v1 task with "
            f"nnUNetv2_convert_old_nnUNet_dataset first, then preprocess with these plans")
        return
    from nnpp.file_safety import load_json_file
    raw_json = load_json_file(raw, "dataset.json")
    if sorted(raw_json.get("labels", {}).values()) != sorted(ds_json["labels"].values()) or \
            len(raw_json.get("channel_names", {})) != len(ds_json["channel_names"]):
        raise NnppError(f"{raw} (labels {raw_json.get('labels')}, channels {raw_json.get('channel_names')}) does not "
                        f"fit the model (labels {ds_json['labels']}, channels {ds_json['channel_names']}); convert "
                        f"into the dataset the v1 model was trained on")
    target = os.path.join(nnUNet_preprocessed, dataset_name, "dataset.json")
    if not os.path.isfile(target):
        tmp = target + ".tmp"
        shutil.copyfile(raw, tmp)
        os.replace(tmp, target)
        log(f"dataset.json copied to {target}")


def convert_v1_model(v1_folder: str, dataset: str, configuration: str | None = None, folds=None,
                     trainer: str | None = None, plans_name: str | None = None, dataset_json: str | None = None,
                     checkpoints=("model_final_checkpoint", "model_best"), to_preprocessed: bool = False,
                     overwrite: bool = False, log=print) -> str:
    """Convert (see module doc); returns the v2 model folder. Needs ``nnUNet_results`` set (nnpp.paths)."""
    src = inspect_v1_folder(v1_folder)
    configuration, folds = _checked_request(src, configuration, folds)
    plans_name = plans_name or src.plans_name
    trainer_name = trainer or V1_UNETPP_TRAINERS[src.trainer]
    v1_plans = _load_v1_plans(src)
    jobs = _checkpoints_to_convert(src, folds, checkpoints)

    from nnunetv2.paths import nnUNet_results
    stage, batch_dice = _v1_stage(v1_plans, configuration, jobs[0][3])
    dataset_name = resolve_dataset_name(dataset, src.task)
    ds_json, notes = _v2_dataset_json(src, dataset_json, v1_plans, log)
    out = os.path.join(nnUNet_results, dataset_name, f"{trainer_name}__{plans_name}__{configuration}")
    targets = _v2_checkpoint_files(out, jobs, overwrite)

    from nnpp.model_folder import find_trainer_class
    trainer_class = find_trainer_class(trainer_name)
    plans_args = dict(stage=stage, configuration=configuration, dataset_name=dataset_name, plans_name=plans_name,
                      unetpp=True, batch_dice=batch_dice, source=str(src.path))
    plans, converted = _convert_checkpoints(jobs, v1_plans, plans_args, ds_json, trainer_class, trainer_name, notes)
    _write_model_folder(out, plans, ds_json, converted, targets, overwrite, log)
    if to_preprocessed:
        _copy_plans_to_preprocessed(plans, ds_json, dataset_name, plans_name, overwrite, log)
        did = int(dataset_name[len("Dataset"):len("Dataset") + 3])
        log(f"to validate: nnUNetv2_preprocess -d {did} -plans_name {plans_name} -c {configuration}, then "
            f"nnpp_train {did} {configuration} {folds[0]} -tr {trainer_name} -p {plans_name} --val")
    for note in plans["nnpp_v1_notes"]:
        log(f"note: {note}")
    _check_written_folder(out, configuration, trainer_class, targets)
    return out


def _checked_request(src: V1Folder, configuration: str | None, folds) -> tuple[str, list]:
    """The configuration (given, or from the v1 folder's place) and the folds (given, or all) to convert; one line
    when the configuration cannot be told, the v1 trainer is not a UNet++ one nnpp knows, or a fold is missing."""
    configuration = configuration or src.configuration
    if configuration is None:
        raise NnppError(f"cannot tell the configuration from {src.path} (not under .../nnUNet/CONFIG/TaskXXX/); "
                        f"pass -c 3d_fullres (or 2d, 3d_lowres)")
    if src.trainer not in V1_UNETPP_TRAINERS:
        raise NnppError(f"v1 trainer '{src.trainer}' is not one nnpp_convert_v1_model knows (UNet++: "
                        f"{', '.join(V1_UNETPP_TRAINERS)}); its network may differ from the official UNet++, so it "
                        f"is not converted")
    folds = [str(f) for f in folds] if folds else sorted(src.folds)
    missing = [f for f in folds if f not in src.folds]
    if missing:
        raise NnppError(f"fold(s) {', '.join(missing)} not in {src.path} (it has fold(s) {', '.join(sorted(src.folds))})")
    return configuration, folds


def _load_v1_plans(src: V1Folder) -> dict:
    v1_plans = load_v1_pickle(str(src.path / "plans.pkl"), "v1 plans")
    if not isinstance(v1_plans, dict):
        raise NnppError(f"{src.path / 'plans.pkl'} holds a {type(v1_plans).__name__}, not v1 plans")
    return v1_plans


def _checkpoints_to_convert(src: V1Folder, folds: list, checkpoints) -> list:
    """(fold, v1 stem, .model path, its .model.pkl info) of each checkpoint to convert; one line for a checkpoint
    of another trainer or a fold with none of ``checkpoints``."""
    jobs = []
    for fold in folds:
        for stem in checkpoints:
            model = src.folds[fold].get(stem)
            if model is None:
                continue
            info = load_v1_pickle(str(model) + ".pkl", f"v1 model info ({model.name}.pkl, written beside every "
                                                       f"v1 checkpoint)")
            name = info.get("name") if isinstance(info, dict) else None
            if name != src.trainer:
                raise NnppError(f"{model}.pkl names trainer '{name}' but the folder is {src.trainer}'s; the folder "
                                f"is mixed up, copy it again")
            jobs.append((fold, stem, model, info))
        if not any(j[0] == fold for j in jobs):
            raise NnppError(f"fold_{fold} has none of {', '.join(s + '.model' for s in checkpoints)}")
    return jobs


def _v1_stage(v1_plans: dict, configuration: str, info: dict) -> tuple:
    """The v1 plans stage the model was trained on and its batch Dice, from the trainer's init arguments saved in
    a checkpoint's info (the configuration's defaults where they are missing)."""
    init = info.get("init") or ()
    stage = pick_stage(v1_plans, configuration, init[5] if len(init) > 5 else None)
    batch_dice = bool(init[4]) if len(init) > 4 else configuration in ("2d", "3d_lowres")
    return stage, batch_dice


def _v2_dataset_json(src: V1Folder, explicit: str | None, v1_plans: dict, log) -> tuple[dict, list]:
    """The v2 dataset.json (from the v1 one where found) and the notes of the conversion so far."""
    v1_dataset, found_at = find_v1_dataset_json(src, explicit)
    ds_json, notes = convert_dataset_json(v1_dataset, v1_plans)
    if found_at:
        log(f"labels and channels from {found_at}")
    if (src.path / "postprocessing.json").is_file():
        notes.append(f"v1 post-processing ({src.path / 'postprocessing.json'}) is not carried over: nnU-Net v2 "
                     f"decides it with nnUNetv2_determine_postprocessing after validation")
    return ds_json, notes


def _v2_checkpoint_files(out: str, jobs: list, overwrite: bool) -> list:
    """The v2 checkpoint file of each job; one line when one exists and ``overwrite`` is off."""
    targets = [os.path.join(out, f"fold_{fold}", CHECKPOINTS[stem]) for fold, stem, _, _ in jobs]
    existing = [t for t in targets if os.path.isfile(t)]
    if existing and not overwrite:
        raise NnppError(f"{existing[0]} exists; pass --overwrite to replace the converted checkpoint(s)")
    return targets


def _convert_checkpoints(jobs: list, v1_plans: dict, plans_args: dict, ds_json: dict, trainer_class,
                         trainer_name: str, notes: list) -> tuple[dict, list]:
    """Each v1 checkpoint as a v2 checkpoint of the network built from the converted plans (``plans_args``: the
    keywords of :func:`nnpp.convert.v1_plans.convert_plans` but the features, which come from the weights), its
    weights loaded strictly. Every checkpoint must need the same plans. Returns the plans (with the notes of the
    conversion, ``nnpp_v1_notes``) and (fold, v1 stem, .model path, v2 checkpoint) of each job."""
    configuration = plans_args["configuration"]
    converted, plans = [], None
    for fold, stem, model, info in jobs:
        ckpt = load_v1_checkpoint(str(model))
        state = strip_module_prefix(ckpt["state_dict"])
        n_stages, n_conv, features = _checked_v1_layout(state, v1_plans, plans_args["stage"], model, notes)
        fold_plans, plan_notes = convert_plans(v1_plans, features=features, **plans_args)
        if plans is not None and fold_plans != plans:
            raise NnppError(f"{model} needs different plans than the first converted checkpoint (features "
                            f"{features}); convert its fold on its own (-f {fold}) into another -p name")
        plans = fold_plans
        network = build_network(plans, ds_json, configuration, trainer_class)
        weights = map_state_dict(state, v1_unetpp_module_map(n_stages, n_conv), network)
        network.load_state_dict(weights, strict=True)
        checkpoint = v2_checkpoint(network, weights, plans, ds_json, configuration,
                                   fold if fold == "all" else int(fold), trainer_name, ckpt.get("epoch", 0))
        converted.append((fold, stem, model, checkpoint))
    notes = list(dict.fromkeys(notes + plan_notes))
    plans["nnpp_v1_notes"] = notes
    for _, _, _, checkpoint in converted:
        checkpoint["init_args"]["plans"] = plans
    return plans, converted


def _checked_v1_layout(state: dict, v1_plans: dict, stage: int, model, notes: list) -> tuple[int, int, list]:
    """(stages, convolutions per stage, features per stage) of the v1 UNet++ weights ``state``, checked against the
    v1 plans' stage; a feature cap other than v1's default is taken from the weights, with a note."""
    n_stages, n_conv = v1_unetpp_layout(state)
    sp = v1_plans["plans_per_stage"][stage]
    if n_stages != len(sp["pool_op_kernel_sizes"]) + 1 or n_conv != int(v1_plans.get("conv_per_stage", 2)):
        raise NnppError(f"shape mismatch: {model} holds a {n_stages}-stage UNet++ with {n_conv} convs per stage, "
                        f"the v1 plans stage {stage} a {len(sp['pool_op_kernel_sizes']) + 1}-stage one with "
                        f"{v1_plans.get('conv_per_stage', 2)}; the plans.pkl belongs to another model")
    features = v1_stage_features(state, n_stages, n_conv)
    base = int(v1_plans["base_num_features"])
    ndim = len(sp["patch_size"])
    cap = int(v1_plans.get("max_num_features", V1_MAX_FEATURES[ndim]))
    if features != features_per_stage(base, n_stages, cap):
        if features == features_per_stage(base, n_stages, max(features)):
            notes.append(f"the checkpoint caps features at {max(features)} (v1's default maximum is {cap}); "
                         f"features_per_stage {features} taken from the weights")
        else:
            raise NnppError(f"shape mismatch: {model} has stage features {features}, the v1 plans (base {base}, "
                            f"max {cap}) give {features_per_stage(base, n_stages, cap)}")
    return n_stages, n_conv, features


def _write_model_folder(out: str, plans: dict, ds_json: dict, converted: list, targets: list, overwrite: bool,
                        log) -> None:
    _write_json_atomic(plans, os.path.join(out, "plans.json"), overwrite)
    _write_json_atomic(ds_json, os.path.join(out, "dataset.json"), overwrite)
    for (fold, stem, model, checkpoint), target in zip(converted, targets):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        atomic_torch_save(checkpoint, target)
        log(f"fold {fold}: {model.name} (epoch {checkpoint['current_epoch']}) -> {target}")


def _copy_plans_to_preprocessed(plans: dict, ds_json: dict, dataset_name: str, plans_name: str, overwrite: bool,
                                log) -> None:
    """The converted plans (and the raw dataset.json) where nnUNetv2_preprocess reads them."""
    from nnunetv2.paths import nnUNet_preprocessed
    if not nnUNet_preprocessed:
        raise NnppError("--to_preprocessed needs nnUNet_preprocessed set")
    target = os.path.join(nnUNet_preprocessed, dataset_name, plans_name + ".json")
    if _write_json_atomic(plans, target, overwrite):
        log(f"plans copied to {target}")
    _prepare_preprocessed_dataset_json(dataset_name, ds_json, log)


def _check_written_folder(out: str, configuration: str, trainer_class, targets: list) -> None:
    """Read back what was written, the predictor's way: the network from the written plans.json and dataset.json,
    every written checkpoint loaded into it strictly."""
    import torch
    with open(os.path.join(out, "plans.json")) as f:
        plans_back = json.load(f)
    with open(os.path.join(out, "dataset.json")) as f:
        ds_back = json.load(f)
    net = build_network(plans_back, ds_back, configuration, trainer_class)
    for target in targets:
        net.load_state_dict(torch.load(target, map_location="cpu", weights_only=False)["network_weights"], strict=True)
