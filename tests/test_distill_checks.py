"""nnpp_distill's start-up checks, one fixture per branch: check_compatible (labels, output heads, input
channels, 2D vs 3D, spacing, normalisation, stride), the leak check's refusals (missing dataset, no cases, a
teacher outside DatasetXXX_Name, a distilled teacher's recorded cases) and the student plans' refusals (cascade
stages, UNet++-only options for a U-Net student). Every case is one NnppError line, never a traceback."""
import copy
import json
import os

import pytest
import torch

from nnpp import NnppError


@pytest.fixture(scope="module")
def plans(tiny_dataset):
    pre = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        p = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dj = json.load(f)
    return p, dj


def _teacher(plans, dataset_json, configuration="3d_fullres", edit=None, folder="teacher", fold="0"):
    """A Teacher whose plans are ``plans`` after ``edit(configuration dict, plans)``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnpp.distill.teachers import Teacher
    p = copy.deepcopy(plans)
    if edit:
        edit(p["configurations"][configuration], p)
    pm = PlansManager(p)
    return Teacher(torch.nn.Conv3d(1, 1, 1), folder, fold, pm, pm.get_configuration(configuration), dataset_json)


def _student(plans):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    return pm, pm.get_configuration("3d_fullres")


def _check(teacher, plans, dataset_json):
    from nnpp.distill.teachers import check_compatible
    pm, cm = _student(plans)
    check_compatible(teacher, pm, cm, dataset_json)


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_same_data_is_compatible(plans):
    p, dj = plans
    _check(_teacher(p, dj), p, dj)


@pytest.mark.parametrize("what, teacher_edit, dataset_edit, match", [
    ("labels", None, lambda dj: {**dj, "labels": {"background": 0, "liver": 1}}, "has labels"),
    ("more labels", None, lambda dj: {**dj, "labels": {"background": 0, "liver": 1, "tumour": 2, "cyst": 3}},
     "has labels"),
    ("input channels", None, lambda dj: {**dj, "channel_names": {"0": "CT", "1": "PET"}}, "takes 2 input channels"),
    ("spacing", lambda c, p: c.update(spacing=[9.0, 9.0, 9.0]), None, "trained at spacing [9.0, 9.0, 9.0]"),
    ("normalisation", lambda c, p: c.update(normalization_schemes=["ZScoreNormalization"]), None,
     "normalises its input differently (['ZScoreNormalization']"),
    ("intensity statistics", lambda c, p: p["foreground_intensity_properties_per_channel"]["0"].update(mean=1234.5),
     None, "normalises its input differently"),
])
def test_each_incompatibility_is_one_line(plans, what, teacher_edit, dataset_edit, match):
    p, dj = plans
    teacher = _teacher(p, dataset_edit(dj) if dataset_edit else dj, edit=teacher_edit)
    with pytest.raises(NnppError) as e:
        _check(teacher, p, dj)
    assert match in _one_line(e), (what, str(e.value))


def test_stride_that_does_not_divide_the_student_patch(plans):
    p, dj = plans
    student = copy.deepcopy(p)
    student["configurations"]["3d_fullres"]["patch_size"] = [16, 32, 36]  # 36 is not a multiple of 8
    with pytest.raises(NnppError) as e:
        _check(_teacher(p, dj), student, dj)
    assert "student patch [16, 32, 36] is not divisible by teacher teacher/fold_0's total stride [4, 8, 8]" \
        in _one_line(e)


def test_2d_teacher_with_3d_student(plans):
    p, dj = plans
    assert "2d" in p["configurations"]
    with pytest.raises(NnppError) as e:
        _check(_teacher(p, dj, "2d"), p, dj)
    assert "is a 2D model" in _one_line(e) and "the student's configuration is 3D" in str(e.value)


# ------------------------------------------------------------------------------------------------ leak check
def _root(tmp_path, cases=("c0", "c1", "c2")):
    pre = tmp_path / "pre" / "Dataset950_X"
    pre.mkdir(parents=True)
    splits = [{"train": [c for c in cases if c != v], "val": [v]} for v in cases]
    (pre / "splits_final.json").write_text(json.dumps(splits))
    return str(tmp_path / "pre")


def _bare_teacher(folder, fold):
    from nnpp.distill.teachers import Teacher
    return Teacher(torch.nn.Conv3d(1, 1, 1), folder=str(folder), fold=fold)


def test_teacher_on_fold_all_with_missing_dataset_folder(tmp_path):
    from nnpp.distill.teachers import check_leaks
    root = _root(tmp_path)
    t = _bare_teacher(tmp_path / "res" / "Dataset951_Gone" / "Tr__P__3d", "all")
    with pytest.raises(NnppError) as e:
        check_leaks([t], root, 0, ["c0"])
    assert "Dataset951_Gone does not exist" in _one_line(e)


def test_dataset_without_cases_is_not_leak_free(tmp_path):
    from nnpp.distill.teachers import check_leaks
    root = _root(tmp_path)
    (tmp_path / "pre" / "Dataset952_Empty" / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    t = _bare_teacher(tmp_path / "res" / "Dataset952_Empty" / "Tr__P__3d", "all")
    with pytest.raises(NnppError) as e:
        check_leaks([t], root, 0, ["c0"])
    assert "no cases found" in _one_line(e)


def test_teacher_outside_a_dataset_folder(tmp_path):
    from nnpp.distill.teachers import check_leaks, describe_leak
    root = _root(tmp_path)
    t = _bare_teacher(tmp_path / "somewhere" / "Tr__P__3d", "0")
    with pytest.raises(NnppError) as e:
        check_leaks([t], root, 0, ["c0"])
    assert "not inside a DatasetXXX_Name folder" in _one_line(e) and "--allow_val_leak" in str(e.value)
    leaks = check_leaks([t], root, 0, ["c0"], allow_val_leak=True)  # accepted, and the run is leaky
    assert leaks == [("Tr__P__3d/fold_0", None)]
    assert "training cases are unknown" in describe_leak(*leaks[0])


def test_distilled_teacher_uses_its_recorded_cases(tmp_path):
    """A KD student used as a teacher: its kd_config.json lists every case its weights saw (its own training
    cases and its teachers'); the leak check uses that list, not only its fold's split."""
    from nnpp.distill.teachers import check_leaks
    root = _root(tmp_path)
    folder = tmp_path / "res" / "Dataset950_X" / "nnUNetTrainerKD__P_kd__3d"
    (folder / "fold_1").mkdir(parents=True)
    t = _bare_teacher(folder, "1")
    assert check_leaks([t], root, 1, ["c1"]) == []        # by its split: fold 1 never trained on c1
    (folder / "fold_1" / "kd_config.json").write_text(json.dumps({"training_cases": ["c0", "c1", "c2"]}))
    with pytest.raises(NnppError, match=r"was trained on 1 of the student's fold-1 validation cases \(c1\)"):
        check_leaks([t], root, 1, ["c1"])
    # a student whose record lists no cases (distilled before they were recorded, or from teachers of unknown
    # cases) has unknown training cases: refused, or a leak with --allow_val_leak; never "only its split"
    (folder / "fold_1" / "kd_config.json").write_text(json.dumps({"kd": ["soft"]}))
    with pytest.raises(NnppError, match="kd_config.json lists no training cases.*--allow_val_leak"):
        check_leaks([t], root, 1, ["c1"])
    assert check_leaks([t], root, 1, ["c1"], allow_val_leak=True) == [("nnUNetTrainerKD__P_kd__3d/fold_1", None)]


# --------------------------------------------------------------------------------------------- student plans
def test_cascade_configuration_is_refused(plans):
    from nnpp.distill.student import make_student_plans
    p, _ = plans
    p = copy.deepcopy(p)
    p["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    with pytest.raises(NnppError) as e:
        make_student_plans(p, "3d_cascade_fullres", 2)
    assert "is a cascade stage (previous_stage '3d_lowres'" in _one_line(e)


def test_unet_student_from_unetpp_only_plans(plans):
    from nnpp.distill.student import make_student_plans
    p, _ = plans
    p = copy.deepcopy(p)
    p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(checkpoint_nodes="node", seg_bias=False)
    with pytest.raises(NnppError) as e:
        make_student_plans(p, "3d_fullres", 2, "unet")
    assert "--student unet: the plans' arch kwargs checkpoint_nodes, seg_bias are options of nnpp's UNet++" \
        in _one_line(e)
    assert make_student_plans(p, "3d_fullres", 2, "unetpp")["plans_name"] == "nnUNetPlans_kd_r2"  # UNet++ takes them
