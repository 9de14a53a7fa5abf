"""Ranks of the 2-process KD test (started by torch.multiprocessing.spawn from test_distill_ddp.py)."""
import json
import os

import torch


def run(rank: int, world: int, port: int, dataset: str, preprocessed: str, results: str, out: str,
        steps: int = 2) -> None:
    """A UNet++ student with --kd soft cwd --cwd_feat under DDP: a few steps on each rank's own batches, then each
    rank saves its KD modules (before and after) and its student weights to ``out/rank{rank}.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), nnUNet_results=results)
    torch.set_num_threads(1)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnpp import distributed
    from nnpp.distill.student import write_student_plans
    from nnpp.distill.teachers import Teacher
    from nnpp.distill.settings import KD_DEFAULTS
    from nnpp.run.train import make_trainer
    from nnpp.training import nnUNetPlusPlusTrainer

    with distributed.process_group(distributed.dist_env(), "gloo"):
        plans = write_student_plans(preprocessed, "nnUNetPlans", "3d_fullres", 2, "unetpp", log=None,
                                    writer=rank == 0)  # as nnpp_distill: rank 0 writes, the other waits
        trainer = make_trainer(dataset, "3d_fullres", "0", "nnUNetPlusPlusTrainerKDDDP", plans, torch.device("cpu"))
        torch.manual_seed(1)  # the same teacher on every rank, at the source plans' (full) width
        source = PlansManager(json.load(open(os.path.join(preprocessed, "nnUNetPlans.json"))))
        net = nnUNetPlusPlusTrainer.build_network_architecture(
            source, source.get_configuration("3d_fullres"), 1, trainer.label_manager.num_segmentation_heads, False)
        trainer.configure_kd([Teacher(net, folder="teacher", fold="0")],
                             {**KD_DEFAULTS, "kd": ["soft", "cwd"], "cwd_feat": True, "t": ["x"], "tf": ["0"], "r": 2,
                              "student": "unetpp"})
        torch.manual_seed(100 + rank)  # different KD-module initialisations: DDP must make them equal
        trainer.initialize()
        kd = trainer.bare_network.kd_modules
        before = {k: v.detach().clone() for k, v in kd.state_dict().items()}
        loader, _ = trainer.get_dataloaders()
        for _ in range(steps):
            trainer.train_step(next(loader))
        torch.save({"before": before, "after": {k: v.detach().clone() for k, v in kd.state_dict().items()},
                    "student": {k: v.detach().clone() for k, v in trainer.bare_network.state_dict().items()},
                    "ddp": type(trainer.network).__name__},
                   os.path.join(out, f"rank{rank}.pt"))
