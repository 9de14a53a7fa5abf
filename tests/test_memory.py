"""UNet++'s feature-map count (what nnU-Net's planner calls) and activation checkpointing of the nested nodes."""
import pytest
import torch

from nnpp.nets import plans
from nnpp.nets import unetpp
from nnpp.nets.plans import PLAIN_UNET_CLASS, UNETPP_CLASS
from nnpp.nets.unetpp import saved_activation_bytes

TINY = plans.arch_kwargs([2, 4, 8], [[1, 1], [2, 2], [2, 2]], n_conv=1)


def build(kwargs, classes=2, mode=None, cls=UNETPP_CLASS, ds=True):
    kwargs = dict(kwargs)
    if mode is not None:
        kwargs["checkpoint_nodes"] = mode
    return plans.build_network(cls, kwargs, 1, classes, deep_supervision=ds)


@pytest.mark.parametrize("mode, ds, expected", [
    # 2D, 3 stages (2, 4, 8 features), 1 conv per stage, 8x8 input, 2 classes; nnU-Net units (elements):
    # encoder 2*64 + 4*16 + 8*4 = 224 (PlainConvEncoder's own count)
    # X01: conv 2*64 + concat 2 maps * 2 * 64 / 2 = 256; X11: 4*16 + 2*4*16/2 = 128; X02: 2*64 + 3*2*64/2 = 320
    # heads: 2 x 2 classes x 64 = 256 (one head without deep supervision: 128)
    ("none", True, 224 + 256 + 128 + 320 + 256),
    ("none", False, 224 + 256 + 128 + 320 + 128),
    # checkpointed nodes keep their output (half weight: 2*64/2, 4*16/2, 2*64/2) + the largest node (X02) once
    ("node", True, 224 + 64 + 32 + 64 + 320 + 256),
    # cat_conv1 keeps no concatenation: the conv blocks' counts 128 + 64 + 128
    ("cat_conv1", True, 224 + 128 + 64 + 128 + 256),
])
def test_feature_map_count_by_hand(mode, ds, expected):
    assert build(TINY, mode=mode, ds=ds).compute_conv_feature_map_size((8, 8)) == expected


def test_count_rejects_batch_or_channel_axes():
    with pytest.raises(ValueError, match="spatial size only"):
        build(TINY).compute_conv_feature_map_size((1, 8, 8))


def test_bad_checkpoint_mode():
    with pytest.raises(ValueError, match="checkpoint_nodes must be one of"):
        build(TINY, mode="everything")


SHAPES = {  # three plan shapes: isotropic 3D, anisotropic 3D (1x3x3 first kernel, 1x2x2 strides), deep 2D
    "3d": (plans.arch_kwargs([8, 16, 32, 64], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]), (32, 32, 32), 3),
    "3d-aniso": (plans.arch_kwargs([8, 16, 32, 64, 64], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                                   kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 4), (16, 48, 48), 2),
    "2d": (plans.arch_kwargs([8, 16, 32, 64, 128, 128], [[1, 1]] + [[2, 2]] * 5), (128, 128), 4),
}


def peak_training_bytes(net, x) -> int:
    """Peak CPU memory of one forward + backward (activations, temporaries, gradients; parameters excluded),
    measured by torch's MemTracker (it tracks every tensor storage, on any device)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(net)
    with tracker:
        out = net(x)
        sum(o.square().mean() for o in out).backward()
    peak = {str(k).split(".")[-1]: v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    return peak["Total"] - peak["PARAM"]


@pytest.mark.parametrize("shape", SHAPES)
def test_estimate_matches_measured_memory(shape):
    """nnU-Net's count is in PlainConvUNet's units, so what must hold is the ratio: UNet++'s count over
    PlainConvUNet's equals UNet++'s measured memory over PlainConvUNet's, within 20%, for each checkpointing
    mode. Measured two ways: bytes saved for backward (unchecked and cat_conv1: what the count models) and the
    forward+backward peak (all modes; includes the node recomputed during backward)."""
    kwargs, patch, classes = SHAPES[shape]
    x = torch.randn(1, 1, *patch)
    torch.manual_seed(0)
    plain = build(kwargs, classes, cls=PLAIN_UNET_CLASS)
    plain_count = int(plain.compute_conv_feature_map_size(patch))
    plain_saved, plain_peak = saved_activation_bytes(plain, x), peak_training_bytes(plain, x)
    for mode in ("none", "node", "cat_conv1"):
        net = build(kwargs, classes, mode=mode)
        estimate = int(net.compute_conv_feature_map_size(patch)) / plain_count
        peak = peak_training_bytes(net, x) / plain_peak
        assert abs(estimate / peak - 1) <= 0.2, (mode, estimate, peak)
        if mode != "node":  # a checkpointed node's recompute is transient: saved bytes cannot see it
            saved = saved_activation_bytes(net, x) / plain_saved
            assert abs(estimate / saved - 1) <= 0.2, (mode, estimate, saved)


def test_saved_bytes_by_hand():
    """saved_activation_bytes on a one-conv network: conv saves its input, the norm its input (the conv output),
    LeakyReLU (in place) its output; the loss saves the output. Input 1x1x4x4 fp32, 2 channels out."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.InstanceNorm2d(2),
                              torch.nn.LeakyReLU(inplace=True))
    # input 16*4 + conv output 32*4 + norm output (= LeakyReLU's, in place) 32*4; norm's mean/rstd: 2 x (1*2)*4
    assert saved_activation_bytes(net, torch.randn(1, 1, 4, 4)) == 16 * 4 + 32 * 4 + 32 * 4 + 2 * 2 * 4


