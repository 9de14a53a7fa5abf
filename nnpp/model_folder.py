"""A trained nnU-Net model folder, rebuilt exactly as nnU-Net's predictor rebuilds it.

``plans.json`` + ``dataset.json`` + the checkpoint's ``trainer_name`` -> that trainer class's static
``build_network_architecture(plans_manager, configuration_manager, n_in, n_out, enable_deep_supervision=False)``
-> ``load_state_dict(strict=True)`` for every fold. Never from command-line architecture flags, so an export or a
prediction cannot drift from what was trained: a plans.json whose configuration differs from the one stored in
the checkpoint, a checkpoint that does not fit the rebuilt network, or folds of different runs are refused with
one line (:class:`nnpp.NnppError`).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from dataclasses import dataclass, field

from torch import nn

from nnpp import NnppError
from nnpp.checkpoints import load_checkpoint
from nnpp.saved_settings import setting_of


#: every trainer nnpp defines -> the module that defines it (imported on first use, so this bottom module imports
#: nothing above it; nnpp.training registers its trainers, nnpp.distill.trainer the distillation students)
NNPP_TRAINER_MODULES = {
    **{name: "nnpp.training.nnUNetPlusPlusTrainer" for name in (
        "nnUNetPlusPlusTrainer", "nnUNetPlusPlusTrainerV2", "nnUNetPlusPlusTrainerDDP", "nnUNetPlusPlusTrainerV2_hypDDP")},
    **{name: "nnpp.distill.trainer" for name in ("nnUNetPlusPlusTrainerKD", "nnUNetTrainerKD",
                                                 "nnUNetPlusPlusTrainerKDDDP", "nnUNetTrainerKDDDP",
                                                 "nnUNetTrainerNoKD")},
    "nnUNetPlusPlusTrainerPrune": "nnpp.distill.prune",
}
#: what a pruned depth's checkpoint records about its pruning (nnpp_prune; its key in the checkpoint)
PRUNE_KEY = "nnpp_prune"


def pruned_checkpoint(folder: str, fold, depth: int) -> str:
    """The checkpoint nnpp_prune saves for depth ``depth`` of model ``folder``'s fold ``fold`` (the whole network's
    weights, the sub-network X^{0,depth} distilled; its run lives in the same folder)."""
    return os.path.join(folder, f"fold_{fold}", f"prune_depth{depth}", "checkpoint_final.pth")


def find_trainer_class(name: str):
    """A trainer class by name: one of nnpp's (:data:`NNPP_TRAINER_MODULES`), else any trainer nnU-Net itself can
    find (its own package, the folders in ``nnUNet_extTrainer``). Unknown name -> NnppError."""
    if name in NNPP_TRAINER_MODULES:
        return getattr(importlib.import_module(NNPP_TRAINER_MODULES[name]), name)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        raise NnppError(f"unknown trainer '{name}'; use one of {', '.join(NNPP_TRAINER_MODULES)} or an nnU-Net "
                        f"trainer class name (e.g. nnUNetTrainer)") from None


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _json_normal(obj):
    """What ``obj`` looks like after a JSON round trip (tuples -> lists), for comparisons with files."""
    return json.loads(json.dumps(obj))


def load_model_json(path: str, what: str) -> dict:
    """A model folder's JSON file (nnpp.file_safety.load_json_file with model-folder hints)."""
    from nnpp.file_safety import load_json_file
    return load_json_file(path, what, missing_hint="is this an nnU-Net model folder (TRAINER__PLANS__CONFIG with "
                          "plans.json, dataset.json, fold_F/)?", fix="restore it from the training run")


def build_network(trainer_class, plans_manager, configuration_manager, num_input_channels: int,
                  num_output_channels: int, deep_supervision: bool = False) -> nn.Module:
    """The trainer's static ``build_network_architecture`` (nnU-Net's predictor's call: deep supervision off by
    default; old signature included)."""
    sig = inspect.signature(trainer_class.build_network_architecture)
    if "plans_manager" in sig.parameters:
        return trainer_class.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision=deep_supervision)
    return trainer_class.build_network_architecture(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
        enable_deep_supervision=deep_supervision)


