"""torch.distributed for nnpp: read what torchrun / torch.distributed.launch set, start and stop the group.

Launchers: ``torchrun --nproc_per_node=N [--nnodes M --node_rank R --master_addr A --master_port P]`` sets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; the older ``python -m torch.distributed.launch``
sets the same variables and also passes ``--local-rank=K`` (``--local_rank`` before torch 2.0).
The backend follows the device (nccl / hccl / gloo), see :func:`nnpp.device.dist_backend`.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import socket
import sys
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nnpp import NnppError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(local_rank_arg: int | None = None) -> DistEnv:
    """The launcher's view of this process. ``local_rank_arg`` is torch.distributed.launch's --local-rank."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    except ValueError as e:
        raise NnppError(f"bad distributed environment variable ({e}); launch with torchrun") from None
    return DistEnv(rank, local, world)


def _die_with_parent() -> None:  # runs in every child forked by this process (Linux)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def bind_children_to_this_process() -> None:
    """Data-augmentation workers (batchgenerators forks them) must not outlive their rank: when torchrun
    kills a rank, or the rank dies, the kernel kills its forked workers too. Without this, a dead rank's
    workers are orphaned and keep the machine busy."""
    if sys.platform.startswith("linux"):
        os.register_at_fork(after_in_child=_die_with_parent)


def init(env: DistEnv, backend: str, timeout_s: int = 1800) -> None:
    """Join the process group (env:// rendezvous set up by the launcher)."""
    if not env.enabled or dist.is_initialized():
        return
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def teardown(finished: bool = False) -> None:
    """Leave the process group.

    ``finished``: this rank completed its work, so it first waits for the others (a rank that tears its
    connections down while a peer still uses them can abort, gloo's "terminate called without an active
    exception"). After an error no barrier: the launcher stops the other ranks. Unreachable DDP wrappers
    (their reducers hold the group) are collected while the interpreter is still fully alive.
    """
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(env: DistEnv, backend: str):
    """``init`` on entry; ``teardown`` on exit, with the barrier only when the body finished without error."""
    init(env, backend)
    try:
        yield
    except BaseException:
        teardown(finished=False)
        raise
    teardown(finished=True)


def port_is_free(port: int, host: str = "") -> bool:
    """Whether a rendezvous could listen on ``port`` (the launch scripts check MASTER_PORT with this)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A port that is free now (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_module(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` itself, its DistributedDataParallel and torch.compile wrappers removed (what checkpoints store)."""
    net = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
    return getattr(net, "_orig_mod", net)


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(value: float, device) -> float:
    """Sum of ``value`` over all ranks (a collective: every rank must call it); ``value`` alone outside DDP.
    Reduced in float32 (HCCL and some NPUs have no float64 all-reduce): ~7 significant digits, enough for the
    throughput and loss figures it sums."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float32, device=device)
    dist.all_reduce(t)
    return float(t.item())


def rank0_choice(value):
    """Rank 0's ``value`` on every rank (a collective: every rank must call it); ``value`` itself outside DDP. For
    choices each rank makes from its own machine (e.g. ``--amp auto`` on nodes with different CPUs) that must be
    one choice for the whole run."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


RANK_TIMEOUT_ENV = "NNPP_RANK_TIMEOUT"
DEFAULT_RANK_TIMEOUT_S = 1800.0


def rank_timeout(timeout_s: float | None = None) -> float:
    """Seconds a rank may show no sign of life before the ranks waiting for it give up (:func:`ranks_run`):
    ``timeout_s`` when given, else ``NNPP_RANK_TIMEOUT``, else 30 minutes."""
    text = os.environ.get(RANK_TIMEOUT_ENV) if timeout_s is None else str(timeout_s)
    if text is None or not text.strip():
        return DEFAULT_RANK_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise NnppError(f"{RANK_TIMEOUT_ENV}={text}: must be a number of seconds > 0 (how long a rank may show no "
                        f"sign of life before the others stop waiting for it)")
    return value


