"""UNet++ planner (nnU-Net's ExperimentPlanner sized for UNet++) and nnpp_plan_and_preprocess."""
import json
import os

import numpy as np
import pytest

from conftest import nnunet_env, output_tail, run_cli
from nnpp.nets import plans
from nnpp.nets.plans import PLAIN_UNET_CLASS, UNETPP_CLASS

TASK03 = plans.arch_kwargs([32, 64, 128, 256, 320, 320], [[1, 1, 1]] + [[2, 2, 2]] * 5)
REFERENCE_3D, REFERENCE_BS = 560_000_000, 2  # nnU-Net's UNet_reference_val_3d (8 GB, batch 2)


def largest_cube(mode=None, cls=UNETPP_CLASS):
    """Largest cubic patch (multiple of 2^5) whose count fits nnU-Net's 8 GB reference at batch 2."""
    kwargs = dict(TASK03, **({"checkpoint_nodes": mode} if mode else {}))
    net = plans.build_network(cls, kwargs, 1, 3, allow_init=False)
    fits = [p for p in range(32, 257, 16) if net.compute_conv_feature_map_size((p,) * 3) / REFERENCE_BS * 2
            <= REFERENCE_3D]
    return max(fits), net.compute_conv_feature_map_size((128,) * 3)


def test_task03_plan_matches_the_issue():
    """The issue's analytic figures: UNet++ ~4x PlainConvUNet's count at 128^3; at the 8 GB target nnU-Net's rule
    leaves ~80^3 for UNet++ and ~112^3 with every nested node checkpointed (PlainConvUNet: 128^3 fits)."""
    plain_cube, plain_count = largest_cube(cls=PLAIN_UNET_CLASS)
    cube, count = largest_cube()
    assert plain_cube >= 128
    assert 3.5 <= count / plain_count <= 4.5
    assert cube == 80
    assert largest_cube("node")[0] == 112
    assert 80 < largest_cube("cat_conv1")[0] < 112


