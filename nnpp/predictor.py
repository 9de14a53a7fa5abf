"""nnU-Net's predictor with what nnpp's device layer knows, and batched test-time mirroring.

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

Preprocessing, sliding window, Gaussian weighting, resampling and export are nnU-Net's. What this module relies on
from nnU-Net's private API is pinned by tests/test_nnunet_pins.py.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import os
import shutil
import tempfile
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
from nnpp.files import owner_alive, owner_suffix

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


class nnppPredictor(nnUNetPredictor):
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
        call: ``(n + k - 2)`` logits and ``(n - 1)`` activations more. Activations are the network's own
        ``compute_conv_feature_map_size(patch)`` (nnU-Net's planning count, an upper bound at inference; 0 for
        networks without it, e.g. ONNX Runtime adapters). The surplus must fit ``max(TTA_MEMORY_FLOOR,
        TTA_MEMORY_FRACTION x the case's fp16 logits accumulator)``: the accumulator is part of nnU-Net's own peak
        (only the floor when ``accumulator_here`` is False: the accumulator lives elsewhere, e.g. on the host).
        Elements are 2 bytes under fp16/bf16 autocast (logits summed in fp16 / fp32), else 4. Examples (measured
        peaks in benchmarks/RESULTS.md): the demo (3 classes, 8-64 features, 32x48x48, fp32): 8; Task03's UNet++
        (32-320 features, 128^3): 1 (7 GB of activations a copy in fp32); the same with 105 classes on a
        220x380x460 case in fp16 on a GPU: 1."""
        patch = [int(p) for p in self.configuration_manager.patch_size]
        mirrors = len(self.mirror_combinations(len(patch) + 2))
        half = self.amp.mode in ("O1", "bf16") if self.amp is not None else self.device.type == "cuda"
        size = 2 if half else 4
        classes = self.label_manager.num_segmentation_heads
        logits = classes * int(np.prod(patch)) * (2 if half and (self.amp is None or self.amp.mode == "O1") else 4)
        from nnpp.distributed import bare_module  # DDP (the trainer's final validation) and compile unwrapped
        try:
            activations = int(bare_module(self.network).compute_conv_feature_map_size(patch)) * size
        except (AttributeError, TypeError, ValueError, AssertionError, NotImplementedError):
            activations = 0
        budget = max(TTA_MEMORY_FLOOR, TTA_MEMORY_FRACTION * classes * int(np.prod(case_shape)) * 2
                     if accumulator_here else 0)
        n = self.tta_cap
        while n > 1 and (n + max(1, n // mirrors) - 2) * logits + (n - 1) * activations > budget:
            n -= 1
        return n

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

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        """nnU-Net's sliding window (same slicers, Gaussian, fp16 accumulators, producer thread, error cleanup),
        with the tiles taken in groups of ``max(1, tta_batch // mirrors)`` and predicted by :meth:`predict_tiles`
        (``tta_batch`` chosen for this case by :meth:`auto_tta_batch` unless the user set it)."""
        predicted_logits = n_predictions = prediction = gaussian = workon = None
        results_device = self.device if do_on_device else torch.device("cpu")
        self.tta_batch = self.auto_tta_batch(data.shape[1:], results_device == self.device) if self.tta_auto \
            else self.tta_cap
        if self.tta_auto and self.tta_batch < self.tta_cap and self._tta_said != self.tta_batch:
            self._tta_said = self.tta_batch
            print(f"[nnpp] {self.label_manager.num_segmentation_heads} classes x "
                  f"{'x'.join(map(str, self.configuration_manager.patch_size))} patch: {self.tta_batch} tile "
                  f"cop{'y' if self.tta_batch == 1 else 'ies'} per network call (more would add over max(512 MiB, 10% of the case's logits) to nnU-Net's tile memory; --tta_batch N overrides)")
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

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return super().predict_logits_from_preprocessed_data(data)
        finally:
            dev.synchronize(self.device)
            self.network_seconds += time.perf_counter() - t0


    # ------------------------------------------------------------------------------------- file to file
    def predict_cases(self, input_folder, output_folder: str, save_probabilities: bool = False, overwrite: bool = True,
                      folder_with_segs_from_prev_stage: str | None = None, num_processes_preprocessing: int = 0,
                      num_processes_segmentation_export: int = 0, num_parts: int = 1, part_id: int = 0,
                      on_case_done=None) -> list:
        """nnU-Net's file-to-file prediction (``predict_from_files`` / ``predict_from_files_sequential``: its case
        lists and ``--continue_prediction`` skip, its preprocessing iterator or preprocessor, this predictor's
        logits, its ``export_prediction_from_logits``) with two changes: every case is written **atomically**
        (:func:`export_case`: into a hidden temp folder beside the outputs, then renamed, the segmentation last,
        so a killed process never leaves a file that ``--continue_prediction`` takes for a finished case), and
        each case's time is measured in three parts.

        ``num_processes_preprocessing`` / ``_segmentation_export`` 0: everything in this process, in order (all three
        parts measured exactly); > 0: nnU-Net's background processes, and then ``read_preprocess_s`` is the time
        this process *waited* for a preprocessed case (the work itself overlaps the network) and ``export_s`` the
        export worker's own time (it overlaps the next cases). Returns one dict per case (``case``,
        ``read_preprocess_s``, ``network_s``, ``export_s``, ``overlapped``); ``on_case_done(record)`` is called as
        each case is finished."""
        from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
        from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
        if self.configuration_manager.previous_stage_name is not None and folder_with_segs_from_prev_stage is None:
            raise NnppError(f"this configuration is a cascade stage after {self.configuration_manager.previous_stage_name}: "
                            f"pass -prev_stage_predictions with that stage's predictions")
        cases, outputs, prev = self._manage_input_and_output_lists(
            input_folder, output_folder, folder_with_segs_from_prev_stage, overwrite, part_id, num_parts,
            save_probabilities)
        if not cases:
            return []
        names = [os.path.basename(o) for o in outputs]
        for o in outputs:  # temp folders a killed run left for this part's cases (not those of a live process)
            parent = os.path.dirname(os.path.abspath(o))
            for d in os.listdir(parent):
                if d.startswith(f".{os.path.basename(o)}.partial.") and not owner_alive(d):
                    shutil.rmtree(os.path.join(parent, d), ignore_errors=True)
        overlapped = num_processes_preprocessing > 0

        def items():
            if not overlapped:
                preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing)
                for files, ofile, sps in zip(cases, outputs, prev):
                    t0 = time.perf_counter()
                    self.current_case = os.path.basename(ofile)
                    data, seg, properties = preprocessor.run_case(files, sps, self.plans_manager,
                                                                  self.configuration_manager, self.dataset_json)
                    if folder_with_segs_from_prev_stage is not None:
                        import numpy as np
                        data = np.vstack((data, convert_labelmap_to_one_hot(
                            seg[0], self.label_manager.foreground_labels, data.dtype)))
                    yield torch.from_numpy(data), properties, ofile, time.perf_counter() - t0
                return
            iterator = self._internal_get_data_iterator_from_lists_of_filenames(cases, prev, outputs,
                                                                                num_processes_preprocessing)
            t0 = time.perf_counter()
            for i, item in enumerate(iterator):  # the workers hand cases over in order
                self.current_case = names[i]
                data = item["data"]
                if isinstance(data, str):  # nnU-Net's workers hand large cases over as .npy files
                    import numpy as np
                    path, data = data, torch.from_numpy(np.load(data))
                    os.remove(path)
                yield data, item["data_properties"], item["ofile"], time.perf_counter() - t0
                t0 = time.perf_counter()

        records, pending = [], []
        export_args = (self.configuration_manager, self.plans_manager, self.dataset_json)
        threads = self.export_threads
        pool = multiprocessing.get_context("spawn").Pool(num_processes_segmentation_export) \
            if num_processes_segmentation_export > 0 else None
        try:
            workers = list(pool._pool) if pool is not None else []
            for data, properties, ofile, read_s in items():
                self.current_case = os.path.basename(ofile)  # named by a rank that fails (nnpp_predict under torchrun)
                # (also set while a case is read and preprocessed; with worker processes a failure there may be named
                # after the last case handed over)
                if self.verbose:
                    print(f"predicting {os.path.basename(ofile)}")
                network_before = self.network_seconds
                logits = self.predict_logits_from_preprocessed_data(data).cpu()
                record = {"case": os.path.basename(ofile), "read_preprocess_s": read_s,
                          "network_s": self.network_seconds - network_before, "export_s": None,
                          "overlapped": overlapped or pool is not None}
                if pool is None:
                    record["export_s"] = export_case(logits, properties, *export_args, ofile, save_probabilities,
                                                     threads)
                    records.append(record)
                    if on_case_done:
                        on_case_done(record)
                    continue
                while check_workers_alive_and_busy(pool, workers, [r for _, r in pending], allowed_num_queued=2):
                    time.sleep(0.1)
                pending.append((record, pool.apply_async(export_case, (logits.numpy(), properties, *export_args,
                                                                       ofile, save_probabilities, threads))))
                pending = self._collect(pending, records, workers, on_case_done, wait=False)
            self._collect(pending, records, workers, on_case_done, wait=True)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        compute_gaussian.cache_clear()
        empty_cache(self.device)
        order = {n: i for i, n in enumerate(names)}
        return sorted(records, key=lambda r: order.get(r["case"], 0))

    @staticmethod
    def _collect(pending, records, workers, on_case_done, wait: bool) -> list:
        left = []
        for record, result in pending:
            while wait and not result.ready():
                if not all(w.is_alive() for w in workers):
                    raise NnppError("a segmentation export worker died (likely killed for lack of CPU memory); "
                                    "use fewer -nps processes")
                result.wait(0.1)
            if result.ready():
                record["export_s"] = result.get()
                records.append(record)
                if on_case_done:
                    on_case_done(record)
            else:
                left.append((record, result))
        return left


# ------------------------------------------------------------------------------------------ export resampling
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


# ---------------------------------------------------------------------------------- building a predictor
# (the library home of what nnpp_predict, nnpp_export's guard, the benchmarks and the trainer need)
def inference_amp(mode: str, device):
    """The torch precision of nnpp_predict: ``auto`` is nnU-Net's inference choice (fp16 autocast on cuda, and on
    npu alike; fp32 elsewhere), not the training default (which picks bf16 on CPUs with native bf16)."""
    if mode == "auto":
        mode = "O1" if device.type in ("cuda", "npu") else "O0"
    return dev.make_amp(mode, device)


AMP_TEXT = {"O0": "fp32", "O1": "fp16 autocast", "bf16": "bf16 autocast"}


def make_predictor(device, step_size: float = 0.5, mirroring: bool = True, on_device: bool = True,
                   verbose: bool = False, progress: bool = True, amp=None, tta_batch: int | None = None):
    """nnU-Net's predictor on ``device`` (a torch.device: cpu, cuda, mps, npu...) with Gaussian weighting;
    :class:`nnpp.predictor.nnppPredictor`: logits stay on npu as they do on cuda (``on_device``), mirrored copies
    go through the network in batches of ``tta_batch``, the network runs in ``amp`` (an nnpp.device.Amp)."""
    return nnppPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirroring,
                         perform_everything_on_device=on_device, device=device, verbose=verbose,
                         verbose_preprocessing=verbose, allow_tqdm=progress, amp=amp,
                         tta_batch=tta_batch)


