"""DDP on the CPU (gloo, 2 processes): synchronised parameters, --dbs, torchrun and torch.distributed.launch,
two nodes on loopback, a killed rank, resume, fps/prof modes, launch scripts and bad inputs."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import free_port, nnunet_env, output_tail

from nnpp.distributed import port_is_free

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT = ["--epochs", "1", "--iters", "2", "--val_iters", "1"]


def torchrun(*args, nproc=2, port=None, launcher="torch.distributed.run", extra=()):
    return [sys.executable, "-m", launcher, f"--nproc_per_node={nproc}", f"--master_port={port or free_port()}",
            *extra, "-m", "nnpp.run.train", *map(str, args)]


def run(cmd, env, timeout=600):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(tiny_dataset, tmp_path):
    return nnunet_env(tiny_dataset, nnUNet_results=str(tmp_path / "results"), OMP_NUM_THREADS="1")


def run_dir(tiny_dataset, env, trainer, plans="nnUNetPlans", sub=""):
    return pathlib.Path(env["nnUNet_results"], sub, tiny_dataset["name"], f"{trainer}__{plans}__3d_fullres", "fold_0")


@pytest.mark.parametrize("dbs,batch", [(True, 1), (False, 2)])
def test_ddp_ranks_stay_identical(tiny_dataset, tmp_path, monkeypatch, dbs, batch):
    """After a few DDP steps both ranks hold the same (updated) parameters; --dbs halves the plans batch."""
    import torch.multiprocessing as mp

    import ddp_worker
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    mp.spawn(ddp_worker.run, args=(2, free_port(), str(tiny_dataset["id"]), dbs, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["batch_size"] == r1["batch_size"] == batch
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert any(not torch.equal(a, b) for a, b in zip(r0["initial"], r0["params"]))  # they did train
    # checkpoints: only rank 0 writes, a stale .tmp is never promoted, concurrent saves do not race
    assert r0["rank1_alone_wrote"] is False and r1["rank1_alone_wrote"] is False
    assert r0["stale"] == r1["stale"] == b"stale"
    assert r0["saved_epoch"] == r1["saved_epoch"] == 4


def test_every_rank_must_see_the_results_folder(tmp_path):
    """Multi-node runs need one shared results folder: a rank that sees another folder stops every rank."""
    import torch.multiprocessing as mp

    import ddp_worker
    for name, folders in (("same", [tmp_path / "shared"] * 2), ("split", [tmp_path / "node0", tmp_path / "node1"])):
        out = tmp_path / name
        out.mkdir()
        mp.spawn(ddp_worker.shared_folder, args=(2, free_port(), [str(f) for f in folders], str(out)), nprocs=2)
        results = [(out / f"shared{r}.txt").read_text() for r in (0, 1)]
        if name == "same":
            assert results == ["ok", "ok"] and os.listdir(folders[0]) == []  # the token file is gone
        else:
            assert results[0] == results[1]
            assert results[0].startswith(f"rank(s) 1 do not see rank 0's results folder {folders[0]}")


def test_amp_auto_is_rank0s_choice(tmp_path):
    """Ranks on nodes with different CPUs resolve --amp auto differently on their own; the run takes rank 0's."""
    import torch.multiprocessing as mp

    import ddp_worker
    mp.spawn(ddp_worker.amp_auto, args=(2, free_port(), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"amp{r}.txt").read_text() for r in (0, 1)] == ["bf16 bf16", "bf16 O0"]


@pytest.mark.slow
def test_torchrun_and_legacy_launch(tiny_dataset, env):
    p = run(torchrun(tiny_dataset["id"], "3d_fullres", 0, "-device", "cpu", "--dbs", *SHORT), env)
    assert p.returncode == 0, output_tail(p)
    ddp_run = run_dir(tiny_dataset, env, "nnUNetPlusPlusTrainerDDP")
    assert (ddp_run / "checkpoint_final.pth").is_file() and (ddp_run / "validation" / "summary.json").is_file()
    assert not run_dir(tiny_dataset, env, "nnUNetPlusPlusTrainer").exists()  # 1-device results untouched
    assert p.stdout.count("Dice liver") == 1  # rank 0 alone reports

    # the seed's launcher passes --local-rank; the seed's trainer name maps to its DDP name
    p = run(torchrun(tiny_dataset["id"], "3d_fullres", 0, "-device", "cpu", "-tr", "nnUNetPlusPlusTrainerV2",
                     *SHORT, launcher="torch.distributed.launch"), env)
    assert p.returncode == 0, output_tail(p)
    assert (run_dir(tiny_dataset, env, "nnUNetPlusPlusTrainerV2_hypDDP") / "checkpoint_final.pth").is_file()


