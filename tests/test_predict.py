"""nnpp_predict builds nnU-Net's predictor itself: any device object, nnU-Net's modules untouched, strict loading,
pruning, and one-line errors for model folders that do not fit their checkpoints."""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import nnunet_env, output_tail, run_cli

from nnpp import NnppError


def results_of(model_folder):
    """nnUNet_results of a trained_model folder (.../RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG)."""
    return os.path.dirname(os.path.dirname(model_folder))


def images_ts(ds):
    return os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTs")


def read_seg(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".nii.gz"))
    assert files
    return {f: sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, f))) for f in files}


def predict_in_process(model_folder, ds, out, monkeypatch, *extra):
    from nnpp.run import predict
    monkeypatch.setenv("nnUNet_results", results_of(model_folder))
    tr = os.path.basename(model_folder).split("__")[0]
    rc = predict.main(["-i", images_ts(ds), "-o", str(out), "-d", str(ds["id"]), "-c", "3d_fullres", "-tr", tr,
                       "-npp", "0", "-nps", "0", "--disable_progress_bar", *extra])
    assert rc == 0
    return read_seg(str(out))


def test_npu_device_reaches_nnunets_predictor_untouched(trained_model, tiny_dataset, tmp_path, monkeypatch):
    """-device npu (what -device auto resolves to on Ascend) is handed to nnUNetPredictor as a torch.device; nnU-Net's
    own entry point asserts on that name, and nnU-Net's trainer lookup is not replaced. Before: NnppError
    ("nnU-Net's predictor supports auto, cuda, mps, cpu") and a patched recursive_find_trainer_class_by_name."""
    import nnunetv2.inference.predict_from_raw_data as nnunet_predict
    import nnunetv2.utilities.find_objects as find_objects
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnpp import device as dev
    asked, made = [], []
    # no NPU here: resolve 'npu' to the CPU, and record the device nnUNetPredictor is built with
    monkeypatch.setattr(dev, "resolve_device", lambda name="auto", local_rank=None: asked.append(name) or torch.device("cpu"))
    orig_init = nnUNetPredictor.__init__
    monkeypatch.setattr(nnUNetPredictor, "__init__", lambda self, *a, **k: made.append(k["device"]) or orig_init(self, *a, **k))
    original_lookup = nnunet_predict.recursive_find_trainer_class_by_name
    segs = predict_in_process(trained_model("nnUNetPlusPlusTrainer", 0), tiny_dataset, tmp_path / "p", monkeypatch,
                              "-f", "0", "-device", "npu", "--disable_tta")
    assert asked == ["npu"] and made == [torch.device("cpu")]
    assert nnunet_predict.recursive_find_trainer_class_by_name is original_lookup \
        is find_objects.recursive_find_trainer_class_by_name
    img = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(images_ts(tiny_dataset), os.listdir(images_ts(tiny_dataset))[0])))
    (seg,) = segs.values()
    assert seg.shape == img.shape and set(np.unique(seg).tolist()) <= {0, 1, 2}