def _no_compile(predictor, compile_ok: bool) -> None:
    """nnU-Net compiles the network when nnUNet_compile is set; undo that where compiling is not supported
    (ONNX Runtime adapters, devices other than cuda)."""
    from torch._dynamo.eval_frame import OptimizedModule
    if not compile_ok and isinstance(predictor.network, OptimizedModule):
        predictor.network = predictor.network._orig_mod


def init_torch(predictor, model_folder: str, folds, checkpoint_name: str = "checkpoint_final.pth",
               depth: int | None = None):
    """Initialise ``predictor`` with the torch network of ``model_folder`` (built by the checkpoint's trainer
    class, every fold loaded strictly, pruned to ``depth``). Returns the :class:`TrainedModel`."""
    from nnpp.model_folder import load_trained_model, pruning_warning, set_depth
    model = load_trained_model(model_folder, folds, checkpoint_name)
    network = set_depth(model.build_network(0), depth)
    warning = pruning_warning(model, depth, getattr(network, "depth", None))
    if warning:
        print(f"[nnpp_predict] {warning}", flush=True)
    predictor.manual_initialization(network, model.plans_manager, model.configuration_manager, model.parameters,
                                    model.dataset_json, model.trainer_name, model.inference_allowed_mirroring_axes)
    _no_compile(predictor, dev.compile_supported(predictor.device))
    return model


