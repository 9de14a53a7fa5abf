"""nnUNetPlusPlusTrainer in-process on the tiny dataset: network, loss weights, targets, AMP steps, checkpoints."""
import os

import numpy as np
import pytest
import torch

from nnpp import NnppError


@pytest.fixture
def trainer(tiny_dataset, tmp_path, monkeypatch):
    from nnpp.run.train import make_trainer
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))  # each test its own output folder
    t = make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", device=torch.device("cpu"))
    t.initialize()
    return t


def _batch(trainer):
    tr, val = trainer.get_dataloaders()
    return next(tr)


def test_builds_unetpp_with_all_heads_weighted(trainer):
    """The loss the trainer builds weights the L heads 1, 1/2, 1/4 from X^{0,L} down: nnU-Net's halving, never 0
    (the default ds_weights, descending: 4/7, 2/7, 1/7), scaled so X^{0,L} weighs 1 as the shallow heads are probes
    (the default shallow_heads); nnU-Net's own would be 8/15, 4/15, 2/15 and 0 for a 4th output."""
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    from nnpp.nets import UNetPlusPlus
    assert isinstance(trainer.network, UNetPlusPlus)
    n_stages = trainer.configuration_manager.network_arch_init_kwargs["n_stages"]
    assert trainer.network.depth == n_stages - 1 == 3  # the tiny plans: 4 stages
    loss = trainer._build_loss()
    assert isinstance(loss, DeepSupervisionWrapper)
    assert list(loss.weight_factors) == pytest.approx([1, 1 / 2, 1 / 4])
    assert list(trainer.deep_supervision_weights()) == pytest.approx([4 / 7, 2 / 7, 1 / 7])  # KD's head weights


def test_one_full_resolution_target_for_all_heads(trainer):
    """The pipeline carries one full-resolution target (not one per head); the loss pairs it with every head."""
    from nnpp.training.deep_supervision import SharedTargetDeepSupervision
    batch = _batch(trainer)
    target = batch["target"]
    patch = tuple(trainer.configuration_manager.patch_size)
    assert isinstance(target, torch.Tensor) and tuple(target.shape) == (trainer.batch_size, 1, *patch)
    # by hand: heads 2 and 4 against target 1 (2 voxels each), |o - t| summed, weights 0.5 / 0.5 -> 1 + 3
    loss = SharedTargetDeepSupervision(lambda o, t: (o - t).abs().sum(), [0.5, 0.5])
    assert loss([torch.full((2,), 2.0), torch.full((2,), 4.0)], torch.ones(2)).item() == 4.0
    # nnU-Net's per-head target lists still work (its multi-scale trainers, the KD student)
    assert loss([torch.full((2,), 2.0), torch.full((1,), 4.0)], [torch.ones(2), torch.zeros(1)]).item() == 3.0
    out = trainer.train_step(batch)
    assert torch.isfinite(out["loss"])
    val = trainer.validation_step(_batch(trainer))
    assert np.isfinite(val["loss"]) and len(val["tp_hard"]) == trainer.label_manager.num_segmentation_heads - 1


@pytest.mark.parametrize("mode", ["O0", "O1", "bf16"])
def test_train_step_updates_every_head(trainer, mode):
    trainer.configure_amp(mode)
    assert (trainer.grad_scaler is not None) == (mode == "O1")
    batch = _batch(trainer)
    heads = [h.weight.detach().clone() for h in trainer.network.decoder.seg_layers]
    out = trainer.train_step(batch)
    assert torch.isfinite(out["loss"])
    changed = [not torch.equal(before, h.weight) for before, h in zip(heads, trainer.network.decoder.seg_layers)]
    assert all(changed)


def test_checkpoint_roundtrip_and_atomic_write(trainer, tmp_path):
    trainer.configure_amp("O1")
    trainer.train_step(_batch(trainer))
    trainer.current_epoch = 6
    path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    assert os.path.isfile(path) and not os.path.exists(path + ".tmp")

    from nnpp.run.train import make_trainer
    fresh = make_trainer(str(trainer.plans_manager.dataset_name), "3d_fullres", "0", device=torch.device("cpu"))
    fresh.configure_amp("O1")
    fresh.load_checkpoint(path)
    assert fresh.current_epoch == 7  # nnU-Net stores the next epoch to run
    for (k, a), b in zip(trainer.network.state_dict().items(), fresh.network.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.grad_scaler.state_dict() == trainer.grad_scaler.state_dict()
    saved_opt, loaded_opt = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]  # lr, momentum, ...
    for k, state in saved_opt["state"].items():
        assert torch.equal(loaded_opt["state"][k]["momentum_buffer"], state["momentum_buffer"])


