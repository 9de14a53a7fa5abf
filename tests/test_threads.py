"""Threads that fit the machine: every rank takes its share of the CPUs this process may use (affinity mask, cgroup
quota); torchrun's default of one thread per worker is told apart from a user's OMP_NUM_THREADS=1, also behind
wrappers; NNPP_THREADS wins; nnpp_predict divides ONNX Runtime's threads, -npp/-nps and the export threads among the
local ranks."""
import os
import shlex
import subprocess
import sys

import pytest

from nnpp import cpu_threads

CHILD = "from nnpp.cpu_threads import user_thread_count; print(user_thread_count())"


def _launcher(started_with: dict, sets_after_start: dict, worker_env: dict, wrapper=None) -> str:
    """What a torchrun worker reports: a launcher process started with ``started_with`` in its environment changes
    its own ``os.environ`` by ``sets_after_start`` (as torchrun does) and starts the worker with that plus
    ``worker_env``, directly or through ``wrapper(worker's shell command)``, the command line that runs it."""
    worker = [sys.executable, "-c", CHILD]
    if wrapper is not None:
        worker = wrapper(" ".join(map(shlex.quote, worker)))
    code = (f"import os, subprocess, sys; os.environ.update({sets_after_start!r}); os.environ.update({worker_env!r}); "
            f"print(subprocess.run({worker!r}, capture_output=True, text=True).stdout.strip())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NNPP_THREADS")}
    env.update(started_with)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_torchruns_default_of_one_thread_is_not_a_choice():
    worker = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}
    # torchrun set OMP_NUM_THREADS=1 itself (it was started without it): its default, not the user's
    assert _launcher({}, {"OMP_NUM_THREADS": "1"}, worker) == "None"
    # the user started torchrun with OMP_NUM_THREADS=1 (or 4): their choice
    assert _launcher({"OMP_NUM_THREADS": "1"}, {}, worker) == "1"
    assert _launcher({"OMP_NUM_THREADS": "4"}, {}, worker) == "4"
    # not under torchrun: any value is the user's
    assert _launcher({}, {"OMP_NUM_THREADS": "1"}, {}) == "1"


@pytest.mark.parametrize("wrapper", ["sh -c", "nice + script"])
def test_torchruns_default_seen_through_wrappers(tmp_path, wrapper):
    """A wrapper between torchrun and the worker (``torchrun --no-python sh -c ...``, a shell script, under ``nice``)
    was started with torchrun's OMP_NUM_THREADS=1: the launcher is the first ancestor torchrun did not start, not
    the worker's parent (the rule before read the parent's start environment: 1 thread per rank here)."""
    if wrapper == "sh -c":
        def wrap(command):  # '; true': the shell stays the worker's parent (no exec of a last command)
            return ["sh", "-c", f"{command}; true"]
    else:
        script = tmp_path / "rank.sh"

        def wrap(command):
            script.write_text(f"#!/bin/sh\n{command}\nexit $?\n")
            return ["nice", "-n", "1", "sh", str(script)]
    worker = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}
    assert _launcher({}, {"OMP_NUM_THREADS": "1"}, worker, wrap) == "None"
    assert _launcher({"OMP_NUM_THREADS": "1"}, {}, worker, wrap) == "1"


