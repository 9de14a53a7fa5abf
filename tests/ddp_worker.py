"""One rank of the in-process DDP test (started by torch.multiprocessing.spawn from test_ddp.py)."""
import os

import torch


def run(rank: int, world: int, port: int, dataset: str, dbs: bool, out: str, steps: int = 3) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nnpp import distributed
    from nnpp.run.train import make_trainer

    with distributed.process_group(distributed.dist_env(), "gloo"):
        trainer = make_trainer(dataset, "3d_fullres", "0", "nnUNetPlusPlusTrainerDDP", device=torch.device("cpu"))
        trainer.distribute_batch = dbs
        trainer.initialize()
        initial = [p.detach().clone() for p in trainer.network.parameters()]
        loader, _ = trainer.get_dataloaders()
        losses = [float(trainer.train_step(next(loader))["loss"]) for _ in range(steps)]
        torch.save({"batch_size": trainer.batch_size, "losses": losses, "initial": initial,
                    "params": [p.detach().clone() for p in trainer.network.parameters()]},
                   os.path.join(out, f"rank{rank}.pt"))
