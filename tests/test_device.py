"""Device layer: resolution, AMP modes, backends; and the rule that only nnpp/device.py touches devices."""
import ast
import pathlib
import types

import pytest
import torch

from nnpp import NnppError
from nnpp import device as dev

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE_MODULES = {"cuda", "npu", "mps", "backends"}


def device_calls(source: str):
    """Line numbers where ``source`` touches torch.cuda / torch.npu / torch.mps / torch.backends / torch_npu or
    calls ``.cuda()``.

    Parsed, not grepped: names in strings, comments and docstrings (error messages that mention
    torch_npu, say) are not calls; ``import torch_npu``, ``torch.cuda.x``, ``x.cuda()``,
    ``from torch import npu``, ``getattr(torch, "cuda")`` and ``import_module("torch_npu")`` are.
    """
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in DEVICE_MODULES and isinstance(node.value, ast.Name) \
                and node.value.id == "torch":
            hits.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            hits.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id == "torch_npu":
            hits.append(node.lineno)
        elif isinstance(node, ast.Import) and any(
                a.name.split(".")[0] == "torch_npu" or a.name.startswith(tuple(f"torch.{m}" for m in DEVICE_MODULES))
                for a in node.names):
            hits.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module.split(".")[0] == "torch_npu"
                or node.module.startswith(tuple(f"torch.{m}" for m in DEVICE_MODULES))
                or (node.module == "torch" and any(a.name in DEVICE_MODULES for a in node.names))):
            hits.append(node.lineno)
        elif isinstance(node, ast.Call) and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str)
                and (a.value.split(".")[0] == "torch_npu" or a.value in DEVICE_MODULES
                     or a.value.startswith(tuple(f"torch.{m}" for m in DEVICE_MODULES)))
                for a in node.args) and _callee(node) in ("import_module", "__import__", "getattr", "find_spec"):
            hits.append(node.lineno)
    return sorted(set(hits))


def _callee(call):
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)


def test_only_device_module_touches_devices():
    """No Python file of the project but nnpp/device.py calls torch.cuda, torch.npu, torch.mps, torch.backends,
    torch_npu or .cuda()."""
    offenders, scanned = [], 0
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "nnpp/device.py" or "/." in f"/{rel}" or rel.startswith(("build/", "venv/", ".venv/")):
            continue
        source = path.read_text()
        scanned += 1
        lines = source.splitlines()
        offenders += [f"{rel}:{n}: {lines[n - 1].strip()}" for n in device_calls(source)]
    assert offenders == []
    assert scanned > 20 and device_calls((ROOT / "nnpp" / "device.py").read_text())  # the scan sees the real thing


@pytest.mark.parametrize("line", [
    "x = x.cuda()", "torch.cuda.synchronize()", "import torch_npu", "import torch_npu.profiler as p",
    "torch.npu.empty_cache()", "from torch import cuda", "from torch_npu.contrib import transfer_to_npu",
    "m = importlib.import_module('torch_npu')", "getattr(torch, 'npu').set_device(0)",
    "net.to('cpu').cuda(0)", "from torch.cuda import amp", "torch.backends.cudnn.benchmark = True",
    "torch.mps.synchronize()", "from torch.backends import cudnn", "from torch import backends",
    "import torch.backends.cudnn as cudnn", "getattr(torch, 'mps')"])
def test_scan_catches_a_violation(line):
    assert device_calls(line), line


@pytest.mark.parametrize("line", [
    "raise NnppError('-device npu needs the torch_npu package')", "# torch.cuda.synchronize()",
    "def test_npu_without_torch_npu(): pass", "x = dev.synchronize(device)", "y = torch.device('cuda')"])
def test_scan_ignores_text_and_the_device_layer_calls(line):
    assert device_calls(line) == [], line


def test_unknown_device_is_a_clear_error():
    with pytest.raises(NnppError, match="unknown device 'tpu'"):
        dev.resolve_device("tpu")


@pytest.mark.skipif(dev.npu_available(), reason="this machine has a working torch_npu")
def test_npu_without_torch_npu():
    with pytest.raises(NnppError, match="torch_npu"):
        dev.resolve_device("npu")


@pytest.mark.parametrize("mode,dtype,scaled", [("O0", torch.float32, False), ("O1", torch.float16, True),
                                               ("bf16", torch.bfloat16, False)])
def test_amp_modes_on_cpu(mode, dtype, scaled):
    amp = dev.make_amp(mode, torch.device("cpu"))
    assert (amp.scaler is not None) == scaled
    lin = torch.nn.Linear(4, 4)
    with amp.autocast():
        y = lin(torch.randn(2, 4))
    assert y.dtype == dtype


