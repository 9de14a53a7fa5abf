"""Knowledge-distillation losses, all computed in fp32 with exact, documented reductions.

Shapes: logits and features are ``(B, C, *spatial)`` (2D or 3D). "Voxels" below means the spatial positions of
one sample. Every function returns a scalar tensor.

Teacher targets are log-probabilities. Several teachers form an ensemble whose target is the **mean of their
probabilities**, computed in log space (``logsumexp_k log p_k - log K``), never the mean of their logits:
:func:`ensemble_log_probs` (softmax tasks), :func:`ensemble_log_probs_binary` (sigmoid / region tasks) and
:func:`ensemble_spatial_log_probs` (CWD's per-channel spatial distributions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: MGD (Yang et al. 2022) multiplies a *sum* of squared errors over C x H x W by alpha = 2e-5. nnpp uses the mean
#: over the elements instead (a 3D map has orders of magnitude more elements than the 2D detection necks alpha
#: was tuned on, so the sum would explode) rescaled by the element count alpha was tuned for:
#: alpha_3d = MGD_ALPHA_2D * MGD_REF_ELEMENTS / (C * |voxels|), i.e. loss = MGD_ALPHA_2D * MGD_REF_ELEMENTS * mean.
MGD_ALPHA_2D = 2e-5
MGD_REF_ELEMENTS = 256 * 32 * 32  # a 256-channel 32x32 FPN level, the scale of MGD's detection features


# ------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """A (possibly ensembled) teacher distribution over classes at each voxel, in log space.

    ``log_p``: log-probabilities ``(B, C, *S)``. Softmax tasks: a distribution over C. Binary (sigmoid/region)
    tasks: ``log_p`` is log P(channel on) and ``log_q`` log P(channel off), each channel its own Bernoulli."""
    log_p: torch.Tensor
    log_q: torch.Tensor | None = None

    @property
    def binary(self) -> bool:
        return self.log_q is not None

    def pooled_to(self, shape: Sequence[int]) -> "Target":
        """The target at a coarser head's spatial ``shape``: probabilities average-pooled over each head voxel's
        footprint (a mean of distributions is a distribution), back to log space. Identity at the same shape."""
        if tuple(shape) == tuple(self.log_p.shape[2:]):
            return self
        pool = F.adaptive_avg_pool3d if len(shape) == 3 else F.adaptive_avg_pool2d

        def down(log_x):
            return torch.log(pool(log_x.exp(), tuple(shape)).clamp_min(torch.finfo(torch.float32).tiny))
        return Target(down(self.log_p), None if self.log_q is None else down(self.log_q))


def ensemble_log_probs(teacher_logits: Sequence[torch.Tensor], T: float = 1.0) -> Target:
    """Softmax ensemble: log of (1/K) sum_k softmax(z_k / T) over the class dim 1, in fp32."""
    logp = torch.stack([F.log_softmax(z.float() / T, dim=1) for z in teacher_logits])
    return Target(torch.logsumexp(logp, dim=0) - math.log(len(teacher_logits)))


def ensemble_log_probs_binary(teacher_logits: Sequence[torch.Tensor], T: float = 1.0) -> Target:
    """Sigmoid/region ensemble: per channel, P(on) = (1/K) sum_k sigmoid(z_k / T) and P(off) = 1 - P(on),
    both in log space (log sigmoid(x) and log sigmoid(-x), so neither saturates to log 0)."""
    z = torch.stack([t.float() / T for t in teacher_logits])
    log_k = math.log(len(teacher_logits))
    return Target(torch.logsumexp(F.logsigmoid(z), dim=0) - log_k, torch.logsumexp(F.logsigmoid(-z), dim=0) - log_k)


def ensemble_spatial_log_probs(teacher_maps: Sequence[torch.Tensor], tau: float) -> torch.Tensor:
    """CWD's target: for each sample and channel, the distribution softmax(map_c / tau) over the voxels, averaged
    over the teachers in log space. Returns ``(B, C, N_voxels)`` log-probabilities."""
    logp = torch.stack([F.log_softmax(m.float().flatten(2) / tau, dim=2) for m in teacher_maps])
    return torch.logsumexp(logp, dim=0) - math.log(len(teacher_maps))


# ------------------------------------------------------------------------------------------- logit KD
def soft_kd(student_logits: torch.Tensor, target: Target, T: float = 1.0) -> torch.Tensor:
    """Hinton's soft-target term: ``T^2 * KL(p_teacher || p_student)`` with p = softmax(z / T) over the classes.

    Reduction: the KL is **summed over the classes** at each voxel, then **averaged over voxels and batch**. Its
    size therefore does not depend on the number of classes (``F.kl_div(..., reduction='mean')`` would also
    divide by C, silently scaling the KD weight by 1/C). The T^2 factor keeps its gradient scale independent of T.
    Binary targets (sigmoid/region tasks): the Bernoulli KL of each channel, summed over channels, averaged over
    voxels and batch."""
    s = student_logits.float() / T
    if target.binary:
        kl = (F.kl_div(F.logsigmoid(s), target.log_p, log_target=True, reduction="none")
              + F.kl_div(F.logsigmoid(-s), target.log_q, log_target=True, reduction="none"))
    else:
        kl = F.kl_div(F.log_softmax(s, dim=1), target.log_p, log_target=True, reduction="none")
    return T * T * kl.sum(dim=1).mean()


def cwd(student_map: torch.Tensor, target_log_probs: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021): each channel's activation map becomes a distribution
    over the voxels, softmax(map_c / tau); the loss is ``tau^2 * KL(teacher_c || student_c)``, the KL **summed over
    voxels**, then **averaged over channels and batch** (the paper's tau^2 / C * sum_c). ``target_log_probs``:
    :func:`ensemble_spatial_log_probs` of the teacher maps (channels must match: adapt narrower students first)."""
    log_s = F.log_softmax(student_map.float().flatten(2) / tau, dim=2)
    kl = F.kl_div(log_s, target_log_probs, log_target=True, reduction="none")
    return tau * tau * kl.sum(dim=2).mean()


