"""The tiles of a case through the network: batched test-time mirroring inside nnU-Net's sliding window.

nnU-Net's ``nnUNetPredictor`` (2.8.1) calls the network once per tile and once per mirrored copy of it: up to 8
calls of batch 1 for a 3D tile, 4 for a 2D one. On the CPU, torch sends batch-1 3D convolutions with few channels
to its slow im2col path (``slow_conv3d``); batch >= 2 goes to oneDNN. ``nnppPredictor`` keeps nnU-Net's sliding
window (its slicers, Gaussian, fp16 accumulation, padding, the OOM fallback of ``predict_sliding_window_return_logits``)
and changes only how the network is called:

* **batched mirroring**: the mirrored copies of a tile, and of several tiles where ``tta_batch`` allows, go through
  the network as one batch of at most ``tta_batch`` (tiles x mirrors; at most 8 = one 3D tile's 8 copies, two 2D
  tiles' 4). Mirrors are averaged in nnU-Net's order (identity first, then ``itertools.combinations``), so the
  logits equal nnU-Net's up to float error (batched convolutions sum in another order). ``tta_batch`` bounds the
  batch for memory: ``1`` is nnU-Net's one-copy-per-call; the default (None) chooses it per case from the classes,
  the network's activations, the patch and the case's size (:meth:`nnppPredictor.auto_tta_batch`), so a large
  model or a 100-class one stays within 1.1x nnU-Net's memory;
* tiles are fed in the **network's memory format** (channels_last_3d networks get channels_last_3d tiles);
* logits stay on any accelerator the device layer says can hold them (cuda, npu), not on cuda only;
* the network runs in the given :class:`nnpp.device.Amp` mode (the innermost autocast wins over nnU-Net's CUDA fp16).

File-to-file prediction (case lists, preprocessing, atomic export, the time split) is
:class:`nnpp.predictor.cases.CaseFilePrediction`'s, a base of ``nnppPredictor``. Preprocessing, sliding window,
Gaussian weighting, resampling and export are nnU-Net's. What this package relies on from nnU-Net's private API is
pinned by tests/test_nnunet_pins.py.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from queue import Queue
from threading import Thread

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache
from tqdm import tqdm

from nnpp import NnppError
from nnpp import device as dev
from nnpp.predictor.cases import CaseFilePrediction

DEFAULT_TTA_BATCH = 8  # the most tiles x mirrored copies per network call (one 3D tile's 8 copies)
TTA_MEMORY_FLOOR = 512 * 2 ** 20  # bytes beyond nnU-Net's tile working set the auto choice always allows
TTA_MEMORY_FRACTION = 0.1  # ... or this fraction of the case's logits accumulator, whichever is larger


def network_memory_format(network: torch.nn.Module, ndim: int) -> torch.memory_format:
    """The memory format ``network``'s convolution weights are stored in, for inputs with ``ndim`` dimensions
    (channels_last_3d for 5D / channels_last for 4D when the weights are so; contiguous otherwise, e.g. for a
    network without parameters such as an ONNX Runtime adapter)."""
    if ndim not in (4, 5):
        return torch.contiguous_format
    cl = torch.channels_last_3d if ndim == 5 else torch.channels_last
    for p in network.parameters():
        if p.ndim == ndim and p.shape[1] > 1 and p.shape[2:].numel() > 1:
            return cl if p.is_contiguous(memory_format=cl) and not p.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format


class nnppPredictor(CaseFilePrediction, nnUNetPredictor):
    """nnU-Net's predictor with batched mirroring, tiles in the network's memory format, logits kept on any
    accelerator that can hold them and the network in an AMP mode (module doc); file to file by its base
    :class:`nnpp.predictor.cases.CaseFilePrediction`. Built by :func:`nnpp.predictor.build.make_predictor`."""

    def __init__(self, tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True,
                 perform_everything_on_device: bool = True, device: torch.device = torch.device("cuda"),
                 verbose: bool = False, verbose_preprocessing: bool = False, allow_tqdm: bool = True,
                 amp: dev.Amp | None = None, tta_batch: int | None = None):
        super().__init__(tile_step_size=tile_step_size, use_gaussian=use_gaussian, use_mirroring=use_mirroring,
                         perform_everything_on_device=perform_everything_on_device, device=device, verbose=verbose,
                         verbose_preprocessing=verbose_preprocessing, allow_tqdm=allow_tqdm)
        if tta_batch is not None and (not isinstance(tta_batch, int) or tta_batch < 1):
            raise NnppError(f"--tta_batch must be a positive integer (tiles x mirrors per network call), got {tta_batch}")
        self.perform_everything_on_device = perform_everything_on_device and dev.keeps_logits_on_device(device)
        self.amp = amp
        self.tta_auto = tta_batch is None  # choose per case (auto_tta_batch), never above the cap
        self.tta_cap = DEFAULT_TTA_BATCH if tta_batch is None else tta_batch  # halved for good on out of memory
        self.tta_batch = self.tta_cap  # copies per network call now
        self._tta_said = None
        self.network_seconds = 0.0  # time inside predict_logits_from_preprocessed_data, summed over calls
        self.export_threads: int | None = None  # torch threads of each export (None: nnU-Net's default_num_processes)
        self.current_case: str | None = None  # the case predict_cases works on

    # ------------------------------------------------------------------------------------------ mirroring
    def mirror_combinations(self, ndim: int) -> list:
        """The flips nnU-Net averages for an input of ``ndim`` dims, in its order: identity first, then every
        non-empty combination of the allowed axes (as tensor axes, +2 for batch and channel)."""
        mirror_axes = self.allowed_mirroring_axes if self.use_mirroring else None
        if mirror_axes is None:
            return [()]
        if max(mirror_axes) > ndim - 3:
            raise NnppError(f"mirroring axes {tuple(mirror_axes)} do not fit {ndim - 2}D tiles")
        axes = [m + 2 for m in mirror_axes]
        return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    def auto_tta_batch(self, case_shape, accumulator_here: bool = True) -> int:
        """Copies per network call for a case of ``case_shape`` (the padded spatial shape the sliding window runs
        on): the most (<= the cap) whose extra memory stays within a budget beyond nnU-Net's own tile working set.

        nnU-Net holds 3 tile-sized logits at a time (the network's output, its flipped copy, the tile's sum) and the
        activations of a batch-1 call; :meth:`predict_tiles` holds ``n`` (a call's output) + 1 (one flipped tile) +
        ``k`` (the sum of the ``k = n // mirrors`` tiles of a group) logits and the activations of a batch-``n``
        call: ``(n + k - 2)`` logits and ``(n - 1)`` activations more (:meth:`tta_surplus_bytes`). Activations are
        the network's own ``compute_conv_feature_map_size(patch)`` (nnU-Net's planning count, an upper bound at
        inference; 0 for torch networks without it). An ONNX Runtime / OpenVINO adapter
        (:class:`nnpp.deploy.ort.OrtNetwork`) answers with the count of the torch network its export was built from
        (recorded by nnpp_export, else rebuilt from the export's plans) and says the bytes of its elements: logits as
        its session returns them (fp32 for fp32, int8 and fp16 exports, whose inputs and outputs stay fp32),
        activations 2 bytes in fp16 exports on GPU providers, else 4 (ONNX Runtime's CPU provider runs fp16 models
        through fp32 kernels; the rule is checked against ONNX Runtime's measured peak in tests/test_memory.py).
        The surplus must fit ``max(TTA_MEMORY_FLOOR,
        TTA_MEMORY_FRACTION x the case's fp16 logits accumulator)``: the accumulator is part of nnU-Net's own peak
        (only the floor when ``accumulator_here`` is False: the accumulator lives elsewhere, e.g. on the host).
        Torch elements are 2 bytes under fp16/bf16 autocast (logits summed in fp16 / fp32), else 4. Examples
        (measured peaks in benchmarks/RESULTS.md): the demo (3 classes, 8-64 features, 32x48x48, fp32): 8; Task03's
        UNet++ (32-320 features, 128^3): 1 (7 GB of activations a copy in fp32); the same with 105 classes on a
        220x380x460 case in fp16 on a GPU: 1."""
        classes = self.label_manager.num_segmentation_heads
        budget = max(TTA_MEMORY_FLOOR, TTA_MEMORY_FRACTION * classes * int(np.prod(case_shape)) * 2
                     if accumulator_here else 0)
        n = self.tta_cap
        while n > 1 and self.tta_surplus_bytes(n) > budget:
            n -= 1
        return n

    def tta_surplus_bytes(self, n: int) -> int:
        """Bytes that ``n`` tile copies per network call hold beyond nnU-Net's one copy per call (the rule of
        :meth:`auto_tta_batch`): ``(n + k - 2)`` tile-sized logits (``k = max(1, n // mirrors)`` tiles summed at a
        time) and ``(n - 1)`` samples' activations (``n`` for a network whose runtime keeps the batch-1 calls' blocks
        beside a bigger batch's: ``whole_batch_activations``, ONNX Runtime's arena), each in the precision the network
        computes and returns."""
        patch = [int(p) for p in self.configuration_manager.patch_size]
        mirrors = len(self.mirror_combinations(len(patch) + 2))
        from nnpp.distributed import bare_module  # DDP (the trainer's final validation) and compile unwrapped
        net = bare_module(self.network)
        half = self.amp.mode in ("O1", "bf16") if self.amp is not None else self.device.type == "cuda"
        # what the network says it returns and computes in (ONNX Runtime / OpenVINO adapters), else torch autocast's
        logit_size = getattr(net, "logits_itemsize", None) or \
            (2 if half and (self.amp is None or self.amp.mode == "O1") else 4)
        size = getattr(net, "activations_itemsize", None) or (2 if half else 4)
        logits = self.label_manager.num_segmentation_heads * int(np.prod(patch)) * logit_size
        try:
            activations = int(net.compute_conv_feature_map_size(patch)) * size
        except (AttributeError, TypeError, ValueError, AssertionError, NotImplementedError):
            activations = 0
        samples = n - 1 + (1 if n > 1 and getattr(net, "whole_batch_activations", False) else 0)
        return (n + max(1, n // mirrors) - 2) * logits + samples * activations

    def _run_network(self, x: torch.Tensor) -> torch.Tensor:
        """One network call on a batch, in the network's memory format and the predictor's AMP mode."""
        x = x.contiguous(memory_format=network_memory_format(self.network, x.ndim))
        with self.amp.autocast(exclusive=True) if self.amp is not None else contextlib.nullcontext():
            return self.network(x)

    @torch.inference_mode()
    def predict_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of tiles (k, C, *patch), mirrored and averaged as nnU-Net's
        ``_internal_maybe_mirror_and_predict`` does for one tile, with the k x mirrors copies going through the
        network in chunks of at most ``tta_batch``.

        Memory is bounded like nnU-Net's: each chunk's logits are flipped back and added into one accumulator of the
        k tiles as they come (no list of all outputs), in the network output's precision as nnU-Net sums its mirrors
        (fp32, or fp16 under fp16 autocast; bf16 outputs are summed in fp32). With ``tta_batch`` 1 that is nnU-Net's
        memory: one output, its flipped copy, the accumulator. Copies are taken mirror by mirror (identity first,
        then nnU-Net's combinations), so every tile's sum is in nnU-Net's order. Out of device memory anywhere in a
        chunk (the network, the flip, the sum) at a chunk > 1 halves ``tta_batch`` for the rest of the run, with one
        line, and the chunk is redone from the first copy not yet added (out of memory is what
        :func:`nnpp.device.is_out_of_memory` says: torch's error, or the plain RuntimeError of older Ascend
        releases). Returns (k, classes, *patch)."""
        combos = self.mirror_combinations(tiles.ndim)
        k, total = tiles.shape[0], tiles.shape[0] * len(combos)
        prediction, done = None, 0  # copy c is mirror c // k of tile c % k; `done` copies are in `prediction`
        while done < total:
            n = min(self.tta_batch, total - done)
            try:
                segments, c = [], done  # (mirror, first tile, end tile) runs of this chunk
                while c < done + n:
                    m, t = divmod(c, k)
                    end = min(k, t + done + n - c)
                    segments.append((m, t, end))
                    c += end - t
                x = [torch.flip(tiles[t:e], combos[m]) if combos[m] else tiles[t:e] for m, t, e in segments]
                out = self._run_network(torch.cat(x) if len(x) > 1 else x[0])
                del x
                if prediction is None:
                    dtype = torch.float32 if out.dtype == torch.bfloat16 else out.dtype
                    prediction = torch.zeros((k, *out.shape[1:]), dtype=dtype, device=out.device)
                offset = 0
                for m, t, e in segments:
                    part = out[offset:offset + e - t]
                    if combos[m]:  # tile by tile: one flipped tile in memory at a time, counted as it is added
                        for i in range(e - t):
                            prediction[t + i] += torch.flip(part[i], [a - 1 for a in combos[m]])
                            done += 1
                    else:
                        prediction[t:e] += part
                        done += e - t
                    offset += e - t
                del out, part
            except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
                if n == 1 or not dev.is_out_of_memory(e):
                    raise
                self.tta_batch = self.tta_cap = max(1, n // 2)
                out = part = x = None
                empty_cache(self.device)
                print(f"[nnpp] out of device memory at {n} tiles x mirrors per network call: continuing with "
                      f"{self.tta_batch} (set --tta_batch {self.tta_batch} to start there)")
        if len(combos) > 1:
            prediction /= len(combos)
        return prediction

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's per-tile entry, kept for callers of it: the batched path on one tile."""
        return self.predict_tiles(x)

    def _choose_tta_batch(self, case_shape, accumulator_here: bool) -> None:
        """``tta_batch`` for this case: :meth:`auto_tta_batch` unless the user set it; one line the first time the
        automatic choice stays below the cap."""
        self.tta_batch = self.auto_tta_batch(case_shape, accumulator_here) if self.tta_auto else self.tta_cap
        if self.tta_auto and self.tta_batch < self.tta_cap and self._tta_said != self.tta_batch:
            self._tta_said = self.tta_batch
            print(f"[nnpp] {self.label_manager.num_segmentation_heads} classes x "
                  f"{'x'.join(map(str, self.configuration_manager.patch_size))} patch: {self.tta_batch} tile "
                  f"cop{'y' if self.tta_batch == 1 else 'ies'} per network call (more would add over max(512 MiB, 10% of the case's logits) to nnU-Net's tile memory; --tta_batch N overrides)")

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        """nnU-Net's sliding window (same slicers, Gaussian, fp16 accumulators, producer thread, error cleanup),
        with the tiles taken in groups of ``max(1, tta_batch // mirrors)`` and predicted by :meth:`predict_tiles`
        (``tta_batch`` chosen for this case by :meth:`auto_tta_batch` unless the user set it)."""
        predicted_logits = n_predictions = prediction = gaussian = workon = None
        results_device = self.device if do_on_device else torch.device("cpu")
        self._choose_tta_batch(data.shape[1:], results_device == self.device)
        tiles_per_group = max(1, self.tta_batch // len(self.mirror_combinations(len(self.configuration_manager.patch_size) + 2)))
        groups = [slicers[i:i + tiles_per_group] for i in range(0, len(slicers), tiles_per_group)]

        def producer(d, groups, q):
            for g in groups:
                q.put((torch.stack([d[s] for s in g]).to(self.device), g))
            q.put("end")

        try:
            empty_cache(self.device)
            data = data.to(results_device)
            queue = Queue(maxsize=2)
            t = Thread(target=producer, args=(data, groups, queue), daemon=True)
            t.start()
            predicted_logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]),
                                           dtype=torch.half, device=results_device)
            n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
            if self.use_gaussian:
                gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                            value_scaling_factor=10, device=results_device)
            else:
                gaussian = 1
            with tqdm(desc=None, total=len(slicers), disable=not self.allow_tqdm) as pbar:
                while True:
                    item = queue.get()
                    if item == "end":
                        queue.task_done()
                        break
                    workon, group = item
                    prediction = self.predict_tiles(workon).to(results_device)
                    for i, sl in enumerate(group):
                        tile = prediction[i]
                        if self.use_gaussian:
                            tile *= gaussian
                        predicted_logits[sl] += tile
                        n_predictions[sl[1:]] += gaussian
                    queue.task_done()
                    pbar.update(len(group))
            queue.join()
            torch.div(predicted_logits, n_predictions, out=predicted_logits)
            if torch.any(torch.isinf(predicted_logits)):
                raise RuntimeError("Encountered inf in predicted array. Aborting... If this problem persists, "
                                   "reduce value_scaling_factor in compute_gaussian or increase the dtype of "
                                   "predicted_logits to fp32")
            return predicted_logits
        except Exception as e:
            del predicted_logits, n_predictions, prediction, gaussian, workon
            empty_cache(self.device)
            empty_cache(results_device)
            raise e

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        """nnU-Net's, with the torch threads nnU-Net's ``predict_logits_from_preprocessed_data`` predicts with
        (``min(nnUNet_def_n_proc, threads)``) also where the sliding window is called directly, as in nnU-Net's final
        validation: convolutions on the CPU sum in an order that depends on the thread count, and the fp16
        accumulators keep such differences, so validation and nnpp_predict compute the same logits (and masks)."""
        from nnunetv2.configuration import default_num_processes
        threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, threads))
        try:
            return super().predict_sliding_window_return_logits(input_image)
        finally:
            torch.set_num_threads(threads)

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return super().predict_logits_from_preprocessed_data(data)
        finally:
            dev.synchronize(self.device)
            self.network_seconds += time.perf_counter() - t0
