"""patches/nnunetv2-<version>-npu.patch: applies to the installed nnunetv2, agrees with nnpp's device layer, and the
patched nnU-Net still trains and predicts with its own commands (on the CPU; no NPU on test machines)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import pytest

from conftest import nnunet_env, output_tail

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATCHES = ROOT / "patches"

# nnU-Net's own nnUNetTrainer, shortened, found through nnU-Net's nnUNet_extTrainer hook: 1 epoch of 2 iterations
# (nnU-Net's shortest variant still runs 250), no mirroring, and no validation after training: the test runs
# nnU-Net's predictor through nnUNetv2_predict instead (validation would be the same predictor once more).
TINY_TRAINER = '''
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_2iters(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, patch_size, None

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("validation skipped (test trainer)")
'''

# What the patched nnU-Net knows about devices, read from the patched copy (a separate process: the tests'
# own nnunetv2 import stays the installed one), and what its commands answer to -device npu (no torch_npu here)
# and to an unknown device: {command: [exit status, last line of stderr]}.
PROBE = '''
import contextlib, io, json, os, sys
import nnunetv2
from nnunetv2.utilities import helpers
from nnunetv2.run.run_training import run_training_entry
from nnunetv2.inference.predict_from_raw_data import predict_entry_point, predict_entry_point_modelfolder
try:
    helpers.import_torch_npu()
    message = None
except ImportError as e:
    message = str(e)
out = os.environ["PROBE_OUT"]
commands = {
    "nnUNetv2_train npu": (run_training_entry, ["999", "3d_fullres", "0", "-device", "npu"]),
    "nnUNetv2_train tpu": (run_training_entry, ["999", "3d_fullres", "0", "-device", "tpu"]),
    "nnUNetv2_predict npu": (predict_entry_point, ["-i", out, "-o", out, "-d", "999", "-c", "3d_fullres",
                                                   "-device", "npu"]),
    "nnUNetv2_predict_from_modelfolder npu": (predict_entry_point_modelfolder, ["-i", out, "-o", out, "-m", out,
                                                                               "-device", "npu"]),
}
answers = {}
for name, (entry, argv) in commands.items():
    sys.argv = [name.split()[0], *argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            entry()
        status = 0
    except SystemExit as e:
        status = e.code
    answers[name] = [status, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""]
print(json.dumps({"file": nnunetv2.__file__, "choices": helpers.DEVICE_CHOICES, "accelerators": helpers.ACCELERATORS,
                  "backends": {t: helpers.dist_backend(t) for t in helpers.DEVICE_CHOICES}, "message": message,
                  "answers": answers}))
'''


# The grad scaler the patched nnUNetTrainer builds for -device npu, with a stand-in for torch_npu: the 'npu' device
# type registered as torch_npu registers it (torch's privateuse1 backend) and a torch.npu namespace whose
# amp.GradScaler records its construction.
SCALER_PROBE = '''
import json, os, sys, types
import torch
torch.utils.rename_privateuse1_backend("npu")
class StandInNpuGradScaler:
    pass
torch.npu = types.SimpleNamespace(amp=types.SimpleNamespace(GradScaler=StandInNpuGradScaler))
sys.modules["torch_npu"] = types.ModuleType("torch_npu")
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
plans = dict(json.load(open(os.environ["PROBE_PLANS"])), continue_training=False)  # as nnU-Net's run_training
dataset_json = json.load(open(os.environ["PROBE_DATASET_JSON"]))
trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("npu"))
print(json.dumps({"device": str(trainer.device), "scaler": type(trainer.grad_scaler).__name__}))
'''


def installed_nnunetv2() -> pathlib.Path:
    import nnunetv2
    return pathlib.Path(nnunetv2.__file__).parent


def the_patch() -> pathlib.Path:
    from importlib.metadata import version
    v = version("nnunetv2")
    path = PATCHES / f"nnunetv2-{v}-npu.patch"
    assert path.is_file(), f"no NPU patch for the installed nnunetv2 {v} in {PATCHES}: regenerate it (patches/README.md)"
    return path


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """A copy of the installed nnunetv2 package with the NPU patch applied: the folder to put on PYTHONPATH."""
    if shutil.which("patch") is None:
        pytest.skip("the 'patch' program is not installed")
    site = tmp_path_factory.mktemp("patched_site")
    shutil.copytree(installed_nnunetv2(), site / "nnunetv2", ignore=shutil.ignore_patterns("__pycache__"))
    patch = the_patch()
    for extra in (["--dry-run"], []):
        p = subprocess.run(["patch", "-p1", "--no-backup-if-mismatch", *extra, "-i", str(patch)], cwd=site,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "FAILED" not in p.stdout and "fuzz" not in p.stdout, p.stdout  # applies exactly
    assert not list(site.rglob("*.rej")) and not list(site.rglob("*.orig"))
    return site


def run_patched(site, code_or_module, *args, env=None, timeout=300):
    cmd = [sys.executable, *(["-c", code_or_module] if "\n" in code_or_module else ["-m", code_or_module]),
           *map(str, args)]
    env = dict(env or os.environ, PYTHONPATH=str(site))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_patch_agrees_with_the_device_layer(patched, tmp_path):
    from nnpp import NnppError, device as nd
    results = tmp_path / "nnUNet_results"
    (results / "Dataset999_Probe").mkdir(parents=True)  # lets nnUNetv2_predict resolve -d 999
    env = nnunet_env({"nnUNet_results": str(results), "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path)},
                     PROBE_OUT=str(tmp_path))
    p = run_patched(patched, PROBE, env=env)
    assert p.returncode == 0, output_tail(p)
    knows = json.loads(p.stdout.strip().splitlines()[-1])
    assert pathlib.Path(knows["file"]).parent == patched / "nnunetv2"  # the patched copy was imported
    # devices: nnpp's, less 'auto' (nnU-Net's -device names one device)
    assert set(knows["choices"]) == set(nd.DEVICE_CHOICES) - {"auto"}
    # accelerators (device index, DDP device ids, autocast + grad scaler): where nnpp gives DDP device ids and
    # where nnpp's --amp auto is O1 (fp16 autocast with loss scaling)
    dev = {t: types.SimpleNamespace(type=t, index=0) for t in knows["choices"]}
    assert set(knows["accelerators"]) == {t for t in dev if nd.ddp_device_ids(dev[t]) is not None}
    assert set(knows["accelerators"]) == {t for t in dev if nd.resolve_amp_mode("auto", dev[t]) == "O1"}
    # DDP backends: nccl / hccl / gloo as nnpp chooses them
    assert knows["backends"] == {t: nd.dist_backend(dev[t]) for t in dev}
    assert knows["backends"]["npu"] == "hccl"
    # the message for a missing torch_npu is the device layer's (up to the device suggestion, which differs:
    # nnU-Net has no -device auto)
    try:
        nd.import_torch_npu()
    except NnppError as e:
        ours = str(e)
    else:
        pytest.skip("torch_npu is installed here: no missing-torch_npu message to compare")
    assert knows["message"] is not None
    assert knows["message"].split(" or choose -device")[0] == ours.split(" or choose -device")[0]
    # nnU-Net's commands: -device npu without torch_npu is one line and exit status 2 (argparse's error)
    for name in ("nnUNetv2_train npu", "nnUNetv2_predict npu", "nnUNetv2_predict_from_modelfolder npu"):
        assert knows["answers"][name] == [2, f"{name.split()[0]}: error: {knows['message']}"], name
    assert knows["answers"]["nnUNetv2_train tpu"] == [2, "nnUNetv2_train: error: -device must be one of cuda, npu, "
                                                         "mps, cpu, got: tpu"]


def test_patched_trainer_and_device_layer_build_the_same_npu_grad_scaler(patched, tiny_dataset, tmp_path,
                                                                         monkeypatch):
    """On npu the patched nnUNetTrainer and nnpp's device layer both scale losses with torch_npu's GradScaler
    (torch.npu.amp.GradScaler: a stand-in here, no torch_npu on test machines)."""
    from nnpp import device as nd
    pre = pathlib.Path(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    env = nnunet_env(tiny_dataset, nnUNet_results=str(tmp_path / "results"), PROBE_PLANS=str(pre / "nnUNetPlans.json"),
                     PROBE_DATASET_JSON=str(pre / "dataset.json"))
    p = run_patched(patched, SCALER_PROBE, env=env)
    assert p.returncode == 0, output_tail(p)
    theirs = json.loads(p.stdout.strip().splitlines()[-1])
    assert theirs == {"device": "npu:0", "scaler": "StandInNpuGradScaler"}

    class StandInNpuGradScaler:
        pass
    import torch
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(amp=types.SimpleNamespace(GradScaler=StandInNpuGradScaler)),
                        raising=False)
    monkeypatch.setattr(nd, "import_torch_npu", lambda: None)
    ours = nd.make_grad_scaler(types.SimpleNamespace(type="npu", index=0))
    assert type(ours).__name__ == theirs["scaler"]


@pytest.mark.slow
def test_patched_nnunet_trains_and_predicts_on_cpu(patched, tiny_dataset, tmp_path):
    """nnU-Net's own nnUNetv2_train (2 iterations) and nnUNetv2_predict from the patched copy, on the CPU."""
    ext = tmp_path / "ext_trainers"
    ext.mkdir()
    (ext / "nnUNetTrainer_2iters.py").write_text(TINY_TRAINER)
    env = nnunet_env(tiny_dataset, nnUNet_results=str(tmp_path / "results"), nnUNet_extTrainer=str(ext))
    p = run_patched(patched, "nnunetv2.run.run_training", tiny_dataset["id"], "3d_fullres", 0,
                    "-tr", "nnUNetTrainer_2iters", "-device", "cpu", env=env)
    assert p.returncode == 0, output_tail(p)
    assert "Using device: cpu" in p.stdout
    run = tmp_path / "results" / tiny_dataset["name"] / "nnUNetTrainer_2iters__nnUNetPlans__3d_fullres"
    assert (run / "fold_0" / "checkpoint_final.pth").is_file()
    log = next((run / "fold_0").glob("training_log_*.txt")).read_text()
    assert "Epoch 0" in log and "train_loss" in log and "Training done." in log

    images = pathlib.Path(tiny_dataset["nnUNet_raw"], tiny_dataset["name"], "imagesTs")
    predict = ("import sys\nfrom nnunetv2.inference.predict_from_raw_data import predict_entry_point\n"
               "sys.argv[0] = 'nnUNetv2_predict'\npredict_entry_point()\n")
    common = ["-i", str(images), "-o", str(tmp_path / "pred"), "-d", str(tiny_dataset["id"]), "-c", "3d_fullres",
              "-f", "0", "-tr", "nnUNetTrainer_2iters", "--disable_tta", "-npp", "1", "-nps", "1"]
    p = run_patched(patched, predict, *common, "-device", "cpu", env=env)
    assert p.returncode == 0, output_tail(p)
    assert sorted(f.name for f in (tmp_path / "pred").glob("*.nii.gz")) == \
        sorted(f.name.replace("_0000.nii.gz", ".nii.gz") for f in images.glob("*.nii.gz"))