class _Heartbeat:
    """This rank's sign of life in the shared folder while it works: a small JSON file (its owner suffix, i.e. pid
    and host/pid namespace, see :func:`nnpp.file_safety.owner_alive`; pid and host name; a beat count) rewritten
    atomically every ``every_s`` seconds by a daemon thread. The count, not the file time, is what readers
    compare: no two machines' clocks are ever compared."""

    def __init__(self, path: str, every_s: float):
        from nnpp.file_safety import owner_suffix
        self.path, self.every_s, self.beats = path, every_s, 0
        self.owner, self.host = owner_suffix(), socket.gethostname()
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="nnpp-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        import json

        from nnpp.file_safety import write_atomic
        self.beats += 1
        write_atomic(self.path, json.dumps({"owner": self.owner, "pid": os.getpid(), "host": self.host,
                                            "beat": self.beats}))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._beat()
            except OSError:  # a full disk or a flaky network file system: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _read_beat(path: str) -> dict | None:
    import json
    try:
        with open(path) as f:
            beat = json.load(f)
        return beat if isinstance(beat, dict) else None
    except (OSError, ValueError):
        return None


def _wait_for_results(paths: list, beats: list, rank: int, what: str, timeout: float, poll_s: float) -> None:
    """Return when every rank's result file in ``paths`` exists; raise NnppError naming the first rank found dead
    (the rule: :func:`ranks_run`)."""
    import time

    from nnpp.file_safety import owner_alive
    start = time.monotonic()
    last = {r: (None, start) for r in range(len(paths)) if r != rank}  # the beat last seen, and when it changed
    while last:
        for r in sorted(last):
            if os.path.exists(paths[r]):
                del last[r]
                continue
            now, beat = time.monotonic(), _read_beat(beats[r])
            if beat is not None and beat != last[r][0]:
                last[r] = (beat, now)
            seen, since = last[r]
            who = f"rank {r}" + (f" (pid {seen.get('pid', '?')} on {seen.get('host', '?')})" if seen else "")
            if seen is not None and not owner_alive(str(seen.get("owner", ""))) and not os.path.exists(paths[r]):
                raise NnppError(f"{who} died while {what}: its process is gone and it wrote no result; see rank "
                                f"{r}'s output (this rank stops waiting for it)")
            if now - since > timeout and not os.path.exists(paths[r]):
                state = (f"showed no sign of life for more than {timeout:g} s" if seen is not None
                         else f"showed no sign of life (no heartbeat file) within {timeout:g} s")
                raise NnppError(f"{who} {state} while {what} (it died or hangs; this rank stops waiting for it); "
                                f"if its work can legitimately stall longer, set "
                                f"{RANK_TIMEOUT_ENV} to more seconds (now {timeout:g})")
        if last:
            time.sleep(poll_s)


