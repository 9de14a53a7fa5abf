"""Threads that fit the machine: every rank takes its share of the cores; torchrun's default of one
thread per worker is told apart from a user's OMP_NUM_THREADS=1; nnpp_predict divides ONNX Runtime's threads,
-npp/-nps and the export threads among the local ranks."""
import os
import subprocess
import sys

import pytest

from nnpp import device as dev

CHILD = "from nnpp.device import user_thread_count; print(user_thread_count())"


def _launcher(started_with: dict, sets_after_start: dict, worker_env: dict) -> str:
    """What a torchrun worker reports: a launcher process started with ``started_with`` in its environment changes
    its own ``os.environ`` by ``sets_after_start`` (as torchrun does) and starts the worker with that plus
    ``worker_env``."""
    code = (f"import os, subprocess, sys; os.environ.update({sets_after_start!r}); os.environ.update({worker_env!r}); "
            f"print(subprocess.run([sys.executable, '-c', {CHILD!r}], capture_output=True, text=True).stdout.strip())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
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


def test_ranks_share_the_cores(monkeypatch):
    monkeypatch.setattr(dev, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert dev.threads_per_rank(2) == (8, "16 cores / 2 local rank(s)")
    assert dev.threads_per_rank(32)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dev.threads_per_rank(2) == (3, "OMP_NUM_THREADS=3")


@pytest.mark.parametrize("flags, local_world, expected", [
    ([], 1, (16, 0, 3, 3, 5)),  # one process: every core; ONNX Runtime's own choice; nnU-Net's -npp/-nps 3
    ([], 2, (8, 8, 1, 1, 8)),  # 2 ranks: half the cores each, ONNX Runtime too, nnU-Net's 3 workers -> 1 each
    (["--ort_threads", "3", "-npp", "2", "-nps", "0"], 2, (8, 3, 2, 0, 8)),  # given flags are kept
])
def test_predict_shares_the_machine_among_local_ranks(monkeypatch, flags, local_world, expected):
    from nnpp.run import predict
    monkeypatch.setattr(dev, "usable_cores", lambda: 16)
    for var in ("OMP_NUM_THREADS", "nnUNet_npp", "nnUNet_nps"):
        monkeypatch.delenv(var, raising=False)
    args = predict.parser().parse_args(["-i", "in", "-o", "out", *flags])
    predict.share_resources(args, local_world)
    assert (args.threads, args.ort_threads, args.npp, args.nps, args.export_threads) == expected
