"""The device layer: the ONLY module of nnpp that touches torch.cuda, torch.npu, torch_npu, torch.mps or
torch.backends (a test enforces it). Everything else asks this module.

Devices: ``cuda`` (NVIDIA), ``npu`` (Huawei Ascend, through the optional ``torch_npu`` package, which needs
the CANN toolkit), ``mps`` (Apple) and ``cpu``. ``auto`` prefers npu, cuda, mps, cpu.

AMP modes (``--amp``):
  ``O0``    fp32, no autocast, no loss scaling.
  ``O1``    fp16 autocast + dynamic loss scaling (GradScaler); the seed's apex O1 choice.
  ``bf16``  bfloat16 autocast, no loss scaling (bf16 has fp32's exponent range).
  ``auto``  O1 on cuda and npu; bf16 on CPUs with native bfloat16 instructions (AVX512-BF16 or AMX: measured
            0.44-0.45x the fp32 step of UNet++ and the same demo Dice, benchmarks/RESULTS.md); O0 on other CPUs and
            on mps (fp16 autocast on the CPU is correct but slow).

Memory format (:func:`memory_format`): channels_last_3d for 3D networks and batches on the CPU (measured 0.71-0.80x
the contiguous UNet++ step); contiguous elsewhere until measured there.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import resource
import sys
from dataclasses import dataclass

import torch

from nnpp import NnppError

DEVICE_CHOICES = ("auto", "cuda", "npu", "mps", "cpu")
AMP_CHOICES = ("auto", "O0", "O1", "bf16")


# ----------------------------------------------------------------------------------------------- backends
def import_torch_npu():
    """Import ``torch_npu`` (registers the 'npu' device). Raises NnppError when it is not installed."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError as e:
        raise NnppError(f"-device npu needs the torch_npu package (and the Ascend CANN toolkit), which could "
                        f"not be imported ({e}); install torch_npu matching torch {torch.__version__.split('+')[0]} "
                        f"or choose -device cuda/cpu/auto") from None


def npu_available() -> bool:
    """True when torch_npu is installed, imports, and sees at least one NPU. Never raises."""
    if "torch_npu" not in sys.modules and importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import_torch_npu()
        return torch.npu.is_available()
    except Exception:  # a broken CANN install must not break the CPU/CUDA path
        return False


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "npu":
        return npu_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    raise NnppError(f"unknown device '{kind}'; choose one of {', '.join(DEVICE_CHOICES)}")


def device_count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        return torch.npu.device_count() if npu_available() else 0
    return 1


