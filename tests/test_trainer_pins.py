"""Pins on the nnU-Net (nnunetv2 2.8.1) internals nnpp's trainer overrides or relies on.

nnU-Net has no public hook for these, so nnpp overrides private methods and flips attributes around nnU-Net's own
calls (nnpp/training/nnUNetPlusPlusTrainer.py). Each test states exactly what of nnU-Net's behaviour that relies on,
so an nnunetv2 upgrade fails here with a message naming the override instead of training something else. setup.py
states the nnunetv2 range these pins were checked against. (The predictor's pins: tests/test_nnunet_pins.py.)
"""
import inspect
import types

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

OVERRIDES = "nnpp/training/nnUNetPlusPlusTrainer.py"


def upgrade(override: str, what: str) -> str:
    from importlib.metadata import version
    return (f"nnunetv2 {version('nnunetv2')}: {what}. nnpp's {override} ({OVERRIDES}) relies on it: re-check that "
            f"override against this nnunetv2, then update this pin and the nnunetv2 range in setup.py")


@pytest.mark.parametrize("name, signature", [
    ("_get_deep_supervision_scales", "(self)"),
    ("_set_batch_size_and_oversample", "(self)"),
    ("_do_i_compile", "(self)"),
    ("_build_loss", "(self)"),
    ("initialize", "(self)"),
    ("validation_step", "(self, batch: dict) -> dict"),
])
def test_overridden_signatures(name, signature):
    got = str(inspect.signature(getattr(nnUNetTrainer, name)))
    assert got == signature, upgrade(f"nnUNetPlusPlusTrainer.{name}", f"nnUNetTrainer.{name}{got} (pinned: "
                                     f"{signature})")


def test_no_deep_supervision_scales_means_one_target():
    """_get_deep_supervision_scales returns None so that nnU-Net's training and validation transforms carry the one
    full-resolution target (every UNet++ head is full resolution), not a list of downsampled ones."""
    seg = torch.randint(0, 3, (1, 8, 16, 16)).to(torch.int16)
    img = torch.randn(1, 8, 16, 16)
    val = nnUNetTrainer.get_validation_transforms(None, foreground_labels=[1, 2])
    out = val(image=img.clone(), segmentation=seg.clone())
    assert isinstance(out["segmentation"], torch.Tensor) and out["segmentation"].shape == seg.shape, upgrade(
        "_get_deep_supervision_scales (returns None)", "get_validation_transforms(None) no longer keeps one target")
    tr = nnUNetTrainer.get_training_transforms((8, 16, 16), (0, 0), None, (), False, use_mask_for_norm=[False],
                                               foreground_labels=[1, 2])
    out = tr(image=img.clone(), segmentation=seg.clone())
    assert isinstance(out["segmentation"], torch.Tensor) and out["segmentation"].shape == seg.shape, upgrade(
        "_get_deep_supervision_scales (returns None)", "get_training_transforms(None) no longer keeps one target")
    # and a scale list is what makes nnU-Net downsample (the switch nnpp turns off)
    out = nnUNetTrainer.get_validation_transforms([[1, 1, 1], [0.5, 0.5, 0.5]], foreground_labels=[1, 2])(
        image=img.clone(), segmentation=seg.clone())
    assert isinstance(out["segmentation"], list), upgrade("_get_deep_supervision_scales",
                                                          "deep-supervision targets no longer come from the scales")


def test_batch_size_from_plans_and_ddp_split(monkeypatch):
    """nnpp's _set_batch_size_and_oversample: without DDP (and for DDP without --dbs, where nnpp sets it itself)
    the plans' batch; with --dbs nnU-Net's split of the plans' (global) batch over torch.distributed's ranks."""
    trainer = types.SimpleNamespace(is_ddp=False, configuration_manager=types.SimpleNamespace(batch_size=5),
                                    oversample_foreground_percent=0.33, batch_size=None)
    nnUNetTrainer._set_batch_size_and_oversample(trainer)
    assert (trainer.batch_size, trainer.oversample_foreground_percent) == (5, 0.33), upgrade(
        "_set_batch_size_and_oversample", "without DDP the batch size is no longer the plans' batch size")
    import torch.distributed as dist
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    sizes = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda *a, r=rank: r)
        trainer.is_ddp = True
        nnUNetTrainer._set_batch_size_and_oversample(trainer)
        sizes.append(trainer.batch_size)
    assert sizes == [3, 2], upgrade("_set_batch_size_and_oversample (--dbs)",
                                    f"a global batch of 5 over 2 ranks is split {sizes}, pinned [3, 2]")


