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


# ------------------------------------------- hardening: backups kept, nothing overwritten, v1 pickles, NaN Dice, -d
def v1_pkl_protocol(path):
    """The protocol byte of a pickle file: protocol >= 2 pickles start with PROTO (0x80) and the protocol."""
    data = pathlib.Path(path).read_bytes()
    return data[1] if data[0] == 0x80 else 0


def test_change_bs_second_run_keeps_the_original_backup(v2_root):
    plans = v2_root / "nnUNet_preprocessed" / "Dataset003_Liver" / "nnUNetPlans.json"
    original = plans.read_text()
    assert tool("change_bs", "-path", v2_root, "-size", 8).returncode == 0
    p = tool("change_bs", "-path", v2_root, "-size", 4)
    assert p.returncode == 0, p.stderr
    assert "(backup: nnUNetPlans.json.bak.1)" in p.stdout
    assert plans.with_name("nnUNetPlans.json.bak").read_text() == original  # batch size 2, as planned
    assert json.loads(plans.with_name("nnUNetPlans.json.bak.1").read_text())["configurations"]["3d_fullres"][
        "batch_size"] == 8
    assert json.loads(plans.read_text())["configurations"]["3d_fullres"]["batch_size"] == 4
    # the same size again writes nothing, not even a backup
    p = tool("change_bs", "-path", v2_root, "-size", 4)
    assert p.returncode == 0 and "batch size already 4; nothing changed" in p.stdout
    assert sorted(f.name for f in plans.parent.iterdir()) == ["nnUNetPlans.json", "nnUNetPlans.json.bak",
                                                              "nnUNetPlans.json.bak.1"]


def test_change_bs_copy_to_never_overwrites(v2_root):
    folder = v2_root / "nnUNet_preprocessed" / "Dataset003_Liver"
    source = (folder / "nnUNetPlans.json").read_text()
    mine = folder / "nnUNetPlans_bs4.json"
    mine.write_text('{"configurations": {"3d_fullres": {"batch_size": 4, "patch_size": [64, 64, 64]}}}')
    before = mine.read_text()
    one_error_line(tool("change_bs", "-path", v2_root, "-size", 4, "--copy_to", "nnUNetPlans_bs4"),
                   "already exists")
    assert mine.read_text() == before
    one_error_line(tool("change_bs", "-path", v2_root, "-size", 4, "--copy_to", "nnUNetPlans"),
                   "names the plans being read")
    assert (folder / "nnUNetPlans.json").read_text() == source
    one_error_line(tool("change_bs", "-path", v2_root, "-size", 4, "--copy_to", "../elsewhere"), "plans identifier")
    # a copy made by the same command before is accepted (launch scripts re-run it), and left as it was
    assert tool("change_bs", "-path", v2_root, "-size", 6, "--copy_to", "nnUNetPlans_bs6").returncode == 0
    made = (folder / "nnUNetPlans_bs6.json").stat().st_mtime_ns
    p = tool("change_bs", "-path", v2_root, "-size", 6, "--copy_to", "nnUNetPlans_bs6")
    assert p.returncode == 0 and "identical, left as it was" in p.stdout
    assert (folder / "nnUNetPlans_bs6.json").stat().st_mtime_ns == made
    assert (folder / "nnUNetPlans.json").read_text() == source
    assert not list(folder.glob("*.bak")) and not list(folder.glob("*.tmp"))


def test_change_bs_v1_configurations(v1_root):
    pre = v1_root / "nnUNet_preprocessed" / "Task003_Liver"
    pkl3d = pre / "nnUNetPlansv2.1_plans_3D.pkl"
    pkl2d = pre / "nnUNetPlansv2.1_plans_2D.pkl"
    pkl2d.write_bytes(pickle.dumps({"plans_per_stage": {0: {"batch_size": 40, "patch_size": [192, 192]}},
                                    "num_stages": 1}, protocol=3))
    before3d = pkl3d.read_bytes()
    p = tool("change_bs", "-path", v1_root, "-size", 12, "-c", "2d")
    assert p.returncode == 0, p.stderr
    assert pickle.loads(pkl2d.read_bytes())["plans_per_stage"][0]["batch_size"] == 12
    assert pkl3d.read_bytes() == before3d
    assert v1_pkl_protocol(pkl2d) == 3  # written back with the protocol it was read with
    # 3d_lowres is stage 0 of the 3D plans (v1's default_configuration), 3d_fullres the last stage
    p = tool("change_bs", "-path", v1_root, "-size", 3, "-c", "3d_lowres")
    assert p.returncode == 0, p.stderr
    stages = pickle.loads(pkl3d.read_bytes())["plans_per_stage"]
    assert (stages[0]["batch_size"], stages[1]["batch_size"]) == (3, 2)
    one_error_line(tool("change_bs", "-path", v1_root, "-size", 3, "-c", "3d_fancy"), "not an nnU-Net v1 configuration")
    pkl2d.write_bytes(pickle.dumps({"plans_per_stage": {0: {"patch_size": [192, 192]}}}))
    one_error_line(tool("change_bs", "-path", v1_root, "-size", 3, "-c", "2d"), "has no batch_size")
    pkl2d.write_bytes(b"not a pickle")
    one_error_line(tool("change_bs", "-path", v1_root, "-size", 3, "-c", "2d"), "is not an nnU-Net v1 plans file")


