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
    from nnpp.nets import UNetPlusPlus
    assert isinstance(trainer.network, UNetPlusPlus)
    n_stages = trainer.configuration_manager.network_arch_init_kwargs["n_stages"]
    w = np.asarray(trainer.loss.weight_factors)
    assert len(w) == trainer.network.depth == n_stages - 1 >= 2
    assert np.all(w > 0) and np.isclose(w.sum(), 1.0)


def test_full_resolution_target_per_head(trainer):
    batch = _batch(trainer)
    target = batch["target"]
    assert isinstance(target, list) and len(target) == trainer.network.depth
    patch = tuple(trainer.configuration_manager.patch_size)
    assert all(tuple(t.shape[2:]) == patch and torch.equal(t, target[0]) for t in target)


@pytest.mark.parametrize("mode", ["O0", "O1", "bf16"])
def test_train_step_updates_every_head(trainer, mode):
    trainer.configure_amp(mode)
    assert (trainer.grad_scaler is not None) == (mode == "O1")
    batch = _batch(trainer)
    heads = [h.weight.detach().clone() for h in trainer.network.decoder.seg_layers]
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"])
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
    from nnpp.run.common import parse_dataset_id
    for text in ("3", "003", "Dataset003_Liver", "Task003_Liver", "Task03_Liver"):
        assert parse_dataset_id(text) == 3
    with pytest.raises(NnppError, match="not a dataset id"):
        parse_dataset_id("Liver")
