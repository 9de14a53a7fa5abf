"""One rank of a 2-process run started by hand (no torchrun: as under srun, mpirun or two nodes started by hand),
in nnpp.distributed.ranks_run; rank 1 dies (``kill``: SIGKILL) or freezes (``stop``: SIGSTOP) in its share of the
work while rank 0, done with its own share, waits for rank 1's result. Run from tests/test_dead_rank.py:
``python dead_rank.py FOLDER kill|stop`` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set."""
import os
import signal
import sys
import time

from nnpp import distributed
from nnpp.cli import entry_point

HOW = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


@entry_point("dead_rank")
def main(argv):
    folder, how = argv

    def work(rank, n):
        if rank == 1:
            time.sleep(0.5)  # a few heartbeats first
            os.kill(os.getpid(), HOW[how])
        return rank

    distributed.init(distributed.dist_env(), "gloo")
    print(f"rank {os.environ['RANK']} pid {os.getpid()} working", flush=True)
    distributed.ranks_run(work, folder, "pseudo-labelling", poll_s=0.1)
    distributed.teardown(finished=True)


if __name__ == "__main__":
    main(sys.argv[1:])
