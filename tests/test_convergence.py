"""nnpp_train --seed, the UNet++ deep-supervision weightings (--ds_weights, --shallow_heads), and a smoke run of
benchmarks/bench_convergence.py (tiny: one network, one seed, a few iterations)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnpp import NnppError
from nnpp.device import device_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Stop(Exception):
    pass


def _initial_state(tiny_dataset, tmp_path, *flags):
    """What ``nnpp_train ... FLAGS`` starts from: initial weights and the first training batch (the run is stopped
    right after the trainer is built, so nothing trains)."""
    from nnpp.run import train
    seen = {}

    def setup(trainer, args):
        trainer.initialize()
        seen["weights"] = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        seen["batch"] = next(trainer.get_dataloaders()[0])["data"].clone()
        seen["trainer"] = trainer
        raise _Stop

    args = train.build_parser().parse_args([str(tiny_dataset["id"]), "3d_fullres", "0", "-device", "cpu",
                                            "--results", str(tmp_path), *flags])
    with pytest.raises(_Stop):
        train.run(args, setup=setup)
    return seen


def _same(a, b) -> bool:
    return all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]) and torch.equal(a["batch"],
                                                                                                     b["batch"])


def test_seed_reproduces_weights_and_batches(tiny_dataset, tmp_path):
    assert os.environ.get("nnUNet_n_proc_DA") == "0"  # augmentation in this process: seeded by --seed
    a = _initial_state(tiny_dataset, tmp_path / "a", "--seed", "3")
    b = _initial_state(tiny_dataset, tmp_path / "b", "--seed", "3")
    c = _initial_state(tiny_dataset, tmp_path / "c", "--seed", "4")
    assert _same(a, b)
    assert not any(torch.equal(a["weights"][k], c["weights"][k]) for k in a["weights"] if k.endswith("conv.weight"))
    assert not torch.equal(a["batch"], c["batch"])
    assert a["trainer"].run_settings()["seed"] == 3
    unseeded = _initial_state(tiny_dataset, tmp_path / "d")
    assert "seed" not in unseeded["trainer"].run_settings()


def test_ds_weights_modes_reach_the_loss(tiny_dataset, tmp_path, monkeypatch):
    """--ds_weights sets the loss nnU-Net's wrapper applies; equal stays selectable (and is what an absent setting
    means on --c); nnU-Net's own trainer refuses the flag with one clear error."""
    from nnpp.saved_settings import DS_WEIGHTS
    losses = {}
    for mode in DS_WEIGHTS:
        t = _initial_state(tiny_dataset, tmp_path / mode, "--ds_weights", mode)["trainer"]
        losses[mode] = np.array(t.deep_supervision_weights())
        assert t.ds_weights == mode and losses[mode].sum() == pytest.approx(1) and (losses[mode] > 0).all()
        # the default shallow_heads=probe: the loss weighs X^{0,L} 1, the probes in the mode's proportions
        assert t.shallow_heads == "probe" and t.loss.weight_factors == pytest.approx(losses[mode] / losses[mode][0])
        assert t.run_settings().get("ds_weights", "equal") == mode
    assert losses["equal"] == pytest.approx([1 / 3] * 3)
    assert losses["descending"] == pytest.approx([4 / 7, 2 / 7, 1 / 7])  # X^{0,L} first
    assert losses["decay"] == pytest.approx(losses["equal"])  # epoch 0 of decay
    default = _initial_state(tiny_dataset, tmp_path / "default")["trainer"]  # the default: descending
    assert default.ds_weights == "descending" and default.loss.weight_factors == pytest.approx([1, 1 / 2, 1 / 4])
    assert default.run_settings()["ds_weights"] == "descending" and default.run_settings()["shallow_heads"] == "probe"
    assert default.bare_network.decoder.probe_heads is True
    trained = _initial_state(tiny_dataset, tmp_path / "trained", "--shallow_heads", "trained")["trainer"]
    assert trained.loss.weight_factors == pytest.approx(losses["descending"])
    assert trained.bare_network.decoder.probe_heads is False and "shallow_heads" not in trained.run_settings()

    t = _initial_state(tiny_dataset, tmp_path / "decay2", "--ds_weights", "decay", "--epochs", "4")["trainer"]
    t.current_epoch = 3
    t.on_train_epoch_start()  # the weights in the loss follow the epoch
    assert t.loss.weight_factors == pytest.approx([1, 1 / 4, 1 / 4])  # (4/6, 1/6, 1/6) scaled to X^{0,L} = 1

    # --c on a run whose settings name neither ds_weights nor shallow_heads (every run before the flags): equal
    # weights, shallow heads trained, whatever the defaults are now
    old = _initial_state(tiny_dataset, tmp_path / "old", "--ds_weights", "equal", "--shallow_heads", "trained",
                         "--epochs", "3")["trainer"]
    assert "ds_weights" not in old.run_settings() and "shallow_heads" not in old.run_settings()
    old.save_checkpoint(os.path.join(old.output_folder, "checkpoint_latest.pth"))
    resumed = _initial_state(tiny_dataset, tmp_path / "old", "--c")["trainer"]
    assert resumed.ds_weights == "equal" and resumed.loss.weight_factors == pytest.approx([1 / 3] * 3)
    assert resumed.shallow_heads == "trained" and resumed.bare_network.decoder.probe_heads is False
    # ... and so does nnU-Net's own resume (nnUNetv2_train ... --c, trainer found through nnUNet_extTrainer): the
    # trainer's load_checkpoint restores the run's weights before nnU-Net initialises it
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    from nnpp.training.nnunet_ext import EXT_TRAINER_PATH
    monkeypatch.setenv("nnUNet_extTrainer", EXT_TRAINER_PATH)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "old"))
    nnunet_resumed = get_trainer_from_args(str(tiny_dataset["id"]), "3d_fullres", 0, "nnUNetPlusPlusTrainer",
                                           continue_training=True, device=torch.device("cpu"))
    assert nnunet_resumed.ds_weights == "descending"  # the class defaults, before the checkpoint is read
    assert nnunet_resumed.shallow_heads == "probe"
    maybe_load_checkpoint(nnunet_resumed, True, False)
    assert nnunet_resumed.ds_weights == "equal" and nnunet_resumed.current_epoch == 1
    assert nnunet_resumed.shallow_heads == "trained" and nnunet_resumed.bare_network.decoder.probe_heads is False
    assert nnunet_resumed.loss.weight_factors == pytest.approx([1 / 3] * 3)

    with pytest.raises(NnppError, match="--ds_weights.*need an nnpp trainer"):
        _initial_state(tiny_dataset, tmp_path / "unet", "-tr", "nnUNetTrainer", "--ds_weights", "descending")