def test_truncated_checkpoint_is_one_clear_error(trainer, tmp_path):
    path = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    trainer.save_checkpoint(path)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(NnppError, match="truncated or corrupt"):
        trainer.load_checkpoint(path)


def test_seed_alias_and_unknown_trainer():
    from nnpp.training import find_trainer_class, nnUNetPlusPlusTrainer
    alias = find_trainer_class("nnUNetPlusPlusTrainerV2")
    assert issubclass(alias, nnUNetPlusPlusTrainer) and alias.__name__ == "nnUNetPlusPlusTrainerV2"
    assert find_trainer_class("nnUNetTrainer").__name__ == "nnUNetTrainer"
    with pytest.raises(NnppError, match="unknown trainer 'NoSuchTrainer'"):
        find_trainer_class("NoSuchTrainer")


def test_dataset_id_forms():
    from nnpp.dataset_ids import parse_dataset_id
    for text in ("3", "003", "Dataset003_Liver", "Task003_Liver", "Task03_Liver"):
        assert parse_dataset_id(text) == 3
    with pytest.raises(NnppError, match="not a dataset id"):
        parse_dataset_id("Liver")


def test_stale_tmp_is_never_promoted(trainer):
    """A .tmp left by a crashed run must not replace a good checkpoint, whether or not this save writes."""
    path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    good = open(path, "rb").read()
    with open(path + ".tmp", "wb") as f:
        f.write(b"half-written by a crashed run")
    trainer.disable_checkpointing = True
    trainer.save_checkpoint(path)
    assert open(path, "rb").read() == good
    trainer.disable_checkpointing = False
    trainer.current_epoch = 3
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["current_epoch"] == 4
    assert open(path + ".tmp", "rb").read() == b"half-written by a crashed run"  # untouched, never renamed
    assert sorted(os.listdir(trainer.output_folder)) == ["checkpoint_latest.pth", "checkpoint_latest.pth.tmp"] + \
        sorted(f for f in os.listdir(trainer.output_folder) if f.startswith("training_log"))


def test_run_settings_saved_and_resolved_on_resume(trainer, monkeypatch):
    import argparse

    from nnpp import device as dev
    from nnpp.run.train import build_parser, resume_settings
    trainer.configure_amp("bf16")
    trainer.num_epochs, trainer.num_iterations_per_epoch = 7, 3
    path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["nnpp_run_settings"]
    assert saved == {"epochs": 7, "iters": 3, "val_iters": trainer.num_val_iterations_per_epoch, "amp": "bf16",
                     "dbs": False, "checkpoint": "none", "ds_weights": "descending",
                     "shallow_heads": "probe"}

    args = build_parser().parse_args(["1", "3d_fullres", "0", "--c"])
    resume_settings(args, saved, path, trainer.device)
    assert (args.epochs, args.iters, args.amp, args.dbs, args.checkpoint) == (7, 3, "bf16", False, "none")

    args = build_parser().parse_args(["1", "3d_fullres", "0", "--c", "--epochs", "9"])
    with pytest.raises(NnppError, match=r"--c: --epochs 9 contradicts the run being continued \(--epochs 7"):
        resume_settings(args, saved, path, trainer.device)
    args = build_parser().parse_args(["1", "3d_fullres", "0", "--c", "--amp", "O0"])
    with pytest.raises(NnppError, match="--amp O0 contradicts"):
        resume_settings(args, saved, path, trainer.device)
    args = build_parser().parse_args(["1", "3d_fullres", "0", "--c", "--epochs", "9", "--change_settings"])
    resume_settings(args, saved, path, trainer.device, change=True)
    assert args.epochs == 9 and args.amp == "bf16"
    args = build_parser().parse_args(["1", "3d_fullres", "0", "--c", "--checkpoint", "node"])
    with pytest.raises(NnppError, match="--checkpoint node contradicts the run being continued"):
        resume_settings(args, saved, path, trainer.device)
    # 'auto' is what it resolves to on this device: not a contradiction of the same mode
    for native_bf16, same in ((False, "O0"), (True, "bf16")):
        monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native_bf16)
        args = argparse.Namespace(**vars(build_parser().parse_args(["1", "3d_fullres", "0", "--amp", "auto"])))
        resume_settings(args, dict(saved, amp=same), path, trainer.device)
        other = "bf16" if same == "O0" else "O0"
        with pytest.raises(NnppError, match=f"--amp auto contradicts .*--amp {other}"):
            resume_settings(args, dict(saved, amp=other), path, trainer.device)


