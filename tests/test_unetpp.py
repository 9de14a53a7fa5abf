"""UNet++ network: shapes, gradients to every head, pruning, deep-supervision switching, checkpoints."""
import itertools

import pytest
import torch

from nnpp.nets import UNetPlusPlus


def plans_kwargs(dim: int, depth: int, features=4, conv_bias=True) -> dict:
    """UNetPlusPlus constructor arguments from nnU-Net-style plans (nnpp.nets.plans), with anisotropic strides and
    kernels: the pooling axis rotates so each axis is pooled about depth/dim times (small inputs, any depth)."""
    from pydoc import locate

    from nnpp.nets.plans import REQUIRES_IMPORT, arch_kwargs
    n_stages = depth + 1
    strides, kernels = [[1] * dim], [[3] * dim]
    for s in range(depth):
        if dim == 3:  # all axes but one pooled, the skipped axis rotating
            stride = [1 if a == s % 3 else 2 for a in range(3)]
        else:  # 2D: both axes, then one at a time
            stride = [2, 2] if s < 2 else [2 if a == s % 2 else 1 for a in range(2)]
        strides.append(stride)
        kernels.append([1 if dim == 3 and a == 0 and s == 0 else 3 for a in range(dim)])  # one (1,3,3) level
    kw = arch_kwargs([min(features * 2 ** i, 32) for i in range(n_stages)], strides, kernels, conv_bias=conv_bias)
    kw.update({k: locate(kw[k]) if kw[k] else None for k in REQUIRES_IMPORT})
    return dict(kw, input_channels=1, num_classes=3)


def input_shape(kw: dict, batch=2):
    size = [1] * len(kw["strides"][0])
    for s in kw["strides"]:
        size = [a * b for a, b in zip(size, s)]
    return (batch, kw["input_channels"], *[2 * a for a in size])


@pytest.mark.parametrize("dim,depth", list(itertools.product([2, 3], [3, 4, 5, 6])))
def test_output_shapes(dim, depth):
    kw = plans_kwargs(dim, depth)
    x = torch.randn(input_shape(kw))
    net = UNetPlusPlus(**kw, deep_supervision=True)
    out = net(x)
    assert isinstance(out, list) and len(out) == depth == net.depth
    assert all(o.shape == (x.shape[0], 3, *x.shape[2:]) for o in out)
    net.decoder.deep_supervision = False
    single = net(x)
    assert torch.is_tensor(single) and single.shape == out[0].shape


def test_seven_stage_2d_plan():
    """nnU-Net 2D plans have 7-8 stages (e.g. Task03 2d: 512x512 patch, 8 stages); a 2D net of that depth."""
    kw = plans_kwargs(2, 7, features=2)
    kw["strides"] = [[1, 1]] + [[2, 2]] * 7
    kw["kernel_sizes"] = [[3, 3]] * 8
    out = UNetPlusPlus(**kw, deep_supervision=True)(torch.randn(1, 1, 256, 256))
    assert len(out) == 7 and out[0].shape == (1, 3, 256, 256)


def test_every_parameter_gets_a_gradient():
    """One backward through nnpp's deep-supervision loss reaches every parameter, every head included.
    conv_bias=False: a conv bias directly before InstanceNorm is cancelled by the mean subtraction, so its
    gradient is zero in exact arithmetic whatever the loss (nnU-Net plans use such biases)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(0)
    kw = plans_kwargs(3, 3, conv_bias=False)
    net = UNetPlusPlus(**kw, deep_supervision=True)
    net.apply(net.initialize)
    x = torch.randn(input_shape(kw))
    target = torch.randint(0, 3, (x.shape[0], 1, *x.shape[2:])).float()
    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                                 dice_class=MemoryEfficientSoftDiceLoss), [1 / 3] * 3)
    loss(net(x), [target] * 3).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    assert len(net.decoder.seg_layers) == 3  # one head per top-row node, all reached above


def test_probe_heads_learn_alone_and_the_network_learns_from_the_deepest_head():
    """decoder.probe_heads (shallow_heads="probe"): the loss of the heads X^{0,1..L-1} reaches exactly their own
    1x1 convs; X^{0,L}'s loss reaches its head and the network body, not the other heads. Outputs are unchanged."""
    torch.manual_seed(0)
    kw = plans_kwargs(2, 3, conv_bias=False)
    net = UNetPlusPlus(**kw, deep_supervision=True)
    net.apply(net.initialize)
    x = torch.randn(input_shape(kw))
    plain = net(x)
    net.decoder.probe_heads = True
    outs = net(x)
    assert all(torch.equal(a, b) for a, b in zip(plain, outs))

    def reached(loss) -> set:
        net.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    shallow = reached(sum(o.square().mean() for o in outs[1:]))  # heads on X^{0,2}, X^{0,1}
    assert shallow == {f"decoder.seg_layers.{j}.{w}" for j in (0, 1) for w in ("weight", "bias")}
    deep = reached(outs[0].square().mean())  # X^{0,3}
    assert "decoder.seg_layers.2.weight" in deep and "encoder.stages.0.0.convs.0.conv.weight" in deep
    assert not deep & {f"decoder.seg_layers.{j}.weight" for j in (0, 1)}
    assert len(deep) > 0.9 * (len(list(net.named_parameters())) - 4)  # the whole body (some InstanceNorm biases cancel)