def test_amp_auto_and_bad_mode(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.make_amp("auto", torch.device("cpu")).mode == "O0"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)  # AVX512-BF16 / AMX: bf16 measured faster
    assert dev.make_amp("auto", torch.device("cpu")).mode == "bf16"
    assert dev.resolve_amp_mode("auto", torch.device("mps")) == "O0"
    assert dev.resolve_amp_mode("auto", torch.device("cuda", 0)) == "O1"
    npu = types.SimpleNamespace(type="npu", index=0)  # torch.device("npu") exists only once torch_npu is imported
    assert dev.resolve_amp_mode("auto", npu) == "O1"
    assert dev.resolve_amp_mode("o1", torch.device("cpu")) == "O1"
    with pytest.raises(NnppError, match="unknown AMP mode 'O2'"):
        dev.make_amp("O2", torch.device("cpu"))


def test_auto_prefers_an_accelerator(monkeypatch):
    """``auto`` picks npu over cuda over mps over cpu, with what this machine reports replaced by a table."""
    for present, expected in (({"npu", "cuda", "cpu"}, "npu"), ({"cuda", "mps", "cpu"}, "cuda"),
                              ({"mps", "cpu"}, "mps"), ({"cpu"}, "cpu")):
        monkeypatch.setattr(dev, "_available", lambda kind, present=present: kind in present)
        assert dev.auto_device_type() == expected


def test_rank_beyond_the_visible_devices(monkeypatch):
    monkeypatch.setattr(dev, "_available", lambda kind: True)
    monkeypatch.setattr(dev, "device_count", lambda kind: 2)
    with pytest.raises(NnppError, match="local rank 2 needs cuda:2 but only 2 cuda device"):
        dev.resolve_device("cuda", local_rank=2)


def test_host_to_device_copies_pin_on_accelerators(monkeypatch):
    """Batches are page-locked before the copy on cuda and npu (nnU-Net's augmenter pins on cuda only), so the
    copy can be asynchronous; the copy is always non_blocking."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, device, non_blocking=False: calls.append(non_blocking) or t)
    for kind, expected in (("npu", ["pin", True]), ("cuda", ["pin", True]), ("cpu", [True])):
        calls.clear()
        dev.to_device(torch.zeros(2), types.SimpleNamespace(type=kind, index=0))
        assert calls == expected, kind


def test_o0_switches_off_an_enclosing_autocast():
    lin = torch.nn.Linear(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with dev.make_amp("O0", torch.device("cpu")).autocast(exclusive=True):
            assert lin(torch.randn(2, 4)).dtype == torch.float32
        with dev.make_amp("O0", torch.device("cpu")).autocast():
            assert lin(torch.randn(2, 4)).dtype == torch.bfloat16  # not exclusive: the enclosing one holds


def test_native_bf16_probe_without_the_probes(monkeypatch):
    """A torch without the CPU-feature probes: no native bf16 assumed (auto stays O0)."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert dev.cpu_has_native_bf16() is False


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "npu", "mps"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_memory_format_fits_the_batch_rank(device_type, spatial_dims):
    """Whatever format the device layer picks for a network must apply to its batches (channels_last_3d on a 2D
    batch raises) and to its weights. (That the format survives a UNet++ forward: tests/test_norms.py; that the
    trainer applies it: tests/test_trainer.py.)"""
    fmt = dev.memory_format(types.SimpleNamespace(type=device_type, index=0), spatial_dims)  # no torch_npu here
    batch = torch.zeros(2, 3, *(4,) * spatial_dims).contiguous(memory_format=fmt)
    assert batch.is_contiguous(memory_format=fmt)
    conv = (torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d)(3, 4, 3).to(memory_format=fmt)
    assert conv(batch).shape[:2] == (2, 4)


def test_cpu_capability_names_bf16(monkeypatch):
    """Speed figures name the CPU: torch's kernel level and whether bf16 is native."""
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    level, bf16 = dev.cpu_capability().split(", ")
    assert level and bf16 == "no native bf16"
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert dev.cpu_capability() == f"{level}, native bf16"


@pytest.mark.parametrize("mode", ["O0", "O1"])
def test_each_clip_group_is_clipped_on_its_own(mode):
    """loss = 3a + 4000b with SGD lr 1: unclipped gradients 3 and 4000. Groups [a], [b] at max norm 12: a keeps its
    gradient 3 (step to -2), b's is cut to 12 (step to -11); one group [a, b] would have shrunk a's too (norm 4000)."""
    a, b = torch.nn.Parameter(torch.ones(())), torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([a, b], lr=1.0)
    amp = dev.make_amp(mode, torch.device("cpu"))
    amp.backward_and_step(3 * a + 4000 * b, opt, [[a], [b]], 12)
    assert a.item() == pytest.approx(-2.0) and b.item() == pytest.approx(1 - 12, rel=1e-4)
    a.data.fill_(1.0)
    b.data.fill_(1.0)
    opt.zero_grad()
    amp.backward_and_step(3 * a + 4000 * b, opt, [[a, b]], 12)
    assert a.item() == pytest.approx(1 - 3 * 12 / 4000.0011, rel=1e-4)
