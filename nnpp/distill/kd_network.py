"""The student network in training: the student and its KD-only modules (feature adapters, MGD generators) as one
module, :class:`KDStudent`, so that DDP synchronises both and torch.compile sees one call whose forward also returns
the encoder features; its ``state_dict`` is the student's, so ``network_weights`` holds the student network only.

:class:`KDModulesMixin` (a part of :class:`nnpp.distill.kd_mixin.KDMixin`) pairs the student's encoder stages with
each teacher's by spatial shape (the deepest teacher stage of that shape), builds the KD modules for the pairs and
wraps the student with them before nnU-Net builds the optimizer, so the same optimizer (same poly LR, same gradient
clipping) trains them.
"""
from __future__ import annotations

import torch
from torch import nn
from torch._dynamo import OptimizedModule

from nnpp import NnppError
from nnpp.distill import losses as L


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
        if getattr(self.net, "prune_depth", None):  # a pruned UNet++ (nnpp_prune): only the stages X^{0,k} needs
            skips = self.net.encoder_skips(x)
            out = self.net.decoder(skips, len(skips) - 1)
        else:
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


class KDModulesMixin:
    """The KD modules of a distillation trainer: stage pairs, adapters and MGD generators, the :class:`KDStudent`
    wrapper (a part of :class:`nnpp.distill.kd_mixin.KDMixin`)."""

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
    def student_network(self) -> nn.Module:
        """The student network itself: DDP, torch.compile and the :class:`KDStudent` wrapper removed."""
        net = self.bare_network
        return net.net if isinstance(net, KDStudent) else net

    @property
    def kd_modules(self) -> nn.ModuleDict | None:
        net = self.bare_network
        return net.kd_modules if isinstance(net, KDStudent) else None