@pytest.fixture
def planning_env(tiny_dataset, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # nnU-Net's estimate sets torch threads to this
    return tiny_dataset


def plan(planner_cls, dataset, name, **kwargs):
    planner = planner_cls(dataset["id"], plans_name=name, max_patch=(32, 64, 64), **kwargs)
    return planner.plan_experiment()["configurations"]["3d_fullres"]


def test_planner_sizes_patch_for_unetpp(planning_env):
    """Same dataset, same (small) memory target: UNet++ plans get a smaller patch than PlainConvUNet plans, and a
    larger one again with checkpointed nodes; they name UNet++, carry checkpoint_nodes only when set, and point
    at nnU-Net's 3d_fullres data (same spacing)."""
    from nnpp.planning import SmallUNetPlanner, SmallUNetPlusPlusPlanner
    target = 0.02  # GB: small enough that both planners shrink the 32x64x64 cap
    plain = plan(SmallUNetPlanner, planning_env, "t_plain", gpu_memory_target_in_gb=target)
    unetpp = plan(SmallUNetPlusPlusPlanner, planning_env, "t_unetpp", gpu_memory_target_in_gb=target)
    ckpt = plan(SmallUNetPlusPlusPlanner, planning_env, "t_ckpt", gpu_memory_target_in_gb=target,
                checkpoint_nodes="node")
    voxels = {k: np.prod(c["patch_size"]) for k, c in (("plain", plain), ("unetpp", unetpp), ("ckpt", ckpt))}
    assert voxels["unetpp"] < voxels["plain"] and voxels["unetpp"] < voxels["ckpt"], voxels
    assert plain["architecture"]["network_class_name"] == PLAIN_UNET_CLASS
    assert unetpp["architecture"]["network_class_name"] == UNETPP_CLASS
    assert "checkpoint_nodes" not in unetpp["architecture"]["arch_kwargs"]
    assert ckpt["architecture"]["arch_kwargs"]["checkpoint_nodes"] == "node"
    assert unetpp["data_identifier"] == "nnUNetPlans_3d_fullres"
    np.testing.assert_array_equal(plain["spacing"], unetpp["spacing"])
    written = json.load(open(os.path.join(planning_env["nnUNet_preprocessed"], planning_env["name"], "t_ckpt.json")))
    assert written["configurations"]["3d_fullres"]["patch_size"] == [int(v) for v in ckpt["patch_size"]]


def test_cli_bad_inputs(tiny_dataset, tmp_path):
    env = nnunet_env(tiny_dataset)
    p = run_cli("plan_and_preprocess", "-d", "977", "-c", "3d_fullres", env=env)
    assert p.returncode == 2 and "dataset 977 not found in nnUNet_raw" in p.stderr, output_tail(p)
    p = run_cli("plan_and_preprocess", "-d", tiny_dataset["id"], "-c", "3d_fullres", "-np", "1", "2", env=env)
    assert p.returncode == 2 and "-np takes one number or one per configuration (1), got 2" in p.stderr
    p = run_cli("plan_and_preprocess", "-d", tiny_dataset["id"], "--checkpoint", "all", env=env)
    assert p.returncode == 2 and "invalid choice: 'all'" in p.stderr
    p = run_cli("plan_and_preprocess", "-d", tiny_dataset["id"], env=nnunet_env(tiny_dataset, drop=["nnUNet_raw"]))
    assert p.returncode == 2 and "nnUNet_raw" in p.stderr and "not set" in p.stderr


@pytest.mark.slow
def test_plan_train_predict_end_to_end(tiny_dataset, tmp_path):
    """nnpp_plan_and_preprocess -> nnpp_train -p nnppUNetPlusPlusPlans -> nnpp_predict, small and on the CPU."""
    results = tmp_path / "results"
    env = nnunet_env(tiny_dataset, nnUNet_results=str(results), nnUNet_n_proc_DA="0")
    p = run_cli("plan_and_preprocess", "-d", tiny_dataset["id"], "-c", "3d_fullres", "-np", "1",
                "-pl", "SmallUNetPlusPlusPlanner", "--checkpoint", env=env)
    assert p.returncode == 0, output_tail(p)
    assert "reusing nnU-Net's preprocessed nnUNetPlans_3d_fullres" in p.stdout
    plans_file = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"], "nnppUNetPlusPlusPlans.json")
    conf = json.load(open(plans_file))["configurations"]["3d_fullres"]
    assert conf["architecture"]["network_class_name"] == UNETPP_CLASS
    assert conf["architecture"]["arch_kwargs"]["checkpoint_nodes"] == "node"
    p = run_cli("train", tiny_dataset["id"], "3d_fullres", 0, "-p", "nnppUNetPlusPlusPlans", "-device", "cpu",
                "--epochs", "1", "--iters", "2", "--val_iters", "1", env=env)
    assert p.returncode == 0, output_tail(p)
    folder = results / tiny_dataset["name"] / "nnUNetPlusPlusTrainer__nnppUNetPlusPlusPlans__3d_fullres"
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    assert (folder / "fold_0" / "validation" / "summary.json").is_file()
    out = tmp_path / "pred"
    p = run_cli("predict", "-i", os.path.join(tiny_dataset["nnUNet_raw"], tiny_dataset["name"], "imagesTs"),
                "-o", out, "-d", tiny_dataset["id"], "-c", "3d_fullres", "-p", "nnppUNetPlusPlusPlans", "-f", "0",
                "-device", "cpu", "--disable_tta", env=env)
    assert p.returncode == 0, output_tail(p)
    assert [f for f in os.listdir(out) if f.endswith(".nii.gz")]


def _copy_dataset(dataset, root) -> dict:
    """A private copy of the session's tiny dataset (raw + preprocessed) under ``root``: nnU-Net folders."""
    import shutil

    from conftest import make_nnunet_dirs
    dirs = make_nnunet_dirs(root)
    for k in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(os.path.join(dataset[k], dataset["name"]), os.path.join(dirs[k], dataset["name"]))
    return dirs


def _fingerprint(folder) -> dict:
    """{relative path: sha256}, plus inode and mtime for nnU-Net's plans and preprocessed data (they change if a
    file is rewritten, even with the same bytes; nnU-Net's planner itself re-copies dataset.json)."""
    from nnpp.model_folder import sha256_file
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(base, f)
            rel, st = os.path.relpath(p, folder), os.stat(p)
            out[rel] = (sha256_file(p),) + ((st.st_ino, st.st_mtime_ns) if rel.startswith("nnUNetPlans") else ())
    return out


def test_verified_nnunet_data_is_shared(planning_env):
    """The session's nnU-Net-preprocessed 3d_fullres data matches UNet++ plans of the same dataset: shared."""
    from nnpp.planning import UNETPP_PLANS, SmallUNetPlusPlusPlanner
    from nnpp.run.plan_and_preprocess import _choose_data_identifiers, _training_cases
    tiny_dataset = planning_env
    pre = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    plans = SmallUNetPlusPlusPlanner(tiny_dataset["id"], plans_name="t_share").plan_experiment()
    cases = _training_cases(tiny_dataset["name"])
    assert len(cases) == 5
    # the session preprocesses 3d_fullres; 2d only if a 2D test ran earlier in the session
    has_2d = os.path.isdir(os.path.join(pre, "nnUNetPlans_2d"))
    moved = _choose_data_identifiers(pre, plans, UNETPP_PLANS, cases)
    assert moved == ({} if has_2d else {"2d": "nnUNetPlans_2d does not exist"})
    assert plans["configurations"]["2d"]["data_identifier"] == ("nnUNetPlans_2d" if has_2d else f"{UNETPP_PLANS}_2d")
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    # a case missing from nnU-Net's folder (an interrupted preprocessing): not shared
    assert "lacks 1 case" in _choose_data_identifiers(pre, plans, UNETPP_PLANS, cases + ["extra_999"])["3d_fullres"]
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == f"{UNETPP_PLANS}_3d_fullres"


@pytest.mark.parametrize("tamper", ["plans_missing", "spacing_differs"])
def test_nnunet_data_never_rewritten(tiny_dataset, tmp_path, tamper):
    """nnU-Net's preprocessed folder that does not verifiably match (its nnUNetPlans.json gone, or a spacing that
    differs) is left as it is, file for file, and so is nnUNetPlans.json; nnpp preprocesses into its own
    identifier and its plans point there."""
    dirs = _copy_dataset(tiny_dataset, tmp_path)
    pre = os.path.join(dirs["nnUNet_preprocessed"], tiny_dataset["name"])
    default_plans = os.path.join(pre, "nnUNetPlans.json")
    if tamper == "plans_missing":
        os.remove(default_plans)
    else:
        theirs = json.load(open(default_plans))
        theirs["configurations"]["3d_fullres"]["spacing"][0] *= 1.0000001
        json.dump(theirs, open(default_plans, "w"))
    before = {k: v for k, v in _fingerprint(pre).items()  # what nnpp's run may rewrite: its own plans and data
              if not k.startswith("nnppUNetPlusPlusPlans")}
    env = nnunet_env(dirs, nnUNet_n_proc_DA="0")
    p = run_cli("plan_and_preprocess", "-d", tiny_dataset["id"], "-c", "3d_fullres", "-np", "1",
                "-pl", "SmallUNetPlusPlusPlanner", env=env)
    assert p.returncode == 0, output_tail(p)
    after = _fingerprint(pre)
    kept = {k: v for k, v in after.items() if k in before}
    assert kept == before, "nnU-Net's files were rewritten: " + str(
        sorted(k for k in before if before[k] != after.get(k))[:5])
    assert "not sharing nnU-Net's nnUNetPlans_3d_fullres" in p.stdout, output_tail(p)
    new = sorted(k for k in after if k not in before)
    assert not [k for k in new if k.startswith("nnUNetPlans")], new  # nothing new under nnU-Net's names
    conf = json.load(open(os.path.join(pre, "nnppUNetPlusPlusPlans.json")))["configurations"]["3d_fullres"]
    assert conf["data_identifier"] == "nnppUNetPlusPlusPlans_3d_fullres"
    own = os.path.join(pre, conf["data_identifier"])
    assert len([f for f in os.listdir(own) if f.endswith(".pkl")]) == 5