def _dtypes_seen(network):
    seen = []
    network.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, list) else o).dtype))
    return seen


def test_validation_step_keeps_the_run_precision_inside_an_outer_autocast(trainer):
    """nnU-Net's validation_step enters its own fp16 autocast on CUDA; --amp O0 must still run fp32 inside it
    (the same mechanism, shown with the CPU's autocast)."""
    trainer.configure_amp("O0")
    _, val = trainer.get_dataloaders()
    seen = _dtypes_seen(trainer.network)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trainer.validation_step(next(val))
    assert seen == [torch.float32]


def test_final_validation_runs_in_the_run_precision(trainer):
    """perform_actual_validation predicts through nnpp's predictor in the run's AMP mode (nnU-Net's predictor
    autocasts on CUDA only, always fp16), and nnU-Net's predictor class is restored afterwards."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    original = nnunet_trainer_module.nnUNetPredictor
    trainer.configure_amp("bf16")
    seen = _dtypes_seen(trainer.network)
    trainer.perform_actual_validation()
    assert seen and set(seen) == {torch.bfloat16}
    assert nnunet_trainer_module.nnUNetPredictor is original
    assert os.path.isfile(os.path.join(trainer.output_folder, "validation", "summary.json"))


def test_predictor_keeps_logits_on_any_accelerator():
    import types

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnpp.predictor.tiles import nnppPredictor
    npu = types.SimpleNamespace(type="npu", index=0)  # torch.device("npu") exists only once torch_npu is imported
    assert nnUNetPredictor(device=npu).perform_everything_on_device is False  # nnU-Net: cuda only
    assert nnppPredictor(device=npu).perform_everything_on_device is True
    assert nnppPredictor(device=torch.device("cpu")).perform_everything_on_device is False
    assert nnppPredictor(device=npu, perform_everything_on_device=False).perform_everything_on_device is False


def test_pretrained_weights(trainer, tmp_path):
    """-pretrained_weights: every tensor but the segmentation heads is taken over; a misfit is one clear error."""
    donor_path = str(tmp_path / "donor.pth")
    import copy
    donor_net = copy.deepcopy(trainer.network)  # (its state_dict has aliases: conv.weight is all_modules.0.weight)
    with torch.no_grad():
        for p in donor_net.parameters():
            p.normal_()
    donor = donor_net.state_dict()
    torch.save({"network_weights": donor}, donor_path)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.load_pretrained_weights(donor_path)
    after = trainer.network.state_dict()
    for k in after:
        expected = before[k] if ".seg_layers." in k else donor[k]
        assert torch.equal(after[k], expected), k
    assert any(".seg_layers." in k for k in after)

    key = next(k for k in donor if k.endswith("weight") and ".seg_layers." not in k)
    torch.save({"network_weights": dict(donor, **{key: torch.zeros(1)})}, donor_path)
    with pytest.raises(NnppError, match=f"does not fit this network: {key} is shape \\(1,\\)"):
        trainer.load_pretrained_weights(donor_path)


def test_loss_stays_on_the_device_and_the_epoch_mean_is_logged(trainer):
    """train_step hands back the loss as a device tensor (no host synchronisation per step); the epoch's mean is
    read once and logged as nnU-Net's train loss."""
    out = trainer.train_step(_batch(trainer))
    assert isinstance(out["loss"], torch.Tensor) and out["loss"].device == trainer.device
    assert not out["loss"].requires_grad
    trainer.on_train_epoch_start()
    trainer.on_train_epoch_end([{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(2.0)}, {"loss": torch.tensor(4.5)}])
    assert trainer.logger.get_value("train_losses", step=trainer.current_epoch) == pytest.approx(2.5)


