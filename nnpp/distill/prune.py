"""Pruning by self-distillation: a UNet++'s sub-network X^{0,k} fine-tuned with the full network as its teacher.

UNet++'s deep supervision exists so that the pruned networks X^{0,k} (:attr:`nnpp.nets.UNetPlusPlus.prune_depth`)
are usable on their own. With probe heads (nnpp_train's default) the network never learns for them, and with trained
heads on a real CT the full network suffered (documentation/training.md). ``nnpp_prune`` gives a trained model a
usable depth k after training instead: the sub-network X^{0,k} (encoder stages 0..k, the nodes X^{i,j} with
i + j <= k, the head on X^{0,k}) starts from the trained weights and is trained for a short budget (default 20% of
the model's training iterations) on

    (1 - a) * DiceCE(X^{0,k}, labels) + a * T^2 * KL(full network || X^{0,k})

through nnpp's distillation trainer (:class:`nnpp.distill.kd_mixin.KDMixin`: soft KD from the frozen full network of
the same fold and checkpoint; nnU-Net's data, augmentation, poly LR, checkpoints, ``--c`` and validation). The
other parameters get no gradient and stay as trained.

Where it lives: ``MODEL_FOLDER/fold_F/prune_depthK/`` (log, ``progress.png``, checkpoints, ``kd_config.json``,
``validation/summary.json`` = the pruned network's Dice on the fold's validation cases). Its ``checkpoint_final.pth``
holds the whole network's state dict (the sub-network fine-tuned, the rest as trained) and records under
``nnpp_prune`` the depth and the SHA-256 of the full network's checkpoint it was distilled from;
:func:`nnpp.model_folder.load_trained_model` uses it for ``nnpp_predict``/``nnpp_export --depth k`` (``depth_from``:
"distilled") as long as that checkpoint is unchanged.
"""
from __future__ import annotations

import os

import torch

from nnpp import NnppError
from nnpp.distill.kd_mixin import KDMixin
from nnpp.model_folder import PRUNE_KEY
from nnpp.training.nnUNetPlusPlusTrainer import nnUNetPlusPlusTrainer

#: the share of the model's own training iterations nnpp_prune trains for by default
DEFAULT_BUDGET = 0.2


class nnUNetPlusPlusTrainerPrune(KDMixin, nnUNetPlusPlusTrainer):
    """The sub-network X^{0,k} of a trained UNet++, fine-tuned with the full network as its teacher (see the module
    docstring). Deep supervision off: the network's one output is X^{0,k}. Set :attr:`prune_depth` and
    :attr:`prune_source` (the full network's checkpoint) before ``initialize``."""
    #: k, the depth trained (1..L-1)
    prune_depth: int | None = None
    #: ``{"checkpoint": path, "sha256": hex, "weights": state dict}`` of the full network the run starts from (the
    #: teacher's own, loaded once)
    prune_source: dict | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # nnU-Net records these by name (my_init_kwargs)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

    def _configure_network(self) -> None:
        super()._configure_network()
        net = self.student_network
        if not hasattr(net, "prune_depth") or not 1 <= (self.prune_depth or 0) < net.depth:
            raise NnppError(f"--depth {self.prune_depth}: nnpp_prune trains a UNet++ depth 1..L-1 (this network: "
                            f"{type(net).__name__}, depth {getattr(net, 'depth', 'none')})")
        net.prune_depth = self.prune_depth

    def initialize(self):
        super().initialize()
        if self.prune_source is not None:  # the trained weights (a --c then loads its own checkpoint over them)
            self.student_network.load_state_dict(self.prune_source["weights"], strict=True)
            self.print_to_log_file(f"pruning to depth {self.prune_depth}: starting from {self.prune_source['checkpoint']}")

    def run_settings(self) -> dict:
        return {**super().run_settings(), "depth": self.prune_depth}

    def checkpoint_extras(self) -> dict:
        extras = super().checkpoint_extras()
        if self.prune_source is not None:
            extras[PRUNE_KEY] = {"depth": self.prune_depth, "source_checkpoint": self.prune_source["checkpoint"],
                                 "source_sha256": self.prune_source["sha256"]}
        return extras

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        super().load_checkpoint_extras(checkpoint)
        saved = checkpoint.get(PRUNE_KEY) or {}
        if self.prune_source is not None and saved.get("source_sha256") not in (None, self.prune_source["sha256"]):
            raise NnppError(f"--c: this pruning started from another {os.path.basename(saved['source_checkpoint'])} "
                            f"(the full network changed since); start it again without --c")

    def report_sizes(self, rows: list) -> None:
        """The pruned network's cost per patch beside the full network's (parameters: those it runs)."""
        s, t = rows[0], rows[1]
        where = f"per patch {tuple(self.configuration_manager.patch_size)} on {self.device}"
        self.print_to_log_file(f"[nnpp_prune] depth {self.prune_depth}: {s['flops_per_patch'] / 1e9:.3g} GFLOP and "
                               f"{s['ms_per_patch']:.1f} ms {where}, {s['flops_per_patch'] / max(t['flops_per_patch'], 1):.2f}x "
                               f"the FLOPs and {s['ms_per_patch'] / t['ms_per_patch']:.2f}x the latency of the full "
                               f"network ({t['flops_per_patch'] / 1e9:.3g} GFLOP, {t['ms_per_patch']:.1f} ms)")
