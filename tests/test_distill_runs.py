"""Runs that continue and validate as users expect: --c/--val without -r/--student find the run (never another
folder), multi-process students have their own trainer names, and the end-of-run table puts a teacher's Dice
beside the student's only when both were scored on the same validation cases."""
import json
import os
from types import SimpleNamespace

import pytest

from nnpp import NnppError


def _run(results, trainer, plans, r, student, fold=0, checkpoint="checkpoint_final.pth", record=True):
    fold_dir = results / f"{trainer}__{plans}__3d_fullres" / f"fold_{fold}"
    fold_dir.mkdir(parents=True)
    (fold_dir / checkpoint).write_bytes(b"")
    if record:
        (fold_dir / "kd_config.json").write_text(json.dumps({"r": r, "student": student}))
    return fold_dir.parent


def _args(**kw):
    base = dict(c=True, val=False, r=None, student=None, configuration="3d_fullres", fold="0", p="nnUNetPlans")
    return SimpleNamespace(**{**base, **kw})


def test_continue_without_r_finds_the_run(tmp_path, capsys):
    from nnpp.run.distill import STUDENT_TRAINERS, resolve_student
    _run(tmp_path, "nnUNetTrainerKD", "nnUNetPlans_kd_unet_r4", 4, "unet", checkpoint="checkpoint_latest.pth")
    args = _args()
    resolve_student(args, str(tmp_path), STUDENT_TRAINERS)
    assert (args.student, args.r) == ("unet", 4)  # not the defaults: the run that exists
    assert "--c: the run in" in capsys.readouterr().out
    # --val needs a finished run: the interrupted one is not it, so the defaults stand
    args = _args(c=False, val=True)
    resolve_student(args, str(tmp_path), STUDENT_TRAINERS)
    from nnpp.run.distill import DEFAULT_R, DEFAULT_STUDENT
    assert (args.student, args.r) == (DEFAULT_STUDENT, DEFAULT_R)


def test_several_runs_need_a_choice(tmp_path):
    from nnpp.run.distill import STUDENT_TRAINERS, resolve_student
    _run(tmp_path, "nnUNetTrainerKD", "nnUNetPlans_kd_unet_r4", 4, "unet")
    _run(tmp_path, "nnUNetPlusPlusTrainerKD", "nnUNetPlans_kd_r2", 2, "unetpp")
    with pytest.raises(NnppError, match="--c: 2 distillations of 3d_fullres fold 0 match") as e:
        resolve_student(_args(), str(tmp_path), STUDENT_TRAINERS)
    assert "\n" not in str(e.value)
    args = _args(student="unetpp")                     # what is given narrows the search
    resolve_student(args, str(tmp_path), STUDENT_TRAINERS)
    assert (args.student, args.r) == ("unetpp", 2)
    args = _args(r=3)                                  # nothing matches -r 3: a fresh run with it
    resolve_student(args, str(tmp_path), STUDENT_TRAINERS)
    assert args.r == 3


def test_ddp_students_have_their_own_names(tmp_path):
    from nnpp.model_folder import find_trainer_class
    from nnpp.run.distill import STUDENT_TRAINERS, STUDENT_TRAINERS_DDP, resolve_student
    for student, name in STUDENT_TRAINERS_DDP.items():
        cls = find_trainer_class(name)
        assert cls.__name__ == name and issubclass(cls, find_trainer_class(STUDENT_TRAINERS[student]))
        assert name != STUDENT_TRAINERS[student]
    # a 1-device run is not what a multi-process --c continues
    _run(tmp_path, "nnUNetTrainerKD", "nnUNetPlans_kd_unet_r4", 4, "unet")
    args = _args()
    resolve_student(args, str(tmp_path), STUDENT_TRAINERS_DDP)
    assert args.r is not None and (args.student, args.r) != ("unet", 4)


def _summary(path, cases, dice):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"mean": {"1": {"Dice": dice}},
                                "metric_per_case": [{"reference_file": f"/gt/{c}.nii.gz"} for c in cases]}))


