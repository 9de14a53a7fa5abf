"""Batched test-time mirroring (nnppPredictor): the logits of nnU-Net's own one-copy-per-call sliding window, with
the network called on batches of tiles x mirrors (bounded by tta_batch) in the network's memory format.

Tiny convolutional networks and a hand-set predictor state (patch size, labels, mirroring axes): only nnU-Net's
sliding-window code runs, no training."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nnpp import NnppError
from nnpp.predictor.resample import argmax_of_trilinear
from nnpp.predictor.tiles import nnppPredictor


class Recording(nn.Module):
    """A tiny conv net (instance norm, so samples in a batch stay independent) that records each call's input."""

    def __init__(self, dims: int, classes: int = 3, channels: int = 1):
        super().__init__()
        conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
        torch.manual_seed(0)
        self.body = nn.Sequential(conv(channels, 4, 3, padding=1), norm(4, affine=True), nn.LeakyReLU(),
                                  conv(4, 4, 3, padding=1), nn.LeakyReLU(), conv(4, classes, 1))
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last_3d)
                           if x.ndim == 5 else x.is_contiguous(memory_format=torch.channels_last)))
        return self.body(x)


def make(cls, net, patch, mirror_axes, **kw):
    p = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
            device=torch.device("cpu"), allow_tqdm=False, **kw)
    p.network = net.eval()
    p.configuration_manager = SimpleNamespace(patch_size=list(patch))
    p.label_manager = SimpleNamespace(num_segmentation_heads=3)
    p.allowed_mirroring_axes = mirror_axes
    return p


