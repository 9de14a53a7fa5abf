"""nnpp_distill end to end on the tiny dataset: a trained teacher -> the default (U-Net) student with --kd soft cwd
on 1 and 2 processes (the latter under its own DDP trainer name), --c restoring the adapters and the KD
configuration, --val without the teacher, the student predicted by nnpp_predict, and the bad inputs (one clear
line, exit 2)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import free_port, nnunet_env, output_tail, run_cli

SHORT = ("-device", "cpu", "--epochs", "1", "--iters", "2", "--val_iters", "1")
STUDENT = "nnUNetTrainerKD__nnUNetPlans_kd_unet_r2__3d_fullres"          # the default student: U-Net, r=2
STUDENT_DDP = "nnUNetTrainerKDDDP__nnUNetPlans_kd_unet_r2__3d_fullres"


@pytest.fixture(scope="module")
def teacher(trained_model):
    return trained_model("nnUNetPlusPlusTrainer", 0)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_distill_one_process_continue_and_predict(tiny_dataset, teacher, tmp_path):
    ds = tiny_dataset
    env = nnunet_env(ds, nnUNet_results=str(tmp_path / "results"))
    # a copy of the teacher (inside its DatasetXXX folder, as nnU-Net lays it out), removed before --val below
    source, teacher = teacher, str(tmp_path / "teachers" / ds["name"] / os.path.basename(teacher))
    shutil.copytree(source, teacher, ignore=shutil.ignore_patterns("fold_[1-9]"))  # fold 0 only
    # --cwd-feat: the former dashed spelling of --cwd_feat on purpose (a hidden alias), checked end to end below
    p = run_cli("distill", ds["id"], "3d_fullres", 0, "-t", teacher, "--kd", "soft", "cwd", "--cwd-feat", *SHORT,
                env=env)
    assert p.returncode == 0, output_tail(p)
    fold = tmp_path / "results" / ds["name"] / STUDENT / "fold_0"
    # the report: sizes at start, Dice of student and teacher side by side at the end
    assert "[nnpp_distill] student:" in p.stdout and "GFLOP and" in p.stdout and "x its FLOPs" in p.stdout
    table = p.stdout[p.stdout.index("[nnpp_distill] validation Dice"):]
    assert f"student {STUDENT}/fold_0" in table and "teacher nnUNetPlusPlusTrainer__nnUNetPlans__3d_fullres/fold_0" in table
    record = json.loads((fold / "kd_config.json").read_text())
    assert record["leaky"] is False and record["kd"] == ["soft", "cwd"] and record["cwd_feat"] is True
    splits = json.loads(open(os.path.join(ds["nnUNet_preprocessed"], ds["name"], "splits_final.json")).read())
    assert record["teachers_resolved"][0]["training_cases"] == splits[0]["train"]
    assert record["training_cases"] == sorted(splits[0]["train"])  # the student's and its teacher's
    assert [r["name"] for r in record["sizes"]] == ["student", "teacher " + record["teachers_resolved"][0]["name"]]
    assert all(r["flops_per_patch"] > 0 and r["ms_per_patch"] > 0 for r in record["sizes"])
    ck = _load(fold / "checkpoint_final.pth")
    assert ck["trainer_name"] == "nnUNetTrainerKD"
    assert "ds_weights" not in ck["nnpp_run_settings"]  # the U-Net student has nnU-Net's weights: nothing to record
    assert not any(k.startswith(("kd_modules", "net.")) for k in ck["network_weights"])  # the student only
    adapters = ck["nnpp_kd"]["modules"]
    assert adapters and all(k.startswith("cwd_t0_s") for k in adapters)
    plans = json.loads((tmp_path / "results" / ds["name"] / STUDENT / "plans.json").read_text())
    teacher_plans = json.loads(open(os.path.join(teacher, "plans.json")).read())
    f_s = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]
    f_t = teacher_plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]
    assert f_s == [max(8, f // 2) for f in f_t] and plans["plans_name"] == "nnUNetPlans_kd_unet_r2"
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("PlainConvUNet")

    # --c with another KD setting: one line, exit 2; --c as started: the adapters and the config come back
    p = run_cli("distill", ds["id"], "3d_fullres", 0, "--c", "-T", "5", "-device", "cpu", env=env)
    assert p.returncode == 2 and "--c: -T 5.0 contradicts the run being continued (-T " in p.stderr and p.stderr.count("\n") == 1, output_tail(p)
    before = os.path.getmtime(fold / "checkpoint_final.pth")
    p = run_cli("distill", ds["id"], "3d_fullres", 0, "--c", "-device", "cpu", env=env)
    assert p.returncode == 0, output_tail(p)
    assert "KD: restored" in p.stdout and "kd=['soft', 'cwd']" in p.stdout and "cwd_feat=True" in p.stdout
    resumed = _load(fold / "checkpoint_final.pth")
    assert os.path.getmtime(fold / "checkpoint_final.pth") > before  # rewritten by the resumed run
    assert resumed["nnpp_run_settings"] == ck["nnpp_run_settings"]
    assert all(torch.equal(adapters[k], resumed["nnpp_kd"]["modules"][k]) for k in adapters)

    # --val validates the student alone: no teacher needed (the teacher folder is gone)
    shutil.rmtree(teacher)
    p = run_cli("distill", ds["id"], "3d_fullres", 0, "--val", "-device", "cpu", env=env)
    assert p.returncode == 0, output_tail(p)
    table = p.stdout[p.stdout.index("[nnpp_distill] validation Dice"):]
    assert f"student {STUDENT}/fold_0" in table and "(no summary.json)" in table  # the teacher's row, gone

    # the student is an ordinary model folder: nnpp_predict loads it from plans.json + trainer class
    src = os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTs")
    p = run_cli("predict", "-i", src, "-o", tmp_path / "pred", "-d", ds["id"], "-c", "3d_fullres", "-f", "0",
                "-tr", "nnUNetTrainerKD", "-p", "nnUNetPlans_kd_unet_r2", "-device", "cpu", "--disable_tta",
                "-npp", "0", "-nps", "0", env=env)
    assert p.returncode == 0, output_tail(p)
    inputs = sorted(f.replace("_0000.nii.gz", ".nii.gz") for f in os.listdir(src))
    assert sorted(f for f in os.listdir(tmp_path / "pred") if f.endswith(".nii.gz")) == inputs


@pytest.mark.slow
def test_distill_two_processes(tiny_dataset, teacher, tmp_path):
    """torchrun, 2 ranks, with unlabeled cases (--pseudo both): each rank pseudo-labels its share of them, rank 0
    preprocesses them, and the run trains on the mixed batches."""
    import glob
    ds = tiny_dataset
    env = nnunet_env(ds, nnUNet_results=str(tmp_path / "results"), OMP_NUM_THREADS="1")
    pre = os.path.join(ds["nnUNet_preprocessed"], ds["name"])
    train = json.loads(open(os.path.join(pre, "splits_final.json")).read())[0]["train"]
    unl = tmp_path / "unlabeled"
    unl.mkdir()
    for i, case in enumerate(train[:2]):  # training images under new ids: unlabeled scans of the same kind
        shutil.copy(os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTr", f"{case}_0000.nii.gz"),
                    unl / f"ddpscan{i}_0000.nii.gz")
    # --tee 3: torchrun relays each rank's output line by line; two ranks writing their block-buffered stdout to one
    # pipe can cut a line in two (rank 1's pseudo-label line went missing so once in CI)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--tee", "3", "--log_dir", str(tmp_path / "rank_logs"),
           "-m", "nnpp.run.distill", str(ds["id"]), "3d_fullres", "0", "-t", teacher, "--kd", "soft", "cwd",
           "--unlabeled", str(unl), "--pseudo", "both", *SHORT]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, output_tail(p)
    said = sorted(line.rsplit("(", 1)[1] for line in p.stdout.splitlines()
                  if "pseudo-labels: the teacher predicts 1 unlabeled case(s)" in line)
    assert said == ["rank 0 of 2, on cpu)", "rank 1 of 2, on cpu)"], output_tail(p)  # one case each, on its rank
    assert sorted(os.path.basename(f) for f in glob.glob(os.path.join(pre, "nnpp_unlabeled", "pseudo_*",
                                                                      "ddpscan*.nii.gz"))) == \
        ["ddpscan0.nii.gz", "ddpscan1.nii.gz"]
    assert not glob.glob(os.path.join(pre, "nnpp_unlabeled", ".nnpp_rank*"))  # the ranks' result files are gone
    fold = tmp_path / "results" / ds["name"] / STUDENT_DDP / "fold_0"  # never over a 1-device run
    assert not (tmp_path / "results" / ds["name"] / STUDENT).exists()
    assert "2 rank(s)" in p.stdout and p.stdout.count("[nnpp_distill] validation Dice") == 1  # rank 0 reports
    ck = _load(fold / "checkpoint_final.pth")
    assert ck["nnpp_run_settings"]["kd"] == ["soft", "cwd"] and os.path.isfile(fold / "validation" / "summary.json")


@pytest.mark.slow
def test_distill_bad_inputs(tiny_dataset, teacher, tmp_path):
    ds = tiny_dataset
    env = nnunet_env(ds, nnUNet_results=str(tmp_path / "results"))

    def bad(*args, match):
        p = run_cli("distill", ds["id"], "3d_fullres", 0, *args, "-device", "cpu", env=env)
        assert p.returncode == 2, output_tail(p)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("nnpp_distill: error:"), output_tail(p)
        assert match in p.stderr, output_tail(p)

    bad("-t", tmp_path / "nope", match="teacher folder")
    bad("-t", teacher, "-tf", "3", match="fold_3/checkpoint_final.pth does not exist")
    bad("-t", teacher, "--kd", "soft", "dark", match="unknown KD method(s) dark")
    bad("-t", teacher, "-r", "0", match="-r 0")
    bad(match="no teacher")
    # a teacher of fold 1 (a copy of the fold-0 model under fold_1) trained on the student's fold-0 validation case
    leaky = tmp_path / "teachers" / ds["name"] / "nnUNetPlusPlusTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(teacher, leaky)
    shutil.copytree(leaky / "fold_0", leaky / "fold_1")
    bad("-t", leaky, "-tf", "1", match="was trained on 1 of the student's fold-0 validation cases")
    # an edited model folder is the model-folder loader's refusal (the compatibility checks' own branches are
    # tested with their own fixtures in test_distill_checks.py)
    dj = json.loads((leaky / "dataset.json").read_text())
    (leaky / "dataset.json").write_text(json.dumps({**dj, "labels": {"background": 0, "organ": 1, "lesion": 2}}))
    bad("-t", leaky, match="restore dataset.json")
