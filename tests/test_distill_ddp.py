"""KD modules under 2-process DDP: the adapters of --cwd_feat are part of the module DDP wraps, so after training
steps on different batches they are equal on both ranks (and have moved)."""
import os

import pytest
import torch
from conftest import free_port


@pytest.mark.slow
def test_cwd_feat_adapters_equal_across_ranks(tiny_dataset, tmp_path):
    import torch.multiprocessing as mp

    import kd_ddp_worker
    pre = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    mp.spawn(kd_ddp_worker.run, args=(2, free_port(), str(tiny_dataset["id"]), pre, str(tmp_path / "results"),
                                      str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["ddp"] == "DistributedDataParallel"
    adapters = [k for k in r0["after"] if k.startswith("cwd_t0_s")]
    assert adapters
    assert all(torch.equal(r0["after"][k], r1["after"][k]) for k in r0["after"])      # equal across ranks
    assert any(not torch.equal(r0["before"][k], r0["after"][k]) for k in adapters)     # and trained
    assert all(torch.equal(r0["student"][k], r1["student"][k]) for k in r0["student"])