@pytest.fixture(scope="module")
def fresh_trainer(tiny_dataset, tmp_path_factory):
    """An nnpp trainer, constructed but not initialized (outside DDP)."""
    import os

    from nnpp.run.train import make_trainer
    old = os.environ.get("nnUNet_results")
    os.environ["nnUNet_results"] = str(tmp_path_factory.mktemp("pins_results"))
    try:
        yield make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", device=torch.device("cpu"))
    finally:
        if old is None:
            os.environ.pop("nnUNet_results", None)
        else:
            os.environ["nnUNet_results"] = old


def test_initialize_decides_ddp_and_compile_by_the_overridden_hooks(fresh_trainer, monkeypatch):
    """nnpp's initialize sets ``is_ddp = False`` around nnU-Net's initialize (then wraps DDP with the device layer's
    ids): nnU-Net must decide DDP from ``self.is_ddp`` alone, not by asking torch.distributed. nnpp's _do_i_compile
    adds the device layer's veto: nnU-Net must decide torch.compile through ``self._do_i_compile()``."""
    import torch.distributed as dist

    def asked(*a, **k):
        raise AssertionError(upgrade("initialize (is_ddp flip)", "nnUNetTrainer.initialize consults "
                                     "torch.distributed itself instead of self.is_ddp"))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for name in ("get_world_size", "get_rank", "barrier", "all_gather_object"):
        monkeypatch.setattr(dist, name, asked)
    monkeypatch.setattr(nnunet_trainer_module, "DDP", asked)
    compiled = []
    monkeypatch.setattr(type(fresh_trainer), "_do_i_compile", lambda self: True)
    monkeypatch.setattr(torch, "compile", lambda m, *a, **k: compiled.append(m) or m)
    nnUNetTrainer.initialize(fresh_trainer)  # nnU-Net's own, as nnpp's initialize calls it (is_ddp False)
    assert not isinstance(fresh_trainer.network, torch.nn.parallel.DistributedDataParallel)
    assert compiled and compiled[0] is fresh_trainer.network, upgrade(
        "_do_i_compile", "nnUNetTrainer.initialize no longer compiles the network when self._do_i_compile() is true")


def test_build_loss_follows_enable_deep_supervision(fresh_trainer, monkeypatch):
    """nnpp's _build_loss sets ``enable_deep_supervision = False`` around nnU-Net's: that must give nnU-Net's plain
    Dice + CE (one output, one target) without asking for deep-supervision scales; nnpp then wraps it with its own
    head weights."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    if not fresh_trainer.was_initialized:
        fresh_trainer.initialize()

    def scales(self):
        raise AssertionError(upgrade("_build_loss (enable_deep_supervision flip)", "nnUNetTrainer._build_loss asks "
                                     "for deep-supervision scales with enable_deep_supervision off"))
    monkeypatch.setattr(type(fresh_trainer), "_get_deep_supervision_scales", scales)
    monkeypatch.setattr(fresh_trainer, "enable_deep_supervision", False)
    loss = nnUNetTrainer._build_loss(fresh_trainer)
    assert isinstance(loss, DC_and_CE_loss) and not isinstance(loss, DeepSupervisionWrapper), upgrade(
        "_build_loss (enable_deep_supervision flip)", f"nnU-Net's loss without deep supervision is {type(loss)}")
    out = torch.randn(2, 3, 4, 8, 8)
    assert torch.isfinite(loss(out, torch.randint(0, 3, (2, 1, 4, 8, 8)).float()))


def test_validation_step_calls_self_network_once(fresh_trainer, monkeypatch):
    """nnpp's validation_step swaps ``self.network`` for a function that runs the real network in the run's AMP
    mode and memory format: nnU-Net's validation_step must call ``self.network(data)`` exactly once with the batch's
    data, and with deep supervision score ``output[0]`` against ``target[0]``."""
    if not fresh_trainer.was_initialized:
        fresh_trainer.initialize()
    data = torch.randn(2, 1, 4, 8, 8)
    target = torch.randint(0, 3, (2, 1, 4, 8, 8)).float()
    perfect = torch.nn.functional.one_hot(target[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float() * 10
    calls = []

    def network(x):
        calls.append(x)
        return [perfect, -perfect]  # only output[0] is right

    monkeypatch.setattr(fresh_trainer, "network", network)
    monkeypatch.setattr(fresh_trainer, "loss", lambda o, t: torch.zeros(()))
    monkeypatch.setattr(fresh_trainer, "enable_deep_supervision", True)
    out = nnUNetTrainer.validation_step(fresh_trainer, {"data": data, "target": [target, -target]})
    assert len(calls) == 1 and torch.equal(calls[0], data), upgrade(
        "validation_step (self.network swap)", f"validation_step called self.network {len(calls)} time(s)")
    assert np.all(out["fp_hard"] == 0) and np.all(out["fn_hard"] == 0) and np.all(out["tp_hard"] > 0), upgrade(
        "validation_step", "validation_step no longer scores output[0] against target[0] with deep supervision")