def ranks_run(fn, folder: str, what: str, poll_s: float = 2.0, timeout_s: float | None = None) -> list:
    """``fn(rank, world_size)`` on every rank (each its share of long work, e.g. pseudo-labelling a thousand scans);
    the list of every rank's (JSON-serialisable) result, on every rank; ``[fn(0, 1)]`` outside DDP. The ranks do not
    wait for each other in a collective, which would time out after the process group's timeout: each writes a
    result file into ``folder`` (every rank must see it: checked first, as for the results folder), named by a
    token broadcast first, and polls for the others'. When ``fn`` raises on a rank, that rank raises its own
    error and every other rank one line naming the rank and ``what``. Every rank passes a barrier after reading,
    then rank 0 removes the files (also on failure).

    A dead rank does not hang the others, whatever launched them (torchrun kills the rest itself; srun, mpirun or
    nodes started by hand do not): while ``fn`` runs, each rank keeps a heartbeat file in ``folder`` (rewritten
    every ``timeout / 10`` seconds, at most every minute, by a background thread; see :class:`_Heartbeat`). A
    waiting rank gives up on rank ``r``, with one line naming ``r``, its pid and host and ``what`` (an NnppError:
    the entry points exit non-zero), when ``r`` has written no result and

    * ``r`` runs on the same host (and pid namespace) and its process is gone (seen at the next poll), or
    * ``r``'s heartbeat has not changed for ``timeout`` seconds on the waiting rank's own clock (a killed node, a
      frozen process), or ``r``'s heartbeat has not appeared within ``timeout`` seconds.

    ``timeout`` is ``timeout_s``, else the environment variable ``NNPP_RANK_TIMEOUT`` (seconds), else 30 minutes
    (:func:`rank_timeout`); it bounds silence, not work: a rank working for hours keeps beating. After such a
    failure the run's few small ``.nnpp_rank*`` files stay in ``folder`` (no later run reads them: each has its
    own token), and what the dead rank was writing stays where it left it (e.g. nnpp_distill's
    ``<prepared folder>.partial<pid>``: such folders are cleaned only by their owner-pid rule, on the same host)."""
    import json
    rank, n = world()
    if n == 1:
        return [fn(0, 1)]
    check_shared_folder(folder, "data folder")
    # rank 0's timeout for every rank: a waiter must not judge a rank by a shorter timeout than that rank beats for
    token, timeout = rank0_choice((uuid.uuid4().hex, rank_timeout(timeout_s)))
    paths = [os.path.join(folder, f".nnpp_rank{r}_{token}.json") for r in range(n)]
    beats = [os.path.join(folder, f".nnpp_rank{r}_{token}.alive") for r in range(n)]
    error = None
    heartbeat = _Heartbeat(beats[rank], every_s=min(60.0, timeout / 10))
    try:
        try:
            payload = json.dumps({"value": fn(rank, n)})
        except BaseException as e:
            error = e
            payload = json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        with open(paths[rank] + ".tmp", "w") as f:
            f.write(payload)
        os.replace(paths[rank] + ".tmp", paths[rank])
    finally:
        heartbeat.stop()  # no beat after the result: rank 0 removes the heartbeats after the barrier
    _wait_for_results(paths, beats, rank, what, timeout, poll_s)
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    dist.barrier()  # every rank has read every file
    if rank == 0:
        for path in paths + beats:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    if error is not None:
        raise error
    failed = next((r for r, res in enumerate(results) if "error" in res), None)
    if failed is not None:
        raise NnppError(f"rank {failed} failed while {what} ({results[failed]['error']}); see rank {failed}'s "
                        f"output")
    return [res["value"] for res in results]


def rank0_runs(fn, folder: str, what: str, poll_s: float = 2.0, timeout_s: float | None = None):
    """``fn()`` on rank 0 only, its result on every rank (:func:`ranks_run` with nothing to do on the others: they
    poll for rank 0's result file, so rank 0's work may outlast the process group's timeout; a dead rank 0 stops
    them within ``timeout_s`` / ``NNPP_RANK_TIMEOUT``, see :func:`ranks_run`)."""
    return ranks_run(lambda rank, n: fn() if rank == 0 else None, folder, what, poll_s, timeout_s)[0]


def check_shared_folder(path: str, what: str = "results folder") -> None:
    """Every rank must see the same ``path`` (multi-node runs need a shared results folder: otherwise --c on
    the other nodes starts at epoch 0 and the final validation scores only rank 0's node). Rank 0 writes a
    token file there, the others read it; every rank raises the same clear error when one does not see it."""
    rank, n = world()
    if n == 1:
        return
    os.makedirs(path, exist_ok=True)
    shared = [uuid.uuid4().hex, os.path.abspath(path)] if rank == 0 else [None, None]
    dist.broadcast_object_list(shared, src=0)
    token, path0 = shared
    marker = os.path.join(path, f".nnpp_shared_{token}")
    if rank == 0:
        with open(marker, "w") as f:
            f.write(token)
    dist.barrier()
    try:
        with open(marker) as f:
            sees = f.read() == token
    except OSError:
        sees = False
    flags = [None] * n
    dist.all_gather_object(flags, sees)
    if rank == 0:
        os.remove(marker)
    missing = [r for r, flag in enumerate(flags) if not flag]
    if missing:
        raise NnppError(f"rank(s) {', '.join(map(str, missing))} do not see rank 0's {what} {path0}: every node "
                        f"needs the same shared folder (e.g. NFS) at the same path for nnUNet_results; mount it "
                        f"or set nnUNet_results to a shared path")


def split_global_batch(global_batch: int, world_size: int) -> None:
    """--dbs: the plans batch is the global batch; every rank needs at least one sample."""
    if global_batch < world_size:
        raise NnppError(f"--dbs: the global batch size {global_batch} is smaller than the world size {world_size}; "
                        f"raise the plans batch size (tools/change_bs.py) or use fewer processes")
