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