# ----------------------------------------------------------------------------------------- feature KD
def attention_map(features: torch.Tensor) -> torch.Tensor:
    """AT's spatial attention (Zagoruyko & Komodakis, ICLR 2017): Q = sum_c |A_c|^2 per voxel, flattened and
    L2-normalised per sample -> ``(B, N_voxels)``. Channel counts need not match between student and teacher."""
    q = features.float().pow(2).sum(dim=1).flatten(1)
    return F.normalize(q, p=2, dim=1)


def attention_transfer(student_features: torch.Tensor, teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """AT loss with the paper's normalisation: ``|| Q_s/||Q_s||_2 - Q_t/||Q_t||_2 ||_2`` per sample (the p=2 norm
    of the difference of the unit-norm attention vectors, so in [0, 2]), **averaged over the batch** and over the
    teachers (each teacher its own target). The paper's beta/2 is the method's weight."""
    q_s = attention_map(student_features)
    return torch.stack([(q_s - attention_map(t)).norm(p=2, dim=1).mean() for t in teacher_features]).mean()


def spatial_affinity(features: torch.Tensor, pool: int = 4) -> torch.Tensor:
    """SP's similarity matrix, within each sample (nnU-Net batches are 2, so the paper's batch-by-batch Gram is
    degenerate): the map is average-pooled to at most ``pool`` voxels per axis (P voxels), then G = F^T F over
    the channels (P x P), each row L2-normalised. Returns ``(B, P, P)``."""
    shape = tuple(min(pool, s) for s in features.shape[2:])
    pooled = (F.adaptive_avg_pool3d if len(shape) == 3 else F.adaptive_avg_pool2d)(features.float(), shape)
    f = pooled.flatten(2)  # B, C, P
    return F.normalize(f.transpose(1, 2) @ f, p=2, dim=2)


def similarity_preserving(student_features: torch.Tensor, teacher_features: Sequence[torch.Tensor],
                          pool: int = 4) -> torch.Tensor:
    """SP loss (Tung & Mori, ICCV 2019) on within-sample spatial affinities: ``||G_s - G_t||_F^2 / P^2`` (the
    paper's 1/b^2 with b -> P pooled voxels), **averaged over the batch** and the teachers."""
    g_s = spatial_affinity(student_features, pool)
    p2 = g_s.shape[1] * g_s.shape[2]
    return torch.stack([((g_s - spatial_affinity(t, pool)) ** 2).sum(dim=(1, 2)).mean() / p2
                        for t in teacher_features]).mean()


def mgd(generated: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """MGD's generation loss: squared error between the features generated from the masked student map and the
    teacher's, **averaged over all elements** (batch, channels, voxels) and multiplied by
    ``MGD_ALPHA_2D * MGD_REF_ELEMENTS`` (the paper's alpha rescaled to 3D element counts, see the constant)."""
    return MGD_ALPHA_2D * MGD_REF_ELEMENTS * F.mse_loss(generated.float(), teacher_features.float(), reduction="mean")


# ------------------------------------------------------------------------------------------ KD modules
class Adapter(nn.Module):
    """1x1(x1) conv from the student's channels to the teacher's (for CWD on features)."""

    def __init__(self, c_in: int, c_out: int, dim: int = 3):
        super().__init__()
        self.conv = (nn.Conv3d if dim == 3 else nn.Conv2d)(c_in, c_out, 1)

    def forward(self, x):
        return self.conv(x)


class MGDGenerator(nn.Module):
    """MGD's student side: 1x1 align conv to the teacher's channels, a random spatial mask (each voxel dropped
    with probability ``mask_ratio``, 0.75 in the paper), then the generator conv3-ReLU-conv3."""

    def __init__(self, c_in: int, c_out: int, dim: int = 3, mask_ratio: float = 0.75):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.mask_ratio = mask_ratio
        self.align = conv(c_in, c_out, 1)
        self.generation = nn.Sequential(conv(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True),
                                        conv(c_out, c_out, 3, padding=1))

    def forward(self, x):
        x = self.align(x)
        keep = (torch.rand((x.shape[0], 1, *x.shape[2:]), device=x.device) >= self.mask_ratio).to(x.dtype)
        return self.generation(x * keep)