def io_channels(plans_manager, configuration_manager, dataset_json: dict) -> tuple[int, int]:
    """(input channels, segmentation heads) of a model, as nnU-Net's predictor determines them."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    return (determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads)


def load_strict(network: nn.Module, weights: dict, checkpoint: str, trainer_name: str) -> None:
    """``network.load_state_dict(weights, strict=True)``; a mismatch becomes one line naming the first keys."""
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        own = network.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in weights and hasattr(weights[k], "shape") and tuple(weights[k].shape) != tuple(own[k].shape)]
        parts = [f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("size mismatch", shapes)) if keys]
        detail = "; ".join(parts) or str(e).splitlines()[0]
        raise NnppError(f"checkpoint {checkpoint} does not match the network that plans.json + {trainer_name} build "
                        f"({detail}); the model folder was edited or mixes runs: restore plans.json/dataset.json "
                        f"from the training run") from None


@dataclass
class TrainedModel:
    """Everything nnU-Net's predictor needs, read from a model folder and checked fold by fold.

    ``parameters[i]`` is the state dict of ``folds[i]``; ``checkpoint_sha256[i]`` the hash of its file.
    """
    folder: str
    folds: list
    checkpoint_name: str
    checkpoints: list
    checkpoint_sha256: list
    parameters: list
    plans: dict
    dataset_json: dict
    plans_manager: object
    configuration_manager: object
    configuration: str
    trainer_name: str
    trainer_class: type
    num_input_channels: int
    num_output_channels: int
    inference_allowed_mirroring_axes: tuple | None
    extra: dict = field(default_factory=dict)

    def build_network(self, fold_index: int = 0) -> nn.Module:
        """A fresh network (deep supervision off, eval mode) holding fold ``fold_index``'s weights, loaded strictly."""
        net = build_network(self.trainer_class, self.plans_manager, self.configuration_manager,
                            self.num_input_channels, self.num_output_channels)
        load_strict(net, self.parameters[fold_index], self.checkpoints[fold_index], self.trainer_name)
        return net.eval()

    @property
    def patch_size(self) -> list:
        return list(self.configuration_manager.patch_size)