def test_probe_grad_passes_that_fraction_of_the_probe_heads_gradient_to_the_network():
    """decoder.probe_grad = s: the shallow heads' loss reaches the body with exactly s times the gradient it has when
    the heads are trained, and their own 1x1 convs with all of it; X^{0,L}'s gradient and every output unchanged."""
    torch.manual_seed(0)
    kw = plans_kwargs(2, 3, conv_bias=False)
    net = UNetPlusPlus(**kw, deep_supervision=True)
    net.apply(net.initialize)
    x = torch.randn(input_shape(kw))

    def grads(probe_grad, loss=lambda outs: sum(o.square().mean() for o in outs[1:]) + 0.0 * outs[0].sum()):
        """Outputs and parameter gradients of ``loss`` (default: the shallow heads') with probe_grad (None: trained)."""
        net.decoder.probe_heads, net.decoder.probe_grad = probe_grad is not None, probe_grad or 0.0
        net.zero_grad(set_to_none=True)
        outs = net(x)
        loss(outs).backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    outs_trained, trained = grads(None)
    outs_quarter, quarter = grads(0.25)
    assert all(torch.equal(a, b) for a, b in zip(outs_trained, outs_quarter))
    heads = {f"decoder.seg_layers.{j}.{w}" for j in (0, 1) for w in ("weight", "bias")}
    body = [n for n in trained if n not in heads and trained[n].abs().sum() > 0]
    assert "encoder.stages.0.0.convs.0.conv.weight" in body and len(body) > 10
    for n in body:
        torch.testing.assert_close(quarter[n], 0.25 * trained[n], rtol=1e-4, atol=1e-7)
    for n in heads:
        torch.testing.assert_close(quarter[n], trained[n])
    _, probe = grads(0.0)  # a probe: the body gets nothing from the shallow heads
    assert {n for n, g in probe.items() if g.abs().sum() > 0} == heads

    def deepest(outs):  # X^{0,L}'s loss alone: its gradient does not depend on probe_grad
        return outs[0].square().mean()
    (_, full), (_, scaled) = grads(None, deepest), grads(0.25, deepest)
    assert full.keys() == scaled.keys() and "encoder.stages.0.0.convs.0.conv.weight" in full
    assert all(torch.equal(full[n], scaled[n]) for n in full)


