"""CPU threads per process: how many CPUs this process may use (affinity mask, cgroup CPU quota) and each rank's
share of them, unless the user chose (``NNPP_THREADS``, or an ``OMP_NUM_THREADS`` that torchrun did not set)."""
from __future__ import annotations

import os

import torch

from nnpp import NnppError


def set_cpu_threads(n: int | None = None) -> None:
    torch.set_num_threads(n or usable_cores())


# Where this process's cgroup is found: module-level so that tests (and odd systems) can point them elsewhere.
PROC_SELF_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
THREADS_ENV = "NNPP_THREADS"  # nnpp's own thread count per process; wins over OMP_NUM_THREADS


def _cgroup_cpu_dirs() -> list[tuple[int, str]]:
    """(cgroup version, folder) of every cgroup that limits this process's CPU time: its own cgroup (from
    ``/proc/self/cgroup``) and each ancestor up to the hierarchy's mount (a quota on a parent limits the children
    too). cgroup v2: the unified line ``0::/path`` under ``CGROUP_ROOT``; v1: the line naming the ``cpu``
    controller, under ``CGROUP_ROOT/<controllers>`` (or ``cpu``, ``cpu,cpuacct``). Folders that do not exist are
    skipped by the reader (inside a container without a cgroup namespace the path names the host's view, and the
    mount root is the container's own cgroup)."""
    try:
        with open(PROC_SELF_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    dirs: list[tuple[int, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            bases = [(2, CGROUP_ROOT)]
        elif "cpu" in controllers.split(","):
            names = dict.fromkeys((controllers, "cpu", "cpu,cpuacct"))
            bases = [(1, os.path.join(CGROUP_ROOT, name)) for name in names]
        else:
            continue
        steps = [p for p in path.split("/") if p]
        for version, base in bases:
            for k in range(len(steps), -1, -1):
                if (version, os.path.join(base, *steps[:k])) not in dirs:
                    dirs.append((version, os.path.join(base, *steps[:k])))
    return dirs


def _cgroup_quota(version: int, folder: str) -> float | None:
    """CPUs' worth of time the cgroup in ``folder`` may use (quota / period), None for no quota or no such file.
    v2 ``cpu.max``: ``"max 100000"`` (none) or ``"200000 100000"`` (2 CPUs); v1 ``cpu.cfs_quota_us`` (-1: none)
    over ``cpu.cfs_period_us``."""
    try:
        if version == 2:
            with open(os.path.join(folder, "cpu.max")) as f:
                quota, period = (f.read().split() + ["100000"])[:2]
        else:
            with open(os.path.join(folder, "cpu.cfs_quota_us")) as f:
                quota = f.read().strip()
            with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        if quota == "max":
            return None
        quota_us, period_us = int(quota), int(period)
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cgroup_cpu_limit() -> float | None:
    """The tightest CPU quota of this process's cgroups (containers with ``--cpus``, SLURM, Kubernetes limits), in
    CPUs (may be fractional); None where there is none or no cgroup can be read (not Linux)."""
    quotas = [q for q in (_cgroup_quota(v, d) for v, d in _cgroup_cpu_dirs()) if q is not None]
    return min(quotas) if quotas else None


def _mask_size() -> int:
    """The CPUs of this process's affinity mask (all CPUs where the OS has none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cores() -> int:
    """The CPUs this process may use: the CPUs of its affinity mask (``taskset``, SLURM's ``--cpu-bind``, cpusets;
    all CPUs where the OS has no mask), fewer where a cgroup CPU quota allows less time (``docker --cpus=1.5``:
    1; a fraction of a CPU rounds down, since threads beyond the quota are throttled), at least 1."""
    cores = _mask_size()
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, cores)


def _start_environ(pid: int) -> dict[bytes, bytes] | None:
    """The environment process ``pid`` was started with (``/proc/PID/environ``: later changes of its own
    ``os.environ`` do not show); None where it cannot be read (not Linux, another user's process)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return None
    return dict(item.split(b"=", 1) for item in items if b"=" in item)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _torchrun_started_with(var: str) -> bool | None:
    """Whether the torchrun (or ``torch.distributed.launch``) process that started this worker had ``var`` in the
    environment it was itself started with; None where that cannot be found out. The launcher is the nearest
    ancestor not started by it: torchrun gives its workers ``TORCHELASTIC_RUN_ID`` in their environment only, so
    wrappers between it and the worker (``sh -c``, a shell script; ``nice`` and ``exec`` start no process) carry
    that run id and are passed over; torchrun itself was started without it."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "").encode()
    pid = os.getppid()
    for _ in range(32):
        if pid is None or pid <= 1:
            return None  # orphaned (the launcher is gone) or no ancestry to read
        env = _start_environ(pid)
        if env is None:
            return None
        if env.get(b"TORCHELASTIC_RUN_ID") != run_id:
            return var.encode() in env
        pid = _parent_pid(pid)
    return None


def _user_threads() -> tuple[int, str] | None:
    """(thread count, where it comes from) when the user chose one, else None; see :func:`user_thread_count`."""
    value = os.environ.get(THREADS_ENV)
    if value is not None and value.strip():
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise NnppError(f"{THREADS_ENV}={value}: must be a whole number of CPU threads per process >= 1 "
                            f"(or unset: every local rank its share of the CPUs)")
        return n, f"{THREADS_ENV}={n}"
    value = os.environ.get("OMP_NUM_THREADS")
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    if n < 1:
        return None
    if n == 1 and "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_WORLD_SIZE", "1").strip() != "1" \
            and not _torchrun_started_with("OMP_NUM_THREADS"):
        return None  # torchrun's default (LOCAL_WORLD_SIZE > 1: torchrun always sets it to a whole number)
    return n, f"OMP_NUM_THREADS={n}"


def user_thread_count() -> int | None:
    """The CPU thread count per process the user chose, or None (then every local rank takes its share of
    :func:`usable_cores`, see :func:`threads_per_rank`).

    1. ``NNPP_THREADS`` (a whole number >= 1; anything else is an error) wins: nnpp's own knob, the one way to say
       "1 thread per rank" under torchrun when the rule below cannot see the user's 1.
    2. else ``OMP_NUM_THREADS``, except torchrun's default: torchrun (and ``torch.distributed.launch``) sets
       ``OMP_NUM_THREADS=1`` for the workers of a run with more than one process per node when it was not set,
       and leaves no other trace (torch/distributed/run.py). So under torchrun (``TORCHELASTIC_RUN_ID`` set) with
       ``LOCAL_WORLD_SIZE`` > 1, a 1 counts as set by the user only when the torchrun process was itself started
       with ``OMP_NUM_THREADS`` (read from its start environment, found past any wrapper, see
       :func:`_torchrun_started_with`); where that cannot be read, 1 is torchrun's default. Any other value, and
       any value outside torchrun (srun, mpirun, a single process), is the user's. Values that are not whole
       numbers >= 1 count as unset."""
    chosen = _user_threads()
    return None if chosen is None else chosen[0]


#: how launchers other than torchrun name the number of this job's processes on this node
LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


def local_ranks() -> int:
    """This job's processes on this node: torchrun's ``LOCAL_WORLD_SIZE``, else Open MPI's, MPICH's or SLURM's
    count (``SLURM_NTASKS_PER_NODE`` "4(x2)": 4), else 1 -- never the job's global ``WORLD_SIZE``."""
    for var in ("LOCAL_WORLD_SIZE", *LOCAL_SIZE_VARS):
        digits = os.environ.get(var, "").split("(")[0].split(",")[0]
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def threads_per_rank(local_world: int | None = None) -> tuple[int, str]:
    """(CPU threads for one of ``local_world`` (default :func:`local_ranks`) processes on this machine, why): the
    user's choice (:func:`user_thread_count`), else this process's usable CPUs (:func:`usable_cores`: affinity mask
    and cgroup quota) divided by the local ranks, at least 1 (so N ranks together use every CPU once). Outside
    torchrun, a mask smaller than the machine is taken as this rank's own share (srun --cpu-bind, mpirun
    --bind-to give each task its own CPUs) and not divided again; torchrun's workers all inherit one mask."""
    chosen = _user_threads()
    if chosen is not None:
        return chosen
    cores, local_world = usable_cores(), max(1, local_ranks() if local_world is None else local_world)
    if local_world > 1 and "TORCHELASTIC_RUN_ID" not in os.environ and _mask_size() < (os.cpu_count() or 1):
        return cores, f"{cores} cores bound to this rank"
    return max(1, cores // local_world), f"{cores} cores / {local_world} local rank(s)"
