"""File-to-file prediction: nnU-Net's case lists and preprocessing, each case written atomically, its time measured.

:class:`CaseFilePrediction` is a base of :class:`nnpp.predictor.tiles.nnppPredictor`; it uses what nnU-Net's
predictor and nnppPredictor hold (plans, configuration, ``predict_logits_from_preprocessed_data``,
``network_seconds``, ``export_threads``, ``current_case``).
"""
from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache

from nnpp import NnppError
from nnpp.predictor.resample import export_case, remove_abandoned_exports


class CaseFilePrediction:
    """File to file (:meth:`predict_cases`), for nnU-Net's predictor subclasses that time their network calls."""

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
        self._check_previous_stage(folder_with_segs_from_prev_stage)
        cases, outputs, prev = self._manage_input_and_output_lists(
            input_folder, output_folder, folder_with_segs_from_prev_stage, overwrite, part_id, num_parts,
            save_probabilities)
        if not cases:
            return []
        remove_abandoned_exports(outputs)
        overlapped = num_processes_preprocessing > 0
        if overlapped:
            preprocessed = self._preprocessed_by_workers(cases, prev, outputs, num_processes_preprocessing)
        else:
            preprocessed = self._preprocessed_here(cases, prev, outputs, folder_with_segs_from_prev_stage is not None)
        records = self._predict_and_export(preprocessed, save_probabilities, num_processes_segmentation_export,
                                           overlapped, on_case_done)
        compute_gaussian.cache_clear()
        empty_cache(self.device)
        order = {os.path.basename(o): i for i, o in enumerate(outputs)}
        return sorted(records, key=lambda r: order.get(r["case"], 0))

    def _check_previous_stage(self, folder_with_segs_from_prev_stage: str | None) -> None:
        if self.configuration_manager.previous_stage_name is not None and folder_with_segs_from_prev_stage is None:
            raise NnppError(f"this configuration is a cascade stage after {self.configuration_manager.previous_stage_name}: "
                            f"pass -prev_stage_predictions with that stage's predictions")

    def _preprocessed_here(self, cases, prev, outputs, with_previous_stage: bool):
        """(data, properties, output file, seconds of reading + preprocessing) of each case, preprocessed in this
        process in order; the previous stage's segmentation appended one-hot for a cascade stage."""
        from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing)
        for files, ofile, sps in zip(cases, outputs, prev):
            t0 = time.perf_counter()
            self.current_case = os.path.basename(ofile)
            data, seg, properties = preprocessor.run_case(files, sps, self.plans_manager,
                                                          self.configuration_manager, self.dataset_json)
            if with_previous_stage:
                data = np.vstack((data, convert_labelmap_to_one_hot(
                    seg[0], self.label_manager.foreground_labels, data.dtype)))
            yield torch.from_numpy(data), properties, ofile, time.perf_counter() - t0

    def _preprocessed_by_workers(self, cases, prev, outputs, processes: int):
        """The same tuples from nnU-Net's preprocessing worker processes; the seconds are the time this process
        waited for the case."""
        iterator = self._internal_get_data_iterator_from_lists_of_filenames(cases, prev, outputs, processes)
        t0 = time.perf_counter()
        for i, item in enumerate(iterator):  # the workers hand cases over in order
            self.current_case = os.path.basename(outputs[i])
            data = item["data"]
            if isinstance(data, str):  # nnU-Net's workers hand large cases over as .npy files
                path, data = data, torch.from_numpy(np.load(data))
                os.remove(path)
            yield data, item["data_properties"], item["ofile"], time.perf_counter() - t0
            t0 = time.perf_counter()

    def _predict_and_export(self, preprocessed, save_probabilities: bool, export_processes: int, overlapped: bool,
                            on_case_done) -> list:
        """The logits of each preprocessed case, exported in this process (``export_processes`` 0) or by a spawned
        pool of that many workers, at most 2 cases queued per worker. Returns the records in the order finished."""
        from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
        records, pending = [], []
        export_args = (self.configuration_manager, self.plans_manager, self.dataset_json)
        threads = self.export_threads
        pool = multiprocessing.get_context("spawn").Pool(export_processes) if export_processes > 0 else None
        try:
            workers = list(pool._pool) if pool is not None else []
            for data, properties, ofile, read_s in preprocessed:
                record, logits = self._predict_case(data, ofile, read_s, overlapped or pool is not None)
                if pool is None:
                    record["export_s"] = export_case(logits, properties, *export_args, ofile, save_probabilities,
                                                     threads)
                    self._case_done(record, records, on_case_done)
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
        return records

    def _predict_case(self, data, ofile: str, read_s: float, overlapped: bool):
        """The case's logits on the CPU and its record (``export_s`` still None)."""
        self.current_case = os.path.basename(ofile)  # named by a rank that fails (nnpp_predict under torchrun)
        # (also set while a case is read and preprocessed; with worker processes a failure there may be named
        # after the last case handed over)
        if self.verbose:
            print(f"predicting {os.path.basename(ofile)}")
        network_before = self.network_seconds
        logits = self.predict_logits_from_preprocessed_data(data).cpu()
        record = {"case": os.path.basename(ofile), "read_preprocess_s": read_s,
                  "network_s": self.network_seconds - network_before, "export_s": None, "overlapped": overlapped}
        return record, logits

    @staticmethod
    def _case_done(record: dict, records: list, on_case_done) -> None:
        records.append(record)
        if on_case_done:
            on_case_done(record)

    @staticmethod
    def _collect(pending, records, workers, on_case_done, wait: bool) -> list:
        """The pending exports that are finished go into ``records`` (all of them with ``wait``: a dead worker is
        one line); returns those still running."""
        left = []
        for record, result in pending:
            while wait and not result.ready():
                if not all(w.is_alive() for w in workers):
                    raise NnppError("a segmentation export worker died (likely killed for lack of CPU memory); "
                                    "use fewer -nps processes")
                result.wait(0.1)
            if result.ready():
                record["export_s"] = result.get()
                CaseFilePrediction._case_done(record, records, on_case_done)
            else:
                left.append((record, result))
        return left
