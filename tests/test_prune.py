"""nnpp_prune: a trained UNet++'s depth k distilled from its full network, saved into the model folder, used by
nnpp_predict/nnpp_export --depth k without further flags."""
import os
import shutil

import pytest
import torch
from conftest import nnunet_env, output_tail, run_cli

from nnpp import NnppError

DEPTH = 2
SHORT = ("-device", "cpu", "--epochs", "1", "--iters", "2", "--val_iters", "1")


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def sub_network_keys(state: dict, k: int) -> set:
    """The parameters X^{0,k} runs: encoder stages 0..k, the nodes X^{i,j} with i + j <= k (their transposed convs
    included), the head on X^{0,k}."""
    keys = set()
    for name in state:
        parts = name.split(".")
        if parts[0] == "encoder" and parts[1] == "stages" and int(parts[2]) <= k:
            keys.add(name)
        elif parts[:2] in (["decoder", "up"], ["decoder", "nodes"]) and sum(map(int, parts[2].split("_"))) <= k:
            keys.add(name)
        elif parts[:2] == ["decoder", "seg_layers"] and int(parts[2]) == k - 1:
            keys.add(name)
    return keys


@pytest.fixture(scope="module")
def pruned(trained_model, tiny_dataset, tmp_path_factory):
    """A copy of the probe-trained UNet++ (nnpp_train's default) pruned to depth 2: (model folder, env, process)."""
    src = trained_model("nnUNetPlusPlusTrainer", 0)
    results = tmp_path_factory.mktemp("prune_results")
    model = results / os.path.basename(os.path.dirname(src)) / os.path.basename(src)
    shutil.copytree(src, model, ignore=shutil.ignore_patterns("fold_[1-9]"))
    env = nnunet_env(tiny_dataset, nnUNet_results=str(results))
    p = run_cli("prune", tiny_dataset["id"], "3d_fullres", "0", "--depth", DEPTH, *SHORT, env=env)
    assert p.returncode == 0, output_tail(p)
    return str(model), env, p


def test_only_the_sub_network_learns_and_the_run_lands_in_the_model_folder(pruned):
    model, env, p = pruned
    fold = os.path.join(model, "fold_0")
    source, out = os.path.join(fold, "checkpoint_final.pth"), os.path.join(fold, f"prune_depth{DEPTH}")
    ck = _weights(os.path.join(out, "checkpoint_final.pth"))
    from nnpp.model_folder import sha256_file
    assert ck["nnpp_prune"] == {"depth": DEPTH, "source_checkpoint": source, "source_sha256": sha256_file(source)}
    assert ck["nnpp_run_settings"]["depth"] == DEPTH and ck["nnpp_run_settings"]["kd"] == ["soft"]
    before, after = _weights(source)["network_weights"], ck["network_weights"]
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    sub = sub_network_keys(before, DEPTH)
    assert "decoder.seg_layers.1.weight" in sub and "decoder.nodes.1_1.convs.0.conv.weight" in sub
    assert "decoder.nodes.0_3.convs.0.conv.weight" not in sub and "encoder.stages.3.0.convs.0.conv.weight" not in sub
    assert changed == sub  # every parameter X^{0,2} runs moved, no other one did
    # its own run: log, validation of the pruned network, kd_config; nothing under the pruning trainer's name
    assert os.path.isfile(os.path.join(out, "validation", "summary.json"))
    assert any(f.startswith("training_log_") for f in os.listdir(out))
    assert not any("Prune" in d for d in os.listdir(os.path.dirname(model)))
    assert "depth 2 of " in p.stdout and "1 epochs x 2 iterations (the model trained 1 x 2)" in p.stdout
    assert "[nnpp_prune] validation Dice" in p.stdout and f"depth {DEPTH} (distilled)" in p.stdout


def test_predict_and_export_load_the_distilled_depth(pruned):
    from nnpp.model_folder import check_depth, load_trained_model
    model, env, _ = pruned
    path = os.path.join(model, "fold_0", f"prune_depth{DEPTH}", "checkpoint_final.pth")
    full = load_trained_model(model, [0])
    at_depth = load_trained_model(model, [0], depth=DEPTH)
    assert at_depth.checkpoints == [path] and at_depth.extra["distilled_folds"] == ["0"]
    distilled = _weights(path)["network_weights"]
    assert all(torch.equal(at_depth.parameters[0][k], distilled[k]) for k in distilled)
    assert not all(torch.equal(full.parameters[0][k], distilled[k]) for k in distilled)
    assert check_depth(at_depth, DEPTH, 3) == "distilled"
    with pytest.raises(NnppError, match="nnpp_prune DATASET CONFIG FOLD --depth 2 for fold"):
        check_depth(full, DEPTH, 3)  # the probe model itself, loaded without the depth


