"""The distillation step: the teachers' outputs, the KD terms and the loss (a part of
:class:`nnpp.distill.kd_mixin.KDMixin`).

Loss per step (the KD terms in fp32 with autocast off; reductions in :mod:`nnpp.distill.losses`):

    total = (1 - a) * seg + a * (soft_weight * soft + cwd_weight * cwd) + at_weight * at + sp_weight * sp
            + mgd_weight * mgd

``seg`` is nnU-Net's Dice+CE over the deep-supervision heads; ``soft`` is summed over the heads with the same
head weights as ``seg`` (``loss_head_weights``: under UNet++ probe heads X^{0,L} weighs 1, as in ``seg``); ``cwd`` is on the full-resolution logits (plus, with ``cwd_feat``, the mean over the
matched encoder stages through adapters); ``at``/``sp`` are means over matched encoder-stage pairs and teachers,
``mgd`` over the deepest matched pair of each teacher (every pair with ``mgd_all_stages``). Encoder stages are
paired by spatial shape (the deepest teacher stage of that shape; :mod:`nnpp.distill.kd_network`).

With unlabeled cases (``--unlabeled``, :mod:`nnpp.distill.mixed_batches`) every batch holds ``n_u`` unlabeled
patches (first) and labeled ones; by ``--pseudo``:

* ``hard``: the teacher's pseudo-labels (predicted once, before training) are their segmentation; every patch gets
  ``seg`` (ground truth or pseudo-label) and no teacher runs in the step (a no-KD step);
* ``soft``: ``seg`` over the labeled patches only, the KD terms over every patch (teachers online);
* ``both``: ``seg`` over every patch (pseudo-labels on the unlabeled ones) and the KD terms over every patch.

Hot path: the teachers' decoders run only when a logit method (soft, cwd) is on; only the teacher stages a
feature loss reads are cast to fp32; the soft-KD target of a U-Net student's coarser heads is pooled once per
step, each head's from the previous (finer) one.
"""
from __future__ import annotations

import numpy as np
import torch

from nnpp import device as dev
from nnpp.distill import losses as L
from nnpp.distill.settings import FEATURE_METHODS
from nnpp.distill.teachers import ensemble_target


class KDStepMixin:
    """``train_step`` with the KD terms, and their epoch means in the log."""

    def kd_losses(self, outputs, skips, extra, t_logits: list, t_skips: list) -> dict:
        """The unweighted KD terms (fp32 scalars) of one step; see the module docstring for the formula."""
        c = self.kd_config
        heads = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        terms = {}
        if "soft" in c["kd"]:
            target = ensemble_target(t_logits, c["T"], self.label_manager.has_regions)
            weights = self.loss_head_weights() if len(heads) > 1 else [1.0]
            soft = []
            for w, h in zip(weights, heads):  # heads fine to coarse: each pooled target from the previous one
                target = target.pooled_to(h.shape[2:])
                if w != 0:
                    soft.append(float(w) * L.soft_kd(h, target, c["T"]))
            terms["soft"] = sum(soft)
        if "cwd" in c["kd"]:
            tau = c["cwd_tau"]
            cwd = L.cwd(heads[0], L.ensemble_spatial_log_probs(t_logits, tau), tau)
            if c["cwd_feat"]:
                feat = [L.cwd(extra[f"cwd_t{k}_s{s}"], L.ensemble_spatial_log_probs([t_skips[k][ts]], tau), tau)
                        for k, pairs in enumerate(self.kd_pairs) for s, ts in pairs]
                cwd = cwd + torch.stack(feat).mean()
            terms["cwd"] = cwd
        if "at" in c["kd"]:
            terms["at"] = torch.stack([L.attention_transfer(skips[s], [t_skips[k][ts]])
                                       for k, pairs in enumerate(self.kd_pairs) for s, ts in pairs]).mean()
        if "sp" in c["kd"]:
            terms["sp"] = torch.stack([L.similarity_preserving(skips[s], [t_skips[k][ts]], c["sp_pool"])
                                       for k, pairs in enumerate(self.kd_pairs) for s, ts in pairs]).mean()
        if "mgd" in c["kd"]:
            terms["mgd"] = torch.stack([L.mgd(extra[f"mgd_t{k}_s{s}"], t_skips[k][ts])
                                        for k, pairs in enumerate(self.kd_pairs)
                                        for s, ts in self.mgd_pairs(pairs)]).mean()
        return terms

    def kd_total(self, seg: torch.Tensor, terms: dict) -> torch.Tensor:
        c = self.kd_config
        logit = sum(c[f"{m}_weight"] * terms[m] for m in ("soft", "cwd") if m in terms)
        feature = sum(c[f"{m}_weight"] * terms[m] for m in FEATURE_METHODS if m in terms)
        return (1 - c["a"]) * seg + c["a"] * logit + feature

    def teacher_outputs(self, data: torch.Tensor):
        """Every teacher's (fp32 logits or None when no logit method is on, fp32 skips of the stages a feature
        loss reads or None)."""
        feats, logits = self.kd_needs_features(), self.kd_needs_logits()
        outs = [t.forward(data, self.amp, features=feats, logits=logits, stages=self.teacher_stages(k))
                for k, t in enumerate(self.teachers)]
        return [o[0] for o in outs], [o[1] for o in outs]

    def train_step(self, batch: dict) -> dict:
        mode = self.unlabeled_mode
        if not self.kd_on or mode == "hard":  # hard: pseudo-labels are the unlabeled patches' targets, no teacher
            return super().train_step(batch)
        data, target = self._batch_to_device(batch)
        t_logits, t_skips = self.teacher_outputs(data)
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp.autocast():
            outputs, skips, extra = self.network(data, features=True)
            if mode == "soft":  # the segmentation loss sees the labeled patches only
                from nnpp.distill.unlabeled import unlabeled_mask
                labeled = torch.as_tensor(np.flatnonzero(~unlabeled_mask(batch["keys"])), device=data.device)
                outputs_l = [o[labeled] for o in outputs] if isinstance(outputs, (list, tuple)) else outputs[labeled]
                target_l = [t[labeled] for t in target] if isinstance(target, list) else target[labeled]
                seg = self.loss(outputs_l, target_l)
            else:
                seg = self.loss(outputs, target)
        with dev.Amp("O0", self.device).autocast(exclusive=True):  # KD terms in fp32
            terms = self.kd_losses(outputs, skips, extra, t_logits, t_skips)
            loss = self.kd_total(seg.float(), terms)
        self.backward_and_step(loss)
        # on the device: read once per epoch (on_train_epoch_end), no host synchronisation per step
        self._kd_terms.append({"seg": seg.detach(), **{k: v.detach() for k, v in terms.items()}})
        return {"loss": loss.detach()}

    def on_train_epoch_end(self, train_outputs):
        if self.kd_on and self._kd_terms:
            means = {k: torch.stack([t[k].float() for t in self._kd_terms]).mean().item() for k in self._kd_terms[0]}
            self.print_to_log_file("KD terms (epoch means, unweighted): "
                                   + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
            self._kd_terms = []
        super().on_train_epoch_end(train_outputs)