@pytest.mark.slow
def test_bench_convergence_smoke(tmp_path):
    """The benchmark end to end on a tiny task: data through nnU-Net's pipeline, one U-Net run validated at two
    points, the s/it measurement, and the JSON, table and plot it writes."""
    out = tmp_path / "conv.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_convergence.py"), "--workdir",
                        str(tmp_path / "work"), "--networks", "unet", "--seeds", "0", "--points", "2", "4",
                        "--iters_per_epoch", "2", "--cases", "5", "--size", "32", "--batch", "2", "--base", "4",
                        "--speed_iters", "2", "--parallel", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["structures"] == ["organ", "kidney", "vessel", "lesion"]
    assert set(result["curves"]) == {"unet"} and list(result["curves"]["unet"]) == ["2", "4"]
    for row in result["curves"]["unet"].values():
        assert set(row) == {"organ", "kidney", "vessel", "lesion", "mean"}
        assert all(len(cell) == 3 and cell[2] == 1 for cell in row.values())  # mean, sd, number of seeds
    assert result["runs"][0]["seed"] == 0 and set(result["runs"][0]["dice"]) == {"2", "4"}
    assert {"cpu", "cpu_capability", "native_bf16"} <= set(result["machine"])
    assert (result["machine"]["device"], result["machine"]["amp"], result["runs"][0]["device"]) == ("cpu", "O0", "cpu")
    assert result["mirroring"] is True and result["runs"][0]["mirroring"] is True
    assert result["seconds_per_iteration"]["unet"] > 0 and set(result["equal_wall_time"]["unet"]) == {"2", "4"}
    table = (tmp_path / "conv.md").read_text()
    assert "| network | iterations | organ | kidney | vessel | lesion | mean |" in table
    assert "device cpu" in table and "fp32, test-time mirroring;" in table
    assert result["machine"]["cpu_capability"] in table
    assert (tmp_path / "conv.png").stat().st_size > 0

    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_convergence.py"), "--points", "3",
                          "--iters_per_epoch", "2", "--workdir", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "multiple of --iters_per_epoch" in bad.stderr