def load_trained_model(folder: str, folds, checkpoint_name: str = "checkpoint_final.pth",
                       depth: int | None = None) -> TrainedModel:
    """Read ``folder`` (``.../TRAINER__PLANS__CONFIG``) for ``folds`` and check that every fold's weights fit the
    network the folder's plans build (strict load) and that plans.json/dataset.json are the ones each checkpoint
    was trained with. Raises NnppError naming the file and what to do. With ``depth``, a fold whose depth was
    distilled by nnpp_prune from this very checkpoint (:func:`pruned_checkpoint`) gets the distilled weights
    (``extra["distilled_folds"]``; ``checkpoints``/``checkpoint_sha256`` then name the distilled file)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folds = [str(f) for f in folds]
    if not folds:
        raise NnppError(f"no folds given for {folder}; pass -f 0 [1 ...]")
    missing = [f for f in folds if not os.path.isfile(os.path.join(folder, f"fold_{f}", checkpoint_name))]
    if missing:
        raise NnppError(f"no {checkpoint_name} for fold(s) {', '.join(missing)} in {folder}; train them or pass "
                        f"-f with the trained folds (or check -d/-c/-tr/-p)")
    plans = load_model_json(os.path.join(folder, "plans.json"), "plans.json")
    dataset_json = load_model_json(os.path.join(folder, "dataset.json"), "dataset.json")
    plans_manager = PlansManager(plans)

    named = os.path.basename(os.path.normpath(folder)).split("__")  # nnU-Net's TRAINER__PLANS__CONFIG
    checkpoints, hashes, parameters, run_settings = [], [], [], []
    trainer_name = configuration = mirror_axes = None
    for f in folds:
        path = os.path.join(folder, f"fold_{f}", checkpoint_name)
        ckpt = load_checkpoint(path)
        init = ckpt["init_args"]
        if trainer_name is None:
            trainer_name, configuration = ckpt["trainer_name"], init.get("configuration")
            mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
        elif (ckpt["trainer_name"], init.get("configuration")) != (trainer_name, configuration):
            raise NnppError(f"{path} comes from {ckpt['trainer_name']} / {init.get('configuration')} but fold "
                            f"{folds[0]} from {trainer_name} / {configuration}; the folds of one model folder must "
                            f"come from one trainer and configuration")
        if len(named) == 3 and (ckpt["trainer_name"], init.get("configuration")) != (named[0], named[2]):
            raise NnppError(f"{path} was written by {ckpt['trainer_name']} / {init.get('configuration')}, but this is "
                            f"the {named[0]} / {named[2]} model folder; it mixes runs: put each checkpoint back in "
                            f"its own TRAINER__PLANS__CONFIG folder")
        if configuration not in plans.get("configurations", {}):
            raise NnppError(f"{path} was trained with configuration '{configuration}', which plans.json in {folder} "
                            f"does not have; restore plans.json from the training run")
        # the plans and labels stored in the checkpoint are the ones the weights were trained with
        if "plans" in init:
            trained_cfg = PlansManager(init["plans"]).get_configuration(configuration).configuration
            here_cfg = plans_manager.get_configuration(configuration).configuration
            diff = sorted(k for k in set(trained_cfg) | set(here_cfg) if k != "batch_size"
                          and _json_normal(trained_cfg.get(k)) != _json_normal(here_cfg.get(k)))
            if diff:
                raise NnppError(f"plans.json in {folder} differs from the plans {path} was trained with (configuration "
                                f"'{configuration}': {', '.join(diff)}); restore plans.json from the training run")
        if "dataset_json" in init and _json_normal(init["dataset_json"].get("labels")) != \
                _json_normal(dataset_json.get("labels")):
            raise NnppError(f"dataset.json in {folder} has labels {dataset_json.get('labels')} but {path} was "
                            f"trained with {init['dataset_json'].get('labels')}; restore dataset.json")
        checkpoints.append(path)
        hashes.append(sha256_file(path))
        parameters.append(ckpt["network_weights"])
        run_settings.append(ckpt.get("nnpp_run_settings") or {})

    distilled = _use_distilled_depth(folder, folds, checkpoint_name, depth, checkpoints, hashes, parameters) \
        if depth else []
    configuration_manager = plans_manager.get_configuration(configuration)
    trainer_class = find_trainer_class(trainer_name)
    n_in, n_out = io_channels(plans_manager, configuration_manager, dataset_json)
    model = TrainedModel(
        folder=folder, folds=folds, checkpoint_name=checkpoint_name, checkpoints=checkpoints,
        checkpoint_sha256=hashes, parameters=parameters, plans=plans, dataset_json=dataset_json,
        plans_manager=plans_manager, configuration_manager=configuration_manager, configuration=configuration,
        trainer_name=trainer_name, trainer_class=trainer_class,
        num_input_channels=n_in, num_output_channels=n_out,
        inference_allowed_mirroring_axes=tuple(mirror_axes) if mirror_axes is not None else None,
        extra={"run_settings": run_settings, "distilled_folds": distilled})
    net = build_network(trainer_class, plans_manager, configuration_manager, model.num_input_channels,
                        model.num_output_channels)
    for weights, path in zip(parameters, checkpoints):
        load_strict(net, weights, path, trainer_name)
    return model


def _use_distilled_depth(folder: str, folds: list, checkpoint_name: str, depth: int, checkpoints: list, hashes: list,
                         parameters: list) -> list:
    """Swap in, fold by fold, the weights nnpp_prune distilled for ``depth`` from the fold's ``checkpoint_name``;
    returns the folds swapped. A distillation from another checkpoint (retrained since, or another -chk) is refused."""
    distilled = []
    for i, f in enumerate(folds):
        path = pruned_checkpoint(folder, f, depth)
        if not os.path.isfile(path):
            continue
        ckpt = load_checkpoint(path)
        record = ckpt.get(PRUNE_KEY) or {}
        if record.get("depth") != depth or record.get("source_sha256") != hashes[i]:
            raise NnppError(f"{path} was distilled from another checkpoint than {checkpoints[i]} (the model was "
                            f"retrained since, or -chk names another): run nnpp_prune ... {f} --depth {depth} -chk "
                            f"{checkpoint_name} again")
        checkpoints[i], hashes[i], parameters[i] = path, sha256_file(path), ckpt["network_weights"]
        distilled.append(f)
    return distilled


def check_depth(model: TrainedModel, depth: int | None, full_depth: int | None, allow_untrained: bool = False,
                log=print) -> str:
    """How ``model`` at ``depth`` was obtained, as nnpp_export records it (``depth_from``): "full" (not pruned),
    "distilled" (every fold's depth distilled by nnpp_prune: the model was loaded with ``depth``), "trained" (a head
    trained with the network), "untrained" (a probe, allowed) or "unknown". A depth below ``full_depth`` of a model
    whose shallow heads were probes (``nnpp_train --shallow_heads probe``, the default; a run that recorded none
    trained them) is refused with one line: the probes' loss never trained the network, and such pruned networks
    scored near 0 Dice on a real CT (benchmarks/RESULTS.md). ``allow_untrained`` runs it anyway, with a warning. A
    model that recorded no nnpp run settings at all is "unknown", with a warning."""
    if not depth or not full_depth or depth >= full_depth:
        return "full"
    distilled = model.extra.get("distilled_folds") or []
    if distilled and set(distilled) == set(model.folds):
        return "distilled"
    settings = model.extra.get("run_settings") or []
    if not any(settings):  # no nnpp run recorded how its heads trained (nnU-Net's or a converted v1 model)
        log(f"WARNING: depth {depth} < {full_depth}: this model records no nnpp run settings, so whether its head "
            f"X^{{0,{depth}}} trained is unknown; judge the pruned network's Dice before using it")
        return "unknown"
    if not any(setting_of(s, "shallow_heads") == "probe" for s in settings):
        return "trained"
    missing = [f for f in model.folds if f not in distilled]
    said = (f"depth {depth} < {full_depth}: this model's head X^{{0,{depth}}} was trained as a probe (nnpp_train "
            f"--shallow_heads probe, the default), the network never learned for it")
    if not allow_untrained:
        raise NnppError(f"--{said}; distil the depth first (nnpp_prune DATASET CONFIG FOLD --depth {depth} for fold(s) "
                        f"{', '.join(missing)}), or pass --allow_untrained_depth to run it anyway")
    log(f"WARNING: {said}; running it because of --allow_untrained_depth")
    return "untrained"


def set_depth(network: nn.Module, depth: int | None) -> nn.Module:
    """Prune a UNet++ to ``depth`` k (its ``prune_depth``: only the nodes X^{0,k} needs run); None = full depth.
    Raises NnppError for networks without pruning (nnU-Net's U-Net) or k outside 1..L."""
    if depth is None:
        return network
    if not hasattr(network, "prune_depth") or not hasattr(network, "depth"):
        raise NnppError(f"--depth is a UNet++ option; {type(network).__name__} cannot be pruned: drop --depth")
    if not 1 <= depth <= network.depth:
        raise NnppError(f"--depth {depth} is out of range: this UNet++ has depth L = {network.depth}, use 1..{network.depth}")
    network.prune_depth = depth
    return network
