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
