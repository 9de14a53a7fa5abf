"""The deep-supervision loss of UNet++: every head at full resolution against one shared target."""
from __future__ import annotations

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper


class SharedTargetDeepSupervision(DeepSupervisionWrapper):
    """nnU-Net's DeepSupervisionWrapper (weighted sum over heads of ``loss(output_i, target_i)``) for heads that
    all share one target: given a single tensor, every head is paired with that same tensor (no copies); given a
    list (nnU-Net's multi-scale targets), it behaves as nnU-Net's wrapper."""

    def forward(self, outputs, target):
        if not isinstance(outputs, (tuple, list)):
            raise TypeError(f"deep supervision needs the heads' outputs as a list, got {type(outputs).__name__}")
        return sum(self.terms(outputs, target))

    def terms(self, outputs, target) -> list:
        """The weighted loss of each head with a non-zero weight, in output order (their sum is the loss)."""
        if isinstance(target, torch.Tensor):
            target = [target] * len(outputs)
        weights = self.weight_factors or (1.0,) * len(outputs)
        return [w * self.loss(o, t) for w, o, t in zip(weights, outputs, target) if w != 0.0]
