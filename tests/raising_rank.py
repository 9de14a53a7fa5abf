"""nnpp_train with a fault injected: rank 1 raises in its third training step (run by torchrun from test_ddp.py)."""
import os
import sys

from nnpp.run import train
from nnpp.training.nnUNetPlusPlusTrainer import nnUNetPlusPlusTrainer

_train_step = nnUNetPlusPlusTrainer.train_step
_steps = [0]


def faulty_train_step(self, batch):
    _steps[0] += 1
    if os.environ.get("RANK") == "1" and _steps[0] == 3:
        raise RuntimeError("injected fault on rank 1")
    return _train_step(self, batch)


nnUNetPlusPlusTrainer.train_step = faulty_train_step

if __name__ == "__main__":
    train.main(sys.argv[1:])
