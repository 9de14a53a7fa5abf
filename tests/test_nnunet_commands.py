"""nnU-Net's own commands on nnpp model folders, through nnU-Net's ``nnUNet_extTrainer`` hook
(nnpp.training.nnunet_ext, printed by ``nnpp_ext_trainer_path``)."""
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import nnunet_env, output_tail, run_cli


def ext_path() -> str:
    p = run_cli("ext_trainer_path")
    assert p.returncode == 0 and p.stderr == "", output_tail(p)
    return p.stdout.strip()


def test_ext_trainer_folder_finds_every_nnpp_trainer(monkeypatch):
    """nnU-Net's own lookup, pointed at the printed folder, returns nnpp's classes themselves for every nnpp
    trainer (the KD students included); without the hook it finds none of them."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnpp.model_folder import NNPP_TRAINER_MODULES
    folder = ext_path()
    assert os.path.isdir(folder)
    monkeypatch.setenv("nnUNet_extTrainer", folder)
    for name, module in NNPP_TRAINER_MODULES.items():
        assert recursive_find_trainer_class_by_name(name) is getattr(importlib.import_module(module), name), name
    monkeypatch.delenv("nnUNet_extTrainer")
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):
        recursive_find_trainer_class_by_name("nnUNetPlusPlusTrainerKD")


def nnunet(command: str, *args, env) -> subprocess.CompletedProcess:
    """One of nnU-Net's console scripts, installed beside this Python."""
    exe = os.path.join(os.path.dirname(sys.executable), command)
    if not os.path.isfile(exe):
        pytest.skip(f"nnU-Net's {command} is not installed beside {sys.executable}")
    return subprocess.run([exe, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_nnunet_commands_on_nnpp_model_folders(tiny_dataset, trained_model, tmp_path):
    """nnUNetv2_find_best_configuration over two folds of a UNet++ model, nnUNetv2_predict with that model and with
    a UNet++ KD student (nnpp_distill), nnUNetv2_ensemble of the two predictions: nnU-Net's commands, unchanged."""
    ds = tiny_dataset
    results = tmp_path / "results"
    src = trained_model("nnUNetPlusPlusTrainer", 0)
    trained_model("nnUNetPlusPlusTrainer", 1)  # the same model folder, second fold
    unetpp = results / ds["name"] / os.path.basename(src)
    shutil.copytree(src, unetpp)  # the session's models are read-only: nnU-Net writes cross-validation results
    env = nnunet_env(ds, nnUNet_results=str(results), nnUNet_extTrainer=ext_path(), nnUNet_def_n_proc="1")

    p = run_cli("distill", ds["id"], "3d_fullres", 0, "-t", unetpp, "--kd", "soft", "--student", "unetpp",
                "-device", "cpu", "--epochs", "1", "--iters", "2", "--val_iters", "1", env=env)
    assert p.returncode == 0, output_tail(p)
    assert (results / ds["name"] / "nnUNetPlusPlusTrainerKD__nnUNetPlans_kd_r2__3d_fullres" / "fold_0" /
            "checkpoint_final.pth").is_file()

    p = nnunet("nnUNetv2_find_best_configuration", ds["id"], "-c", "3d_fullres", "-tr", "nnUNetPlusPlusTrainer",
               "-p", "nnUNetPlans", "-f", 0, 1, "--disable_ensembling", "-np", 1, env=env)
    assert p.returncode == 0, output_tail(p)
    assert "*Best*: nnUNetPlusPlusTrainer__nnUNetPlans__3d_fullres" in p.stdout, output_tail(p)
    info = json.loads((results / ds["name"] / "inference_information.json").read_text())
    assert info["best_model_or_ensemble"]["selected_model_or_models"] == [
        {"configuration": "3d_fullres", "trainer": "nnUNetPlusPlusTrainer", "plans_identifier": "nnUNetPlans"}]
    merged = unetpp / "crossval_results_folds_0_1"
    assert len(json.loads((merged / "summary.json").read_text())["metric_per_case"]) == 2  # one case per fold

    images = os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTs")
    cases = sorted(f.replace("_0000.nii.gz", ".nii.gz") for f in os.listdir(images))
    common = ["-i", images, "-d", ds["id"], "-c", "3d_fullres", "--save_probabilities", "--disable_tta",
              "-device", "cpu", "-npp", 1, "-nps", 1]
    preds = {}
    for name, args in (("unetpp", ["-tr", "nnUNetPlusPlusTrainer", "-f", 0, 1]),
                       ("student", ["-tr", "nnUNetPlusPlusTrainerKD", "-p", "nnUNetPlans_kd_r2", "-f", 0])):
        preds[name] = tmp_path / name
        p = nnunet("nnUNetv2_predict", *common, *args, "-o", preds[name], env=env)
        assert p.returncode == 0, output_tail(p)
        assert sorted(f for f in os.listdir(preds[name]) if f.endswith(".nii.gz")) == cases, name
        assert [f for f in os.listdir(preds[name]) if f.endswith(".npz")], name

    p = nnunet("nnUNetv2_ensemble", "-i", preds["unetpp"], preds["student"], "-o", tmp_path / "ensemble", "-np", 1,
               env=env)
    assert p.returncode == 0, output_tail(p)
    assert sorted(f for f in os.listdir(tmp_path / "ensemble") if f.endswith(".nii.gz")) == cases