@pytest.mark.parametrize("dim,depth", [(3, 4), (2, 3)])
def test_nested_wiring(dim, depth):
    """Read off the running network with forward hooks: node X^{i,j} receives exactly
    cat(X^{i,0}, ..., X^{i,j-1}, up_{i,j}(X^{i+1,j-1})), where X^{i,0} is encoder stage i's output and the
    upsampling of (i, j) receives X^{i+1,j-1}; head j (output index L - j) sees X^{0,j}."""
    torch.manual_seed(0)
    kw = plans_kwargs(dim, depth)
    net = UNetPlusPlus(**kw, deep_supervision=True).eval()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].detach(), output.detach())
        return hook
    for s, stage in enumerate(net.encoder.stages):
        stage.register_forward_hook(record(("enc", s)))
    for key, node in net.decoder.nodes.items():
        node.register_forward_hook(record(("node", *map(int, key.split("_")))))
    for key, up in net.decoder.up.items():
        up.register_forward_hook(record(("up", *map(int, key.split("_")))))
    for j, head in enumerate(net.decoder.seg_layers, start=1):
        head.register_forward_hook(record(("head", j)))
    with torch.no_grad():
        outputs = net(torch.randn(input_shape(kw)))

    def X(i, j):
        return seen["enc", i][1] if j == 0 else seen["node", i, j][1]
    nodes = [(i, j) for j in range(1, depth + 1) for i in range(depth - j + 1)]
    assert sorted(k[1:] for k in seen if k[0] == "node") == sorted(nodes)
    for i, j in nodes:
        assert torch.equal(seen["up", i, j][0], X(i + 1, j - 1)), (i, j)
        expected = torch.cat([X(i, m) for m in range(j)] + [seen["up", i, j][1]], dim=1)
        assert torch.equal(seen["node", i, j][0], expected), (i, j)
    for j in range(1, depth + 1):
        assert torch.equal(seen["head", j][0], X(0, j))
        assert torch.equal(outputs[depth - j], seen["head", j][1])


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_pruned_output_equals_full_network_node(deep_supervision):
    torch.manual_seed(0)
    kw = plans_kwargs(3, 4)
    net = UNetPlusPlus(**kw, deep_supervision=True).eval()
    x = torch.randn(input_shape(kw))
    with torch.no_grad():
        full = net(x)  # [X^{0,4}, X^{0,3}, X^{0,2}, X^{0,1}]
        net.decoder.deep_supervision = deep_supervision
        for k in range(1, 5):
            pruned = net(x, depth=k)
            head = pruned[0] if deep_supervision else pruned
            torch.testing.assert_close(head, full[4 - k], rtol=0, atol=0)
            if deep_supervision:
                assert len(pruned) == k


def test_pruning_computes_only_needed_nodes():
    kw = plans_kwargs(3, 4)
    net = UNetPlusPlus(**kw, deep_supervision=False).eval()
    ran = []
    for name, node in itertools.chain(net.decoder.nodes.items(), net.decoder.up.items()):
        node.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    stages = []
    for s, stage in enumerate(net.encoder.stages):
        stage.register_forward_hook(lambda m, i, o, s=s: stages.append(s))
    net.prune_depth = 2
    with torch.no_grad():
        net(torch.randn(input_shape(kw)))
    assert sorted(set(ran)) == ["0_1", "0_2", "1_1"]
    assert stages == [0, 1, 2]
    with pytest.raises(ValueError, match="1..4"):
        net(torch.randn(input_shape(kw)), depth=5)


def test_checkpoint_loads_with_and_without_deep_supervision():
    kw = plans_kwargs(3, 3)
    with_ds = UNetPlusPlus(**kw, deep_supervision=True)
    without = UNetPlusPlus(**kw, deep_supervision=False)
    without.load_state_dict(with_ds.state_dict(), strict=True)
    with_ds.load_state_dict(without.state_dict(), strict=True)


def test_nnunet_switches_deep_supervision_through_wrappers():
    """nnU-Net's own set_deep_supervision_enabled (unwraps DDP and torch.compile) drives our decoder."""
    import types

    import torch.distributed as dist
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = plans_kwargs(3, 3)
    net = UNetPlusPlus(**kw, deep_supervision=True)
    x = torch.randn(input_shape(kw, batch=1))

    def switch(network, enabled, is_ddp=False):
        nnUNetTrainer.set_deep_supervision_enabled(types.SimpleNamespace(network=network, is_ddp=is_ddp), enabled)

    switch(net, False)
    assert torch.is_tensor(net(x))
    switch(torch.compile(net), True)  # OptimizedModule wrapper, never run
    assert net.decoder.deep_supervision is True

    from conftest import free_port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ddp = DDP(net)
        switch(ddp, False, is_ddp=True)
        assert torch.is_tensor(ddp(x))
        switch(ddp, True, is_ddp=True)
        assert isinstance(ddp(x), list)
    finally:
        dist.destroy_process_group()
