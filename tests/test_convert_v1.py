"""nnpp_convert_v1_model on the official-code v1 UNet++ fixture (tests/data/v1_unetpp, a copy of
shared/fixtures/v1_unetpp): exact reproduction of the v1 network's outputs, the converted plans, safe v1
pickles, bad inputs, and the converted folder used by nnpp_predict, nnpp_train --val and get_dice_result."""
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_nnunet_dirs, nnunet_env, output_tail, run_cli

DATA = pathlib.Path(__file__).resolve().parent / "data" / "v1_unetpp"
V1_FOLDER = DATA / "RESULTS_FOLDER" / "nnUNet" / "3d_fullres" / "Task003_Liver" / "nnUNetPlusPlusTrainerV2__nnUNetPlansv2.1"
DATASET = "Dataset950_V1Val"
MODEL = f"{DATASET}/nnUNetPlusPlusTrainerV2__nnUNetPlansv2.1__3d_fullres"


def write_nifti(array, path, spacing_zyx=(2.5, 0.8, 0.8)):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(img, str(path))


def make_raw_dataset(raw: pathlib.Path, n_cases=5):
    """A v2 raw dataset shaped like the fixture's task (1 CT channel, labels 0/1/2) at the plans' spacing,
    16x40x40 voxels per case (one sliding-window patch)."""
    root = raw / DATASET
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.RandomState(0)
    for c in range(n_cases):
        label = np.zeros((16, 40, 40), np.uint8)
        label[4:12, 8:30, 8:30] = 1
        label[6:10, 12:18, 12:18] = 2
        image = np.where(label == 1, 100, np.where(label == 2, 60, -50)) + rng.normal(0, 15, label.shape)
        write_nifti(image.astype(np.int16), root / "imagesTr" / f"case_{c:03d}_0000.nii.gz")
        write_nifti(label, root / "labelsTr" / f"case_{c:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "cancer": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted once into a private nnU-Net tree (raw dataset 950 present, --to_preprocessed)."""
    dirs = make_nnunet_dirs(tmp_path_factory.mktemp("v1conv"))
    make_raw_dataset(pathlib.Path(dirs["nnUNet_raw"]))
    env = nnunet_env(dirs, drop=("nnUNet_raw_data_base", "RESULTS_FOLDER"))
    p = run_cli("convert_v1_model", V1_FOLDER, 950, "--to_preprocessed", env=env)
    assert p.returncode == 0, output_tail(p)
    return {"dirs": dirs, "env": env, "model": pathlib.Path(dirs["nnUNet_results"]) / MODEL, "stdout": p.stdout}


def build_like_predictor(model: pathlib.Path, deep_supervision: bool):
    """plans.json -> PlansManager -> configuration -> checkpoint's trainer class -> build_network_architecture
    -> load_state_dict(strict=True), as nnU-Net's predictor does it."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnpp.training import find_trainer_class
    plans = json.loads((model / "plans.json").read_text())
    dataset_json = json.loads((model / "dataset.json").read_text())
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    pm = PlansManager(plans)
    cm = pm.get_configuration(checkpoint["init_args"]["configuration"])
    trainer = find_trainer_class(checkpoint["trainer_name"])
    net = trainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json),
                                             pm.get_label_manager(dataset_json).num_segmentation_heads,
                                             deep_supervision)
    net.load_state_dict(checkpoint["network_weights"], strict=True)
    return net.eval(), checkpoint


def test_reproduces_official_v1_outputs(converted):
    ref = torch.load(DATA / "reference_io.pt", weights_only=True)
    net, _ = build_like_predictor(converted["model"], deep_supervision=True)
    with torch.no_grad():
        outputs = net(ref["input"])
    assert len(outputs) == 5
    for j, (out, expected) in enumerate(zip(outputs, ref["outputs"])):
        assert out.shape == (1, 3, 16, 64, 64)
        assert (out - expected).abs().max().item() < 1e-4, f"output {j} (X^(0,{5 - j})) differs"
    net, _ = build_like_predictor(converted["model"], deep_supervision=False)
    with torch.no_grad():
        out = net(ref["input"])
    assert torch.is_tensor(out) and (out - ref["outputs"][0]).abs().max().item() < 1e-4


def test_converted_plans_dataset_and_checkpoint(converted):
    model = converted["model"]
    plans = json.loads((model / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    kw = cfg["architecture"]["arch_kwargs"]
    assert cfg["spacing"] == [2.5, 0.8, 0.8] and cfg["patch_size"] == [16, 64, 64] and cfg["batch_size"] == 2
    assert cfg["median_image_size_in_voxels"] == [90, 256, 256]
    assert cfg["normalization_schemes"] == ["CTNormalization"] and cfg["use_mask_for_norm"] == [False]
    assert cfg["data_identifier"] == "nnUNetPlansv2.1_3d_fullres" and cfg["batch_dice"] is False
    assert kw["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert kw["kernel_sizes"] == [[1, 3, 3]] + [[3, 3, 3]] * 5
    assert kw["features_per_stage"] == [4, 8, 16, 32, 32, 32]  # base 4, capped at 32 by the weights
    assert (kw["upsample_bias"], kw["seg_bias"], kw["decoder_kernels"]) == (False, False, "level_below")
    assert plans["transpose_forward"] == [0, 1, 2] and plans["transpose_backward"] == [0, 1, 2]
    # v1 sd/mn/mx -> std/min/max
    assert plans["foreground_intensity_properties_per_channel"]["0"] == {
        "max": 201.0, "mean": 99.4, "median": 99.0, "min": -17.0, "percentile_00_5": -17.0,
        "percentile_99_5": 197.0, "std": 39.4}
    assert any("caps features at 32" in n for n in plans["nnpp_v1_notes"])
    assert "note: the checkpoint caps features at 32" in converted["stdout"]
    dataset = json.loads((model / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "liver": 1, "cancer": 2}
    assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    _, checkpoint = build_like_predictor(model, deep_supervision=False)
    assert checkpoint["trainer_name"] == "nnUNetPlusPlusTrainerV2" and checkpoint["current_epoch"] == 1000
    assert checkpoint["inference_allowed_mirroring_axes"] == (0, 1, 2)
    assert not (model / "fold_0" / "checkpoint_best.pth").exists()  # the fixture has no model_best
    pre = pathlib.Path(converted["dirs"]["nnUNet_preprocessed"]) / DATASET
    assert json.loads((pre / "nnUNetPlansv2.1.json").read_text()) == plans
    assert json.loads((pre / "dataset.json").read_text())["numTraining"] == 5  # the raw dataset's, copied


def test_unetpp_v1_options_change_only_what_they_say():
    from nnpp.nets.unetpp import UNetPlusPlus
    common = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d,
                  kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                  n_conv_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2, conv_bias=True,
                  norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    v2 = UNetPlusPlus(**common).state_dict()
    v1 = UNetPlusPlus(**common, upsample_bias=False, seg_bias=False, decoder_kernels="level_below").state_dict()
    assert v2["decoder.nodes.0_1.convs.0.conv.weight"].shape[2:] == (1, 3, 3)  # level 0's own kernel
    assert v1["decoder.nodes.0_1.convs.0.conv.weight"].shape[2:] == (3, 3, 3)  # level 1's kernel
    assert "decoder.up.0_1.bias" in v2 and "decoder.seg_layers.1.bias" in v2
    dropped = set(v2) - set(v1)
    assert dropped == {f"decoder.up.{k}.bias" for k in ("0_1", "1_1", "0_2")} | \
        {"decoder.seg_layers.0.bias", "decoder.seg_layers.1.bias"}
    assert set(v1) <= set(v2)
    with pytest.raises(ValueError, match="decoder_kernels"):
        UNetPlusPlus(**common, decoder_kernels="v1")


def test_v1_pickles_load_safely(tmp_path):
    from nnpp import NnppError
    from nnpp.convert.v1_files import V1Object, load_v1_checkpoint, load_v1_pickle
    plans = load_v1_pickle(str(V1_FOLDER / "plans.pkl"), "v1 plans")
    assert plans["plans_per_stage"][0]["pool_op_kernel_sizes"][0] == [1, 2, 2]
    assert plans["dataset_properties"]["intensityproperties"][0]["sd"] == 39.4

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"plans_per_stage": Evil()}))
    with pytest.raises(NnppError, match="system"):
        load_v1_pickle(str(tmp_path / "evil.pkl"), "v1 plans")
    assert not (tmp_path / "pwned").exists()
    # an object of an nnU-Net v1 class (not installed here) comes back as a placeholder
    blob = b"\x80\x02cnnunet.training.foo\nBar\nq\x00)\x81q\x01}q\x02X\x01\x00\x00\x00aq\x03K\x01sb."
    (tmp_path / "v1obj.pkl").write_bytes(blob)
    obj = load_v1_pickle(str(tmp_path / "v1obj.pkl"), "v1 model info")
    assert isinstance(obj, V1Object) and obj.v1_class == "nnunet.training.foo.Bar" and obj.state == {"a": 1}
    # v1 checkpoints keep numpy scalars in their plot data
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3,
                "plot_stuff": ([np.float64(0.5)], [np.float32(0.25)], [], [])}, tmp_path / "m.model")
    ck = load_v1_checkpoint(str(tmp_path / "m.model"))
    assert ck["epoch"] == 3 and float(ck["plot_stuff"][0][0]) == 0.5
    (tmp_path / "bad.model").write_bytes(b"not a checkpoint")
    with pytest.raises(NnppError, match="unreadable"):
        load_v1_checkpoint(str(tmp_path / "bad.model"))


def test_dataset_json_from_plans_when_none_found():
    from nnpp.convert.v1_files import load_v1_pickle
    from nnpp.convert.v1_plans import convert_dataset_json
    plans = load_v1_pickle(str(V1_FOLDER / "plans.pkl"), "v1 plans")
    dataset, notes = convert_dataset_json(None, plans)
    assert dataset["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    assert dataset["channel_names"] == {"0": "CT"}
    assert len(notes) == 1 and "--dataset_json" in notes[0]


# ------------------------------------------------------------------------------------------------ bad inputs
def copy_v1_folder(tmp_path, name="nnUNetPlusPlusTrainerV2__nnUNetPlansv2.1"):
    dst = tmp_path / "RESULTS_FOLDER" / "nnUNet" / "3d_fullres" / "Task003_Liver" / name
    shutil.copytree(V1_FOLDER, dst)
    return dst


def bad(tmp_path, folder, fragment, *extra):
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    env = nnunet_env(drop=("nnUNet_raw_data_base", "RESULTS_FOLDER", "nnUNet_raw", "nnUNet_preprocessed"),
                     nnUNet_results=str(results))
    p = run_cli("convert_v1_model", folder, 3, *extra, env=env)
    assert p.returncode == 2, output_tail(p)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnpp_convert_v1_model: error:") and fragment in lines[0], \
        p.stderr
    return results


def test_bad_not_a_v1_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    bad(tmp_path, tmp_path / "empty", "is not an nnU-Net v1 model folder")


def test_bad_missing_pkl(tmp_path):
    folder = copy_v1_folder(tmp_path)
    (folder / "fold_0" / "model_final_checkpoint.model.pkl").unlink()
    bad(tmp_path, folder, "model_final_checkpoint.model.pkl")
    (folder / "plans.pkl").unlink()
    bad(tmp_path, folder, "plans.pkl missing")


def test_bad_unknown_trainer(tmp_path):
    folder = copy_v1_folder(tmp_path, "nnUNetTrainerV2_Loss_Dice__nnUNetPlansv2.1")
    bad(tmp_path, folder, "v1 trainer 'nnUNetTrainerV2_Loss_Dice' is not one")


def test_bad_shape_mismatch_writes_nothing(tmp_path):
    from nnpp.convert.v1_files import load_v1_pickle
    folder = copy_v1_folder(tmp_path)
    plans = load_v1_pickle(str(folder / "plans.pkl"), "v1 plans")
    plans["plans_per_stage"][0]["conv_kernel_sizes"][0] = [3, 3, 3]  # the checkpoint has (1, 3, 3)
    (folder / "plans.pkl").write_bytes(pickle.dumps(plans))
    results = bad(tmp_path, folder, "shape mismatch: v1 conv_blocks_context.0.blocks.0.conv.weight "
                                    "(4, 1, 1, 3, 3) vs converted encoder.stages.0.0.convs.0.conv.weight "
                                    "(4, 1, 3, 3, 3)")
    assert list(results.iterdir()) == []


def test_existing_conversion_is_not_overwritten(converted):
    p = run_cli("convert_v1_model", V1_FOLDER, 950, env=converted["env"])
    assert p.returncode == 2 and "exists; pass --overwrite" in p.stderr, output_tail(p)


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_nnpp_predict_runs_converted_model(converted, tmp_path):
    import SimpleITK as sitk
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    image = np.random.RandomState(1).normal(100, 40, (20, 60, 60)).astype(np.int16)
    write_nifti(image, inp / "case_000_0000.nii.gz")
    p = run_cli("predict", "-i", inp, "-o", out, "-d", 950, "-c", "3d_fullres", "-f", 0, "-tr",
                "nnUNetPlusPlusTrainerV2", "-p", "nnUNetPlansv2.1", "-device", "cpu", "--disable_tta",
                "-npp", 1, "-nps", 1, env=converted["env"])
    assert p.returncode == 0, output_tail(p)
    seg = sitk.ReadImage(str(out / "case_000.nii.gz"))
    assert sitk.GetArrayFromImage(seg).shape == (20, 60, 60)
    assert np.allclose(seg.GetSpacing(), (0.8, 0.8, 2.5))
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}


@pytest.mark.slow
def test_validate_converted_model_and_read_dice(converted):
    env = converted["env"]
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_preprocess"), "-d", "950",
                        "-plans_name", "nnUNetPlansv2.1", "-c", "3d_fullres", "-np", "1"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, output_tail(p)
    p = run_cli("train", 950, "3d_fullres", 0, "-tr", "nnUNetPlusPlusTrainerV2", "-p", "nnUNetPlansv2.1",
                "--val", "-device", "cpu", env=env)
    assert p.returncode == 0, output_tail(p)
    assert "Dice liver (label 1):" in p.stdout and "Dice cancer (label 2):" in p.stdout, output_tail(p)
    summary = json.loads((converted["model"] / "fold_0" / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    p = subprocess.run([sys.executable, "-m", "nnpp.tools.get_dice_result", "-path",
                        converted["dirs"]["nnUNet_results"], "-mode", "1p", "-d", "950"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, output_tail(p)
    assert "| liver | cancer |" in p.stdout
    assert f"| {100 * summary['mean']['1']['Dice']:.2f} | {100 * summary['mean']['2']['Dice']:.2f} |" in p.stdout