def test_bench_convergence_refuses_3d_plans_for_the_synthetic_task(tmp_path):
    """--config/--max_patch plan the real CT; on the synthetic 2D task they are one error line, nothing written."""
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_convergence.py"), "--config",
                          "3d_fullres", "--workdir", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--task ts_example_ct" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_bench_convergence_refuses_a_workdir_whose_runs_are_on_other_data(tmp_path):
    """A workdir prepared with other options keeps its finished runs: new options there are one error line, and
    neither its runs nor its marker are touched."""
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    marker = work / "prepared.json"
    marker.write_text(json.dumps({"dataset": "ts_example_ct", "plans": "SmallUNetPlanner, max patch 96 x 96, 2d"}))
    (work / "runs" / "unet_s0.json").write_text("{}")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_convergence.py"), "--workdir",
                          str(work), "--networks", "unet", "--seeds", "0", "--points", "2", "--iters_per_epoch", "2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "holds runs on other data, plans, devices or test-time mirroring" in bad.stderr
    assert "new --workdir" in bad.stderr
    assert json.loads(marker.read_text())["plans"].endswith("2d")
    assert (work / "runs" / "unet_s0.json").read_text() == "{}"

    # runs of another device (here: a GPU's, in a workdir otherwise like the one asked for) are refused the same way
    gpu_work = tmp_path / "gpu_work"
    (gpu_work / "runs").mkdir(parents=True)
    (gpu_work / "runs" / "unet_s0.json").write_text(json.dumps({"device": "cuda"}))
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_convergence.py"), "--workdir",
                          str(gpu_work), "--networks", "unet", "--seeds", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "runs: device cuda, mirroring on; asked: device cpu, mirroring on" in bad.stderr
    assert sorted(os.listdir(gpu_work)) == ["runs"]

    # and so are runs scored without test-time mirroring, asked for with it
    (gpu_work / "runs" / "unet_s0.json").write_text(json.dumps({"mirroring": False}))
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_convergence.py"), "--workdir",
                          str(gpu_work), "--networks", "unet", "--seeds", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "runs: device cpu, mirroring off; asked: device cpu, mirroring on" in bad.stderr


@pytest.mark.skipif(device_count("cuda") > 0, reason="a CUDA device is visible")
def test_bench_convergence_refuses_an_absent_device(tmp_path):
    """-device cuda without a GPU: one error line naming the way out, nothing written."""
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_convergence.py"), "-device", "cuda",
                          "--workdir", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "-device cuda: no cuda device is available here; use -device cpu" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_validation_without_mirroring_restores_the_axes():
    """--no_mirroring: nnU-Net's validation sees no mirroring axes; the trainer's axes (saved in its checkpoints) are
    back afterwards, also when the validation fails."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_convergence

    class Trainer:
        inference_allowed_mirroring_axes = (0, 1, 2)
        seen = []

        def perform_actual_validation(self, save_probabilities=False):
            self.seen.append(self.inference_allowed_mirroring_axes)
            if save_probabilities:
                raise RuntimeError("export failed")
            return "validated"

    trainer = Trainer()
    bench_convergence.validate_without_mirroring(trainer)
    assert trainer.perform_actual_validation() == "validated"
    with pytest.raises(RuntimeError, match="export failed"):
        trainer.perform_actual_validation(True)
    assert trainer.seen == [None, None] and trainer.inference_allowed_mirroring_axes == (0, 1, 2)