def test_predict_depth_runs_without_a_flag(pruned, tiny_dataset, tmp_path):
    model, env, _ = pruned
    p = run_cli("predict", "-i", os.path.join(tiny_dataset["nnUNet_raw"], tiny_dataset["name"], "imagesTs"),
                "-o", tmp_path / "pred", "-d", tiny_dataset["id"], "-c", "3d_fullres", "-f", "0", "--depth", DEPTH,
                "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar", env=env)
    assert p.returncode == 0 and "WARNING" not in p.stdout + p.stderr, output_tail(p)
    assert any(f.endswith(".nii.gz") for f in os.listdir(tmp_path / "pred"))


def test_a_retrained_model_refuses_its_old_pruning(pruned, tmp_path):
    from nnpp.model_folder import load_trained_model
    model, env, _ = pruned
    copy = tmp_path / "results" / os.path.basename(os.path.dirname(model)) / os.path.basename(model)
    shutil.copytree(model, copy)
    source = copy / "fold_0" / "checkpoint_final.pth"
    ck = _weights(source)
    ck["network_weights"]["decoder.seg_layers.2.bias"] += 1  # "retrained"
    torch.save(ck, source)
    with pytest.raises(NnppError, match="was distilled from another checkpoint.*run nnpp_prune"):
        load_trained_model(str(copy), [0], depth=DEPTH)
    p = run_cli("prune", *map(str, (os.path.basename(os.path.dirname(copy)), "3d_fullres", "0", "--depth", DEPTH)),
                "--c", *SHORT, env={**env, "nnUNet_results": str(tmp_path / "results")})
    assert p.returncode == 2 and "(the full network changed since); start it again without --c" in p.stderr, \
        output_tail(p)


def test_continue_keeps_the_saved_state(pruned, tmp_path):
    model, env, _ = pruned
    copy = tmp_path / "results" / os.path.basename(os.path.dirname(model)) / os.path.basename(model)
    shutil.copytree(model, copy)
    final = copy / "fold_0" / f"prune_depth{DEPTH}" / "checkpoint_final.pth"
    saved = _weights(final)["network_weights"]
    p = run_cli("prune", os.path.basename(os.path.dirname(copy)), "3d_fullres", "0", "--depth", DEPTH, "--c",
                "-device", "cpu", env={**env, "nnUNet_results": str(tmp_path / "results")})
    assert p.returncode == 0 and "--c: continuing" in p.stdout, output_tail(p)
    again = _weights(final)["network_weights"]
    assert all(torch.equal(saved[k], again[k]) for k in saved)  # finished: nothing trained, the state as saved


@pytest.mark.parametrize("args, says", [
    (("--depth", "3"), "this UNet++ has depth L = 3; prune to 1..2"),
    (("--depth", "1", "-tr", "nnUNetPlusPlusTrainerV2"), "train fold 0 first"),
    (("--depth", "1", "-a", "1.5"), "-a 1.5: the KD weight must be in [0, 1]"),
])
def test_bad_inputs(pruned, tiny_dataset, args, says):
    _, env, _ = pruned
    p = run_cli("prune", tiny_dataset["id"], "3d_fullres", "0", *args, "-device", "cpu", env=env)
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, output_tail(p)
    assert len([line for line in p.stderr.splitlines() if "error:" in line]) == 1


@pytest.mark.parametrize("settings, budget", [
    ({"epochs": 40, "iters": 40, "val_iters": 10}, {"epochs": 8, "iters": 40, "val_iters": 10, "of": (40, 40)}),
    ({"epochs": 2, "iters": 5}, {"epochs": 1, "iters": 5, "val_iters": 50, "of": (2, 5)}),  # at least one epoch
    ({}, {"epochs": 200, "iters": 250, "val_iters": 50, "of": (1000, 250)}),  # nnU-Net's own run: its defaults
])
def test_default_budget_is_a_fifth_of_the_models_training(tmp_path, settings, budget):
    from nnpp.run.prune import default_budget
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, **({"nnpp_run_settings": settings} if settings else {})}, path)
    assert default_budget(str(path)) == budget
