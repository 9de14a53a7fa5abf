"""change_bs and get_dice_result on nnU-Net v1 and v2 layouts, through the seed-compatible scripts."""
import json
import pathlib
import pickle
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def one_error_line(p, fragment):
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if "error" in x]
    assert len(lines) == 1 and fragment in lines[0], p.stderr


@pytest.fixture
def v2_root(tmp_path):
    """nnUNet_preprocessed/Dataset003_Liver/nnUNetPlans.json and a finished v2 run with summary.json."""
    pre = tmp_path / "nnUNet_preprocessed" / "Dataset003_Liver"
    pre.mkdir(parents=True)
    plans = {"dataset_name": "Dataset003_Liver", "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": {"batch_size": 2, "patch_size": [128, 128, 128]},
                                "3d_lowres": {"inherits_from": "3d_fullres"}}}
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    for trainer, dice in (("nnUNetPlusPlusTrainer", (0.9512, 0.6123)), ("nnUNetPlusPlusTrainerDDP", (0.9601, 0.65))):
        run = tmp_path / "nnUNet_results" / "Dataset003_Liver" / f"{trainer}__nnUNetPlans__3d_fullres"
        (run / "fold_0" / "validation").mkdir(parents=True)
        (run / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "cancer": 2}}))
        (run / "fold_0" / "validation" / "summary.json").write_text(json.dumps(
            {"foreground_mean": {"Dice": sum(dice) / 2},
             "mean": {"1": {"Dice": dice[0], "IoU": 0.9}, "2": {"Dice": dice[1], "IoU": 0.5}}}))
    return tmp_path


@pytest.fixture
def v1_root(tmp_path):
    """v1 layout: nnUNet_preprocessed/Task003_Liver/nnUNetPlansv2.1_plans_3D.pkl and validation_raw/summary.json."""
    pre = tmp_path / "nnUNet_preprocessed" / "Task003_Liver"
    pre.mkdir(parents=True)
    plans = {"plans_per_stage": {0: {"batch_size": 2, "patch_size": [80, 160, 160]},
                                 1: {"batch_size": 2, "patch_size": [128, 128, 128]}}, "num_stages": 2}
    (pre / "nnUNetPlansv2.1_plans_3D.pkl").write_bytes(pickle.dumps(plans))
    run = tmp_path / "RESULTS_FOLDER" / "nnUNet" / "3d_fullres" / "Task003_Liver" / \
        "nnUNetPlusPlusTrainerV2__nnUNetPlansv2.1" / "fold_0" / "validation_raw"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"results": {"mean": {
        "0": {"Dice": 0.99}, "1": {"Dice": 0.0686}, "2": {"Dice": 0.0008}}}}))
    return tmp_path


def test_change_bs_v2(v2_root):
    plans = v2_root / "nnUNet_preprocessed" / "Dataset003_Liver" / "nnUNetPlans.json"
    before = plans.read_text()
    p = tool("change_bs", "-path", v2_root, "-size", 8)
    assert p.returncode == 0, p.stderr
    assert json.loads(plans.read_text())["configurations"]["3d_fullres"]["batch_size"] == 8
    assert plans.with_name("nnUNetPlans.json.bak").read_text() == before
    assert not plans.with_name("nnUNetPlans.json.tmp").exists()
    assert "batch size 2 -> 8" in p.stdout


def test_change_bs_copy_to_leaves_original(v2_root):
    plans = v2_root / "nnUNet_preprocessed" / "Dataset003_Liver" / "nnUNetPlans.json"
    before = plans.read_text()
    p = tool("change_bs", "-path", v2_root, "-size", 4, "--copy_to", "nnUNetPlans_bs4")
    assert p.returncode == 0, p.stderr
    assert plans.read_text() == before
    new = json.loads(plans.with_name("nnUNetPlans_bs4.json").read_text())
    assert new["plans_name"] == "nnUNetPlans_bs4" and new["configurations"]["3d_fullres"]["batch_size"] == 4


def test_change_bs_v1(v1_root):
    p = tool("change_bs", "-path", v1_root / "nnUNet_preprocessed", "-size", 1)
    assert p.returncode == 0, p.stderr
    pkl = v1_root / "nnUNet_preprocessed" / "Task003_Liver" / "nnUNetPlansv2.1_plans_3D.pkl"
    plans = pickle.loads(pkl.read_bytes())
    assert plans["plans_per_stage"][1]["batch_size"] == 1 and plans["plans_per_stage"][0]["batch_size"] == 2
    assert pickle.loads(pkl.with_name(pkl.name + ".bak").read_bytes())["plans_per_stage"][1]["batch_size"] == 2


def test_change_bs_bad_inputs(v2_root, tmp_path):
    one_error_line(tool("change_bs", "-path", tmp_path / "missing", "-size", 4), "is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(tool("change_bs", "-path", empty, "-size", 4), "no plans")
    p = tool("change_bs", "-path", v2_root, "-size", "0")
    assert p.returncode == 2 and "expected a positive integer, got '0'" in p.stderr
    p = tool("change_bs", "-path", v2_root, "-size", "eight")
    assert p.returncode == 2 and "expected a positive integer, got 'eight'" in p.stderr
    one_error_line(tool("change_bs", "-path", v2_root, "-size", 4, "-c", "3d_lowres"), "inherits its batch size")
    other = v2_root / "nnUNet_preprocessed" / "Dataset004_Hippocampus"
    other.mkdir()
    (other / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"3d_fullres": {"batch_size": 9}}}))
    one_error_line(tool("change_bs", "-path", v2_root, "-size", 4), "several datasets")
    assert tool("change_bs", "-path", v2_root, "-size", 4, "-d", "4").returncode == 0
    assert json.loads((other / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]["batch_size"] == 4


def test_get_dice_result_v2_modes(v2_root):
    p = tool("get_dice_result", "-path", v2_root, "-mode", "1p")
    assert p.returncode == 0, p.stderr
    assert "| liver | cancer |" in p.stdout and "| 95.12 | 61.23 |" in p.stdout
    p = tool("get_dice_result", "-path", v2_root, "-mode", "8p", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["dice"] == {"liver": 96.01, "cancer": 65.0}


def test_get_dice_result_v1(v1_root):
    p = tool("get_dice_result", "-path", v1_root, "-mode", "1p", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["dice"] == {"class 1": 6.86, "class 2": 0.08}  # the seed's table


def test_get_dice_result_bad_inputs(v2_root, tmp_path):
    one_error_line(tool("get_dice_result", "-path", tmp_path / "missing"), "is not a folder")
    one_error_line(tool("get_dice_result", "-path", v2_root, "-f", "3"), "no summary.json")
    bad = v2_root / "nnUNet_results" / "Dataset003_Liver" / "nnUNetPlusPlusTrainer__nnUNetPlans__3d_fullres" / \
        "fold_0" / "validation" / "summary.json"
    bad.write_text("{not json")
    one_error_line(tool("get_dice_result", "-path", v2_root), "is not valid JSON")
    second = v2_root / "nnUNet_results" / "Dataset004_Hippocampus" / "nnUNetPlusPlusTrainer__nnUNetPlans__3d_fullres" / \
        "fold_0" / "validation"
    second.mkdir(parents=True)
    (second / "summary.json").write_text(json.dumps({"mean": {"1": {"Dice": 0.8}}}))
    one_error_line(tool("get_dice_result", "-path", v2_root), "several datasets")
    p = tool("get_dice_result", "-path", v2_root, "-d", "Dataset004_Hippocampus", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["dice"] == {"class 1": 80.0}
