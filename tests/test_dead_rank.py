"""A dead rank does not hang the others outside torchrun (srun, mpirun, nodes started by hand: nothing kills the
rest): ranks waiting in nnpp.distributed.ranks_run exit non-zero within NNPP_RANK_TIMEOUT with one line naming the
rank."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnpp.distributed import free_port

HERE = Path(__file__).parent
TIMEOUT_S = 3


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP and /proc: Linux")
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_rank_does_not_hang_the_others(tmp_path, how):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               OMP_NUM_THREADS="1", NNPP_RANK_TIMEOUT=str(TIMEOUT_S))
    procs = [subprocess.Popen([sys.executable, str(HERE / "dead_rank.py"), str(tmp_path / "data"), how],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120  # two torch imports on a busy machine
        while time.monotonic() < deadline and procs[0].poll() is None:
            if procs[1].poll() is not None or (how == "stop" and _state(procs[1].pid) == "T"):
                break
            time.sleep(0.05)
        assert procs[1].poll() is not None or _state(procs[1].pid) == "T", "rank 1 never got to its work"
        gone = time.monotonic()
        try:
            _, err = procs[0].communicate(timeout=TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waits for rank 1 ({how}) {TIMEOUT_S + 30} s later")
        waited = time.monotonic() - gone
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"dead_rank: error: rank 1 (pid {procs[1].pid} on "), err
    if how == "kill":  # same host: the pid rule, no need to wait for the timeout
        assert " died while pseudo-labelling: its process is gone" in line, line
        assert waited < TIMEOUT_S + 10
    else:  # frozen: its heartbeat stops
        assert f" showed no sign of life for more than {TIMEOUT_S} s while pseudo-labelling" in line, line
        assert f"set NNPP_RANK_TIMEOUT to more seconds (now {TIMEOUT_S})" in line, line
        assert TIMEOUT_S - 1 < waited < TIMEOUT_S + 10
