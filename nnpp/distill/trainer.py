"""The distillation trainers: nnpp's trainer with frozen teachers and KD terms in the loss.

* ``nnUNetPlusPlusTrainerKD``: UNet++ student (all heads full resolution, head weights 1/L).
* ``nnUNetTrainerKD``: plain U-Net student (nnU-Net's PlainConvUNet, nnU-Net's deep-supervision scales and
  weights; the soft-KD target is pooled to each head's scale).

The student is an ordinary nnU-Net model: the static ``build_network_architecture`` builds the class named in the
student plans (``nnpp.distill.student``), and ``network_weights`` holds the student network only. Training wraps
the student and its KD-only modules (feature adapters, MGD generators) in one :class:`KDStudent` module, so that
DDP synchronises both and torch.compile sees one call whose forward also returns the encoder features; its
``state_dict`` is the student's. The KD modules are saved under ``checkpoint['nnpp_kd']`` and optimised by the
same optimizer (same poly LR, same gradient clipping), so ``--c`` restores them with the optimizer state.

Loss per step (the KD terms in fp32 with autocast off; reductions in :mod:`nnpp.distill.losses`):

    total = (1 - a) * seg + a * (soft_weight * soft + cwd_weight * cwd) + at_weight * at + sp_weight * sp
            + mgd_weight * mgd

``seg`` is nnU-Net's Dice+CE over the deep-supervision heads; ``soft`` is summed over the heads with the
deep-supervision weights; ``cwd`` is on the full-resolution logits (plus, with ``cwd_feat``, the mean over the
matched encoder stages through adapters); ``at``/``sp`` are means over matched encoder-stage pairs and teachers,
``mgd`` over the deepest matched pair of each teacher (every pair with ``mgd_all_stages``). Encoder stages are
paired by spatial shape (the deepest teacher stage of that shape).

With unlabeled cases (``--unlabeled``, :mod:`nnpp.distill.unlabeled`) every batch holds ``n_u`` unlabeled patches
(first) and labeled ones; by ``--pseudo``:

* ``hard``: the teacher's pseudo-labels (predicted once, before training) are their segmentation; every patch gets
  ``seg`` (ground truth or pseudo-label) and no teacher runs in the step (a no-KD step);
* ``soft``: ``seg`` over the labeled patches only, the KD terms over every patch (teachers online);
* ``both``: ``seg`` over every patch (pseudo-labels on the unlabeled ones) and the KD terms over every patch.

Hot path: the teachers' decoders run only when a logit method (soft, cwd) is on; only the teacher stages a
feature loss reads are cast to fp32; the soft-KD target of a U-Net student's coarser heads is pooled once per
step, each head's from the previous (finer) one.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn
from torch._dynamo import OptimizedModule

from nnpp import NnppError
from nnpp import device as dev
from nnpp.distill import losses as L
from nnpp.distill.teachers import ensemble_target
from nnpp.distributed import world
from nnpp.training.nnUNetPlusPlusTrainer import nnUNetPlusPlusTrainer

METHODS = ("soft", "cwd", "at", "sp", "mgd")
FEATURE_METHODS = ("at", "sp", "mgd")
#: KD settings and their defaults; keys are nnpp_distill's argparse dests (saved as run settings, --c reuses them)
KD_DEFAULTS = {"kd": ["soft"], "a": 0.5, "T": 2.0, "tchk": "checkpoint_final.pth", "allow_val_leak": False,
               "da5": False, "soft_weight": 1.0, "cwd_weight": 1.0, "cwd_tau": 4.0, "cwd_feat": False,
               "at_weight": 1.0, "sp_weight": 1.0, "sp_pool": 4, "mgd_weight": 1.0, "mgd_ratio": 0.75,
               "mgd_all_stages": False, "unlabeled": None, "unlabeled_fraction": 0.5, "pseudo": "hard"}
KD_IDENTITY = ("t", "tf", "r", "student")


class KDStudent(nn.Module):
    """The student network plus its KD-only modules, as one module (for DDP and torch.compile).

    ``forward(x)`` is the student's forward. ``forward(x, features=True)`` runs the student's encoder and decoder
    once and returns ``(outputs, skips, extra)``: the usual outputs, the encoder stage outputs, and
    ``{name: module(skips[stage])}`` for every KD module (names ``{method}_t{teacher}_s{stage}``).
    ``state_dict``/``load_state_dict`` are the student's alone, so checkpoints carry no KD parts."""

    def __init__(self, net: nn.Module, kd_modules: nn.ModuleDict):
        super().__init__()
        self.net = net
        self.kd_modules = kd_modules

    @property
    def encoder(self):
        return self.net.encoder

    @property
    def decoder(self):
        return self.net.decoder

    @property
    def depth(self):
        return self.net.depth

    def forward(self, x, features: bool = False):
        if not features:
            return self.net(x)
        skips = self.net.encoder(x)
        out = self.net.decoder(skips)
        extra = {name: m(skips[int(name.rsplit("_s", 1)[1])]) for name, m in self.kd_modules.items()}
        return out, skips, extra

    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


