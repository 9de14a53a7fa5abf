"""Pins of the nnU-Net internals nnpp's predictor relies on. nnU-Net has no public hook for them, so
an nnunetv2 upgrade that changes one must fail here, with a message naming nnpp's override, instead of misbehaving.

Checked against nnunetv2 2.8.1 (setup.py states the range)."""
import inspect

import pytest
import torch


def params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def pin(ok, override, what):
    assert ok, f"nnU-Net changed what {override} relies on: {what}. Re-check that override against this nnunetv2."


def test_sliding_window_internals():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    E = inspect.Parameter.empty
    ours = "nnpp.predictor.nnppPredictor._internal_predict_sliding_window_return_logits (batched mirroring)"
    pin(params(nnUNetPredictor._internal_predict_sliding_window_return_logits) ==
        [("self", E), ("data", E), ("slicers", E), ("do_on_device", True)], ours, "its signature")
    src = inspect.getsource(nnUNetPredictor.predict_sliding_window_return_logits)
    pin("self._internal_predict_sliding_window_return_logits(data, slicers" in src and
        "self._internal_get_sliding_window_slicers(" in src, ours,
        "predict_sliding_window_return_logits no longer calls it with nnU-Net's slicers")
    body = inspect.getsource(nnUNetPredictor._internal_predict_sliding_window_return_logits)
    for fragment, meaning in (("dtype=torch.half", "fp16 accumulators"),
                              ("compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,",
                               "the Gaussian nnpp's copy computes"),
                              ("value_scaling_factor=10", "the Gaussian's scale"),
                              ("self._internal_maybe_mirror_and_predict(workon)[0]", "one tile per call"),
                              ("predicted_logits[sl] += prediction", "accumulation by slicer"),
                              ("n_predictions[sl[1:]] += gaussian", "weights by slicer")):
        pin(fragment in body, ours, f"the body it replicates ({meaning}: '{fragment}')")
    mirror = inspect.getsource(nnUNetPredictor._internal_maybe_mirror_and_predict)
    pin(params(nnUNetPredictor._internal_maybe_mirror_and_predict) == [("self", E), ("x", E)] and
        "itertools.combinations(mirror_axes, i + 1)" in mirror and "prediction /= (len(axes_combinations) + 1)"
        in mirror, "nnpp.predictor.nnppPredictor.predict_tiles / _internal_maybe_mirror_and_predict",
        "the mirror combinations and their average")
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    pin([n for n, _ in params(compute_gaussian.__wrapped__)] ==
        ["tile_size", "sigma_scale", "value_scaling_factor", "dtype", "device"],
        ours, "compute_gaussian's signature")


def test_file_to_file_internals():
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    ours = "nnpp.predictor.nnppPredictor.predict_cases"
    pin([n for n, _ in params(nnUNetPredictor._manage_input_and_output_lists)] ==
        ["self", "list_of_lists_or_source_folder", "output_folder_or_list_of_truncated_output_files",
         "folder_with_segs_from_prev_stage", "overwrite", "part_id", "num_parts", "save_probabilities"],
        ours, "_manage_input_and_output_lists' signature (case lists, parts, --continue_prediction)")
    src = inspect.getsource(nnUNetPredictor._manage_input_and_output_lists)
    pin("[part_id::num_parts]" in src and "isfile(i + self.dataset_json['file_ending'])" in src and
        "isfile(i + '.npz')" in src, ours, "how a case is split into parts and taken as finished")
    pin([n for n, _ in params(nnUNetPredictor._internal_get_data_iterator_from_lists_of_filenames)] ==
        ["self", "input_list_of_lists", "seg_from_prev_stage_files", "output_filenames_truncated", "num_processes"],
        ours, "the preprocessing iterator's signature")
    pin([n for n, _ in params(export_prediction_from_logits)] ==
        ["predicted_array_or_file", "properties_dict", "configuration_manager", "plans_manager",
         "dataset_json_dict_or_file", "output_file_truncated", "save_probabilities", "num_threads_torch"],
        "nnpp.predictor.export_case", "export_prediction_from_logits' signature")
    src = inspect.getsource(export_prediction_from_logits)
    pin("output_file_truncated + dataset_json_dict_or_file['file_ending']" in src and
        "output_file_truncated + '.npz'" in src, "nnpp.predictor.export_case",
        "the files export_prediction_from_logits writes (moved into place atomically by name)")


def test_validation_predictor_global():
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    ours = "nnpp.predictor.nnunet_validation_uses (swaps the predictor class of nnU-Net's final validation)"
    pin(getattr(trainer_module, "nnUNetPredictor", None) is not None, ours,
        "nnunetv2.training.nnUNetTrainer.nnUNetTrainer has no module global nnUNetPredictor")
    src = inspect.getsource(trainer_module.nnUNetTrainer.perform_actual_validation)
    pin("predictor = nnUNetPredictor(" in src and "predictor.predict_sliding_window_return_logits(data)" in src,
        ours, "perform_actual_validation no longer builds nnUNetPredictor by that name and predicts through it")


def test_the_swap_is_undone(monkeypatch):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    from nnpp import device as dev
    from nnpp.predictor.build import nnunet_validation_uses
    from nnpp.predictor.tiles import nnppPredictor
    original = trainer_module.nnUNetPredictor
    with pytest.raises(RuntimeError):
        with nnunet_validation_uses(dev.make_amp("O0", torch.device("cpu")), tta_batch=3):
            p = trainer_module.nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
            assert isinstance(p, nnppPredictor) and p.tta_batch == 3 and p.amp.mode == "O0"
            raise RuntimeError("validation failed")
    assert trainer_module.nnUNetPredictor is original