def test_nnpp_threads_wins(monkeypatch):
    """NNPP_THREADS is nnpp's own knob: it wins over OMP_NUM_THREADS and over torchrun's default; where the launcher's
    start environment cannot be read, a 1 under torchrun with several local ranks is torchrun's default."""
    from nnpp import NnppError
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 16)
    monkeypatch.setattr(cpu_threads, "_start_environ", lambda pid: None)  # e.g. /proc hidden
    for var, value in {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("NNPP_THREADS", raising=False)
    assert cpu_threads.threads_per_rank(2) == (8, "16 cores / 2 local rank(s)")
    monkeypatch.setenv("NNPP_THREADS", "1")
    assert cpu_threads.threads_per_rank(2) == (1, "NNPP_THREADS=1")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("NNPP_THREADS", "6")
    assert cpu_threads.threads_per_rank(2) == (6, "NNPP_THREADS=6") and cpu_threads.user_thread_count() == 6
    for bad in ("0", "two"):
        monkeypatch.setenv("NNPP_THREADS", bad)
        with pytest.raises(NnppError, match=f"^NNPP_THREADS={bad}: must be a whole number"):
            cpu_threads.threads_per_rank(2)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks on this OS")
def test_affinity_mask_limits_the_threads():
    """A process bound to one CPU (taskset, SLURM's --cpu-bind) runs one thread."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from nnpp import cpu_threads as device; "
            "print(device.usable_cores(), device.threads_per_rank(1)[0], device.threads_per_rank(2)[0])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NNPP_THREADS")}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["1", "1", "1"]


@pytest.mark.parametrize("proc_cgroup, files, expected", [
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1),  # docker --cpus=1.5: a fraction rounds down
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 2),
    ("0::/\n", {"cpu.max": "max 100000\n"}, 8),  # no quota: the affinity mask
    ("0::/\n", {"cpu.max": "1600000 100000\n"}, 8),  # a quota above the mask: the mask
    ("0::/\n", {}, 8),  # no cpu.max (root cgroup)
    ("0::/slurm/job1/step0\n", {"slurm/job1/cpu.max": "300000 100000\n",  # a parent's quota limits the children
                                  "slurm/job1/step0/cpu.max": "max 100000\n"}, 3),
    ("0::/docker/abc\n", {"cpu.max": "250000 100000\n"}, 2),  # no cgroup namespace: the mount is the own cgroup
    ("12:memory:/x\n3:cpu,cpuacct:/job\n0::/\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "400000\n",  # cgroup v1
                                                  "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, 4),
    ("3:cpu,cpuacct:/job\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "-1\n",
                                "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, 8),
    (None, {"cpu.max": "100000 100000\n"}, 8),  # no /proc/self/cgroup (not Linux): the mask
])
def test_cgroup_quota_limits_the_cores(monkeypatch, tmp_path, proc_cgroup, files, expected):
    """Containers and SLURM/Kubernetes cgroups give a CPU quota, not fewer CPUs: the quota (quota / period CPUs)
    caps the affinity mask's count."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    if proc_cgroup is not None:
        proc.write_text(proc_cgroup)
    monkeypatch.setattr(cpu_threads, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(cpu_threads, "PROC_SELF_CGROUP", str(proc))
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("NNPP_THREADS", raising=False)
    assert cpu_threads.usable_cores() == expected
    assert cpu_threads.threads_per_rank(2) == (max(1, expected // 2), f"{expected} cores / 2 local rank(s)")


def test_ranks_share_the_cores(monkeypatch):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("NNPP_THREADS", raising=False)
    assert cpu_threads.threads_per_rank(2) == (8, "16 cores / 2 local rank(s)")
    assert cpu_threads.threads_per_rank(32)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads.threads_per_rank(2) == (3, "OMP_NUM_THREADS=3")


@pytest.mark.parametrize("flags, local_world, expected", [
    ([], 1, (16, 0, 3, 3, 5)),  # one process: every core; ONNX Runtime's own choice; nnU-Net's -npp/-nps 3
    ([], 2, (8, 8, 1, 1, 8)),  # 2 ranks: half the cores each, ONNX Runtime too, nnU-Net's 3 workers -> 1 each
    (["--ort_threads", "3", "-npp", "2", "-nps", "0"], 2, (8, 3, 2, 0, 8)),  # given flags are kept
])
def test_predict_shares_the_machine_among_local_ranks(monkeypatch, flags, local_world, expected):
    from nnpp.run import predict
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 16)
    for var in ("OMP_NUM_THREADS", "nnUNet_npp", "nnUNet_nps"):
        monkeypatch.delenv(var, raising=False)
    args = predict.parser().parse_args(["-i", "in", "-o", "out", *flags])
    predict.share_resources(args, local_world)
    assert (args.threads, args.ort_threads, args.npp, args.nps, args.export_threads) == expected


def test_other_launchers_local_ranks_and_bound_masks(monkeypatch):
    """srun / mpirun: the local rank count comes from the launcher's variables (never the global WORLD_SIZE); a
    mask smaller than the machine is the rank's own share (srun --cpu-bind) and is not divided again, while
    torchrun's workers, which all inherit one mask, share it."""
    for var in ("LOCAL_WORLD_SIZE", *cpu_threads.LOCAL_SIZE_VARS, "OMP_NUM_THREADS", "NNPP_THREADS",
                "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert cpu_threads.local_ranks() == 1
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x4)")
    assert cpu_threads.local_ranks() == 4
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    assert cpu_threads.local_ranks() == 2
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 32)
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cpu_threads.threads_per_rank(4) == (8, "8 cores bound to this rank")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert cpu_threads.threads_per_rank(4) == (2, "8 cores / 4 local rank(s)")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert cpu_threads.threads_per_rank(4) == (8, "32 cores / 4 local rank(s)")
