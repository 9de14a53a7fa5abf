"""UNet++ keeps a channels_last_3d activation channels_last through its norms (nnpp.nets.norms)."""
import torch
from torch import nn

from nnpp.nets import plans
from nnpp.nets.norms import ChannelsLastInstanceNorm3d
from nnpp.nets.plans import UNETPP_CLASS

CL = torch.channels_last_3d
KWARGS = plans.arch_kwargs([8, 16, 32, 64], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]])


def _unetpp():
    torch.manual_seed(0)
    return plans.build_network(UNETPP_CLASS, KWARGS, 1, 3)


def test_no_layout_flip_inside_a_channels_last_unetpp():
    """Every convolution (and transposed convolution) of a channels_last_3d UNet++ fed a channels_last_3d batch
    receives a channels_last_3d tensor: no norm turns it contiguous (torch's InstanceNorm3d does)."""
    net = _unetpp().to(memory_format=CL)
    flipped = []
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            m.register_forward_pre_hook(
                lambda mod, args, name=name: None if args[0].is_contiguous(memory_format=CL) else flipped.append(name))
    out = net(torch.randn(2, 1, 16, 32, 32).contiguous(memory_format=CL))
    assert not flipped, f"{len(flipped)} convolution(s) got a contiguous input, e.g. {flipped[:3]}"
    assert out[0].is_contiguous(memory_format=CL)


def test_same_module_same_numbers():
    """The layout-preserving norm is a drop-in: same state-dict keys as torch's InstanceNorm3d, and the network
    computes the same outputs in either memory format (so fp32 checkpoints and predictions are unchanged)."""
    net = _unetpp().eval()
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(type(m) is ChannelsLastInstanceNorm3d for m in norms)
    stock = _unetpp().eval()
    for m in stock.modules():
        if type(m) is ChannelsLastInstanceNorm3d:
            m.__class__ = nn.InstanceNorm3d
    stock.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        ref = stock(x)
        same = net(x)  # contiguous input: torch's own path
        cl = net.to(memory_format=CL)(x.contiguous(memory_format=CL))
    torch.testing.assert_close(same, ref, rtol=0, atol=0)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
