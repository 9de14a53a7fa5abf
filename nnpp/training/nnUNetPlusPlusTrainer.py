"""nnUNetPlusPlusTrainer: nnU-Net v2's trainer with a UNet++ network and deep supervision on every head.

What differs from ``nnUNetTrainer`` (everything else is nnU-Net's: data loading, augmentation, poly LR,
SGD, checkpoints, ``progress.png``, validation and ``summary.json``):

* Network: :class:`nnpp.nets.UNetPlusPlus` built from the plans' PlainConvUNet arguments.
* Deep supervision: UNet++ heads X^{0,1..L} all predict at full resolution, so every head is trained
  against the full-resolution target (nnU-Net's pipeline with scale 1 for every head: no downsampled
  targets are made; its collate step stacks one full-res target per head).
* Head weights: equal, 1/L each (the UNet++ paper averages the losses of its heads). Every head gets a
  gradient; nnU-Net's default would give the last output weight 0, which is why the reference UNet++
  port never trained its deeper nodes. Override :meth:`deep_supervision_weights` to change this.
* AMP on every device through :mod:`nnpp.device` (nnU-Net autocasts on CUDA only): ``configure_amp``.
* torch.compile only where the device layer says it works (CUDA), still switchable with nnUNet_compile.
* Checkpoints are written atomically (temp file + rename); a truncated checkpoint gives one clear error.
* Train throughput (images/s over the training iterations of each epoch) is logged per epoch.

A distillation trainer subclasses this and overrides ``build_network_architecture`` and/or ``_build_loss``.
"""
from __future__ import annotations

import os
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnpp import NnppError
from nnpp.device import compile_supported, ddp_device_ids, make_amp
from nnpp.distributed import split_global_batch

UNETPP_CLASS = "nnpp.nets.unetpp.UNetPlusPlus"


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


class nnUNetPlusPlusTrainer(nnUNetTrainer):
    #: under DDP: True (--dbs) splits the plans batch across ranks as nnU-Net does; False gives every rank
    #: the plans batch (the global batch is then world_size x plans batch)
    distribute_batch = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnU-Net pins cuda to index 0 (or to the rank under DDP); keep the device the device layer chose.
        self.device = device
        self.configure_amp("auto")
        self.train_fps: list[float] = []
        self._train_epoch_t0 = None

    # ------------------------------------------------------------------------------------- configuration
    def configure_amp(self, mode: str) -> None:
        """AMP mode O0 | O1 | bf16 | auto (see nnpp.device). Call before training or loading a checkpoint."""
        self.amp = make_amp(mode, self.device)
        self.grad_scaler = self.amp.scaler
        self.print_to_log_file(f"AMP mode: {self.amp.mode} on {self.device}", also_print_to_console=False)

    @property
    def num_heads(self) -> int:
        return self.configuration_manager.network_arch_init_kwargs["n_stages"] - 1

    def deep_supervision_weights(self) -> np.ndarray:
        """Loss weight of each head, in output order (X^{0,L} first). All non-zero, summing to 1."""
        return np.full(self.num_heads, 1.0 / self.num_heads)

    def _set_batch_size_and_oversample(self):
        if self.is_ddp and not self.distribute_batch:
            self.batch_size = self.configuration_manager.batch_size
            return
        if self.is_ddp:
            split_global_batch(self.configuration_manager.batch_size, dist.get_world_size())
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
        if is_ddp:
            self._set_batch_size_and_oversample()
            self.network = DDP(nn.SyncBatchNorm.convert_sync_batchnorm(self.network),
                               device_ids=ddp_device_ids(self.device))
            self.loss = self._build_loss()

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
        return get_network_from_plans(UNETPP_CLASS, kwargs, configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        # every UNet++ head predicts at full resolution: scale 1 for each (the transform reuses the tensor)
        return [[1.0] * len(self.configuration_manager.patch_size)] * self.num_heads

    def _build_loss(self):
        # nnU-Net's Dice + CE (its choice of options and compile handling), without its resolution-based
        # deep-supervision weights; then our weights on top.
        enabled, self.enable_deep_supervision = self.enable_deep_supervision, False
        try:
            loss = super()._build_loss()
        finally:
            self.enable_deep_supervision = enabled
        if enabled:
            loss = DeepSupervisionWrapper(loss, self.deep_supervision_weights())
        return loss

    # -------------------------------------------------------------------------------------------- steps
    def _batch_to_device(self, batch: dict):
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        return data, target

    def train_step(self, batch: dict) -> dict:
        data, target = self._batch_to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp.autocast():
            output = self.network(data)
            loss = self.loss(output, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        # nnU-Net's pseudo-Dice step under our autocast. On CUDA nnU-Net additionally enters its own fp16
        # autocast inside, so there the online pseudo-Dice is computed in fp16 whatever --amp says.
        with self.amp.autocast():
            return super().validation_step(batch)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._train_epoch_t0 = time.perf_counter()

    def on_train_epoch_end(self, train_outputs):
        # train_step ends with loss.cpu(), which waits for the device: the wall time below is honest.
        seconds = time.perf_counter() - self._train_epoch_t0
        fps = self.batch_size * self.num_iterations_per_epoch / seconds
        self.train_fps.append(fps)
        self.print_to_log_file(f"train throughput: {fps:.2f} img/s ({self.num_iterations_per_epoch} iterations, "
                               f"batch {self.batch_size}, {seconds:.1f} s, AMP {self.amp.mode})")
        super().on_train_epoch_end(train_outputs)

    # -------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        tmp = filename + ".tmp"
        super().save_checkpoint(tmp)
        if os.path.isfile(tmp):  # rank 0 with checkpointing enabled
            os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, str):
            check_checkpoint_file(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)


class nnUNetPlusPlusTrainerV2(nnUNetPlusPlusTrainer):
    """The seed's trainer name (nnU-Net v1 fork). Same trainer; results land under this name."""


class nnUNetPlusPlusTrainerDDP(nnUNetPlusPlusTrainer):
    """Same trainer; nnpp_train picks it for multi-process runs so they never overwrite a 1-device run."""


class nnUNetPlusPlusTrainerV2_hypDDP(nnUNetPlusPlusTrainerV2):
    """The seed's name for its multi-process trainer."""


#: trainer used for a multi-process run of each single-device trainer
DDP_VARIANTS = {"nnUNetPlusPlusTrainer": nnUNetPlusPlusTrainerDDP,
                "nnUNetPlusPlusTrainerV2": nnUNetPlusPlusTrainerV2_hypDDP}
