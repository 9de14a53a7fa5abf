"""Ranks of the in-process DDP tests (started by torch.multiprocessing.spawn from test_ddp.py)."""
import json
import os

import torch


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def run(rank: int, world: int, port: int, dataset: str, dbs: bool, out: str, steps: int = 3) -> None:
    """A few training steps; then, under the process group, -pretrained_weights and the checkpoint writes."""
    _join(rank, world, port)
    import torch.distributed as dist

    from nnpp import distributed
    from nnpp.run.train import make_trainer

    with distributed.process_group(distributed.dist_env(), "gloo"):
        trainer = make_trainer(dataset, "3d_fullres", "0", "nnUNetPlusPlusTrainerDDP", device=torch.device("cpu"))
        trainer.distribute_batch = dbs
        trainer.initialize()
        initial = [p.detach().clone() for p in trainer.network.parameters()]
        loader, _ = trainer.get_dataloaders()
        losses = [float(trainer.train_step(next(loader))["loss"]) for _ in range(steps)]
        params = [p.detach().clone() for p in trainer.network.parameters()]

        # checkpoints: a stale .tmp planted by rank 0 must survive; rank 1 saving alone writes nothing; both
        # saving at once, repeatedly, never fail and leave rank 0's checkpoint
        ckpt = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
        if rank == 0:
            with open(ckpt + ".tmp", "wb") as f:
                f.write(b"stale")
        dist.barrier()
        if rank == 1:
            trainer.save_checkpoint(ckpt)
        dist.barrier()
        alone = os.path.exists(ckpt)
        dist.barrier()
        for epoch in range(4):
            trainer.current_epoch = epoch
            trainer.save_checkpoint(ckpt)
        dist.barrier()
        # -pretrained_weights under a process group on the CPU (nnU-Net's loader maps to cuda:rank)
        trainer.load_pretrained_weights(ckpt)
        torch.save({"batch_size": trainer.batch_size, "losses": losses, "initial": initial, "params": params,
                    "rank1_alone_wrote": alone, "stale": open(ckpt + ".tmp", "rb").read(),
                    "saved_epoch": torch.load(ckpt, weights_only=False)["current_epoch"]},
                   os.path.join(out, f"rank{rank}.pt"))


def shared_folder(rank: int, world: int, port: int, folders: list, out: str) -> None:
    """nnpp.distributed.check_shared_folder with each rank's own view of the results folder."""
    _join(rank, world, port)
    from nnpp import NnppError, distributed

    with distributed.process_group(distributed.dist_env(), "gloo"):
        try:
            distributed.check_shared_folder(folders[rank])
            result = "ok"
        except NnppError as e:
            result = str(e)
    with open(os.path.join(out, f"shared{rank}.txt"), "w") as f:
        f.write(result)


def amp_auto(rank: int, world: int, port: int, out: str) -> None:
    """--amp auto on two ranks whose CPUs differ (rank 0 with native bf16, rank 1 without)."""
    _join(rank, world, port)
    from nnpp import device as dev
    from nnpp import distributed
    from nnpp.run.train import amp_mode

    dev.cpu_has_native_bf16 = lambda: rank == 0
    with distributed.process_group(distributed.dist_env(), "gloo"):
        chosen = amp_mode(None, torch.device("cpu"))
    own = dev.resolve_amp_mode("auto", torch.device("cpu"))
    with open(os.path.join(out, f"amp{rank}.txt"), "w") as f:
        f.write(f"{chosen} {own}")


def _record_polled(rank: int, world: int, port: int, out: str, call) -> None:
    """``call(distributed)`` under a gloo group whose timeout (3 s) the work outlasts; its result, or the NnppError's
    line, written to ``out/r{rank}.json``."""
    _join(rank, world, port)
    from nnpp import NnppError, distributed
    distributed.init(distributed.dist_env(), "gloo", timeout_s=3)
    try:
        result = call(distributed)
    except NnppError as e:
        result = str(e)
    with open(os.path.join(out, f"r{rank}.json"), "w") as f:
        json.dump(result, f)


def rank0_runs(rank: int, world: int, port: int, folder: str, out: str, fail: bool) -> None:
    """nnpp.distributed.rank0_runs with rank 0's work outlasting the process group's timeout (3 s)."""
    import time

    from nnpp import NnppError

    def work():
        time.sleep(6)
        if fail:
            raise NnppError("unlabeled case u1 is the validation case v1")
        return {"folder": "prepared"}
    _record_polled(rank, world, port, out, lambda d: d.rank0_runs(work, folder, "preparing", poll_s=0.2))


def ranks_run(rank: int, world: int, port: int, folder: str, out: str, fail_rank: int) -> None:
    """nnpp.distributed.ranks_run: every rank its share, rank 1's outlasting the process group's timeout (3 s);
    ``fail_rank`` (-1: none) raises."""
    import time

    from nnpp import NnppError

    def work(k, n):
        time.sleep(6 if k == 1 else 0)
        if k == fail_rank:
            raise NnppError("case b is unreadable")
        return ["a", "b", "c"][k::n]
    _record_polled(rank, world, port, out, lambda d: d.ranks_run(work, folder, "pseudo-labelling", poll_s=0.2))
