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
#: nnU-Net's torch resampling (resample_torch_fornnunet, as its *_torchres planners plan it)
RESAMPLE_CHOICES = ("torch", "plans")
DEFAULT_RESAMPLE = "torch"


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


def argmax_of_trilinear(logits: torch.Tensor, shape, chunk: int = 2 ** 19) -> torch.Tensor:
    """``F.interpolate(logits[None].float(), shape, mode="trilinear")[0].argmax(0)`` (nnU-Net's
    ``resample_torch_fornnunet`` of logits, then the argmax) without the classes x output-voxels array; the same
    classes up to float rounding at near-ties.

    Trilinear interpolation is a convex combination of a cell's 8 corner voxels, so where the 8 corners have the
    same arg-max class the interpolated arg-max is that class: most output voxels are a gather of the input's
    arg-max. Only voxels in cells whose corners disagree are interpolated, and only for the corners' arg-max
    classes (in float64 where the device has it, else float32); the result is kept where it beats an upper bound
    of every other class there (per corner, the largest logit of a class outside those, from each input voxel's
    top 3), else all classes are interpolated for that voxel. The logits stay in their dtype (fp16 logits are not
    copied to fp32). Returns int16 labels of ``shape``. Ties go to the lower class as in argmax."""
    dev_ = logits.device
    wide = torch.float64 if dev_.type in ("cpu", "cuda") else torch.float32  # npu / mps: no float64 kernels
    n_cls, ins = logits.shape[0], tuple(logits.shape[1:])
    arg = logits.argmax(0)  # the lower class on ties (topk's order among equal values is not defined)
    top_v, top_c = torch.topk(logits, min(3, n_cls), dim=0)
    axes = [_trilinear_axis(n, o, dev_) for n, o in zip(ins, shape)]
    # cells (corner i0 along each axis, upper corner clamped) whose 8 corners share the arg-max
    pad = torch.nn.functional.pad(arg[None, None].float(), (0, 1, 0, 1, 0, 1), mode="replicate")[0, 0]
    uniform = torch.ones(ins, dtype=torch.bool, device=dev_)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                uniform &= pad[dx:dx + ins[0], dy:dy + ins[1], dz:dz + ins[2]] == pad[:ins[0], :ins[1], :ins[2]]
    del pad
    ix, iy, iz = (a[0] for a in axes)
    seg = arg.to(torch.int16)[ix[:, None, None], iy[None, :, None], iz[None, None, :]]
    flat, arg = logits.reshape(n_cls, -1), arg.reshape(-1)
    top_v, top_c = top_v.reshape(top_v.shape[0], -1), top_c.reshape(top_c.shape[0], -1).to(torch.int16)
    strides = (ins[1] * ins[2], ins[2], 1)
    rows = max(1, chunk // (len(iy) * len(iz)))
    for x0 in range(0, len(ix), rows):  # slabs along the first output axis: the voxel list stays small
        todo = (~uniform[ix[x0:x0 + rows][:, None, None], iy[None, :, None], iz[None, None, :]]).nonzero()
        todo[:, 0] += x0
        for s in range(0, todo.shape[0], chunk):
            o = todo[s:s + chunk]
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
            f, w = torch.stack(corners, 1), torch.stack(weights, 1).to(wide)  # (m, 8) flat corner index, weight
            cand = arg[f]  # (m, 8): the corners' arg-max classes
            vals = (flat[cand[:, :, None], f[:, None, :]].to(wide) * w[:, None, :]).sum(2)  # (m, 8) per candidate
            best = vals.max(1).values
            label = torch.where(vals == best[:, None], cand, n_cls).min(1).values  # the lower class on ties
            outside = (top_c[:, f][..., None] != cand.to(torch.int16)[None, :, None, :]).all(3)  # (3, m, 8)
            bound = torch.where(outside, top_v[:, f].to(wide), -torch.inf).amax(0).maximum(top_v[-1][f].to(wide))
            unsure = (~(best > (bound * w).sum(1))).nonzero()[:, 0]
            per = max(1, 2 ** 22 // (8 * n_cls))  # 32 MB of float64 at a time
            for u0 in range(0, len(unsure), per):  # every class for these voxels, a few at a time
                u = unsure[u0:u0 + per]
                label[u] = (flat[:, f[u]].to(wide) * w[u][None]).sum(2).argmax(0)
            seg[o[:, 0], o[:, 1], o[:, 2]] = label.to(torch.int16)
    return seg


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
    model, in bounded memory: with nnU-Net's torch resampling (``--resample torch``: trilinear, no separate z axis)
    the argmax of the resampled logits is computed without resampling every class (:func:`argmax_of_trilinear`);
    otherwise the logits go back to the original grid (the configuration's ``resampling_fn_probabilities``, nnU-Net's
    spacings) ``classes_per_chunk`` classes at a time, and only the running maximum and its class are kept (the argmax of the logits is nnU-Net's segmentation: softmax keeps the order; ties
    go to the lower class as in argmax). nnU-Net's own holds every class at the original resolution (a 62-class model
    on a 458 x 379 x 224 CT: 10.7 GB peak). Then nnU-Net's steps: the crop reverted, the transpose undone.
    Returns the segmentation (numpy, uint8 or uint16)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
    shape = properties["shape_after_cropping_and_before_resampling"]
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) else \
        [spacing[0], *configuration_manager.spacing]
    config = configuration_manager.configuration
    kw = config.get("resampling_fn_probabilities_kwargs") or {}
    if config.get("resampling_fn_probabilities") == "resample_torch_fornnunet" and len(shape) == 3 and \
            not kw.get("is_seg") and kw.get("mode", "linear") == "linear" and \
            not determine_do_sep_z_and_axis(kw.get("force_separate_z"), current, spacing,
                                            kw.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD))[0]:
        data = torch.from_numpy(logits) if isinstance(logits, np.ndarray) else logits
        seg = argmax_of_trilinear(data.to(kw.get("device", "cpu")), [int(s) for s in shape])
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