def test_network_and_batches_in_the_device_memory_format(trainer):
    """On the CPU a 3D network trains in channels_last_3d (nnpp.device.memory_format): its conv weights, and every
    batch it is given in training and in the pseudo-Dice step (strides read off the tensors the network receives;
    the tiny dataset's batches get a second channel, as a 1-channel tensor is channels-last already)."""
    assert trainer.memory_format == torch.channels_last_3d
    for name, p in trainer.network.named_parameters():
        if p.ndim == 5 and p.shape[1] > 1 and p.shape[2:].numel() > 1:  # else both layouts are the same strides
            assert p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous(), name
    seen = []
    trainer.network.encoder.stages[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].stride()))
    block = trainer.network.encoder.stages[0][0].convs[0]
    block.conv = block.all_modules[0] = torch.nn.Conv3d(2, block.conv.out_channels, 3, padding=1)
    two_channels = lambda b: {**b, "data": torch.cat([b["data"], b["data"]], 1)}  # noqa: E731
    trainer.train_step(two_channels(_batch(trainer)))
    trainer.validation_step(two_channels(_batch(trainer)))
    b, c, d, h, w = two_channels(_batch(trainer))["data"].shape
    assert seen == [(c * d * h * w, 1, h * w * c, w * c, c)] * 2  # NDHWC: channels innermost


def test_checkpointing_flag_reaches_the_network(tiny_dataset, tmp_path, monkeypatch):
    """``checkpoint_nodes`` (nnpp_train --checkpoint) switches the nested nodes to recomputation in the built network
    (a training step goes through torch.utils.checkpoint for each of the 6 nodes of the depth-3 UNet++), and the run
    settings record it; a network without the option refuses it in one line."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnpp.nets import unetpp
    from nnpp.run.train import make_trainer
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    t = make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", device=torch.device("cpu"))
    assert t.activation_checkpointing == "none"  # the plans say nothing: no checkpointing
    t.checkpoint_nodes = "node"
    t.initialize()
    assert t.network.checkpoint_nodes == "node" and t.run_settings()["checkpoint"] == "node"
    calls = []
    monkeypatch.setattr(unetpp, "checkpoint", lambda fn, *a, **kw: calls.append(1) or fn(*a))
    t.train_step(_batch(t))
    assert len(calls) == 6
    t.network = PlainConvUNet(1, 2, [4, 8], torch.nn.Conv3d, 3, [1, 2], 1, 2, 1)
    with pytest.raises(NnppError, match="--checkpoint node: activation checkpointing is a UNet\\+\\+ option"):
        t._configure_network()


def test_probe_heads_log_the_network_loss_and_are_clipped_on_their_own(trainer):
    """Under probe heads (the default) the logged loss is X^{0,L}'s, the loss the network learns from (as with deep
    supervision off), not the sum with the probes'; the probes X^{0,1..L-1} are a gradient-clipping group of their own
    (exactly seg_layers[0..L-2]), so their gradients never shrink the network's step; with shallow heads trained, one
    group, the whole sum logged."""
    assert trainer.probe_heads
    batch = _batch(trainer)
    data, target = trainer._batch_to_device(batch)
    with torch.no_grad():
        output = trainer.network(data)
        terms = trainer.loss.terms(output, target)
        head0 = trainer.loss.loss(output[0], target)
    assert len(terms) == 3 and terms[0].item() == pytest.approx(head0.item())
    trainer.network.eval()  # same output again for train_step: no dropout; batch norm absent in these plans
    groups = trainer.clip_groups()
    probes = {id(p) for head in trainer.network.decoder.seg_layers[:2] for p in head.parameters()}
    assert {id(p) for p in groups[1]} == probes and len(groups) == 2
    assert {id(p) for p in groups[0]} | probes == {id(p) for p in trainer.network.parameters()}
    assert not {id(p) for p in groups[0]} & probes
    out = trainer.train_step(batch)
    assert out["loss"].item() == pytest.approx(head0.item(), rel=1e-5)
    trainer.shallow_heads = "trained"
    trainer._configure_network()
    trainer.loss = trainer._build_loss()
    assert len(trainer.clip_groups()) == 1
    with torch.no_grad():
        output = trainer.network(data)
        total = trainer.loss(output, target).item()
        heads = [trainer.loss.loss(o, target).item() for o in output]
    assert total == pytest.approx(4 / 7 * heads[0] + 2 / 7 * heads[1] + 1 / 7 * heads[2], rel=1e-5)
    assert trainer.train_step(batch)["loss"].item() == pytest.approx(total, rel=1e-5)