def test_same_masks_as_nnunets_own_initialisation(trained_model, tiny_dataset, tmp_path, monkeypatch):
    """nnU-Net's plain U-Net: nnpp's manual initialisation predicts exactly what nnU-Net's
    initialize_from_trained_model_folder predicts (same network, same weights, same pipeline, mirroring on).
    nnpp runs 3D networks channels_last_3d on the CPU (the trainer's format, so that prediction repeats validation's
    float sums); nnU-Net's predictor runs them contiguous, and near-tie voxels may then part (one of 10,530 did on an
    AVX-512 CI machine). Here both run contiguous: the test is about the initialisation, not the memory format."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnpp import device as dev
    monkeypatch.setattr(dev, "memory_format", lambda device, spatial_dims: torch.contiguous_format)
    folder = trained_model("nnUNetTrainer", 0)
    ours = predict_in_process(folder, tiny_dataset, tmp_path / "ours", monkeypatch, "-f", "0", "-device", "cpu",
                              "--resample", "plans")
    ref = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    ref.initialize_from_trained_model_folder(folder, (0,), "checkpoint_final.pth")
    os.makedirs(tmp_path / "ref")
    ref.predict_from_files_sequential(images_ts(tiny_dataset), str(tmp_path / "ref"))
    theirs = read_seg(str(tmp_path / "ref"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])


def validation_cases_as_input(model_folder, ds, folder):
    """The raw images of fold 0's validation cases (those nnU-Net's final validation predicted) copied to ``folder``;
    returns the validation folder."""
    val = os.path.join(model_folder, "fold_0", "validation")
    cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(val) if f.endswith(".nii.gz"))
    assert cases
    os.makedirs(folder)
    for c in cases:
        shutil.copy(os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTr", f"{c}_0000.nii.gz"), folder)
    return val


def test_nnpp_predict_writes_the_masks_validation_scored(trained_model, tiny_dataset, tmp_path, monkeypatch):
    """The Dice a user reads after training (fold_F/validation/summary.json: nnU-Net's final validation through
    nnpp's predictor, exported with the plans' resampling) is the Dice of what nnpp_predict writes with its defaults:
    on the fold's validation cases the masks are equal voxel for voxel. Where classes nearly tie the paths part, so
    the model is made to tie nearly everywhere: a copy of the fixture's with 100 added to every class's output bias
    (the argmax of exact arithmetic is unchanged; at ~100 fp16 keeps steps of 1/16, so near-ties become ties),
    validated again with nnpp_train --val. Before, nnpp_predict resampled with nnU-Net's torch resampling by
    default (fp32, no fp16 storage of the resampled logits: here thousands of voxels differ), ran the network
    contiguous where the trainer runs it channels_last_3d, and validation predicted with the trainer's threads where
    nnU-Net's prediction takes min(nnUNet_def_n_proc, threads): float sums in another order, kept by the fp16
    accumulators (a voxel or two apart on the fixture's model as trained)."""
    folder = copy_model(trained_model, tmp_path)
    ckpt_path = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    heads = [k for k in ckpt["network_weights"] if ".seg_layers." in k and k.endswith(".bias")]
    assert heads
    for k in heads:
        ckpt["network_weights"][k] += 100.0
    torch.save(ckpt, ckpt_path)
    env = nnunet_env(tiny_dataset, nnUNet_results=results_of(folder))
    p = run_cli("train", tiny_dataset["id"], "3d_fullres", 0, "-device", "cpu", "--val", env=env)
    assert p.returncode == 0, output_tail(p)
    val = validation_cases_as_input(folder, tiny_dataset, tmp_path / "val_images")
    validation = read_seg(val)
    from nnpp.run import predict
    monkeypatch.setenv("nnUNet_results", results_of(folder))
    differ = {}
    for mode in ("default", "torch"):
        assert predict.main(["-i", str(tmp_path / "val_images"), "-o", str(tmp_path / mode), "-d",
                             str(tiny_dataset["id"]), "-c", "3d_fullres", "-f", "0", "-device", "cpu", "-npp", "0",
                             "-nps", "0", "--disable_progress_bar", *(["--resample", mode] if mode == "torch" else [])
                             ]) == 0
        ours = read_seg(str(tmp_path / mode))
        assert ours.keys() == validation.keys()
        assert all(ours[k].shape == validation[k].shape for k in ours)
        differ[mode] = sum(int((ours[k] != validation[k]).sum()) for k in ours)
    assert differ["default"] == 0, differ
    # the model does tie: torch's resampling (the old default) parts from it (thousands of voxels on an AVX2 machine,
    # 18 on CI's AVX-512 one: how many is the CPU's business, that some do is the test's)
    assert differ["torch"] > 0, differ


def test_torch_resampling_agrees_with_the_plans_scipy_resampling(trained_model, tiny_dataset, tmp_path, monkeypatch,
                                                                  capsys):
    """--resample torch (nnU-Net's resample_torch_fornnunet) against the plans' scipy resampling of the same logits:
    the exported probabilities differ by interpolation error only and the masks agree (the tiny model's logits are
    nearly flat, so a mask can flip where two classes tie: agreement >= 99%, measured 99.9%+ on real CTs in
    benchmarks/RESULTS.md)."""
    folder = trained_model("nnUNetPlusPlusTrainer", 0)
    out = {}
    for mode in ("torch", "plans"):
        out[mode] = predict_in_process(folder, tiny_dataset, tmp_path / mode, monkeypatch, "-f", "0", "-device", "cpu",
                                       "--resample", mode, "--save_probabilities")
    printed = capsys.readouterr().out
    assert "resample_torch_fornnunet (--resample torch)" in printed
    assert "resample_data_or_seg_to_shape (--resample plans)" in printed
    for k in out["torch"]:
        agree = (out["torch"][k] == out["plans"][k]).mean()
        assert agree >= 0.99, (k, agree)
        a, b = (np.load(tmp_path / m / k.replace(".nii.gz", ".npz"))["probabilities"] for m in ("torch", "plans"))
        assert a.shape == b.shape and np.abs(a - b).max() < 0.2 and np.abs(a - b).mean() < 0.01


def test_depth_prunes_the_predictor_network(trained_model, tiny_dataset, tmp_path, capsys):
    from nnpp.predictor.build import init_torch, make_predictor
    folder = trained_model("nnUNetPlusPlusTrainer", 0)
    pred = make_predictor(torch.device("cpu"), progress=False)
    # the session's model was trained with the default shallow_heads=probe: its depth 1 never trained, refused
    # (one line naming the ways out) unless allowed, then said
    with pytest.raises(NnppError, match=r"--depth 1 < 3: this model's head X\^\{0,1\} was trained as a probe .*"
                                        r"nnpp_prune DATASET CONFIG FOLD --depth 1 for fold\(s\) 0.* --allow_untrained_depth"):
        init_torch(pred, folder, ["0"], depth=1)
    init_torch(pred, folder, ["0"], depth=1, allow_untrained_depth=True)
    assert pred.network.prune_depth == 1
    assert "WARNING: depth 1 < 3: this model's head X^{0,1} was trained as a probe" in capsys.readouterr().out
    init_torch(make_predictor(torch.device("cpu"), progress=False), folder, ["0"], depth=3)  # full depth: no warning
    assert "WARNING" not in capsys.readouterr().out
    x = torch.randn(1, 1, *pred.configuration_manager.patch_size)
    with torch.no_grad():
        assert torch.equal(pred.network(x), pred.network(x, depth=1))
        assert not torch.allclose(pred.network(x), pred.network(x, depth=pred.network.depth))
    with pytest.raises(NnppError, match=r"--depth 9 is out of range: this UNet\+\+ has depth L = \d"):
        init_torch(make_predictor(torch.device("cpu")), folder, ["0"], depth=9, allow_untrained_depth=True)
    with pytest.raises(NnppError, match=r"--depth is a UNet\+\+ option; PlainConvUNet cannot be pruned"):
        init_torch(make_predictor(torch.device("cpu")), trained_model("nnUNetTrainer", 0), ["0"], depth=1)


# ------------------------------------------------------------------------------------- tampered model folders
def copy_model(trained_model, tmp_path, trainer="nnUNetPlusPlusTrainer"):
    src = trained_model(trainer, 0)
    dst = tmp_path / "results" / os.path.basename(os.path.dirname(src)) / os.path.basename(src)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("validation", "fold_[1-9]"))  # fold 0 only
    return str(dst)