@pytest.mark.slow
def test_two_nodes_on_loopback(tiny_dataset, env):
    port = free_port()
    nodes = [subprocess.Popen(torchrun(tiny_dataset["id"], "3d_fullres", 0, "-device", "cpu", *SHORT, nproc=1,
                                       port=port, extra=("--nnodes=2", f"--node_rank={r}", "--master_addr=127.0.0.1")),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "world size is 2" in outs[0]
    assert (run_dir(tiny_dataset, env, "nnUNetPlusPlusTrainerDDP") / "checkpoint_final.pth").is_file()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _descendants(pid: int) -> list[int]:
    kids = _children(pid)
    return kids + [d for k in kids for d in _descendants(k)]


@pytest.mark.slow
def test_killed_rank_stops_the_run_then_resume(tiny_dataset, env):
    port = free_port()
    env = dict(env, nnUNet_n_proc_DA="1")  # with augmentation workers, which must not survive their rank
    log = pathlib.Path(env["nnUNet_results"]).parent / "kill.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(torchrun(tiny_dataset["id"], "3d_fullres", 0, "-device", "cpu", "--epochs", "100",
                                         "--iters", "2", "--val_iters", "1", "--save_every", "1", port=port),
                                env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "Epoch 2" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert "Epoch 2" in log.read_text(), log.read_text()[-3000:]
        everything = _descendants(proc.pid)
        ranks = _children(proc.pid)
        assert len(ranks) == 2 and len(everything) > 2  # two ranks and their augmentation workers
        t0 = time.time()
        os.kill(ranks[1], signal.SIGKILL)
        rc = proc.wait(timeout=60)
    assert rc != 0 and time.time() - t0 < 60
    time.sleep(2)
    alive = [p for p in everything if os.path.exists(f"/proc/{p}") and "zombie" not in
             open(f"/proc/{p}/status").read().lower()]
    assert alive == []
    assert port_is_free(port)

    ckpt = run_dir(tiny_dataset, env, "nnUNetPlusPlusTrainerDDP") / "checkpoint_latest.pth"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    epoch = saved["current_epoch"]
    assert epoch >= 2
    p = run(torchrun(tiny_dataset["id"], "3d_fullres", 0, "-device", "cpu", "--c", "--change_settings", "--epochs", epoch + 1, "--iters",
                     "2", "--val_iters", "1"), dict(env, nnUNet_n_proc_DA="0"))
    assert p.returncode == 0, output_tail(p)
    assert f"Epoch {epoch}" in p.stdout and f"Epoch {epoch - 1}\n" not in p.stdout
    final = torch.load(ckpt.with_name("checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert final["current_epoch"] == epoch + 1
    # the resumed run started from the saved state: its logged history up to the kill is the saved one
    for key, values in saved["logging"].items():
        if isinstance(values, list) and values and key != "epoch_end_timestamps":
            assert final["logging"][key][:epoch] == values[:epoch], key


@pytest.mark.slow
def test_raising_rank_stops_the_run(tiny_dataset, env):
    """A rank that raises (rather than being killed) ends every rank quickly, non-zero, port freed."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "tests" / "raising_rank.py"), str(tiny_dataset["id"]), "3d_fullres", "0", "-device", "cpu",
           "--epochs", "100", "--iters", "2", "--val_iters", "1"]
    t0 = time.time()
    p = run(cmd, dict(env, nnUNet_n_proc_DA="1"), timeout=300)
    assert p.returncode != 0 and time.time() - t0 < 120, output_tail(p)
    assert "injected fault on rank 1" in p.stderr and "Epoch 1" in p.stdout  # it failed where it was told to
    assert "Epoch 99" not in p.stdout
    time.sleep(2)
    assert port_is_free(port)
    left = [d.name for d in pathlib.Path("/proc").iterdir() if d.name.isdigit() and _cmdline_has(d, "raising_rank.py")]
    assert left == []  # neither rank nor their augmentation workers survive


def _cmdline_has(proc_dir: pathlib.Path, text: str) -> bool:
    try:
        return text in (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_fps_and_prof_modes(tiny_dataset, env, nproc):
    def launch(*a):
        args = [tiny_dataset["id"], "3d_fullres", 0, "-device", "cpu", *a]
        cmd = torchrun(*args, nproc=nproc) if nproc > 1 else [sys.executable, "-m", "nnpp.run.train", *map(str, args)]
        return run(cmd, env)

    trainer = "nnUNetPlusPlusTrainerDDP" if nproc > 1 else "nnUNetPlusPlusTrainer"
    p = launch("--other_use", "fps", "--warmup", "1", "--steps", "3")
    assert p.returncode == 0, output_tail(p)
    lines = [line for line in p.stdout.splitlines() if line.startswith("[nnpp fps]")]
    assert len(lines) == 1
    perf = json.loads((run_dir(tiny_dataset, env, trainer, sub="nnpp_perf/fps") / "perf.json").read_text())
    assert perf["world_size"] == nproc and perf["timed_steps"] == 3 and perf["batch_per_rank"] == 2
    assert perf["images_per_s_rank"] > 0
    if nproc == 1:
        assert perf["images_per_s_total"] == perf["images_per_s_rank"]
    assert 0 <= perf["data_wait_share"] < 1 and perf["step_s_median"] > 0
    assert f"FPS {perf['images_per_s_total']:.2f} img/s total" in lines[0]

    p = launch("--other_use", "prof", "--warmup", "1", "--steps", "1")
    assert p.returncode == 0, output_tail(p)
    out = run_dir(tiny_dataset, env, trainer, sub="nnpp_perf/prof")
    traces = sorted(f.name for f in out.glob("output*.prof"))
    assert traces == (["output.prof"] if nproc == 1 else ["output_rank0.prof", "output_rank1.prof"])
    for t in traces:
        assert json.loads((out / t).read_text())["traceEvents"]
    assert "Self CPU" in next(out.glob("prof_table*.txt")).read_text()
    # neither mode touched a real run
    assert not run_dir(tiny_dataset, env, trainer).exists()


def test_dbs_global_batch_smaller_than_world(tiny_dataset, env):
    plans = pathlib.Path(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    p = run([sys.executable, "-m", "nnpp.tools.change_bs", "-path", str(plans), "-size", "1", "--copy_to",
             "nnUNetPlans_bs1"], env)
    assert p.returncode == 0, p.stderr
    p = run(torchrun(tiny_dataset["id"], "3d_fullres", 0, "-device", "cpu", "--dbs", "-p", "nnUNetPlans_bs1"), env)
    assert p.returncode != 0
    assert "--dbs: the global batch size 1 is smaller than the world size 2" in p.stderr


def test_npu_without_torch_npu_under_torchrun(tiny_dataset, env):
    p = run(torchrun(tiny_dataset["id"], "3d_fullres", 0, "-device", "npu"), env)
    assert p.returncode != 0
    # every rank that gets to say it says this one line; torchrun stops the other rank as soon as one has failed, so
    # the second may be killed before it prints: an exact count of 2 depends on timing
    errors = [line for line in p.stderr.splitlines() if "nnpp_train: error:" in line]
    assert 1 <= len(errors) <= 2, p.stderr[-3000:]
    assert all("nnpp_train: error: -device npu needs the torch_npu package" in line for line in errors), errors


@pytest.mark.slow
def test_launch_scripts_8p_more_processes_than_the_plans_batch(tiny_dataset, env):
    """Stock plans (batch 2) with NPROC=3: every device takes the plans batch (global 6), no BATCH_SIZE needed;
    the reported throughput is the total of the 3 ranks. BATCH_SIZE gives a global batch split with --dbs."""
    common = dict(env, DATASET=str(tiny_dataset["id"]), DEVICE="cpu", PYTHON=sys.executable,
                  LOG_DIR=env["nnUNet_results"] + "/logs", MASTER_PORT=str(free_port()))
    p = run(["bash", str(ROOT / "test" / "train_full_8p.sh")], dict(common, NPROC="3", EPOCHS="1", ITERS="1",
                                                                     EXTRA_ARGS="--val_iters 1"))
    assert p.returncode == 0, output_tail(p)
    assert "global batch = 3 ranks x the plans batch per device" in p.stdout
    assert "batch size 2 per rank x 3 rank(s) = global batch 6" in p.stdout
    summary = p.stdout.split("summary (")[-1]
    assert "Dice liver (label 1):" in summary
    fps = [line for line in summary.splitlines() if line.startswith("Training FPS:")]
    assert len(fps) == 1 and " img/s total (3 rank(s) x " in fps[0], summary
    logged = [line for line in p.stdout.splitlines() if "train throughput:" in line]
    assert logged and all("img/s total (3 rank(s), " in line for line in logged)
    p = run(["bash", str(ROOT / "test" / "train_performance_8p.sh")], dict(common, NPROC="2", BATCH_SIZE="4",
                                                                           EXTRA_ARGS="--warmup 1 --steps 2"))
    assert p.returncode == 0, output_tail(p)
    assert "[nnpp fps]" in p.stdout.split("summary (")[-1] and "batch/rank 2" in p.stdout
    assert "global batch 4 (BATCH_SIZE), split across 2 ranks" in p.stdout
    logs = list(pathlib.Path(common["LOG_DIR"]).glob("*.log"))
    assert len(logs) == 2


@pytest.mark.slow
def test_launch_scripts_1p_pretrained_and_val_best(tiny_dataset, env, trained_model):
    """train_full_1p.sh from pretrained weights, validated with checkpoint_best; train_performance_1p.sh."""
    pretrained = os.path.join(trained_model("nnUNetPlusPlusTrainer", 0), "fold_0", "checkpoint_final.pth")
    common = dict(env, DATASET=str(tiny_dataset["id"]), DEVICE="cpu", PYTHON=sys.executable,
                  LOG_DIR=env["nnUNet_results"] + "/logs")
    p = run(["bash", str(ROOT / "test" / "train_full_1p.sh")], dict(
        common, EPOCHS="1", ITERS="1", EXTRA_ARGS=f"--val_iters 1 --val_best -pretrained_weights {pretrained}"))
    assert p.returncode == 0, output_tail(p)
    assert f"initialised from pretrained weights {pretrained}" in p.stdout
    best = run_dir(tiny_dataset, env, "nnUNetPlusPlusTrainer") / "checkpoint_best.pth"
    assert f"validating with {best} (epoch 1)" in p.stdout
    summary = p.stdout.split("summary (")[-1]
    assert "Dice liver (label 1):" in summary and "img/s total (1 rank(s) x " in summary
    p = run(["bash", str(ROOT / "test" / "train_performance_1p.sh")], dict(common, EXTRA_ARGS="--warmup 1 --steps 2"))
    assert p.returncode == 0, output_tail(p)
    assert "[nnpp fps] FPS " in p.stdout.split("summary (")[-1]


def test_launch_script_port_in_use(tiny_dataset, env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = run(["bash", str(ROOT / "test" / "train_full_8p.sh")],
                dict(env, NPROC="2", DATASET=str(tiny_dataset["id"]), DEVICE="cpu", PYTHON=sys.executable,
                     MASTER_PORT=str(port), LOG_DIR=env["nnUNet_results"] + "/logs"))
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: MASTER_PORT {port} is already in use (another run?); set MASTER_PORT " \
                               f"to a free port"


def test_rank0_work_longer_than_the_group_timeout(tmp_path):
    """Rank 0's long work (pseudo-labelling unlabeled scans) while the others wait must not hit the process group's
    timeout (3 s here, 6 s of work); rank 0's failure reaches the others as one line; no result file is left."""
    import json

    import torch.multiprocessing as mp

    import ddp_worker
    for fail in (False, True):
        out = tmp_path / str(fail)
        out.mkdir()
        mp.spawn(ddp_worker.rank0_runs, args=(2, free_port(), str(tmp_path / "data"), str(out), fail), nprocs=2)
        results = {r: json.loads((out / f"r{r}.json").read_text()) for r in (0, 1)}
        if not fail:
            assert results == {0: {"folder": "prepared"}, 1: {"folder": "prepared"}}
        else:  # rank 0 raises its own error, the other one line naming it
            assert results[0] == "unlabeled case u1 is the validation case v1"
            assert results[1].startswith("rank 0 failed while preparing (NnppError: unlabeled case u1 is the "
                                         "validation case v1)")
        assert os.listdir(tmp_path / "data") == []  # the result file is gone in both cases


def test_every_rank_its_share_longer_than_the_group_timeout(tmp_path):
    """ranks_run (pseudo-labelling split across ranks): each rank's result reaches every rank although rank 1 works
    past the process group's timeout; a failing rank raises its own error and the others one line naming it."""
    import json

    import torch.multiprocessing as mp

    import ddp_worker
    for fail_rank in (-1, 1):
        out = tmp_path / str(fail_rank)
        out.mkdir()
        mp.spawn(ddp_worker.ranks_run, args=(2, free_port(), str(tmp_path / "data"), str(out), fail_rank), nprocs=2)
        results = {r: json.loads((out / f"r{r}.json").read_text()) for r in (0, 1)}
        if fail_rank < 0:
            assert results == {0: [["a", "c"], ["b"]], 1: [["a", "c"], ["b"]]}
        else:
            assert results[1] == "case b is unreadable"
            assert results[0] == "rank 1 failed while pseudo-labelling (NnppError: case b is unreadable); see rank " \
                                 "1's output"
        assert os.listdir(tmp_path / "data") == []