def init_onnx(predictor, onnx_folder: str, folds=None, provider: str = "cpu", threads: int = 0,
              trt_cache: str | None = None, device_id: int | None = None) -> dict:
    """Initialise ``predictor`` with the ONNX Runtime sessions of an nnpp_export folder (its plans.json,
    dataset.json and mirroring axes; ``folds`` a subset of the exported ones). ``device_id``: the accelerator the
    provider runs on (default: the predictor's device index; under torchrun the local rank, also for providers
    whose tiles stay on the host such as cann). Returns the export metadata."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnpp.model_folder import load_model_json
    from nnpp.deploy.ort import load_onnx_folder
    meta, network = load_onnx_folder(onnx_folder, provider, threads, folds, trt_cache,
                                     device_id=(predictor.device.index or 0) if device_id is None else device_id)
    plans = load_model_json(os.path.join(onnx_folder, "plans.json"), "plans.json of the ONNX export")
    dataset_json = load_model_json(os.path.join(onnx_folder, "dataset.json"), "dataset.json of the ONNX export")
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(meta["source"]["configuration"])
    if list(configuration_manager.patch_size) != list(meta["patch_size"]):
        raise NnppError(f"{onnx_folder}: plans.json patch {configuration_manager.patch_size} differs from the "
                        f"exported models' {meta['patch_size']}; re-export")
    mirror = meta.get("inference_allowed_mirroring_axes")
    predictor.manual_initialization(network, plans_manager, configuration_manager, network.parameters_list(),
                                    dataset_json, meta["source"]["trainer"], tuple(mirror) if mirror is not None else None)
    _no_compile(predictor, False)
    return meta


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
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial.", suffix=owner_suffix(), dir=folder)  # files.owner_alive
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


@contextlib.contextmanager
def nnunet_validation_uses(amp: dev.Amp, tta_batch: int | None = None):
    """While active, nnU-Net's trainer validation (``perform_actual_validation``) builds an :class:`nnppPredictor`
    in ``amp``'s mode with batched mirroring. nnU-Net offers no hook for the predictor class it builds there, so
    the name it looks up is swapped for the duration of the call and restored afterwards (the rest of validation,
    130 lines of nnU-Net's, stays nnU-Net's; the swap is pinned by tests/test_nnunet_pins.py)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    original = trainer_module.nnUNetPredictor
    trainer_module.nnUNetPredictor = functools.partial(nnppPredictor, amp=amp, tta_batch=tta_batch)
    try:
        yield
    finally:
        trainer_module.nnUNetPredictor = original
