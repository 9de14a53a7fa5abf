"""nnUNetPlusPlusTrainer: nnU-Net v2's trainer with a UNet++ network and deep supervision on every head.

What differs from ``nnUNetTrainer`` (everything else is nnU-Net's: data loading, augmentation, poly LR,
SGD, checkpoints, ``progress.png``, validation and ``summary.json``):

* Network: :class:`nnpp.nets.UNetPlusPlus` built from the plans' PlainConvUNet arguments, or the class that
  UNet++ plans name (``nnpp_plan_and_preprocess``: UNet++-sized patch, optional ``checkpoint_nodes``).
* Deep supervision: UNet++ heads X^{0,1..L} all predict at full resolution, so every head is trained
  against the one full-resolution target: the data pipeline makes no per-head targets (nnU-Net's pipeline
  without deep-supervision scales: one target tensor through collate, worker IPC, pinning and the host-to-
  device copy), and the loss (:class:`SharedTargetDeepSupervision`) pairs every head with that same tensor.
* Head weights: nnU-Net's halving from X^{0,L} down (1, 1/2, 1/4, ... normalised: X^{0,L}, the head that predicts,
  gets about half), but every head non-zero, so every head gets a gradient (nnU-Net's own weights would give the
  last output 0, which is why the reference UNet++ port never trained its deeper nodes). Chosen over the UNet++
  paper's equal 1/L (nnpp's earlier default) with benchmarks/bench_convergence; ``ds_weights`` (nnpp_train
  ``--ds_weights equal|descending|decay``) selects the others (see :meth:`deep_supervision_weights`).
* AMP on every device through :mod:`nnpp.device` (nnU-Net autocasts on CUDA only): ``configure_amp``.
* Memory format from the device layer (channels_last_3d for 3D on the CPU): network and every batch.
* Activation checkpointing of UNet++'s nested nodes: ``checkpoint_nodes`` (nnpp_train ``--checkpoint``; default:
  what the plans say), recorded in the run settings.
* The loss stays on the device: one read per epoch (the epoch mean) instead of one per step.
* torch.compile only where the device layer says it works (CUDA), still switchable with nnUNet_compile.
* Checkpoints are written atomically (temp file + rename); a truncated checkpoint gives one clear error.
* Train throughput (images/s over the training iterations of each epoch) is logged per epoch.

A distillation trainer subclasses this and overrides ``build_network_architecture`` and/or ``_build_loss``.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnpp import NnppError
from nnpp import device as dev
from nnpp.checkpoints import atomic_torch_save, check_checkpoint_file
from nnpp.device import compile_supported, ddp_device_ids, make_amp
from nnpp.distributed import all_reduce_sum, bare_module, split_global_batch, world
from nnpp.nets.plans import PLAIN_UNET_CLASS, UNETPP_CLASS
from nnpp.nets.unetpp import checkpoint_mode
from nnpp.saved_settings import DS_WEIGHTS, SHALLOW_HEADS, UNRECORDED, setting_of, settings_to_record
from nnpp.training.deep_supervision import SharedTargetDeepSupervision


class nnUNetPlusPlusTrainer(nnUNetTrainer):
    #: under DDP: True (--dbs) splits the plans batch across ranks as nnU-Net does; False gives every rank
    #: the plans batch (the global batch is then world_size x plans batch)
    distribute_batch = False
    #: activation checkpointing of UNet++'s nested nodes ("none", "node", "cat_conv1"); None: as the plans say
    checkpoint_nodes: str | None = None
    #: deep-supervision head weights, one of DS_WEIGHTS (nnpp_train --ds_weights; see deep_supervision_weights).
    #: "descending" by benchmarks/bench_convergence (documentation/training.md "Deep supervision weights"); runs that recorded none
    #: trained with "equal" (nnpp.saved_settings.UNRECORDED)
    ds_weights: str = "descending"
    #: how the heads X^{0,1..L-1} learn (nnpp_train --shallow_heads): "probe" (the default) -- their loss reaches
    #: only the head (a 1x1 conv on the node's detached features), the network learns from X^{0,L}'s loss at
    #: weight 1; "trained" -- their loss trains the network too (the UNet++ paper's deep supervision, and what runs
    #: that recorded none trained with; on a real CT it fitted only the liver, see documentation/training.md "Deep supervision of UNet++")
    shallow_heads: str = "probe"
    #: the --seed the run was started with (recorded in the run settings; None: not seeded)
    seed: int | None = None
    #: final validation: at most this many tiles x mirrored copies per network call (nnpp_train --tta_batch;
    #: None: nnppPredictor's choice per case, up to 8 within 1.1x nnU-Net's logits memory; 1 is nnU-Net's one call
    #: per copy)
    tta_batch: int | None = None
    #: True when the caller resolved a continued run's settings itself (nnpp_train: flags against the saved ones);
    #: False (nnU-Net's own ``nnUNetv2_train --c`` through nnUNet_extTrainer): load_checkpoint restores the settings
    #: that change what is trained (see restore_run_settings) from the checkpoint
    settings_resolved: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnU-Net pins cuda to index 0 (or to the rank under DDP); keep the device the device layer chose.
        self.device = device
        self.configure_amp("auto")
        self.train_fps: list[float] = []
        self.memory_format = torch.contiguous_format  # set by the device layer in initialize()
        self._train_epoch_t0 = None

    # ------------------------------------------------------------------------------------- configuration
    def configure_amp(self, mode: str) -> None:
        """AMP mode O0 | O1 | bf16 | auto (see nnpp.device). Call before training or loading a checkpoint."""
        self.amp = make_amp(mode, self.device)
        self.grad_scaler = self.amp.scaler
        self.print_to_log_file(f"AMP mode: {self.amp.mode} on {self.device}", also_print_to_console=False)

    @property
    def num_heads(self) -> int:
        """L, the number of UNet++ heads: the network's own depth (DDP / torch.compile wrappers unwrapped)."""
        return self.bare_network.depth

    @property
    def bare_network(self) -> nn.Module:
        """The network itself, DDP and torch.compile wrappers removed (what checkpoints store)."""
        return bare_module(self.network)

    def run_settings(self) -> dict:
        """What a ``--c`` must reuse, saved in every checkpoint under ``nnpp_run_settings``. Keys are the argparse
        dests of nnpp_train's flags (nnpp.run.train resolves them on resume); subclasses add their own."""
        settings = {"epochs": self.num_epochs, "iters": self.num_iterations_per_epoch,
                    "val_iters": self.num_val_iterations_per_epoch, "amp": self.amp.mode,
                    "dbs": bool(self.distribute_batch), "checkpoint": self.activation_checkpointing}
        if self.uses_ds_weights:  # only what differs from an unrecorded setting's meaning (nnpp.saved_settings)
            settings.update(settings_to_record({key: getattr(self, key) for key in UNRECORDED}))
        if self.seed is not None:
            settings["seed"] = self.seed
        return settings

    @property
    def activation_checkpointing(self) -> str:
        """The checkpointing the network runs with: the ``checkpoint_nodes`` setting, else the plans' value."""
        decoder = getattr(self.bare_network, "decoder", None) if self.was_initialized else None
        if hasattr(decoder, "checkpoint_nodes"):
            return decoder.checkpoint_nodes
        if self.checkpoint_nodes is not None:
            return checkpoint_mode(self.checkpoint_nodes)
        return checkpoint_mode(self.configuration_manager.network_arch_init_kwargs.get("checkpoint_nodes"))

    @property
    def uses_ds_weights(self) -> bool:
        """Whether this trainer's head weights come from ``ds_weights`` (a subclass with its own
        ``deep_supervision_weights``, e.g. the U-Net student's nnU-Net weights, neither uses nor records it)."""
        return type(self).deep_supervision_weights is nnUNetPlusPlusTrainer.deep_supervision_weights

    def restore_run_settings(self, settings: dict) -> None:
        """Continue an nnpp run with what it was trained with (its checkpoint's ``nnpp_run_settings``) where that
        changes the loss: the head weights and how the shallow heads learn, an unrecorded one read as
        :data:`nnpp.saved_settings.UNRECORDED` says, not today's defaults. Called by :meth:`load_checkpoint` unless
        :attr:`settings_resolved`; rebuilds the loss if built."""
        if not self.uses_ds_weights:
            return
        changed = False
        for key in UNRECORDED:
            saved = setting_of(settings, key)
            if saved != getattr(self, key):
                self.print_to_log_file(f"continuing with the run's own {key} {saved} (saved in its checkpoint; this "
                                       f"trainer's default is {getattr(self, key)})")
                setattr(self, key, saved)
                changed = True
        if changed and self.was_initialized:
            self._configure_network()
            self.loss = self._build_loss()

    def checkpoint_extras(self) -> dict:
        """Extra top-level checkpoint entries (subclasses: KD modules under their own key)."""
        return {}

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        """Restore what :meth:`checkpoint_extras` saved; called after nnU-Net restored network and optimizer."""

    def deep_supervision_weights(self) -> np.ndarray:
        """Loss weight of each head, in output order (X^{0,L} first), summing to 1 (``ds_weights``):
        ``equal`` 1/L each (the UNet++ paper); ``descending`` nnU-Net's halving from the deepest output down
        (1, 1/2, 1/4, ... normalised; X^{0,L} gets about half) but never 0; ``decay`` equal at the start, the
        other heads' share falling linearly to 0 by the last epoch (X^{0,L} alone at the end)."""
        n = self.num_heads
        if self.ds_weights == "equal":
            w = np.ones(n)
        elif self.ds_weights == "descending":
            w = 0.5 ** np.arange(n)
        elif self.ds_weights == "decay":
            w = np.r_[1.0, np.full(n - 1, 1.0 - self.current_epoch / max(1, self.num_epochs))]
        else:
            raise NnppError(f"ds_weights must be one of {', '.join(DS_WEIGHTS)}, got {self.ds_weights!r}")
        return w / w.sum()

    def loss_head_weights(self) -> np.ndarray:
        """The weights the segmentation loss applies per head (output order): :meth:`deep_supervision_weights`, or
        with ``shallow_heads="probe"`` the same scaled so X^{0,L} weighs 1 (the network learns from X^{0,L}'s loss
        alone, as with deep supervision off; the probes' weights only scale each head's own step)."""
        w = np.asarray(self.deep_supervision_weights(), dtype=float)
        return w / w[0] if self.probe_heads else w

    @property
    def probe_heads(self) -> bool:
        """Whether the shallow heads are probes: ``shallow_heads="probe"`` on a UNet++ whose head weights come from
        ``ds_weights``. A trainer with its own deep supervision (the U-Net student's nnU-Net weights) has no probes
        and trains with nnU-Net's loss whatever ``shallow_heads`` says."""
        return self.uses_ds_weights and self.shallow_heads == "probe"

    # nnU-Net has no public hook for what follows: the private methods overridden here and the attribute flips
    # around nnU-Net's own calls (is_ddp in initialize, enable_deep_supervision in _build_loss, self.network in
    # validation_step) are pinned to nnunetv2 2.8.1's behaviour by tests/test_trainer_pins.py.
    def _set_batch_size_and_oversample(self):
        if self.is_ddp and not self.distribute_batch:
            self.batch_size = self.configuration_manager.batch_size
            return
        if self.is_ddp:
            split_global_batch(self.configuration_manager.batch_size, world()[1])
        super()._set_batch_size_and_oversample()

    def initialize(self):
        # nnU-Net wraps DDP with device_ids=[global rank], which is right for CUDA on one node only: build
        # everything as a single process, then wrap with the device layer's ids (None on the CPU, local index
        # on cuda/npu) and rebuild what depends on DDP (per-rank batch, the Dice's all-gather).
        is_ddp, self.is_ddp = self.is_ddp, False
        try:
            super().initialize()
        finally:
            self.is_ddp = is_ddp
        self._configure_network()
        if is_ddp:
            self._set_batch_size_and_oversample()
            self.network = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(self.network),
                               device_ids=ddp_device_ids(self.device))
            self.loss = self._build_loss()
        n = world()[1]
        self.print_to_log_file(f"batch size {self.batch_size} per rank x {n} rank(s) = global batch "
                               f"{self.batch_size * n}" + (" (--dbs: the plans batch split across the ranks)"
                                                           if is_ddp and self.distribute_batch else ""),
                               also_print_to_console=world()[0] == 0)

    def _configure_network(self) -> None:
        """Checkpointing and memory format of the freshly built network (parameters keep their identity, so the
        optimizer nnU-Net built is unaffected)."""
        net = self.bare_network
        decoder = getattr(net, "decoder", None)
        if self.checkpoint_nodes is not None:
            mode = checkpoint_mode(self.checkpoint_nodes)
            if hasattr(decoder, "checkpoint_nodes"):
                decoder.checkpoint_nodes = mode
            elif mode != "none":
                raise NnppError(f"--checkpoint {mode}: activation checkpointing is a UNet++ option and "
                                f"{type(net).__name__} has none; drop --checkpoint")
        if self.shallow_heads not in SHALLOW_HEADS:
            raise NnppError(f"shallow_heads must be one of {', '.join(SHALLOW_HEADS)}, got {self.shallow_heads!r}")
        if hasattr(decoder, "probe_heads"):
            decoder.probe_heads = self.probe_heads
        self.memory_format = dev.memory_format(self.device, len(self.configuration_manager.patch_size))
        net.to(memory_format=self.memory_format)
        self.print_to_log_file(f"activation checkpointing: {self.activation_checkpointing}; memory format: "
                               f"{str(self.memory_format).replace('torch.', '')}", also_print_to_console=False)

    def _do_i_compile(self) -> bool:
        return compile_supported(self.device) and super()._do_i_compile()

    # ------------------------------------------------------------------------------------- network, loss
    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        kwargs = configuration_manager.network_arch_init_kwargs
        if "n_conv_per_stage" not in kwargs:
            raise NnppError(f"UNet++ is built from PlainConvUNet plans (n_conv_per_stage, ...); these plans "
                            f"describe {configuration_manager.network_arch_class_name}: plan with nnU-Net's "
                            f"default planner (nnUNetPlans)")
        # plans from nnpp's UNet++ planner name UNet++ (or a subclass): build that; nnU-Net's PlainConvUNet plans
        # describe the same arguments: build UNet++ from them
        arch = configuration_manager.network_arch_class_name
        arch = UNETPP_CLASS if arch == PLAIN_UNET_CLASS else arch
        return get_network_from_plans(arch, kwargs, configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    def _get_deep_supervision_scales(self):
        # every UNet++ head predicts at full resolution: the pipeline carries one target, the loss reuses it
        return None

    def _build_loss(self):
        # nnU-Net's Dice + CE (its choice of options and compile handling), without its resolution-based
        # deep-supervision weights; then our weights on top.
        enabled, self.enable_deep_supervision = self.enable_deep_supervision, False
        try:
            loss = super()._build_loss()
        finally:
            self.enable_deep_supervision = enabled
        if enabled:
            loss = SharedTargetDeepSupervision(loss, self.loss_head_weights())
        return loss

    # -------------------------------------------------------------------------------------------- steps
    def _batch_to_device(self, batch: dict):
        data = dev.to_device(batch["data"], self.device).contiguous(memory_format=self.memory_format)
        target = batch["target"]
        if isinstance(target, list):
            target = [dev.to_device(t, self.device) for t in target]
        else:
            target = dev.to_device(target, self.device)
        return data, target

    def train_step(self, batch: dict) -> dict:
        data, target = self._batch_to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp.autocast():
            output = self.network(data)
            if self.enable_deep_supervision and self.probe_heads:
                terms = self.loss.terms(output, target)
                loss, logged = sum(terms), terms[0]
            else:
                loss = logged = self.loss(output, target)
        self.backward_and_step(loss)
        # logged: the loss the network learns from (X^{0,L}'s alone under probe heads, as with deep supervision
        # off); stays on the device, read once per epoch (on_train_epoch_end)
        return {"loss": logged.detach()}

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """nnU-Net's update: backward (through the grad scaler under O1), gradient norm clipped to 12, step. Under
        probe heads the probes are clipped on their own, so their gradients never scale the network's step."""
        self.amp.backward_and_step(loss, self.optimizer, self.clip_groups(), 12)

    def clip_groups(self) -> list:
        """Parameter groups whose gradient norm is clipped each on its own: the whole network, or under probe heads
        the network without the probes, and the probe heads X^{0,1..L-1}."""
        if not (self.enable_deep_supervision and self.probe_heads):
            return [list(self.network.parameters())]
        probes = {id(p) for head in self.bare_network.decoder.seg_layers[:self.num_heads - 1]
                  for p in head.parameters()}
        params = list(self.network.parameters())
        return [[p for p in params if id(p) not in probes], [p for p in params if id(p) in probes]]

    def validation_step(self, batch: dict) -> dict:
        # nnU-Net's step indexes target[0] with deep supervision on: give it the one target as a list of one
        if self.enable_deep_supervision and not isinstance(batch["target"], list):
            batch = {**batch, "target": [batch["target"]]}
        # nnU-Net's pseudo-Dice step. It enters its own fp16 autocast on CUDA; the network call below re-enters
        # the run's AMP mode inside it (the innermost autocast wins), so --amp O0/bf16 hold in validation too.
        network = self.network
        self.network = lambda x: self._forward_in_amp(network, x)
        try:
            return super().validation_step(batch)
        finally:
            self.network = network

    def _forward_in_amp(self, network, x):
        with self.amp.autocast(exclusive=True):
            return network(x.contiguous(memory_format=self.memory_format))

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, with the predictor told what the device layer knows (logits stay on npu
        as on cuda; the run's AMP mode instead of nnU-Net's CUDA-only fp16; batched mirroring bounded by
        ``tta_batch``). See nnpp.predictor."""
        from nnpp.predictor.build import nnunet_validation_uses
        with nnunet_validation_uses(self.amp, self.tta_batch):
            super().perform_actual_validation(save_probabilities)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        loss = getattr(self.loss, "_orig_mod", self.loss)  # torch.compile'd on cuda
        if self.ds_weights == "decay" and isinstance(loss, DeepSupervisionWrapper):  # this epoch's weights
            loss.weight_factors = tuple(self.loss_head_weights())
        self._train_epoch_t0 = time.perf_counter()

    def on_train_epoch_end(self, train_outputs):
        # the epoch's mean loss: one read from the device, which also waits for its queued work, so the wall time
        # below is honest; nnU-Net logs (and under DDP all-gathers) this mean
        losses = [o["loss"] for o in train_outputs]
        if losses and isinstance(losses[0], torch.Tensor):
            train_outputs = [{"loss": torch.stack(losses).float().mean().item()}]
        seconds = time.perf_counter() - self._train_epoch_t0
        per_rank = self.batch_size * self.num_iterations_per_epoch / seconds
        total = all_reduce_sum(per_rank, self.device)  # every rank reaches this (collective)
        self.train_fps.append(total)
        _, n = world()
        self.print_to_log_file(f"train throughput: {total:.2f} img/s total ({n} rank(s), {per_rank:.2f} img/s/rank; "
                               f"{self.num_iterations_per_epoch} iterations, batch {self.batch_size}/rank, "
                               f"{seconds:.1f} s, AMP {self.amp.mode})", also_print_to_console=world()[0] == 0)
        super().on_train_epoch_end(train_outputs)

    # -------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus ``nnpp_run_settings`` and :meth:`checkpoint_extras`, written by global rank 0
        only (as nnU-Net's own, whose ``local_rank`` is ``dist.get_rank()``, the global rank): a fresh temp file,
        fsync, rename, fsync of the folder. Nothing else ever renames, so a ``.tmp`` left by a crashed run is never
        promoted."""
        if world()[0] != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        mod = self.bare_network
        checkpoint = {
            # nnU-Net 2.8's checkpoint layout (nnUNetTrainer.save_checkpoint), so its tools load ours
            "network_weights": mod.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "nnpp_run_settings": self.run_settings(),
            **self.checkpoint_extras(),
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # nnU-Net 2.8 only loads from a file name (its dict branch never binds the checkpoint). The file is also read
        # once memory-mapped here: the run settings before nnU-Net initialises, the extras after it restored network
        # and optimizer (load_state_dict copies them onto the modules' device)
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            check_checkpoint_file(checkpoint)
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
        saved = checkpoint.get("nnpp_run_settings")
        if saved is not None and not self.settings_resolved:  # nnU-Net's own --c (its checkpoints have no settings)
            self.restore_run_settings(saved)
        super().load_checkpoint(filename_or_checkpoint)
        self.load_checkpoint_extras(checkpoint)

    def load_pretrained_weights(self, path: str) -> None:
        """``-pretrained_weights``: nnU-Net's rule (every key but the segmentation heads must exist with the same
        shape; heads are not transferred), loaded onto this trainer's device instead of ``cuda:rank``."""
        if not self.was_initialized:
            self.initialize()
        check_checkpoint_file(path)
        saved = torch.load(path, map_location="cpu", weights_only=False).get("network_weights")
        if not isinstance(saved, dict):
            raise NnppError(f"-pretrained_weights {path} has no 'network_weights'; pass an nnU-Net checkpoint (.pth)")
        mod = self.bare_network
        own = mod.state_dict()
        for key, value in own.items():
            if ".seg_layers." in key:
                continue
            if key not in saved or saved[key].shape != value.shape:
                found = "missing" if key not in saved else f"shape {tuple(saved[key].shape)}"
                raise NnppError(f"-pretrained_weights {path} does not fit this network: {key} is {found}, the "
                                f"network needs {tuple(value.shape)}; use weights of the same architecture")
        own.update({k: v for k, v in saved.items() if k in own and ".seg_layers." not in k})
        mod.load_state_dict(own)
        self.print_to_log_file(f"initialised from pretrained weights {path} (segmentation heads not transferred)")


class nnUNetPlusPlusTrainerV2(nnUNetPlusPlusTrainer):
    """The seed's trainer name (nnU-Net v1 fork). Same trainer; results land under this name."""


class nnUNetPlusPlusTrainerDDP(nnUNetPlusPlusTrainer):
    """Same trainer; nnpp_train picks it for multi-process runs so they never overwrite a 1-device run."""


class nnUNetPlusPlusTrainerV2_hypDDP(nnUNetPlusPlusTrainerV2):
    """The seed's name for its multi-process trainer."""


#: trainer used for a multi-process run of each single-device trainer
DDP_VARIANTS = {"nnUNetPlusPlusTrainer": nnUNetPlusPlusTrainerDDP,
                "nnUNetPlusPlusTrainerV2": nnUNetPlusPlusTrainerV2_hypDDP}