@pytest.mark.parametrize("mode", ["node", "cat_conv1"])
def test_checkpointing_gives_identical_gradients(mode):
    kwargs, patch, classes = SHAPES["3d"]
    torch.manual_seed(0)
    ref = build(kwargs, classes, mode="none")
    net = build(kwargs, classes, mode=mode)
    net.load_state_dict(ref.state_dict())
    assert list(net.state_dict()) == list(ref.state_dict())  # no new keys: checkpoints load either way
    x = torch.randn(2, 1, 16, 16, 16)
    for model in (ref, net):
        sum(o.square().mean() for o in model(x)).backward()
    for (name, a), b in zip(ref.named_parameters(), net.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_activation_bytes(net, x) < 0.75 * saved_activation_bytes(ref, x)


def test_checkpointing_only_with_gradients(monkeypatch):
    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(unetpp, "checkpoint", counting)
    net = build(TINY, mode="node")
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        net(x)
    assert calls == []
    net(x)
    assert calls == [False] * 3  # the 3 nested nodes X01, X11, X02, non-reentrant
    net.checkpoint_nodes = False
    net(x)
    assert len(calls) == 3


def test_checkpointing_under_torch_compile():
    """Checkpointed nodes trace through torch.compile (dynamo + AOT autograd; the eager backend keeps the test fast
    on the CPU) and give eager's gradients."""
    torch.manual_seed(0)
    ref = build(TINY, mode="none")
    net = build(TINY, mode="node")
    net.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 8, 8)
    sum(o.square().mean() for o in ref(x)).backward()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=False)
    sum(o.square().mean() for o in compiled(x)).backward()
    for (name, a), b in zip(ref.named_parameters(), net.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------ the prediction memory rule under ONNX
ORT_PEAK_CHILD = r"""
import json, re, sys
from types import SimpleNamespace
import torch
from nnpp.deploy.ort import OrtNetwork, make_session
from nnpp.predictor.tiles import nnppPredictor
path, count, classes, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
patch = [int(p) for p in sys.argv[5].split(",")]
# this process's peak RSS (bytes); not getrusage's ru_maxrss, which a child started by (v)fork + exec inherits from
# its parent (the test process, gigabytes after other tests)
peak = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
network = OrtNetwork({"0": make_session(path, "cpu", threads=2)}, feature_map_size=count)
pred = nnppPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False, tta_batch=1)
pred.network, pred.allowed_mirroring_axes = network, (0, 1, 2)
pred.configuration_manager = SimpleNamespace(patch_size=patch)
pred.label_manager = SimpleNamespace(num_segmentation_heads=classes)
tile = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))
pred.predict_tiles(tile)  # nnU-Net's one copy per call: 8 calls of batch 1
one, result = peak(), {}
for b in (2, n):  # the 8 mirrored copies in calls of 2, then of n
    pred.tta_batch = pred.tta_cap = b
    pred.predict_tiles(tile)
    network.feature_map_size = count
    result[b] = {"measured": peak() - one, "rule": pred.tta_surplus_bytes(b)}
    network.feature_map_size = 0  # the rule as it was for ONNX models: no activations
    result[b]["rule_without_activations"] = pred.tta_surplus_bytes(b)
print(json.dumps(result))
"""


def test_onnx_memory_rule_against_a_measured_peak(tmp_path):
    """The memory rule of --tta_batch auto for an ONNX Runtime model counts what a bigger batch adds in the session:
    a UNet++ (8-32 features, 32x48x48 patch) exported to ONNX runs its 8 mirrored copies of a tile as nnU-Net does
    (8 calls of batch 1), then in calls of 2, then in one call of 8, in a fresh process (nnpp's session settings);
    the peak RSS rises by what ONNX Runtime keeps for the bigger batches (measured ~25 and ~145 MiB: 1.06 and 6.3
    samples' worth of the exported network's own count, 23 MiB a sample in fp32) and the rule's estimate (the whole
    batch's activations, 2 and 8 samples, + the extra fp32 logits: 47 and 190 MiB) must cover both. Before, the rule
    counted 0 activations for an ONNX model (0.8 and 6 MiB of logits here): it allowed batches whose memory it never
    saw."""
    import json
    import os
    import subprocess
    import sys
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    if not os.path.isfile("/proc/self/status"):
        pytest.skip("the peak RSS is read from /proc/self/status (Linux)")

    from nnpp.deploy.export import export_network
    patch, classes = (32, 48, 48), 3
    torch.manual_seed(0)
    net = build(plans.arch_kwargs([8, 16, 32], [[1, 1, 1], [2, 2, 2], [2, 2, 2]]), classes, ds=False).eval()
    count = int(net.compute_conv_feature_map_size(patch))
    path = str(tmp_path / "unetpp.onnx")
    export_network(net, path, 1, patch, exporter="torchscript")
    p = subprocess.run([sys.executable, "-c", ORT_PEAK_CHILD, path, str(count), str(classes), "8",
                        ",".join(map(str, patch))], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    mib = {b: {k: round(v / 2 ** 20, 1) for k, v in x.items()} for b, x in r.items()}
    assert r["8"]["measured"] > 50 * 2 ** 20, mib  # the measurement sees the batch (7 samples' activations)
    for b in ("2", "8"):
        assert r[b]["rule"] >= r[b]["measured"], mib
    assert r["8"]["rule_without_activations"] < r["8"]["measured"] / 4, mib  # what the rule missed before
