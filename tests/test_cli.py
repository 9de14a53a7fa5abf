"""nnpp_train / nnpp_predict as a user runs them: end to end on the tiny dataset, and every bad input."""
import json
import os
import shutil

import pytest
import torch
from conftest import nnunet_env, output_tail, run_cli

from nnpp.device import resolve_amp_mode

SHORT = ("--epochs", "1", "--iters", "2", "--val_iters", "1")
V1_NAMES = ("nnUNet_raw_data_base", "RESULTS_FOLDER")


def fold_dir(ds, fold, trainer="nnUNetPlusPlusTrainer", results=None):
    return os.path.join(results or ds["nnUNet_results"], ds["name"], f"{trainer}__nnUNetPlans__3d_fullres",
                        f"fold_{fold}")


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    err = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(err) == 1, proc.stderr
    for f in fragments:
        assert f in err[0], err[0]


@pytest.mark.slow
def test_train_continue_validate_predict(tiny_dataset, tmp_path):
    ds, env = tiny_dataset, nnunet_env(tiny_dataset)
    # 1. train 1 epoch
    p = run_cli("train", ds["id"], "3d_fullres", 0, "-device", "cpu", *SHORT, env=env)
    assert p.returncode == 0, output_tail(p)
    out = fold_dir(ds, 0)
    for f in ("checkpoint_final.pth", "progress.png", "validation/summary.json", "debug.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert any(f.startswith("training_log") for f in os.listdir(out))
    summary = json.load(open(os.path.join(out, "validation", "summary.json")))
    assert set(summary["mean"]) == {"1", "2"}
    assert f"Dice liver (label 1): {summary['mean']['1']['Dice']:.4f}" in p.stdout
    assert "Training FPS:" in p.stdout

    # 2. --c keeps the run's settings: another --epochs is an error, unless changed deliberately
    p = run_cli("train", f"Task{ds['id']:03d}_SynthLiver", "3d_fullres", 0, "-device", "cpu", "--c", "--epochs", "2",
                env=env)
    assert_one_line_error(p, "--c: --epochs 2 contradicts the run being continued (--epochs 1")
    p = run_cli("train", f"Task{ds['id']:03d}_SynthLiver", "3d_fullres", 0, "-device", "cpu", "--c", "--epochs", "2",
                "--change_settings", env=env)
    assert p.returncode == 0, output_tail(p)
    assert "--change_settings: epochs 1 -> 2" in p.stdout
    assert "Epoch 1" in p.stdout and "Epoch 0\n" not in p.stdout
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2 and ckpt["trainer_name"] == "nnUNetPlusPlusTrainer"
    auto = resolve_amp_mode("auto", torch.device("cpu"))  # what this CPU trains in by default (O0 or bf16)
    assert ckpt["nnpp_run_settings"] == {"epochs": 2, "iters": 2, "val_iters": 1, "amp": auto, "dbs": False,
                                         "checkpoint": "none", "ds_weights": "descending",
                                         "shallow_heads": "probe"}

    # 3. --val only, found through the v1 variable names
    os.remove(os.path.join(out, "validation", "summary.json"))
    v1 = nnunet_env(ds, drop=("nnUNet_raw", "nnUNet_results"), nnUNet_raw_data_base=ds["nnUNet_raw"],
                    RESULTS_FOLDER=ds["nnUNet_results"])
    p = run_cli("train", f"Dataset{ds['id']:03d}_SynthLiver", "3d_fullres", 0, "-device", "cpu", "--val", env=v1)
    assert p.returncode == 0, output_tail(p)
    assert "Epoch" not in p.stdout and os.path.isfile(os.path.join(out, "validation", "summary.json"))

    # 4. predict the test case with nnpp_predict (nnU-Net's predictor, our trainer lookup)
    src = os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTs")
    pred = tmp_path / "pred"
    p = run_cli("predict", "-i", src, "-o", pred, "-d", ds["id"], "-c", "3d_fullres", "-f", "0", "-device", "cpu",
                "--disable_tta", "-npp", "1", "-nps", "1", env=env)
    assert p.returncode == 0, output_tail(p)
    inputs = sorted(f.replace("_0000.nii.gz", ".nii.gz") for f in os.listdir(src))
    assert sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz")) == inputs
    import SimpleITK as sitk
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / inputs[0])))
    img = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(src, os.listdir(src)[0])))
    assert seg.shape == img.shape and set(map(int, seg.flatten().tolist())) <= {0, 1, 2}


