"""The logits of a case back on its original grid, and its files written: resampling and export.

nnU-Net's ``export_prediction_from_logits`` for probabilities and regions; for a segmentation alone of a softmax
model the arg-max of the resampled logits without every class at the original grid (:func:`segmentation_from_logits`,
:func:`argmax_of_trilinear`). Every case is written atomically (:func:`export_case`), and the temp folders a killed
run left are removed (:func:`remove_abandoned_exports`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import torch

from nnpp.file_safety import owner_alive, owner_suffix

#: nnpp_predict --resample choices: the plans' own function (nnU-Net's scipy resampling for its default plans) or
#: nnU-Net's torch resampling (resample_torch_fornnunet, as its *_torchres planners plan it). The default follows the
#: plans, as nnU-Net's final validation (the Dice of summary.json) and nnUNetv2_predict do: the same masks (for the
#: default plans' linear resampling computed sparsely, argmax_of_trilinear(stored_as=...), not class by class).
#: torch differs from scipy at near-ties, mostly because nnU-Net stores scipy's resampled logits in fp16 before the
#: argmax (benchmarks/RESULTS.md)
RESAMPLE_CHOICES = ("torch", "plans")
DEFAULT_RESAMPLE = "plans"


def use_torch_resampling(predictor, device: torch.device, threads: int | None = None) -> None:
    """Resample the logits back to each case's original grid with nnU-Net's ``resample_torch_fornnunet`` on
    ``device`` (cpu, cuda or npu) instead of the plans' function: a copy of the predictor's configuration with
    ``resampling_fn_probabilities`` replaced as nnU-Net's ``nnUNetPlannerResEncL_torchres`` plans it (linear in-plane;
    the plans' ``force_separate_z`` kept, so anisotropic cases keep nnU-Net's separate, nearest z axis). Only the
    export changes; preprocessing keeps the plans' own resampling."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    config = dict(predictor.configuration_manager.configuration)
    old = config.get("resampling_fn_probabilities_kwargs") or {}
    config["resampling_fn_probabilities"] = "resample_torch_fornnunet"
    config["resampling_fn_probabilities_kwargs"] = {
        "is_seg": False, "force_separate_z": old.get("force_separate_z"), "memefficient_seg_resampling": False,
        "device": device, **({"num_threads": threads} if threads else {})}
    predictor.configuration_manager = ConfigurationManager(config)


#: classes resampled to the original grid at a time by segmentation_from_logits
EXPORT_CLASSES_PER_CHUNK = 8