def test_report_compares_only_the_same_cases(tmp_path, capsys):
    from nnpp.run import distill
    student = tmp_path / "res" / "Dataset901_X" / "nnUNetTrainerKD__P_kd__3d_fullres" / "fold_0"
    same = tmp_path / "res" / "Dataset901_X" / "TeacherA__P__3d_fullres"
    other = tmp_path / "res" / "Dataset901_X" / "TeacherB__P__3d_fullres"
    _summary(student / "validation" / "summary.json", ["case_1", "case_2"], 0.8123)
    _summary(same / "fold_0" / "validation" / "summary.json", ["case_2", "case_1"], 0.9012)
    _summary(other / "fold_all" / "validation" / "summary.json", ["case_1", "case_2", "case_3"], 0.9876)
    trainer = SimpleNamespace(dataset_json={"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"},
                              output_folder=str(student), fold=0, teachers=[], leaky=False,
                              kd_report_teachers=[(str(same), "0"), (str(other), "all")])
    distill.report(trainer)
    out = capsys.readouterr().out.splitlines()
    row = {line.split()[1]: line for line in out if line.startswith(("student", "teacher"))}
    assert row["nnUNetTrainerKD__P_kd__3d_fullres/fold_0"].split()[-1] == "0.8123"
    assert row["TeacherA__P__3d_fullres/fold_0"].split()[-1] == "0.9012"         # same cases: side by side
    assert "0.9876" not in row["TeacherB__P__3d_fullres/fold_all"]
    assert "not comparable: scored on 3 case(s) (case_1, case_2, case_3), the student on 2" in \
        row["TeacherB__P__3d_fullres/fold_all"]


def test_size_report_warns_in_one_line_when_not_cheaper():
    """report_sizes: one line per network with the ratios; one WARNING line per teacher the student is not
    cheaper than (FLOPs or latency per patch >= the teacher's)."""
    from nnpp.distill.cost import CostReportMixin
    lines = []
    fake = SimpleNamespace(print_to_log_file=lines.append, kd_config={"student": "unetpp", "r": 2},
                           configuration_manager=SimpleNamespace(patch_size=[16, 32, 32]), device="cpu")
    rows = [{"name": "student", "parameters": 250, "flops_per_patch": 2.5e9, "ms_per_patch": 12.0},
            {"name": "teacher A/fold_0", "parameters": 1000, "flops_per_patch": 1e10, "ms_per_patch": 10.0},
            {"name": "teacher B/fold_0", "parameters": 1000, "flops_per_patch": 1e10, "ms_per_patch": 40.0}]
    CostReportMixin.report_sizes(fake, rows)
    assert lines[0] == "[nnpp_distill] student: 250 parameters, 2.5 GFLOP and 12.0 ms per patch (16, 32, 32) on cpu"
    assert "the student is 0.25x its parameters, 0.25x its FLOPs, 1.20x its latency" in lines[1]
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1 and "not cheaper than teacher A/fold_0 (0.25x its FLOPs, 1.20x its latency" in warnings[0]
    assert all("\n" not in line for line in lines)


def test_patch_cost_counts_one_patch_and_times_a_batch():
    """patch_cost: FLOPs of ONE patch (a 1->2 channel 3x3x3 convolution on 4x4x4, padding 1: 2 FLOPs per
    multiply-add x 2 output channels x 64 voxels x 27 taps = 6912) although it times batches of 2, the time is per
    patch (the forward sees a batch of 2), and the network's training mode is restored."""
    import torch

    from nnpp import device as dev
    from nnpp.distill.cost import patch_cost
    conv = torch.nn.Conv3d(1, 2, 3, padding=1, bias=False)
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    conv.train()
    flops, ms = patch_cost(conv, (1, 4, 4, 4), torch.device("cpu"), dev.make_amp("O0", torch.device("cpu")))
    assert flops == 2 * 2 * 64 * 27
    assert ms > 0 and conv.training
    assert seen == [1] + [2] * 4  # the FLOP count on one patch, then 1 warm-up and 3 timed calls of 2 patches