def edit_json(path, fn):
    with open(path) as f:
        obj = json.load(f)
    fn(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def _features(plans):
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [2 * f for f in arch["features_per_stage"]]


def _patch(plans):
    plans["configurations"]["3d_fullres"]["patch_size"][0] *= 2


def _nonlin(plans):
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin_kwargs"] = {"negative_slope": 0.5}


@pytest.mark.parametrize("edit,fragments", [
    (_features, ("plans.json in", "differs from the plans", "architecture", "restore plans.json")),
    (_patch, ("differs from the plans", "patch_size")),
    (_nonlin, ("differs from the plans", "architecture")),
])
def test_edited_plans_are_refused(trained_model, tmp_path, edit, fragments):
    from nnpp.model_folder import load_trained_model
    folder = copy_model(trained_model, tmp_path)
    edit_json(os.path.join(folder, "plans.json"), edit)
    with pytest.raises(NnppError) as e:
        load_trained_model(folder, ["0"])
    for f in fragments:
        assert f in str(e.value)


def test_checkpoint_without_stored_plans_is_checked_by_strict_load(trained_model, tmp_path):
    """A checkpoint from elsewhere (no init_args plans to compare with) must still fit the network exactly."""
    from nnpp.model_folder import load_trained_model
    folder = copy_model(trained_model, tmp_path)
    ckpt_path = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    del ckpt["init_args"]["plans"]
    torch.save(ckpt, ckpt_path)
    edit_json(os.path.join(folder, "plans.json"), _features)
    with pytest.raises(NnppError, match=r"does not match the network that plans.json \+ nnUNetPlusPlusTrainer build "
                                        r"\(size mismatch: encoder\.stages\.0"):
        load_trained_model(folder, ["0"])


def test_folds_of_different_trainers_are_refused(trained_model, tmp_path):
    from nnpp.model_folder import load_trained_model
    folder = copy_model(trained_model, tmp_path)
    os.makedirs(os.path.join(folder, "fold_1"))
    shutil.copy(os.path.join(trained_model("nnUNetTrainer", 0), "fold_0", "checkpoint_final.pth"),
                os.path.join(folder, "fold_1", "checkpoint_final.pth"))
    with pytest.raises(NnppError, match="comes from nnUNetTrainer / 3d_fullres but fold 0 from nnUNetPlusPlusTrainer"):
        load_trained_model(folder, ["0", "1"])


@pytest.mark.slow
def test_cli_bad_model_folders(trained_model, tiny_dataset, tmp_path):
    """As a user runs it: one line, exit 2, nothing predicted."""
    folder = copy_model(trained_model, tmp_path)
    env = nnunet_env(tiny_dataset, nnUNet_results=results_of(folder))
    args = ("-i", images_ts(tiny_dataset), "-o", tmp_path / "o", "-d", tiny_dataset["id"], "-c", "3d_fullres",
            "-f", "0", "-device", "cpu")
    p = run_cli("predict", *args, "--depth", "1", env=env)  # a probe-trained depth: refused before predicting
    assert p.returncode == 2 and "Traceback" not in p.stderr, output_tail(p)
    assert "was trained as a probe" in p.stderr and "--allow_untrained_depth" in p.stderr
    assert not (tmp_path / "o").exists()
    with open(os.path.join(folder, "fold_0", "checkpoint_final.pth"), "r+b") as f:
        f.truncate(1000)
    p = run_cli("predict", *args, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr, output_tail(p)
    assert "checkpoint_final.pth is unreadable" in p.stderr and "truncated or corrupt" in p.stderr
    p = run_cli("predict", *args, "--depth", "0", env=env)
    assert p.returncode == 2 and "expected a positive integer, got '0'" in p.stderr
    p = run_cli("predict", "-i", images_ts(tiny_dataset), "-o", tmp_path / "o", "-device", "cpu", env=env)
    assert p.returncode == 2 and "-d DATASET and -c CONFIGURATION are required" in p.stderr
    assert not (tmp_path / "o").exists()


def test_how_a_depth_was_obtained():
    """check_depth by the run settings each fold's checkpoint recorded: full depth; trained heads; no nnpp settings
    at all (a converted v1 model: unknown, said); probes (refused, or allowed and said)."""
    from types import SimpleNamespace

    from nnpp.model_folder import check_depth
    said = []

    def model(*settings, distilled=()):
        return SimpleNamespace(extra={"run_settings": list(settings), "distilled_folds": list(distilled)},
                               folds=[str(f) for f in range(len(settings))])
    assert check_depth(model({"shallow_heads": "probe"}), None, 4, log=said.append) == "full"
    assert check_depth(model({"shallow_heads": "probe"}), 4, 4, log=said.append) == "full"
    assert check_depth(model({"epochs": 10}), 2, 4, log=said.append) == "trained"  # unrecorded: trained
    assert check_depth(model({"epochs": 10}, {"shallow_heads": "trained"}), 2, 4, log=said.append) == "trained"
    assert said == []
    assert check_depth(model({}, {}), 2, 4, log=said.append) == "unknown"
    assert len(said) == 1 and "records no nnpp run settings" in said[0]
    with pytest.raises(NnppError, match=r"head X\^\{0,3\} was trained as a probe"):
        check_depth(model({"epochs": 10}, {"shallow_heads": "probe"}), 3, 4, log=said.append)
    assert check_depth(model({"shallow_heads": "probe"}), 3, 4, True, log=said.append) == "untrained"
    assert "running it because of --allow_untrained_depth" in said[-1]
    # nnpp_prune distilled the depth (load_trained_model swapped the weights in): every fold, or the others named
    probes = ({"shallow_heads": "probe"}, {"shallow_heads": "probe"})
    assert check_depth(model(*probes, distilled=["0", "1"]), 2, 4, log=said.append) == "distilled"
    with pytest.raises(NnppError, match=r"nnpp_prune DATASET CONFIG FOLD --depth 2 for fold\(s\) 1\)"):
        check_depth(model(*probes, distilled=["0"]), 2, 4, log=said.append)
