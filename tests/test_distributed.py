"""nnpp.distributed helpers that need no process group of their own."""
import torch

from nnpp import distributed


def test_all_reduce_sum_avoids_float64(monkeypatch):
    """HCCL (and some NPUs) have no float64 all-reduce: the sum goes through a float32 tensor."""
    seen = []

    def hccl_like_all_reduce(t):
        if t.dtype == torch.float64:
            raise RuntimeError("HCCL: unsupported data type float64")
        seen.append(t.dtype)
        t.mul_(2)  # two ranks holding the same value

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed.dist, "all_reduce", hccl_like_all_reduce)
    assert distributed.all_reduce_sum(12.5, torch.device("cpu")) == 25.0
    assert seen == [torch.float32]


def test_rank_timeout(monkeypatch):
    """How long a silent rank is waited for: the argument, else NNPP_RANK_TIMEOUT, else 30 minutes; bad values are
    one line naming the variable."""
    import pytest

    from nnpp import NnppError
    monkeypatch.delenv("NNPP_RANK_TIMEOUT", raising=False)
    assert distributed.rank_timeout() == 1800
    monkeypatch.setenv("NNPP_RANK_TIMEOUT", "90")
    assert distributed.rank_timeout() == 90
    assert distributed.rank_timeout(2.5) == 2.5
    for bad in ("0", "-3", "soon", "inf", "nan"):
        monkeypatch.setenv("NNPP_RANK_TIMEOUT", bad)
        with pytest.raises(NnppError, match=f"^NNPP_RANK_TIMEOUT={bad}: must be a number of seconds > 0"):
            distributed.rank_timeout()


def test_a_rank_elsewhere_is_judged_by_its_heartbeat(tmp_path):
    """A rank on another machine (its pid cannot be asked) keeps the others waiting while its heartbeat changes,
    however old the file's time; once the beats stop, the wait ends after the timeout; a rank that never wrote a
    heartbeat ends it too. Nothing compares two machines' clocks."""
    import json
    import os
    import threading
    import time

    import pytest

    from nnpp import NnppError
    paths = [str(tmp_path / f"r{r}.json") for r in range(3)]
    beats = [str(tmp_path / f"r{r}.alive") for r in range(3)]
    open(paths[0], "w").close()
    stop = threading.Event()

    def remote_rank():  # rank 1 beats for 1.2 s from "another host", with file times in the past
        n = 0
        while not stop.wait(0.1) and n < 12:
            n += 1
            with open(beats[1], "w") as f:
                json.dump({"owner": ".owner1-0badf00d", "pid": 1, "host": "node7", "beat": n}, f)
            os.utime(beats[1], (0, 0))
    thread = threading.Thread(target=remote_rank)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(NnppError) as e:
            distributed._wait_for_results(paths[:2], beats[:2], 0, "preparing", timeout=0.5, poll_s=0.02)
    finally:
        stop.set()
        thread.join()
    assert str(e.value).startswith("rank 1 (pid 1 on node7) showed no sign of life for more than 0.5 s while "
                                   "preparing (it died or hangs; this rank stops waiting for it); if its work can "
                                   "legitimately stall longer, set NNPP_RANK_TIMEOUT to more seconds (now 0.5)")
    assert time.monotonic() - start > 1.5  # 1.2 s of beats, then 0.5 s of silence
    with pytest.raises(NnppError, match=r"^rank 2 showed no sign of life \(no heartbeat file\) within 0.3 s while x"):
        distributed._wait_for_results([paths[0], paths[0], paths[2]], beats, 0, "x", timeout=0.3, poll_s=0.02)