def test_change_bs_v1_pickle_readable_by_v1_pythons(v1_root):
    """Python 3.11 writes protocol 5 by default; nnU-Net v1's Pythons (3.6, 3.7) only read up to 4."""
    import numpy as np
    pkl = v1_root / "nnUNet_preprocessed" / "Task003_Liver" / "nnUNetPlansv2.1_plans_3D.pkl"
    plans = {"plans_per_stage": {0: {"batch_size": 2, "current_spacing": np.array([1.0, 0.8, 0.8])}},
             "num_stages": 1}
    pkl.write_bytes(pickle.dumps(plans, protocol=5))
    p = tool("change_bs", "-path", v1_root, "-size", 5)
    assert p.returncode == 0, p.stderr
    assert v1_pkl_protocol(pkl) == 4
    back = pickle.loads(pkl.read_bytes())["plans_per_stage"][0]
    assert back["batch_size"] == 5 and back["current_spacing"].tolist() == [1.0, 0.8, 0.8]
    one_error_line(tool("change_bs", "-path", v1_root, "-size", 5, "-c", "3d_lowres"), "has one stage only")


def v1_run(root, config, summary, fold_dir="fold_0", task="Task003_Liver"):
    run = root / "RESULTS_FOLDER" / "nnUNet" / config / task / "nnUNetPlusPlusTrainerV2__nnUNetPlansv2.1" / \
        fold_dir / "validation_raw"
    run.mkdir(parents=True, exist_ok=True)
    (run / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))


def strict_json(text):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_get_dice_result_v1_configuration_and_all_fold(v1_root):
    v1_run(v1_root, "2d", {"results": {"mean": {"1": {"Dice": 0.5}, "2": {"Dice": 0.25}}}})
    p = tool("get_dice_result", "-path", v1_root, "-c", "2d", "--json")
    assert p.returncode == 0, p.stderr
    assert strict_json(p.stdout)["dice"] == {"class 1": 50.0, "class 2": 25.0}
    p = tool("get_dice_result", "-path", v1_root, "-c", "3d_fullres", "--json")
    assert p.returncode == 0, p.stderr
    assert strict_json(p.stdout)["dice"] == {"class 1": 6.86, "class 2": 0.08}
    one_error_line(tool("get_dice_result", "-path", v1_root, "-c", "3d_lowres"), "configuration 3d_lowres")
    # v1 trains fold 'all' into a folder named 'all' (v2: fold_all)
    v1_run(v1_root, "3d_fullres", {"results": {"mean": {"1": {"Dice": 0.9}, "2": {"Dice": 0.4}}}}, fold_dir="all")
    p = tool("get_dice_result", "-path", v1_root, "-f", "all", "--json")
    assert p.returncode == 0, p.stderr
    assert strict_json(p.stdout)["dice"] == {"class 1": 90.0, "class 2": 40.0}


def test_get_dice_result_nan_is_null(v2_root):
    summary = v2_root / "nnUNet_results" / "Dataset003_Liver" / "nnUNetPlusPlusTrainer__nnUNetPlans__3d_fullres" / \
        "fold_0" / "validation" / "summary.json"
    summary.write_text('{"mean": {"1": {"Dice": 0.9}, "2": {"Dice": NaN}}}')  # as nnU-Net writes it
    p = tool("get_dice_result", "-path", v2_root, "--json")
    assert p.returncode == 0, p.stderr
    assert strict_json(p.stdout)["dice"] == {"liver": 90.0, "cancer": None}
    p = tool("get_dice_result", "-path", v2_root)
    assert p.returncode == 0 and "| 90.00 | nan |" in p.stdout
    from nnpp.dice import format_dice
    lines = format_dice(str(summary)).splitlines()
    assert lines[1] == "Dice class 2 (label 2): nan"
    assert lines[2] == "Dice mean foreground: 0.9000"  # nnU-Net's nanmean over classes


def test_dataset_choice_messages(v2_root):
    """v2 Dataset003_Liver and v1 Task003_Liver share id 3: -d 3 cannot choose, the full name can."""
    v1_run(v2_root, "3d_fullres", {"results": {"mean": {"1": {"Dice": 0.7}}}})
    p = tool("get_dice_result", "-path", v2_root)
    one_error_line(p, "choose one with -d")
    p = tool("get_dice_result", "-path", v2_root, "-d", "3")
    one_error_line(p, "-d 3 matches several datasets")
    assert "choose one with -d" not in p.stderr
    p = tool("get_dice_result", "-path", v2_root, "-d", "Task003_Liver", "--json")
    assert p.returncode == 0, p.stderr
    assert strict_json(p.stdout)["dice"] == {"class 1": 70.0}
    p = tool("get_dice_result", "-path", v2_root, "-d", "Dataset003_Liver", "--json")
    assert p.returncode == 0 and strict_json(p.stdout)["dice"] == {"liver": 95.12, "cancer": 61.23}


def test_dice_table_aligns_rows_and_prints_notes():
    """The table nnpp_distill and nnpp_prune print: the header names labels in the first scored row's order, a
    missing label prints nan, a note row prints its note."""
    from nnpp.dice import dice_table
    text = dice_table("[x] validation Dice", [("student", {"1": 0.5, "2": 0.25}), ("teacher", "(no summary.json)"),
                                              ("other", {"2": 1.0})], {"1": "liver", "2": "tumour"})
    assert text.splitlines() == ["[x] validation Dice",
                                 " " * 9 + "       liver      tumour",
                                 "student        0.5000      0.2500",
                                 "teacher     (no summary.json)",
                                 "other             nan      1.0000"]