def auto_device_type() -> str:
    """What ``-device auto`` means on this machine: the first available of npu, cuda, mps, cpu."""
    return next(k for k in ("npu", "cuda", "mps", "cpu") if _available(k))


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """Turn ``auto|cuda|npu|mps|cpu`` into a torch.device; accelerators get index ``local_rank`` (default 0)
    and become the current device of this process."""
    name = (name or "auto").lower()
    if name not in DEVICE_CHOICES:
        raise NnppError(f"unknown device '{name}'; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        name = auto_device_type()
    elif name == "npu":
        import_torch_npu()  # clear message when missing
        if not torch.npu.is_available():
            raise NnppError("-device npu: torch_npu is installed but sees no NPU; check the driver/CANN "
                            "environment (source test/env_npu.sh) or choose another device")
    elif not _available(name):
        raise NnppError(f"-device {name} requested but no {name} device is available; choose -device auto or cpu")
    if name in ("cpu", "mps"):
        return torch.device(name)
    index = local_rank or 0
    n = device_count(name)
    if index >= n:
        raise NnppError(f"local rank {index} needs {name}:{index} but only {n} {name} device(s) are visible")
    device = torch.device(name, index)
    set_device(device)
    return device


def set_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":
        torch.npu.set_device(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "npu":
        torch.npu.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device running out of memory: torch's ``OutOfMemoryError`` (cuda, recent torch_npu),
    or the plain ``RuntimeError("NPU out of memory. ...")`` older torch_npu releases raise."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                         and "out of memory" in str(error).lower())


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "npu":
        torch.npu.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory since the last reset. On cpu/mps: the process's peak resident set size
    (ru_maxrss, whole process, cannot be reset: measure one configuration per process)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "npu":
        return int(torch.npu.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)
    return device.type


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """nnU-Net's choice: cudnn.benchmark on for training speed (fixed patch size), unless deterministic."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def memory_format(device: torch.device, spatial_dims: int) -> torch.memory_format:
    """The memory format nnpp trains in on ``device`` for a network with ``spatial_dims`` spatial axes (applied to
    the network and to every batch). channels_last_3d for 3D on the CPU, where oneDNN's NDHWC convolutions made the
    UNet++ step 0.71-0.80x the contiguous one (fp32; benchmarks/RESULTS.md); contiguous otherwise (2D, and cuda/npu/mps:
    not measured yet)."""
    if device.type == "cpu" and spatial_dims == 3:
        return torch.channels_last_3d
    return torch.contiguous_format


def keeps_logits_on_device(device: torch.device) -> bool:
    """Sliding-window logits can stay in device memory (nnU-Net's perform_everything_on_device; nnU-Net allows it
    on cuda only, npu has the same memory model)."""
    return device.type in ("cuda", "npu")


def pins_host_memory(device: torch.device) -> bool:
    """Whether host batches should be page-locked before the copy: host-to-device copies from pageable memory
    are synchronous on cuda and npu. (nnU-Net's augmenter pins on cuda only; nnpp pins for npu itself.)"""
    return device.type in ("cuda", "npu")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device``, asynchronous where the device allows it (pinned source, non_blocking)."""
    if pins_host_memory(device) and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def compile_supported(device: torch.device) -> bool:
    """torch.compile is nnU-Net's default on CUDA only (CPU 2D crashes, mps/npu unsupported)."""
    return device.type == "cuda"


# ------------------------------------------------------------------------------------------- distributed
def dist_backend(device: torch.device) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """What DistributedDataParallel wants as device_ids: the index on accelerators, None on the CPU."""
    return [device.index or 0] if device.type in ("cuda", "npu") else None


# -------------------------------------------------------------------------------------------- profiling
def profiler_activities(device: torch.device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    elif device.type == "npu":
        import_torch_npu()
        import torch_npu.profiler as npu_prof  # noqa: F401 (NPU traces need torch_npu's profiler)
        acts = [npu_prof.ProfilerActivity.CPU, npu_prof.ProfilerActivity.NPU]
    return acts


def make_profiler(device: torch.device):
    """A started-on-enter profiler for ``device``: torch.profiler, or torch_npu's profiler on NPU (whose
    traces carry the NPU timeline). Both export chrome traces; read the summary with :func:`profiler_table`."""
    activities = profiler_activities(device)  # imports torch_npu on NPU
    if device.type == "npu":
        import torch_npu.profiler as npu_prof
        return npu_prof.profile(activities=activities)
    return torch.profiler.profile(activities=activities)


def profiler_table(prof, device: torch.device, row_limit: int = 40) -> str:
    """The key-averages table of a finished :func:`make_profiler` run, sorted by self time on ``device``.
    torch_npu's profiler has no key_averages: on NPU the text says where to look instead."""
    if device.type == "npu":
        return "torch_npu's profiler has no key_averages table; open the trace, or analyse it with msprof-analyze\n"
    sort_by = "self_cpu_time_total" if device.type == "cpu" else "self_device_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)


# -------------------------------------------------------------------------------------------------- AMP
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), so that bf16 autocast speeds up
    convolutions instead of emulating them."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cpu_capability() -> str:
    """This CPU as speed figures must name it: torch's kernel level (``torch.backends.cpu.get_cpu_capability()``:
    AVX2, AVX512, ...) and whether bfloat16 is native (AVX512-BF16 or AMX) or emulated, e.g. "AVX512, native bf16"."""
    level = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    return f"{level}, {'native' if cpu_has_native_bf16() else 'no native'} bf16"


def machine_info() -> dict:
    """The machine a speed figure was taken on, for benchmark JSON: CPU model, visible cores, torch version, torch's
    CPU kernel level and whether bf16 is native (``cpu_capability``, ``native_bf16``) and the load average now."""
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "cpu_capability": cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "load_average": os.getloadavg()}


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "npu":
        return bool(getattr(torch.npu, "is_bf16_supported", lambda: False)())
    return device.type in ("cpu", "mps")


def resolve_amp_mode(mode: str, device: torch.device) -> str:
    mode = mode or "auto"
    canonical = {m.lower(): m for m in AMP_CHOICES}
    if mode.lower() not in canonical:
        raise NnppError(f"unknown AMP mode '{mode}'; choose one of {', '.join(AMP_CHOICES)}")
    mode = canonical[mode.lower()]
    if mode == "auto":
        if device.type in ("cuda", "npu"):
            return "O1"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "O0"
    if mode == "bf16" and not bf16_supported(device):
        raise NnppError(f"--amp bf16: {device_name(device)} has no bfloat16 support; use --amp O1 or O0")
    return mode


def make_grad_scaler(device: torch.device):
    if device.type == "npu":
        import_torch_npu()
        return torch.npu.amp.GradScaler()
    return torch.amp.GradScaler(device.type)


@dataclass
class Amp:
    """Mixed precision for one device: ``with amp.autocast(): ...`` and ``amp.scaler`` (None unless O1)."""
    mode: str
    device: torch.device
    scaler: object | None = None

    @property
    def dtype(self) -> torch.dtype:
        return {"O0": torch.float32, "O1": torch.float16, "bf16": torch.bfloat16}[self.mode]

    def autocast(self, exclusive: bool = False):
        """The mode's autocast. ``exclusive``: also switch off an enclosing autocast for O0 (nnU-Net's validation
        enters fp16 autocast on CUDA by itself; the innermost autocast wins). mps rejects autocast contexts
        even when disabled, so there O0 stays a no-op."""
        if self.mode == "O0":
            if exclusive and self.device.type != "mps":
                return torch.autocast(device_type=self.device.type, enabled=False)
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


    def backward_and_step(self, loss: torch.Tensor, optimizer, clip_groups=None, max_norm: float = 12.0) -> None:
        """Backward (loss scaled under O1), gradient-norm clipping on the unscaled gradients of each parameter group
        of ``clip_groups`` (a list of parameter iterables, each clipped to ``max_norm`` on its own) when given,
        optimizer step (skipped by the scaler when gradients overflowed)."""
        if self.scaler is None:
            loss.backward()
            for group in clip_groups or ():
                torch.nn.utils.clip_grad_norm_(group, max_norm)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip_groups is not None:
            self.scaler.unscale_(optimizer)
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, max_norm)
        self.scaler.step(optimizer)
        self.scaler.update()


def make_amp(mode: str, device: torch.device) -> Amp:
    mode = resolve_amp_mode(mode, device)
    return Amp(mode, device, make_grad_scaler(device) if mode == "O1" else None)