def match_stages(student_shapes: list, teacher_shapes: list) -> list:
    """Pairs ``(student stage, teacher stage)`` of equal spatial shape (the deepest teacher stage of that shape)."""
    pairs = []
    for s, shape in enumerate(student_shapes):
        same = [t for t, ts in enumerate(teacher_shapes) if tuple(ts) == tuple(shape)]
        if same:
            pairs.append((s, same[-1]))
    return pairs


class KDMixin:
    """Everything distillation adds to an nnpp trainer. ``configure_kd`` before ``initialize``."""
    teachers: list = []
    kd_config: dict | None = None
    kd_leaks: list = []

    def configure_kd(self, teachers: list, config: dict, leaks: list | None = None) -> None:
        """Teachers (:class:`nnpp.distill.teachers.Teacher`, frozen, on this trainer's device), the resolved KD
        settings (``KD_DEFAULTS`` keys plus ``t``, ``tf``, ``r``, ``student``) and the accepted leaks."""
        unknown = [m for m in config["kd"] if m not in METHODS]
        if unknown:
            raise NnppError(f"unknown KD method(s) {', '.join(unknown)}; choose from {' '.join(METHODS)}")
        self.teachers = list(teachers)
        self.kd_config = dict(config)
        self.kd_leaks = list(leaks or [])
        self.kd_pairs: list = []
        self._kd_terms: list = []
        if self.kd_leaks:
            from nnpp.distill.teachers import describe_leak
            self.print_to_log_file("WARNING: leaky distillation (--allow-val-leak): " + "; ".join(
                describe_leak(name, cases) for name, cases in self.kd_leaks)
                + ". The student's validation Dice may be optimistic.")

    # ------------------------------------------------------------------------------------ unlabeled cases
    @property
    def unlabeled_mode(self) -> str | None:
        """``--pseudo`` when this run trains on unlabeled cases, else None."""
        return self.kd_config["pseudo"] if self.kd_on and getattr(self, "unlabeled_dir", None) else None

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.unlabeled_mode:
            from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

            from nnpp.distill.unlabeled import MixedDataset
            dataset_tr = MixedDataset(dataset_tr, nnUNetDatasetBlosc2(self.unlabeled_dir))  # what prepare writes
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        """nnU-Net's loaders; with unlabeled cases the training loader is :class:`MixedDataLoader` (nnU-Net's trainer
        names its loader class in its module: it is swapped for the duration of this call only)."""
        if not self.unlabeled_mode:
            return super().get_dataloaders()
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer

        from nnpp.distill.unlabeled import MixedDataLoader, MixedDataset, unlabeled_per_batch
        original = nnunet_trainer.nnUNetDataLoader
        n_u = unlabeled_per_batch(self.kd_config["unlabeled_fraction"], self.batch_size)

        def loader(data, *args, **kwargs):
            if not isinstance(data, MixedDataset):
                return original(data, *args, **kwargs)
            dl = MixedDataLoader(data, *args, **kwargs)
            dl.n_unlabeled = n_u
            return dl
        self.print_to_log_file(f"unlabeled cases: {len(self.unlabeled_cases())} from {self.unlabeled_dir}; "
                               f"{n_u} of {self.batch_size} patches per batch, --pseudo {self.unlabeled_mode}")
        nnunet_trainer.nnUNetDataLoader = loader
        try:
            loaders = super().get_dataloaders()
        finally:
            nnunet_trainer.nnUNetDataLoader = original
        train = getattr(loaders[0], "generator", None) or getattr(loaders[0], "data_loader", None)
        if not isinstance(train, MixedDataLoader):  # nnU-Net no longer builds its loader through that name
            from importlib.metadata import version
            raise NnppError(f"nnunetv2 {version('nnunetv2')}: its trainer did not build the training loader through "
                            f"nnUNetTrainer.nnUNetDataLoader, so the unlabeled cases cannot be mixed in; nnpp is tested "
                            f"with nnunetv2 2.8.1")
        return loaders

    def unlabeled_cases(self) -> list:
        if not getattr(self, "unlabeled_dir", None):
            return []
        return sorted(f[:-len(".b2nd")] for f in os.listdir(self.unlabeled_dir)
                      if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))

    def _configure_network(self) -> None:
        # the teachers see the student's batches: same memory format (else every teacher conv re-lays its input)
        super()._configure_network()
        for t in self.teachers:
            t.network.to(memory_format=self.memory_format)

    # ------------------------------------------------------------------------------------------ settings
    @property
    def kd_on(self) -> bool:
        return self.kd_config is not None

    @property
    def leaky(self) -> bool:
        return bool(self.kd_leaks)

    def kd_needs_features(self) -> bool:
        c = self.kd_config
        return bool(set(c["kd"]) & set(FEATURE_METHODS) or ("cwd" in c["kd"] and c["cwd_feat"]))

    def run_settings(self) -> dict:
        settings = super().run_settings()
        if self.kd_on:
            settings.update({k: self.kd_config[k] for k in (*KD_DEFAULTS, *KD_IDENTITY) if k in self.kd_config})
        return settings

    def kd_training_cases(self) -> list | None:
        """The student's training cases plus every teacher's (None when a teacher's are unknown)."""
        from nnpp.distill.teachers import split_cases
        try:
            cases = set(split_cases(self.preprocessed_dataset_folder_base, self.fold)[0])
        except NnppError:
            return None
        for t in self.teachers:
            if t.training_cases is None:
                return None
            cases |= set(t.training_cases)
        return sorted(cases | set(self.unlabeled_cases()))

    def kd_record(self) -> dict:
        """What ``kd_config.json`` and the checkpoint record about this distillation."""
        return {**self.kd_config, "leaky": self.leaky,
                "leaks": [{"teacher": n, "cases": c} for n, c in self.kd_leaks],
                "teachers_resolved": [{"name": t.name, "folder": t.folder, "fold": t.fold, "trainer": t.trainer_name,
                                       "parameters": t.num_parameters, "training_cases": t.training_cases}
                                      for t in self.teachers],
                # every case the student's weights have seen (its own training cases and its teachers'): a later
                # leak check with this student as a teacher reads it (nnpp.distill.teachers.teacher_training_cases)
                "training_cases": self.kd_training_cases(),
                "stage_pairs": self.kd_pairs, "sizes": getattr(self, "kd_sizes", None),
                "unlabeled_preprocessed": getattr(self, "unlabeled_dir", None),
                "unlabeled_cases": self.unlabeled_cases()}

    # -------------------------------------------------------------------------------------- KD modules
    def _feature_shapes(self, encoder, n_in: int):
        x = torch.zeros((1, n_in, *self.configuration_manager.patch_size), device=self.device)
        with torch.no_grad():
            skips = encoder(x)
        return [(tuple(s.shape[2:]), s.shape[1]) for s in skips]

    def build_kd_modules(self, student: nn.Module) -> nn.ModuleDict:
        """Adapters (CWD on features) and MGD generators for every matched stage pair of every teacher."""
        modules = nn.ModuleDict()
        self.kd_pairs = []
        if not self.kd_needs_features():
            return modules
        c = self.kd_config
        dim = len(self.configuration_manager.patch_size)
        s_feats = self._feature_shapes(student.encoder, self.num_input_channels)
        for k, t in enumerate(self.teachers):
            if not (hasattr(t.network, "encoder") and hasattr(t.network, "decoder")):
                raise NnppError(f"teacher {t.name} ({type(t.network).__name__}) has no encoder/decoder to take "
                                f"features from; use --kd soft/cwd only with it")
            t_feats = self._feature_shapes(t.network.encoder, self.num_input_channels)
            pairs = match_stages([f[0] for f in s_feats], [f[0] for f in t_feats])
            if not pairs:
                raise NnppError(f"teacher {t.name} has no encoder stage with the student's feature-map shapes "
                                f"{[f[0] for f in s_feats]}; feature KD needs matching strides")
            self.kd_pairs.append(pairs)
            for s, ts in pairs:
                c_s, c_t = s_feats[s][1], t_feats[ts][1]
                if "cwd" in c["kd"] and c["cwd_feat"]:
                    modules[f"cwd_t{k}_s{s}"] = L.Adapter(c_s, c_t, dim) if c_s != c_t else nn.Identity()
                if "mgd" in c["kd"] and (s, ts) in self.mgd_pairs(pairs):
                    modules[f"mgd_t{k}_s{s}"] = L.MGDGenerator(c_s, c_t, dim, c["mgd_ratio"])
        return modules

    def mgd_pairs(self, pairs: list) -> list:
        """The stage pairs MGD distils: the deepest matched one (as the paper, on the last neck level), every
        matched one with ``mgd_all_stages``."""
        return list(pairs) if self.kd_config.get("mgd_all_stages") else list(pairs[-1:])

    def teacher_stages(self, k: int) -> set:
        """Teacher ``k``'s encoder stages a feature loss reads (only those are cast to fp32)."""
        c, pairs = self.kd_config, self.kd_pairs[k] if k < len(self.kd_pairs) else []
        stages = set()
        if {"at", "sp"} & set(c["kd"]) or ("cwd" in c["kd"] and c["cwd_feat"]):
            stages |= {ts for _, ts in pairs}
        if "mgd" in c["kd"]:
            stages |= {ts for _, ts in self.mgd_pairs(pairs)}
        return stages

    def kd_needs_logits(self) -> bool:
        """Whether the teachers' decoders must run: a logit method (soft, cwd) is asked for."""
        return bool({"soft", "cwd"} & set(self.kd_config["kd"]))

    def configure_optimizers(self):
        # nnU-Net calls this right after building (and maybe compiling) the student: wrap the student with its
        # KD modules first, so the optimizer (and DDP, wrapped next by nnpp's initialize) cover both.
        if self.kd_on:
            compiled = isinstance(self.network, OptimizedModule)
            student = self.network._orig_mod if compiled else self.network
            wrapper = KDStudent(student, self.build_kd_modules(student).to(self.device))
            self.network = torch.compile(wrapper) if compiled else wrapper
            n_kd = sum(p.numel() for p in wrapper.kd_modules.parameters())
            self.print_to_log_file(f"KD: methods {' '.join(self.kd_config['kd'])}, {len(self.teachers)} teacher(s), "
                                   f"stage pairs {self.kd_pairs}, {n_kd} KD-module parameters")
        return super().configure_optimizers()

    @property
    def kd_modules(self) -> nn.ModuleDict | None:
        net = self.bare_network
        return net.kd_modules if isinstance(net, KDStudent) else None

    def checkpoint_extras(self) -> dict:
        extras = super().checkpoint_extras()
        if self.kd_on and self.kd_modules is not None:
            extras["nnpp_kd"] = {"config": self.kd_record(), "modules": self.kd_modules.state_dict()}
        return extras

    #: --val: validate the student alone (no teachers, no KD modules); the checkpoint's optimizer state, which
    #: covers the KD modules too, is not loaded
    kd_validate_only: bool = False

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.kd_validate_only:
            return super().load_checkpoint(filename_or_checkpoint)
        if not self.was_initialized:
            self.initialize()
        self.optimizer.load_state_dict = lambda state: None  # validation needs the weights, not the optimizer
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            del self.optimizer.load_state_dict

    def load_checkpoint_extras(self, checkpoint: dict) -> None:
        super().load_checkpoint_extras(checkpoint)
        saved = checkpoint.get("nnpp_kd")
        if not self.kd_on or saved is None:
            return
        ours = {k: self.kd_config.get(k, v) for k, v in KD_DEFAULTS.items()}
        theirs = {k: saved["config"].get(k, v) for k, v in KD_DEFAULTS.items()}  # settings added later: defaults
        diff = [k for k in KD_DEFAULTS if ours[k] != theirs[k]]
        if diff:
            raise NnppError("the checkpoint was distilled with another KD configuration (" + ", ".join(
                f"{k}: {theirs[k]} there, {ours[k]} now" for k in diff) + "); continue with the same settings or "
                "train into a new folder")
        try:
            self.kd_modules.load_state_dict(saved["modules"], strict=True)
        except RuntimeError as e:
            raise NnppError(f"the checkpoint's KD modules do not fit this run ({str(e).splitlines()[0]}); "
                            f"continue with the same teachers and methods") from None
        self.print_to_log_file(f"KD: restored {len(saved['modules'])} KD-module tensors and the KD configuration "
                               f"from the checkpoint")

    # ------------------------------------------------------------------------------------------ training
    def kd_losses(self, outputs, skips, extra, t_logits: list, t_skips: list) -> dict:
        """The unweighted KD terms (fp32 scalars) of one step; see the module docstring for the formula."""
        c = self.kd_config
        heads = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        terms = {}
        if "soft" in c["kd"]:
            target = ensemble_target(t_logits, c["T"], self.label_manager.has_regions)
            weights = self.deep_supervision_weights() if len(heads) > 1 else [1.0]
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

    def on_train_start(self):
        super().on_train_start()
        if self.kd_on and world()[0] == 0:
            self.kd_sizes = self.size_report()
            self.report_sizes(self.kd_sizes)
            self._write_kd_record()

    def _write_kd_record(self) -> None:
        path = os.path.join(self.output_folder, "kd_config.json")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.kd_record(), f, indent=2)
        os.replace(tmp, path)
        self.print_to_log_file(f"KD configuration ({'LEAKY' if self.leaky else 'leak-free'}, \"leaky\": "
                               f"{str(self.leaky).lower()}): {path}")

    def on_train_epoch_end(self, train_outputs):
        if self.kd_on and self._kd_terms:
            means = {k: torch.stack([t[k].float() for t in self._kd_terms]).mean().item() for k in self._kd_terms[0]}
            self.print_to_log_file("KD terms (epoch means, unweighted): "
                                   + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
            self._kd_terms = []
        super().on_train_epoch_end(train_outputs)

    # ------------------------------------------------------------------------------------------- reports
    def measure_cost(self, network: nn.Module) -> tuple[int, float]:
        """:func:`patch_cost` of ``network`` on this run's patch, device, autocast and memory format."""
        return patch_cost(network, (self.num_input_channels, *self.configuration_manager.patch_size), self.device,
                          self.amp, self.memory_format)

    def size_report(self) -> list:
        """``[{"name", "parameters", "flops_per_patch", "ms_per_patch"}]`` for the student (first) and every
        teacher, measured on this run's device with the configuration's patch (:func:`patch_cost`)."""
        student = self.bare_network
        student = student.net if isinstance(student, KDStudent) else student
        nets = [("student", student)] + [(f"teacher {t.name}", t.network) for t in self.teachers]
        rows = []
        for name, net in nets:
            flops, ms = self.measure_cost(net)
            rows.append({"name": name, "parameters": sum(p.numel() for p in net.parameters()),
                         "flops_per_patch": flops, "ms_per_patch": ms})
        return rows

    def report_sizes(self, rows: list) -> None:
        """One line per network; a one-line WARNING for each teacher the student is not cheaper than (FLOPs or
        latency per patch >= the teacher's)."""
        s = rows[0]
        where = f"per patch {tuple(self.configuration_manager.patch_size)} on {self.device}"
        self.print_to_log_file(f"[nnpp_distill] student: {s['parameters']:,} parameters, "
                               f"{s['flops_per_patch'] / 1e9:.3g} GFLOP and {s['ms_per_patch']:.1f} ms {where}")
        for t in rows[1:]:
            ratios = (s["parameters"] / t["parameters"], s["flops_per_patch"] / max(t["flops_per_patch"], 1),
                      s["ms_per_patch"] / t["ms_per_patch"])
            self.print_to_log_file(f"[nnpp_distill] {t['name']}: {t['parameters']:,} parameters, "
                                   f"{t['flops_per_patch'] / 1e9:.3g} GFLOP and {t['ms_per_patch']:.1f} ms {where}; the "
                                   f"student is {ratios[0]:.2f}x its parameters, {ratios[1]:.2f}x its FLOPs, "
                                   f"{ratios[2]:.2f}x its latency")
            if ratios[1] >= 1 or ratios[2] >= 1:
                self.print_to_log_file(f"[nnpp_distill] WARNING: the student (--student {self.kd_config.get('student')}"
                                       f" -r {self.kd_config.get('r')}) is not cheaper than {t['name']} "
                                       f"({ratios[1]:.2f}x its FLOPs, {ratios[2]:.2f}x its latency per patch); "
                                       f"the default (--student unet -r 2) or a larger -r is")

    # ------------------------------------------------------------------------------------ augmentation
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        if self.kd_on and self.kd_config.get("da5"):
            from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
            return nnUNetTrainerDA5.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
        return super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()

    def get_training_transforms(self, *args, **kwargs):
        if self.kd_on and self.kd_config.get("da5"):  # nnU-Net's DA5 pipeline (its own static method)
            from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
            return nnUNetTrainerDA5.get_training_transforms(*args, **kwargs)
        return super().get_training_transforms(*args, **kwargs)


class nnUNetPlusPlusTrainerKD(KDMixin, nnUNetPlusPlusTrainer):
    """UNet++ student distilled from nnU-Net model folders (see the module docstring)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return nnUNetPlusPlusTrainer.build_network_architecture(plans_manager, configuration_manager,
                                                                num_input_channels, num_output_channels,
                                                                enable_deep_supervision)


class nnUNetTrainerKD(KDMixin, nnUNetPlusPlusTrainer):
    """Plain U-Net student (nnU-Net's PlainConvUNet from the student plans) with nnU-Net's deep supervision:
    heads at 1, 1/2, 1/4, ... resolution, weights 1/2^i normalised, the lowest head 0 (1e-6 under DDP, whose
    reducer needs every parameter in the graph)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    @property
    def num_heads(self) -> int:
        return self.configuration_manager.network_arch_init_kwargs["n_stages"] - 1

    def _get_deep_supervision_scales(self):
        return nnUNetTrainer._get_deep_supervision_scales(self)

    def deep_supervision_weights(self) -> np.ndarray:
        weights = np.array([1 / (2 ** i) for i in range(self.num_heads)])
        weights[-1] = 1e-6 if self.is_ddp else 0
        return weights / weights.sum()


class nnUNetPlusPlusTrainerKDDDP(nnUNetPlusPlusTrainerKD):
    """The UNet++ student of a multi-process distillation: its own name, so it never overwrites a 1-device run."""


class nnUNetTrainerKDDDP(nnUNetTrainerKD):
    """The U-Net student of a multi-process distillation: its own name, so it never overwrites a 1-device run."""


class nnUNetTrainerNoKD(nnUNetTrainerKD):
    """The U-Net student trained without KD (same network, plans and deep supervision as ``nnUNetTrainerKD``, no
    teachers): the no-KD baseline of a U-Net student (``nnpp_train -tr nnUNetTrainerNoKD -p nnUNetPlans_kd_unet_r2``),
    in a folder of its own. A UNet++ student's baseline is ``nnUNetPlusPlusTrainer``."""


def patch_cost(network: nn.Module, patch: tuple, device: torch.device, amp: dev.Amp,
               memory_format: torch.memory_format = torch.contiguous_format, repeats: int = 3, warmup: int = 2,
               batch: int = 2) -> tuple[int, float]:
    """(forward FLOPs of one patch, forward time in ms per patch) of ``network`` for patches of shape ``patch``
    (channels, *spatial): ``amp``'s autocast, ``memory_format``, no grad. FLOPs are counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, 2 per multiply-add; device-independent)
    on one patch. The time is that of a batch of ``batch`` patches divided by ``batch``, as nnpp_predict batches
    tiles (a batch of 1 sends few-channel 3D convolutions to torch's slow im2col path on the CPU, which made a narrow
    student look as slow as its teacher), the best of ``repeats`` calls after ``warmup`` untimed ones (other work on
    a shared device only ever adds time: on a loaded 2-core CPU single calls of the same network varied 2 ms to 1 s)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn((batch, *patch), device=device).contiguous(memory_format=memory_format)
    was_training = network.training
    network.eval()
    times = []
    with torch.no_grad(), amp.autocast():
        with FlopCounterMode(display=False) as counter:
            network(x[:1])
        flops = int(counter.get_total_flops())
        for i in range(max(0, warmup - 1) + repeats):
            dev.synchronize(device)
            t0 = time.perf_counter()
            network(x)
            dev.synchronize(device)
            if i >= warmup - 1:
                times.append((time.perf_counter() - t0) * 1000 / batch)
    network.train(was_training)
    return flops, min(times)