def _trilinear_axis(n_in: int, n_out: int, device):
    """torch's trilinear source indices and weight along one axis (align_corners=False, sizes given): source
    ``(o + 0.5) * n_in / n_out - 0.5`` clamped at 0, lower index, upper index (clamped at the edge), upper weight."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    return i0.to(device), (i0 + 1).clamp_max(n_in - 1).to(device), (src - i0).clamp(0, 1).to(device)


def argmax_of_trilinear(logits: torch.Tensor, shape, chunk: int = 2 ** 19,
                        stored_as: torch.dtype | None = None) -> torch.Tensor:
    """``F.interpolate(logits[None].float(), shape, mode="trilinear")[0].argmax(0)`` (nnU-Net's
    ``resample_torch_fornnunet`` of logits, then the argmax) without the classes x output-voxels array; the same
    classes up to float rounding at near-ties (computed in float64: the argmax of the exact interpolation).

    ``stored_as`` (a float dtype; CPU only): the mask of nnU-Net's scipy export instead
    (``resample_data_or_seg_to_shape`` with order 1 and no separate z axis, the default plans' resampling of
    logits, then its argmax), exactly: skimage's order-1 ``resize`` (edge mode, no anti-aliasing) interpolates at
    torch's trilinear coordinates, in float64, but nnU-Net stores the result in the logits' dtype (fp16 from its
    predictor) before the argmax, so classes whose interpolations round to the same fp16 value tie and the lower
    class wins. Where that rounding can decide (the best class is not above every other by more than the rounding
    and a float64 error bound), the classes that can reach the top are evaluated by scipy's ``map_coordinates``,
    bit-identical to the ``resize`` nnU-Net calls, and stored in ``stored_as`` as nnU-Net stores them.

    Trilinear interpolation is a convex combination of a cell's 8 corner voxels, so where the 8 corners have the
    same arg-max class the interpolated arg-max is that class: most output voxels are a gather of the input's
    arg-max. Only voxels in cells whose corners disagree are interpolated, and only for the corners' arg-max
    classes (in float64 where the device has it, else float32); the result is kept where it beats an upper bound
    of every other class there (per corner, the largest logit of a class outside those, from each input voxel's
    top 3), else all classes are interpolated for that voxel. With ``stored_as`` a uniform cell is a gather only
    where its class leads the runner-up at every corner by more than two ``stored_as`` steps (plus the error bound);
    elsewhere in it the class and the top-2 bound are interpolated, and the candidates' comparisons are made after
    storage. The logits stay in their dtype (fp16 logits are not copied to fp32). Returns int16 labels of
    ``shape``. Ties go to the lower class as in argmax."""
    dev_ = logits.device
    if stored_as is not None and dev_.type != "cpu":
        raise ValueError("argmax_of_trilinear(stored_as=...) reproduces scipy's resampling: give it CPU logits")
    wide = torch.float64 if dev_.type in ("cpu", "cuda") else torch.float32  # npu / mps: no float64 kernels
    n_cls, ins = logits.shape[0], tuple(logits.shape[1:])
    arg = logits.argmax(0)  # the lower class on ties (topk's order among equal values is not defined)
    if tuple(int(s) for s in shape) == ins or n_cls == 1:  # nothing to interpolate (nnU-Net's too returns the logits)
        return arg.to(torch.int16)
    top_v, top_c = torch.topk(logits, min(3, n_cls), dim=0)
    axes = [_trilinear_axis(n, o, dev_) for n, o in zip(ins, shape)]
    # cells (corner i0 along each axis, upper corner clamped) whose 8 corners share the arg-max
    uniform = _over_cells(arg.float(), torch.maximum) == _over_cells(arg.float(), torch.minimum)
    if stored_as is not None:
        # ... and where that class leads every other by more than values the stored dtype can round together (twice
        # its spacing at the cell's largest |logit|) plus a float64 error bound: the same class after rounding, too
        gap = _over_cells((top_v[0] - top_v[1]).to(torch.float64), torch.minimum)
        mag = _over_cells(torch.maximum(top_v[0].abs(), top_v[1].abs()).to(torch.float64), torch.maximum)
        sure = uniform & (gap > 2 * _spacing(mag, stored_as) + 2 * _float64_error(mag))
        del gap, mag
    else:
        sure = uniform
    ix, iy, iz = (a[0] for a in axes)
    seg = arg.to(torch.int16)[ix[:, None, None], iy[None, :, None], iz[None, None, :]]
    flat, arg = logits.reshape(n_cls, -1), arg.reshape(-1)
    top_v, top_c = top_v.reshape(top_v.shape[0], -1), top_c.reshape(top_c.shape[0], -1).to(torch.int16)
    strides = (ins[1] * ins[2], ins[2], 1)
    rows = max(1, chunk // (len(iy) * len(iz)))
    for x0 in range(0, len(ix), rows):  # slabs along the first output axis: the voxel list stays small
        todo = (~sure[ix[x0:x0 + rows][:, None, None], iy[None, :, None], iz[None, None, :]]).nonzero()
        todo[:, 0] += x0
        for s in range(0, todo.shape[0], chunk):
            o = todo[s:s + chunk]
            if stored_as is not None:  # uniform cells with a close runner-up: the class and the top-2 bound only
                one = uniform[ix[o[:, 0]], iy[o[:, 1]], iz[o[:, 2]]]
                if one.any():
                    f, w = _cell_corners(o[one], axes, strides, wide)
                    best, rival = ((top_v[k][f].to(wide) * w).sum(1) for k in (0, 1))
                    label = arg[f[:, 0]]
                    err = _float64_error(torch.maximum(best.abs(), rival.abs()))
                    unsure = (~(_stored(rival + err, stored_as) < _stored(best - err, stored_as))).nonzero()[:, 0]
                    if len(unsure):
                        label[unsure] = _every_class(logits, flat, f[unsure], w[unsure], o[one][unsure], shape, wide,
                                                     stored_as)
                    seg[o[one][:, 0], o[one][:, 1], o[one][:, 2]] = label.to(torch.int16)
                    o = o[~one]
                    if not len(o):
                        continue
            f, w = _cell_corners(o, axes, strides, wide)  # (m, 8) flat corner index, weight
            cand = arg[f]  # (m, 8): the corners' arg-max classes
            vals = (flat[cand[:, :, None], f[:, None, :]].to(wide) * w[:, None, :]).sum(2)  # (m, 8) per candidate
            best = vals.max(1).values
            label = torch.where(vals == best[:, None], cand, n_cls).min(1).values  # the lower class on ties
            outside = (top_c[:, f][..., None] != cand.to(torch.int16)[None, :, None, :]).all(3)  # (3, m, 8)
            bound = torch.where(outside, top_v[:, f].to(wide), -torch.inf).amax(0).maximum(top_v[-1][f].to(wide))
            bound = (bound * w).sum(1)
            if stored_as is None:
                unsure = (~(best > bound)).nonzero()[:, 0]
            else:  # sure where the runner-up (another candidate, or the bound) is stored lower, error bound included
                other = torch.where(cand == label[:, None], -torch.inf, vals).amax(1).maximum(bound)
                err = _float64_error(torch.maximum(best.abs(), other.abs()))
                unsure = (~(_stored(other + err, stored_as) < _stored(best - err, stored_as))).nonzero()[:, 0]
            if len(unsure):
                label[unsure] = _every_class(logits, flat, f[unsure], w[unsure], o[unsure], shape, wide, stored_as)
            seg[o[:, 0], o[:, 1], o[:, 2]] = label.to(torch.int16)
    return seg


def _cell_corners(o: torch.Tensor, axes, strides, wide) -> tuple:
    """Flat input indices (m, 8) and trilinear weights (m, 8; ``wide``) of the corners of output voxels ``o``
    (m, 3), from the per-axis (lower index, upper index, upper weight) of :func:`_trilinear_axis`."""
    corners, weights = [], []
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                idx, w = 0, 1.0
                for a, d in enumerate((dx, dy, dz)):
                    lo, hi, lam = axes[a]
                    idx = idx + (hi if d else lo)[o[:, a]] * strides[a]
                    w = w * (lam if d else 1 - lam)[o[:, a]]
                corners.append(idx)
                weights.append(w)
    return torch.stack(corners, 1), torch.stack(weights, 1).to(wide)


def _every_class(logits, flat, f, w, o, shape, wide, stored_as) -> torch.Tensor:
    """The class of output voxels ``o`` (corners ``f``, weights ``w``) from every class's interpolation, a few voxels
    at a time (32 MB of float64): the argmax, or with ``stored_as`` :func:`_argmax_stored`."""
    per = max(1, 2 ** 22 // (8 * flat.shape[0]))
    labels = []
    for u0 in range(0, len(o), per):
        every = (flat[:, f[u0:u0 + per]].to(wide) * w[u0:u0 + per][None]).sum(2)  # (classes, voxels)
        labels.append(every.argmax(0) if stored_as is None else
                      _argmax_stored(every, logits, o[u0:u0 + per], shape, stored_as))
    return torch.cat(labels)


def _over_cells(t: torch.Tensor, reduce) -> torch.Tensor:
    """For each trilinear cell of an input-grid tensor (lower corner at each index, upper corner one further along
    every axis, clamped at the edge as the interpolation clamps), ``reduce`` (e.g. torch.maximum) of its 8 corners."""
    pad = torch.nn.functional.pad(t[None, None], (0, 1, 0, 1, 0, 1), mode="replicate")[0, 0]
    x, y, z = t.shape
    out = pad[:x, :y, :z].clone()
    for dx, dy, dz in [(dx, dy, dz) for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)][1:]:
        out = reduce(out, pad[dx:dx + x, dy:dy + y, dz:dz + z])
    return out


def _spacing(mag: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The distance between neighbouring ``dtype`` numbers at magnitude ``mag`` (float64; at least the subnormals'):
    two values farther apart than twice this never round to the same ``dtype`` number."""
    info = torch.finfo(dtype)
    _, e = torch.frexp(mag.clamp_min(info.tiny))  # mag = m * 2**e, 0.5 <= m < 1
    return torch.ldexp(torch.full_like(mag, info.eps), e - 1)