@pytest.mark.slow
def test_2d_configuration_end_to_end(tiny_dataset):
    """A 2D plan: UNet++ with 2D convs trains, validates slice by slice, and reports Dice."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    preprocess_dataset(tiny_dataset["id"], "nnUNetPlans", ("2d",), (1,), show_progress_bar=False)
    p = run_cli("train", tiny_dataset["id"], "2d", 0, "-device", "cpu", *SHORT, env=nnunet_env(tiny_dataset))
    assert p.returncode == 0, output_tail(p)
    out = os.path.join(tiny_dataset["nnUNet_results"], tiny_dataset["name"], "nnUNetPlusPlusTrainer__nnUNetPlans__2d")
    ckpt = torch.load(os.path.join(out, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["network_weights"]["decoder.seg_layers.0.weight"].ndim == 4  # Conv2d heads
    assert os.path.isfile(os.path.join(out, "fold_0", "validation", "summary.json")) and "Dice liver" in p.stdout


@pytest.mark.slow
def test_continue_without_checkpoint_starts_fresh(tiny_dataset):
    env = nnunet_env(tiny_dataset)
    p = run_cli("train", tiny_dataset["id"], "3d_fullres", 1, "-device", "cpu", "--c", "--epochs", "1", "--iters",
                "1", "--val_iters", "1", env=env)
    assert p.returncode == 0, output_tail(p)
    assert "no checkpoint available to continue from. Starting a new training" in p.stdout
    assert "Epoch 0" in p.stdout


def test_truncated_checkpoint(tiny_dataset):
    out = fold_dir(tiny_dataset, 3)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "checkpoint_final.pth"), "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    try:
        p = run_cli("train", tiny_dataset["id"], "3d_fullres", 3, "-device", "cpu", "--val",
                    env=nnunet_env(tiny_dataset))
        assert_one_line_error(p, "checkpoint_final.pth", "truncated or corrupt")
    finally:
        shutil.rmtree(out)


@pytest.mark.parametrize("args,fragments", [
    (("999", "3d_fullres", "0"), ("unknown dataset '999'",)),
    (("Liver", "3d_fullres", "0"), ("'Liver' is not a dataset id",)),
    (("{id}", "3d_fullres", "7"), ("fold '7' is out of range", "0..4")),
    (("{id}", "3d_fullres", "-1"), ("fold '-1' is out of range",)),
    (("{id}", "3d_fullres", "0", "-tr", "NoSuchTrainer"), ("unknown trainer 'NoSuchTrainer'",)),
    (("{id}", "2d_huge", "0"), ("configuration '2d_huge' is not in nnUNetPlans.json",)),
    (("{id}", "3d_fullres", "0", "-p", "MissingPlans"), ("plans 'MissingPlans'", "not found")),
    (("{id}", "3d_fullres", "2", "--val"), ("--val needs a finished training",)),
    (("{id}", "3d_fullres", "0", "--c", "--val"), ("--c and --val exclude each other",)),
])
def test_bad_inputs(tiny_dataset, args, fragments):
    args = [a.format(id=tiny_dataset["id"]) for a in args]
    p = run_cli("train", *args, "-device", "cpu", env=nnunet_env(tiny_dataset))
    assert_one_line_error(p, *fragments)


@pytest.mark.skipif(__import__("nnpp.device").device.npu_available(), reason="torch_npu works here")
def test_device_npu_without_torch_npu(tiny_dataset):
    p = run_cli("train", tiny_dataset["id"], "3d_fullres", 0, "-device", "npu", env=nnunet_env(tiny_dataset))
    assert_one_line_error(p, "-device npu needs the torch_npu package")


def test_paths_unset(tiny_dataset):
    env = nnunet_env(drop=("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") + V1_NAMES)
    p = run_cli("train", tiny_dataset["id"], "3d_fullres", 0, env=env)
    assert_one_line_error(p, "nnUNet_preprocessed", "nnUNet_results (or RESULTS_FOLDER)")


def test_bad_number_is_rejected_by_argparse(tiny_dataset):
    p = run_cli("train", tiny_dataset["id"], "3d_fullres", 0, "--epochs", "zero", env=nnunet_env(tiny_dataset))
    assert p.returncode == 2 and "expected a positive integer, got 'zero'" in p.stderr


@pytest.mark.parametrize("module, flag, value, message", [
    ("export", "--tol", "0", "expected a positive number, got '0'"),
    ("export", "--max_dice_drop", "nan", "expected a number >= 0, got 'nan'"),
    ("predict", "--ort_threads", "-1", "expected an integer >= 0, got '-1'"),
    ("predict", "--tta_batch", "1.5", "expected a positive integer, got '1.5'")])
def test_bad_numbers_of_export_and_predict(module, flag, value, message, capsys):
    """One usage line and exit 2 for a number out of range, from the shared parsers in nnpp.cli."""
    import importlib
    mod = importlib.import_module(f"nnpp.run.{module}")
    parser = mod.parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["-d", "1", "-c", "3d_fullres", "-i", "x", "-o", "y", "-m", "z", flag, value]
                          if module == "predict" else ["-m", "z", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err


def test_predict_bad_inputs(tiny_dataset, tmp_path):
    env = nnunet_env(tiny_dataset)
    p = run_cli("predict", "-i", tmp_path / "nope", "-o", tmp_path / "o", "-d", tiny_dataset["id"], "-c",
                "3d_fullres", "-f", "0", "-device", "cpu", env=env)
    assert_one_line_error(p, "input folder", "does not exist")
    src = os.path.join(tiny_dataset["nnUNet_raw"], tiny_dataset["name"], "imagesTs")
    p = run_cli("predict", "-i", src, "-o", tmp_path / "o", "-d", tiny_dataset["id"], "-c", "3d_fullres",
                "-f", "4", "-device", "cpu", env=env)
    assert_one_line_error(p, "no checkpoint_final.pth for fold(s) 4")
    assert not (tmp_path / "o").exists()


def test_every_console_script_resolves_and_prints_its_help():
    """Each console script of setup.py names a module function that exists (a missing ``main`` broke nnpp_demo
    once), and ``python -m`` on the module runs it: --help prints the command's usage and exits 0."""
    import ast
    import importlib
    import subprocess
    import sys
    setup = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")).read()
    scripts = [s for s in ast.literal_eval(setup[setup.index("[", setup.index('"console_scripts"')):
                                                 setup.index("]", setup.index('"console_scripts"')) + 1])]
    assert len(scripts) >= 10
    for script in scripts:
        name, target = script.split("=")
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func, None)), script
        if name == "nnpp_demo":  # one `python -m` run is enough to pin the __main__ guard pattern
            p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
            assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]
