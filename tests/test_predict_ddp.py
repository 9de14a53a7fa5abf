"""Many cases on many processes: torchrun splits the cases across ranks into one output folder (same masks as one
process), a second run with --continue_prediction skips the finished cases, and a case whose export is killed
midway leaves no file that --continue_prediction would take for a finished case."""
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import free_port, nnunet_env, output_tail

UNETPP = "nnUNetPlusPlusTrainer"


def results_of(model_folder):
    return os.path.dirname(os.path.dirname(model_folder))


def masks(folder):
    return {f: sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, f)))
            for f in sorted(os.listdir(folder)) if f.endswith(".nii.gz")}


def predict_cmd(ds, out, nproc, *extra, images=None):
    args = ["-m", "nnpp.run.predict", "-i", images or os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTr"), "-o", str(out),
            "-d", str(ds["id"]), "-c", "3d_fullres", "-f", "0", "-device", "cpu", "--disable_tta",
            "-npp", "0", "-nps", "0", "--disable_progress_bar", *extra]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *args]


@pytest.mark.slow
def test_two_processes_same_masks_and_continue_skips(trained_model, tiny_dataset, tmp_path):
    env = nnunet_env(tiny_dataset, nnUNet_results=results_of(trained_model(UNETPP, 0)), OMP_NUM_THREADS="1")
    p = subprocess.run(predict_cmd(tiny_dataset, tmp_path / "one", 1), env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, output_tail(p)
    p = subprocess.run(predict_cmd(tiny_dataset, tmp_path / "two", 2), env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, output_tail(p)
    assert "[nnpp_predict] all 2 processes done: 5 case(s)" in p.stdout and "cases/min total" in p.stdout
    assert "[nnpp_predict rank 0]" in p.stdout and "[nnpp_predict rank 1]" in p.stdout
    one, two = masks(tmp_path / "one"), masks(tmp_path / "two")
    assert len(one) == 5 and one.keys() == two.keys()
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])
    assert not [f for f in os.listdir(tmp_path / "two") if f.startswith(".")]  # no temp files left
    # a second run skips every finished case
    stamps = {f: os.stat(tmp_path / "two" / f).st_mtime_ns for f in two}
    for f in sorted(two)[0:3:2]:  # ... but does the missing ones again: cases 0 and 2, both rank 0's at first (the
        os.remove(tmp_path / "two" / f)  # cases' [RANK::2]), now split one per rank
    stale = tmp_path / "two" / f".{sorted(two)[0][:-len('.nii.gz')]}.partial.killed"  # what a SIGKILL leaves
    stale.mkdir()
    from nnpp.file_safety import owner_suffix
    live = tmp_path / "two" / f".{sorted(two)[0][:-len('.nii.gz')]}.partial.x{owner_suffix()}"  # another run's, live
    live.mkdir()
    # ... here without OMP_NUM_THREADS: torchrun gives each worker OMP_NUM_THREADS=1, which nnpp tells from a
    # user's choice; each rank takes its share of the cores (the first run above: the user's 1, said so)
    assert "rank 1: torch 1 CPU thread(s)" in p.stdout and "(OMP_NUM_THREADS=1)" in p.stdout
    from nnpp.cpu_threads import usable_cores
    env_default = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    p = subprocess.run(predict_cmd(tiny_dataset, tmp_path / "two", 2, "--continue_prediction"), env=env_default,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, output_tail(p)
    assert "all 2 processes done: 2 case(s)" in p.stdout
    assert "[nnpp_predict rank 0] time per case over 1 case(s)" in p.stdout
    assert "[nnpp_predict rank 1] time per case over 1 case(s)" in p.stdout
    share = max(1, usable_cores() // 2)
    for rank in (0, 1):
        assert f"rank {rank}: torch {share} CPU thread(s)" in p.stdout, output_tail(p)
    assert f"({usable_cores()} cores / 2 local rank(s))" in p.stdout
    kept = [f for i, f in enumerate(sorted(two)) if i not in (0, 2)]
    assert {f: os.stat(tmp_path / "two" / f).st_mtime_ns for f in kept} == {f: stamps[f] for f in kept}
    assert masks(tmp_path / "two").keys() == one.keys() and not stale.exists() and live.exists()

    # a rank that fails names the case in one line and leaves its traceback in a log file beside the outputs
    images = tmp_path / "images"
    src = os.path.join(tiny_dataset["nnUNet_raw"], tiny_dataset["name"], "imagesTr")
    os.makedirs(images)
    names = sorted(os.listdir(src))
    for f in names:
        os.symlink(os.path.join(src, f), images / f)
    os.remove(images / names[1])
    (images / names[1]).write_bytes(b"not an image")  # the second case: rank 1's
    bad = names[1][:-len("_0000.nii.gz")]
    p = subprocess.run(predict_cmd(tiny_dataset, tmp_path / "three", 2, images=str(images)), env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    log = tmp_path / "three" / "nnpp_predict_rank1.log"
    assert f"rank 1 of 2 failed on case {bad} (" in p.stderr and f"traceback in {log}" in p.stderr, output_tail(p)
    assert log.read_text().startswith(f"rank 1 of 2, case {bad}\nTraceback")


def test_leftover_export_folders_of_live_processes_are_kept(tmp_path, monkeypatch):
    """export_case names its temp folder's owner (pid and where that pid counts: host and pid namespace), and
    nnpp.file_safety.owner_alive tells a killed run's folder (dead owner, or none named) from a live one's."""
    import subprocess

    import nnunetv2.inference.export_prediction as nnunet_export

    from nnpp.file_safety import owner_alive, owner_space
    from nnpp.predictor.resample import export_case
    seen = []

    def export(logits, props, cm, pm, dataset_json, ofile, save_probabilities=False, threads=8):
        seen.append(os.path.basename(os.path.dirname(ofile)))  # the temp folder, while it is written
        for ext in (".npz", ".pkl", dataset_json["file_ending"]):
            open(ofile + ext, "w").write(ext)
    monkeypatch.setattr(nnunet_export, "export_prediction_from_logits", export)
    export_case(None, {}, None, None, {"file_ending": ".nii.gz"}, str(tmp_path / "case_001"), True)
    assert seen[0].startswith(".case_001.partial.") and owner_alive(seen[0])  # this process: alive
    dead = subprocess.Popen(["true"])
    dead.wait()
    space = owner_space()
    assert not owner_alive(f".case_001.partial.ab_c1.owner{dead.pid}-{space}")
    other = "0" * 8 if space != "0" * 8 else "1" * 8
    assert owner_alive(f".case_001.partial.ab_c1.owner{dead.pid}-{other}")  # another host clears its own
    assert not owner_alive(".case_001.partial.killed")  # no owner named: left over
    assert not owner_alive(f".x.owner5-{space}.partial.ab.owner{dead.pid}-{space}")  # the last owner counts
    assert owner_alive(f".c.partial.a.owner99999999999-{space}") is True  # not a pid here: kept, no OverflowError


def test_killed_export_leaves_no_finished_looking_case(tmp_path, monkeypatch):
    """nnU-Net writes the segmentation straight to its final name: a process killed while writing leaves a file
    that --continue_prediction (an isfile test) takes as finished. nnpp's export_case writes beside and renames."""
    import nnunetv2.inference.export_prediction as nnunet_export

    from nnpp.predictor.resample import export_case

    def killed_while_writing(logits, props, cm, pm, dataset_json, ofile, save_probabilities=False, threads=8):
        with open(ofile + ".npz", "wb") as f:
            f.write(b"complete probabilities")
        with open(ofile + dataset_json["file_ending"], "wb") as f:
            f.write(b"half a segmentation")
        raise KeyboardInterrupt  # SIGINT / the rank being stopped, midway
    monkeypatch.setattr(nnunet_export, "export_prediction_from_logits", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        export_case(None, {}, None, None, {"file_ending": ".nii.gz"}, str(tmp_path / "case_001"), True)
    assert os.listdir(tmp_path) == []
    # SIGKILL runs no cleanup: what it leaves is a hidden temp folder, never a file under the case's name
    (tmp_path / ".case_001.partial.x1").mkdir()
    (tmp_path / ".case_001.partial.x1" / "case_001.nii.gz").write_bytes(b"half")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    lister = nnUNetPredictor(device=__import__("torch").device("cpu"), allow_tqdm=False)
    lister.dataset_json = {"file_ending": ".nii.gz"}
    todo, _, _ = lister._manage_input_and_output_lists([[str(tmp_path / "case_001_0000.nii.gz")]], str(tmp_path),
                                                      None, False, 0, 1, True)
    assert len(todo) == 1  # --continue_prediction predicts it again

    def fine(logits, props, cm, pm, dataset_json, ofile, save_probabilities=False, threads=8):
        for ext in (".npz", ".pkl", dataset_json["file_ending"]):
            open(ofile + ext, "w").write(ext)
    monkeypatch.setattr(nnunet_export, "export_prediction_from_logits", fine)
    export_case(None, {}, None, None, {"file_ending": ".nii.gz"}, str(tmp_path / "case_001"), True)
    assert sorted(f for f in os.listdir(tmp_path) if not f.startswith(".")) == \
        ["case_001.nii.gz", "case_001.npz", "case_001.pkl"]