def _float64_error(mag: torch.Tensor) -> torch.Tensor:
    """A bound on how far this module's float64 interpolation of logits of magnitude <= ``mag`` can be from
    scipy's (8 weighted terms summed in another order: ~1e-15 relative; this bound is ~1e-9 relative)."""
    return (mag + 1) * 2.0 ** -30


def _stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 ``x`` stored in ``dtype`` as numpy stores it (nnU-Net's ``reshaped_final`` array: one rounding to
    nearest, ties to even; torch's float64 -> float16 cast rounds twice, through float32, and differs)."""
    return torch.from_numpy(x.cpu().numpy().astype(torch.empty(0, dtype=dtype).numpy().dtype))


def _argmax_stored(every: torch.Tensor, logits: torch.Tensor, voxels: torch.Tensor, shape, stored_as) -> torch.Tensor:
    """nnU-Net's scipy-export class of output ``voxels`` (m, 3), given ``every`` class's float64 interpolation here
    (classes, m): a class whose value cannot be stored as high as the best one (error bound included) is out; where one
    class is left it wins, elsewhere the classes left are interpolated by scipy itself (:func:`_scipy_stored`) and the
    first of the highest stored values wins (numpy's argmax, nnU-Net's)."""
    err = _float64_error(every.abs().amax(0))
    in_play = _stored(every + err, stored_as) >= _stored(every.amax(0) - err, stored_as)  # (classes, m)
    label = in_play.to(torch.uint8).argmax(0)  # the first class in play (where it is the only one)
    contested = (in_play.sum(0) > 1).nonzero()[:, 0]
    if len(contested):
        values = _scipy_stored(logits, voxels[contested], in_play[:, contested], shape, stored_as)
        label[contested] = torch.from_numpy(values.argmax(0))
    return label


def _scipy_stored(logits: torch.Tensor, voxels: torch.Tensor, in_play: torch.Tensor, shape, stored_as) -> np.ndarray:
    """(classes, m) values of nnU-Net's scipy export at output ``voxels`` (m, 3) for the classes ``in_play``
    (classes, m) (-inf elsewhere): each class in float64 (nnU-Net's ``data.astype(float)``), interpolated by scipy's
    ``map_coordinates`` (order 1, mode nearest) at ``resize``'s coordinates ``(o + 0.5) * in / out - 0.5``
    (bit-identical to the ``skimage.transform.resize`` nnU-Net calls), on the box of input voxels these corners span
    (coordinates shifted by a whole number: exact), stored in ``stored_as``."""
    from scipy.ndimage import map_coordinates
    ins = logits.shape[1:]
    cc = np.stack([((np.arange(o) + 0.5) * (n / o) - 0.5)[v] for n, o, v in zip(ins, shape, voxels.T.cpu().numpy())])
    out = np.full(tuple(in_play.shape), -np.inf, dtype=torch.empty(0, dtype=stored_as).numpy().dtype)
    for c in in_play.any(1).nonzero()[:, 0].tolist():
        sel = in_play[c].numpy()
        pts = cc[:, sel]
        lo = np.maximum(np.floor(pts.min(1)), 0).astype(np.int64)
        hi = np.minimum(np.floor(pts.max(1)).astype(np.int64) + 1, np.array(ins) - 1)
        box = logits[c, lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].cpu().numpy().astype(np.float64)
        out[c, sel] = map_coordinates(box, pts - lo[:, None], order=1, mode="nearest")
    return out


def _running_argmax(logits, shape, current, spacing, configuration_manager, classes_per_chunk: int) -> torch.Tensor:
    """The argmax of the logits resampled by the configuration's function, ``classes_per_chunk`` classes at a time:
    the running maximum and its class (ties to the lower class, as argmax)."""
    best = seg = None
    for c0 in range(0, logits.shape[0], classes_per_chunk):
        r = torch.as_tensor(configuration_manager.resampling_fn_probabilities(
            logits[c0:c0 + classes_per_chunk], shape, current, spacing))
        m, a = r.amax(0), r.argmax(0)
        del r
        if best is None:
            best, seg = m, a.to(torch.int16)
        else:
            better = m > best
            best = torch.where(better, m, best)
            seg = torch.where(better, a.to(torch.int16) + c0, seg)
    return seg


def segmentation_from_logits(logits, properties: dict, configuration_manager, plans_manager, label_manager,
                             classes_per_chunk: int = EXPORT_CLASSES_PER_CHUNK):
    """nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` for a segmentation alone of a softmax
    model, in bounded memory: where the resampling is linear without a separate z axis, the argmax of the resampled
    logits is computed without resampling every class (:func:`argmax_of_trilinear`): for the default plans' scipy
    resampling (``resample_data_or_seg_to_shape``, order 1: ``--resample plans``, nnpp_predict's default and what
    nnU-Net's validation and nnUNetv2_predict write) exactly nnU-Net's mask, its fp16 rounding of the resampled
    logits included (``stored_as``), on the CPU; for nnU-Net's torch resampling (``--resample torch``) the argmax of
    the trilinear interpolation in float64, on the configured device. Otherwise the logits go back to the original
    grid (the configuration's ``resampling_fn_probabilities``, nnU-Net's spacings) ``classes_per_chunk`` classes at
    a time, and only the running maximum and its class are kept (the argmax of the logits is nnU-Net's segmentation:
    softmax keeps the order; ties go to the lower class as in argmax). nnU-Net's own holds every class at the
    original resolution (a 62-class model on a 458 x 379 x 224 CT: 10.7 GB peak). Then nnU-Net's steps: the crop
    reverted, the transpose undone. Returns the segmentation (numpy, uint8 or uint16)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
    shape = properties["shape_after_cropping_and_before_resampling"]
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) else \
        [spacing[0], *configuration_manager.spacing]
    config = configuration_manager.configuration
    kw = config.get("resampling_fn_probabilities_kwargs") or {}
    fn = config.get("resampling_fn_probabilities")
    linear = len(shape) == 3 and not kw.get("is_seg") and not determine_do_sep_z_and_axis(
        kw.get("force_separate_z"), current, spacing, kw.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD))[0]
    data = torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits
    if linear and fn == "resample_torch_fornnunet" and kw.get("mode", "linear") == "linear":
        seg = argmax_of_trilinear(data.to(kw.get("device", "cpu")), [int(s) for s in shape])
    elif linear and fn == "resample_data_or_seg_to_shape" and kw.get("order", 3) == 1 and \
            data.dtype in (torch.float16, torch.float32, torch.float64):
        # nnU-Net stores the resampled logits in their own dtype (resample_data_or_seg's dtype_out) before the argmax
        seg = argmax_of_trilinear(data.cpu(), [int(s) for s in shape], stored_as=data.dtype)
    else:
        seg = _running_argmax(logits, shape, current, spacing, configuration_manager, classes_per_chunk)
    dtype = np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16
    out = insert_crop_into_image(np.zeros(properties["shape_before_cropping"], dtype=dtype),
                                 seg.cpu().numpy().astype(dtype), properties["bbox_used_for_cropping"])
    return out.transpose(plans_manager.transpose_backward)


def _partial_prefix(name: str) -> str:
    """How the hidden temp folder of the export of case ``name`` begins (the owner suffix follows)."""
    return f".{name}.partial."


def remove_abandoned_exports(outputs) -> None:
    """Remove the temp folders a killed run left for these output files (not those of a live process:
    :func:`nnpp.file_safety.owner_alive`)."""
    for o in outputs:
        parent = os.path.dirname(os.path.abspath(o))
        for d in os.listdir(parent):
            if d.startswith(_partial_prefix(os.path.basename(o))) and not owner_alive(d):
                shutil.rmtree(os.path.join(parent, d), ignore_errors=True)


def export_case(logits, properties: dict, configuration_manager, plans_manager, dataset_json: dict,
                output_file_truncated: str, save_probabilities: bool = False, threads: int | None = None) -> float:
    """nnU-Net's ``export_prediction_from_logits`` (resampling to the original geometry, segmentation, and with
    ``save_probabilities`` the .npz + .pkl), written into a hidden temp folder beside the output and then moved in
    with ``os.replace`` (atomic on one file system), the segmentation last: nnU-Net's ``--continue_prediction``
    looks for the segmentation (and the .npz), so a process killed mid-export leaves no finished-looking case.
    ``threads``: torch threads of the export (resampling); None = nnU-Net's default. A segmentation alone of a softmax
    model is made by :func:`segmentation_from_logits` (never every class at the original grid; same mask) and written with the
    plans' reader/writer. Returns the seconds it took."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    t0 = time.perf_counter()
    folder, name = os.path.split(os.path.abspath(output_file_truncated))
    tmp = tempfile.mkdtemp(prefix=_partial_prefix(name), suffix=owner_suffix(), dir=folder)  # file_safety.owner_alive
    old_threads = torch.get_num_threads()
    try:
        label_manager = None if save_probabilities else plans_manager.get_label_manager(dataset_json)
        if label_manager is None or label_manager.has_regions:
            export_prediction_from_logits(logits, properties, configuration_manager, plans_manager, dataset_json,
                                          os.path.join(tmp, name), save_probabilities,
                                          threads or default_num_processes)
        else:
            torch.set_num_threads(threads or default_num_processes)
            seg = segmentation_from_logits(logits, properties, configuration_manager, plans_manager, label_manager)
            del logits
            plans_manager.image_reader_writer_class().write_seg(
                seg, os.path.join(tmp, name + dataset_json["file_ending"]), properties)
        seg_file = name + dataset_json["file_ending"]
        for f in sorted(os.listdir(tmp), key=lambda f: f == seg_file):
            os.replace(os.path.join(tmp, f), os.path.join(folder, f))
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - t0