def image(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def nnunet_reference(net, patch, axes, img):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    ref = make(nnUNetPredictor, net, patch, axes)
    out = ref.predict_sliding_window_return_logits(img).float()
    batches = [b for b, *_ in net.calls]
    net.calls.clear()
    return out, batches


def assert_same_logits(ours, ref):
    assert ours.shape == ref.shape
    # both accumulate in nnU-Net's fp16 buffers: float error of the batched convolutions shows at fp16 resolution
    assert (ours - ref).abs().max() <= 2e-3 * max(1.0, ref.abs().max())
    assert (ours.argmax(0) == ref.argmax(0)).float().mean() >= 0.9999


def test_3d_mirrors_of_a_tile_are_one_batch_of_8():
    net, patch, axes = Recording(3), (8, 16, 16), (0, 1, 2)
    img = image((1, 12, 24, 24))  # 2 x 2 x 2 = 8 tiles at step 0.5
    ref, ref_batches = nnunet_reference(net, patch, axes, img)
    assert ref_batches == [1] * 64  # nnU-Net: 8 tiles x 8 copies, one call each
    ours = make(nnppPredictor, net, patch, axes).predict_sliding_window_return_logits(img).float()
    assert [b for b, *_ in net.calls] == [8] * 8
    assert_same_logits(ours, ref)


def test_tta_batch_bounds_the_batch_and_packs_several_tiles():
    net, patch, axes = Recording(3), (8, 16, 16), (0, 1, 2)
    img = image((1, 12, 24, 24))
    ref, _ = nnunet_reference(net, patch, axes, img)
    for tta_batch, expected in ((3, [3, 3, 2] * 8), (24, [24] * 2 + [16])):
        ours = make(nnppPredictor, net, patch, axes, tta_batch=tta_batch).predict_sliding_window_return_logits(img)
        assert [b for b, *_ in net.calls] == expected, tta_batch
        net.calls.clear()
        assert_same_logits(ours.float(), ref)
    with pytest.raises(NnppError, match="--tta_batch must be a positive integer"):
        make(nnppPredictor, net, patch, axes, tta_batch=0)


def test_2d_mirrors_are_batches_of_4_and_two_tiles_by_default():
    net, patch, axes = Recording(2), (16, 16), (0, 1)
    img = image((1, 3, 24, 24))  # a 2D configuration on a 3D image: 3 slices x 2 x 2 tiles
    ref, ref_batches = nnunet_reference(net, patch, axes, img)
    assert ref_batches == [1] * 48
    ours = make(nnppPredictor, net, patch, axes, tta_batch=4).predict_sliding_window_return_logits(img)
    assert [b for b, *_ in net.calls] == [4] * 12
    net.calls.clear()
    assert_same_logits(ours.float(), ref)
    ours = make(nnppPredictor, net, patch, axes).predict_sliding_window_return_logits(img)
    assert [b for b, *_ in net.calls] == [8] * 6
    assert_same_logits(ours.float(), ref)


def test_without_mirroring_tiles_are_batched():
    net, patch = Recording(3), (8, 16, 16)
    img = image((1, 12, 24, 24))
    ref, _ = nnunet_reference(net, patch, None, img)
    ours = make(nnppPredictor, net, patch, None, tta_batch=4).predict_sliding_window_return_logits(img)
    assert [b for b, *_ in net.calls] == [4, 4]
    assert_same_logits(ours.float(), ref)


def test_tiles_arrive_in_the_networks_memory_format():
    """A channels_last_3d network (nnpp's training format on the CPU) gets channels_last_3d tiles, a contiguous
    one contiguous tiles (nnU-Net's producer makes every tile contiguous). Two channels: with one, both layouts
    are the same strides."""
    net, patch, axes = Recording(3, channels=2), (8, 16, 16), (0,)
    img = image((2, 8, 16, 16))
    make(nnppPredictor, net, patch, axes).predict_sliding_window_return_logits(img)
    assert net.calls and all(c for _, c, _ in net.calls)
    net.calls.clear()
    net.to(memory_format=torch.channels_last_3d)
    make(nnppPredictor, net, patch, axes).predict_sliding_window_return_logits(img)
    assert net.calls and all(cl and not c for _, c, cl in net.calls)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (simulated)"),
                                   RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB (simulated)")])
def test_out_of_memory_halves_the_batch(error):
    """A device that runs out of memory above batch 2 (torch's error, or the RuntimeError older torch_npu raises):
    the batch is halved (8 -> 4 -> 2) and the logits are the same as nnU-Net's."""
    class Small(Recording):
        def forward(self, x):
            if x.shape[0] > 2:
                raise error
            return super().forward(x)
    net, patch, axes = Small(3), (8, 16, 16), (0, 1, 2)
    img = image((1, 8, 16, 24))
    ref, _ = nnunet_reference(net, patch, axes, img)
    pred = make(nnppPredictor, net, patch, axes)
    ours = pred.predict_sliding_window_return_logits(img)
    assert pred.tta_batch == 2 and [b for b, *_ in net.calls] == [2] * 8
    assert_same_logits(ours.float(), ref)


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    class Broken(Recording):
        def forward(self, x):
            raise RuntimeError("Given groups=1, weight of size [4, 1, 3, 3, 3], expected input to have 1 channels")
    pred = make(nnppPredictor, Broken(3), (8, 16, 16), (0,))
    with pytest.raises(RuntimeError, match="expected input"):
        pred.predict_sliding_window_return_logits(image((1, 8, 16, 16)))
    assert pred.tta_batch == 8


@pytest.mark.parametrize("tta_batch, expected", [(None, 8), (3, 3)])
def test_final_validation_uses_the_trainers_tta_batch(monkeypatch, tta_batch, expected):
    """nnpp_train --tta_batch reaches the predictor nnU-Net's final validation builds (default 8), in the run's AMP."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    from nnpp import device as dev
    from nnpp.training import nnUNetPlusPlusTrainer
    built = []

    def nnunet_validation(self, save_probabilities=False):  # what nnU-Net's does first: build its predictor
        built.append(trainer_module.nnUNetPredictor(device=torch.device("cpu")))
    monkeypatch.setattr(trainer_module.nnUNetTrainer, "perform_actual_validation", nnunet_validation)
    trainer = object.__new__(nnUNetPlusPlusTrainer)  # only amp and tta_batch are read before nnU-Net's code
    trainer.amp, trainer.tta_batch = dev.make_amp("O0", torch.device("cpu")), tta_batch
    trainer.perform_actual_validation()
    assert isinstance(built[0], nnppPredictor) and built[0].tta_batch == expected and built[0].amp is trainer.amp
    assert trainer_module.nnUNetPredictor.__name__ == "nnUNetPredictor"  # restored afterwards


def test_each_chunks_logits_are_freed_before_the_next_call():
    """Memory is bounded like nnU-Net's: the logits of one network call are added into the tile's accumulator and
    dropped before the next call (an implementation that keeps every chunk's output until the mirrors are averaged
    holds tiles x mirrors x classes logits at once)."""
    import weakref

    class Tracking(Recording):
        def __init__(self):
            super().__init__(3)
            self.alive_at_call, self.outputs = [], []

        def forward(self, x):
            self.alive_at_call.append(sum(r() is not None for r in self.outputs))
            out = super().forward(x)
            self.outputs.append(weakref.ref(out))
            return out
    net, patch, axes = Tracking(), (8, 16, 16), (0, 1, 2)
    img = image((1, 12, 24, 24))
    ref, _ = nnunet_reference(net, patch, axes, img)
    net.alive_at_call.clear()
    net.outputs.clear()
    ours = make(nnppPredictor, net, patch, axes, tta_batch=2).predict_sliding_window_return_logits(img)
    assert [b for b, *_ in net.calls] == [2] * 32 and net.alive_at_call == [0] * 32
    assert_same_logits(ours.float(), ref)


@pytest.mark.parametrize("dims", [3, 2])
def test_out_of_memory_while_summing_the_mirrors_redoes_only_what_is_missing(monkeypatch, dims):
    """Out of memory after the network call (flipping a chunk's logits back) also halves the batch; copies already
    added are not added twice (the logits stay nnU-Net's). 2D: two tiles per mirror in a chunk of 8, the error
    between the two tiles of one mirror."""
    net, patch, axes = (Recording(3), (8, 16, 16), (0, 1, 2)) if dims == 3 else (Recording(2), (16, 16), (0, 1))
    img = image((1, 8, 16, 24) if dims == 3 else (1, 2, 16, 24))
    ref, _ = nnunet_reference(net, patch, axes, img)
    flip, calls = torch.flip, {"n": 0}

    def flaky_flip(t, axes_):
        calls["n"] += 1
        # 3D: in the first chunk's sum, its identity copy and a few mirrors already added; 2D: the first mirror's
        # second tile (its first one already added)
        if calls["n"] == (12 if dims == 3 else 5):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return flip(t, axes_)
    monkeypatch.setattr(torch, "flip", flaky_flip)
    pred = make(nnppPredictor, net, patch, axes)
    ours = pred.predict_sliding_window_return_logits(img)
    assert pred.tta_batch == 4 and calls["n"] > 12
    assert_same_logits(ours.float(), ref)


@pytest.mark.parametrize("spacing", [[4.0, 0.7, 0.7], [1.3, 0.8, 0.75]])
def test_segmentation_export_a_few_classes_at_a_time_is_nnunets(tiny_dataset, monkeypatch, spacing):
    """segmentation_from_logits (3 classes at a time, running argmax; without a separate z axis the sparse trilinear
    argmax, for the plans' scipy resampling with its storage dtype) gives exactly the mask of nnU-Net's
    convert_predicted_logits_to_segmentation_with_correct_shape for an 11-class model: anisotropic spacing (nnU-Net's
    separate z) or not, a crop to revert, the plans' scipy resampling and nnU-Net's torch resampling."""
    import nnpp.predictor.resample as P
    sparse = []
    monkeypatch.setattr(P, "argmax_of_trilinear", lambda *a, **k: sparse.append(1) or argmax_of_trilinear(*a, **k))
    import json
    import os

    import numpy as np
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnpp.predictor.resample import segmentation_from_logits, use_torch_resampling
    plans = json.load(open(os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"], "nnUNetPlans.json")))
    pm = PlansManager(plans)
    labels = {"background": 0, **{f"c{i}": i for i in range(1, 11)}}
    lm = pm.get_label_manager({"labels": labels})
    cm = pm.get_configuration("3d_fullres")
    props = {"spacing": spacing, "shape_after_cropping_and_before_resampling": [9, 40, 36],
             "shape_before_cropping": [12, 44, 40], "bbox_used_for_cropping": [[1, 10], [2, 42], [3, 39]]}
    logits = torch.randn(11, 8, 11, 10, generator=torch.Generator().manual_seed(0)) * 3
    holder = SimpleNamespace(configuration_manager=cm)
    for resampling in ("plans", "torch"):
        if resampling == "torch":
            use_torch_resampling(holder, torch.device("cpu"))
        ref = convert_predicted_logits_to_segmentation_with_correct_shape(logits.clone(), pm, holder.configuration_manager,
                                                                          lm, props)
        ours = segmentation_from_logits(logits.clone(), props, holder.configuration_manager, pm, lm, classes_per_chunk=3)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape == (12, 44, 40)
        assert len(np.unique(ours)) > 5 and np.array_equal(ours, ref), resampling
    assert sparse == ([] if spacing[0] == 4.0 else [1, 1])  # separate z: the chunked path


@pytest.mark.parametrize("kind", ["smooth", "noise", "down", "fp16 ties"])
def test_argmax_of_trilinear_is_the_argmax_of_torchs_trilinear(kind):
    """The sparse trilinear argmax equals the argmax of every class interpolated by F.interpolate: smooth logits (most
    cells uniform), pure noise (near ties everywhere: the all-classes fallback), a shrinking axis, and fp16 logits
    with exact ties and an unchanged axis (ties to the lower class; compared with float64 interpolation, where
    float32's rounding does not split exact ties)."""
    g = torch.Generator().manual_seed(0)
    if kind == "noise":
        x, out = torch.randn(7, 9, 10, 11, generator=g), (20, 31, 17)
    elif kind == "fp16 ties":
        coarse = torch.randn(6, 2, 2, 3, generator=g) * 8
        x, out = torch.nn.functional.interpolate(coarse[None], (10, 12, 14), mode="trilinear")[0].round().half(), \
            (10, 36, 14)
    else:
        ins, out = ((20, 17, 23), (61, 40, 50)) if kind == "smooth" else ((30, 20, 10), (15, 41, 10))
        coarse = torch.randn(12, *[max(2, s // 6) for s in ins], generator=g) * 4
        x = torch.nn.functional.interpolate(coarse[None], ins, mode="trilinear")[0] + \
            0.05 * torch.randn(12, *ins, generator=g)
    ref = torch.nn.functional.interpolate(x[None].double(), out, mode="trilinear")[0].argmax(0)
    ours = argmax_of_trilinear(x, out, chunk=500)
    assert ours.shape == ref.shape and torch.equal(ours.long(), ref)


@pytest.mark.parametrize("kind", ["near ties", "heavy ties", "down", "noise", "integer ties", "fp32"])
def test_stored_argmax_is_nnunets_scipy_export(kind):
    """argmax_of_trilinear(stored_as=the logits' dtype) equals the argmax of nnU-Net's own scipy resampling of logits
    (resample_data_or_seg_to_shape, order 1, as the default plans call it; it stores the resampled logits in the
    input's dtype, fp16 from nnU-Net's predictor, so near-ties become ties and go to the lower class) voxel for
    voxel: 20-40 classes of fp16 logits ~4 apart by 0.3 or 0.05 (a third to a half of the voxels within one fp16
    step of a tie), a shrinking grid, pure noise, integer logits (exact ties everywhere), fp32 logits. The float64
    interpolation alone (the torch path) differs from it by 1-12% of the voxels here."""
    import numpy as np
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    g = torch.Generator().manual_seed(1)

    def smooth(c, shape, scale):
        coarse = torch.randn(c, *[max(2, s // 6) for s in shape], generator=g, dtype=torch.float64)
        return torch.nn.functional.interpolate(coarse[None], shape, mode="trilinear")[0] * scale
    ins, out = ((24, 20, 22), (37, 31, 40)) if kind != "down" else ((30, 26, 28), (22, 19, 21))
    classes = 40 if kind == "heavy ties" else 20
    x = smooth(classes, ins, {"heavy ties": 0.05}.get(kind, 0.3)) + 4 + smooth(1, ins, 2.0)
    if kind == "noise":
        x = torch.randn(8, 9, 10, 11, generator=g) * 0.01 + 3
        out = (20, 31, 17)
    elif kind == "integer ties":
        x = torch.randint(0, 3, (12, 10, 12, 14), generator=g)
        out = (10, 36, 21)
    x = x.float() if kind == "fp32" else x.half()
    ref = torch.from_numpy(np.asarray(resample_data_or_seg_to_shape(
        x, out, [1.0] * 3, [1.0] * 3, is_seg=False, order=1, order_z=0, force_separate_z=None))).argmax(0)
    ours = argmax_of_trilinear(x, out, chunk=3000, stored_as=x.dtype)
    assert ours.shape == ref.shape and torch.equal(ours.long(), ref), int((ours.long() != ref).sum())
    if kind in ("near ties", "heavy ties"):
        assert (argmax_of_trilinear(x, out).long() != ref).float().mean() > 0.005  # the case needs the storage


@pytest.mark.parametrize("classes, patch, case, amp, activations, expected", [
    (3, (128, 128, 128), (200, 300, 300), "O0", 0, 8),  # 25 MB of logits a copy: 7 more fit the 512 MiB floor
    (105, (128, 128, 128), (128, 128, 128), "O0", 0, 1),  # 881 MB a copy: one extra copy is over 512 MiB
    # fp16: 440 MB a copy; the case's fp16 accumulator is 8.1 GB, 10% = 810 MB: one extra copy (n = 2), not two
    (105, (128, 128, 128), (220, 380, 460), "O1", 0, 2),
    # ... unless the activations of a second sample (here 200 M elements, 400 MB in fp16) do not fit beside it
    (105, (128, 128, 128), (220, 380, 460), "O1", 200_000_000, 1),
    (105, (512, 512), (300, 512, 512), "O0", 0, 8),  # 2D: 110 MB a copy, 8 copies + 2 tiles' sum - 2 = 8 x 110 MB
    # the README demo's UNet++ (nnU-Net's count 9,050,112 elements = 36.2 MB fp32; logits 0.88 MB): 7 x 37.1 MB
    (3, (32, 48, 48), (48, 96, 96), "O0", 9_050_112, 8),
    (3, (128, 128, 128), (200, 300, 300), "O0", 1_830_100_992, 1),  # Task03's UNet++: 7.3 GB a copy in fp32
])
def test_default_batch_is_bounded_by_the_memory_it_would_add(classes, patch, case, amp, activations, expected):
    """The default tta_batch per case (nnpp_predict without --tta_batch): the copies whose logits beyond nnU-Net's
    three tile-sized ones, plus the activations beyond one sample's, fit max(512 MiB, 10% of the case's fp16 logits
    accumulator). Figures by hand above."""
    from nnpp import device as dev
    net = Recording(len(patch))
    if activations:
        net.compute_conv_feature_map_size = lambda size: activations if tuple(size) == patch else None
    pred = make(nnppPredictor, net, patch, (0, 1, 2)[:len(patch)],
                amp=dev.make_amp(amp, torch.device("cpu")) if amp == "O0" else SimpleNamespace(mode=amp))
    pred.label_manager = SimpleNamespace(num_segmentation_heads=classes)
    assert pred.auto_tta_batch(case) == expected


def test_default_batch_is_chosen_per_case_and_said_once(capsys):
    """Without --tta_batch the predictor sizes the batch from the case it runs on; an explicit one is kept."""
    net, patch, axes = Recording(3), (8, 16, 16), (0, 1, 2)
    pred = make(nnppPredictor, net, patch, axes)
    pred.auto_tta_batch = lambda shape, here=True: 2  # as a 100-class model would get
    img = image((1, 12, 24, 24))
    for _ in range(2):
        pred.predict_sliding_window_return_logits(img)
    assert [b for b, *_ in net.calls] == [2] * 32 * 2 and capsys.readouterr().out.count("2 tile copies per network call") == 1
    net.calls.clear()
    pred = make(nnppPredictor, net, patch, axes, tta_batch=8)
    pred.auto_tta_batch = lambda shape, here=True: 2
    pred.predict_sliding_window_return_logits(img)
    assert [b for b, *_ in net.calls] == [8] * 8
