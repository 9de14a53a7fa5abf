"""The U-Net student's trainers (nnUNetTrainerNoKD, nnUNetTrainerKD) train with nnU-Net's own loss: nnU-Net's
nnUNetTrainer and nnpp's trainers, built from the same plans, give the same loss on the same multi-scale outputs and
targets -- fresh, on a continued run (nnpp_train --c and nnU-Net's own --c), and when nnU-Net itself constructs the
trainer through its nnUNet_extTrainer hook. UNet++'s shallow-head probes are a UNet++ option; they must not rescale
the U-Net's deep-supervision weights (they did: 1, 1/2, 1/4, ... instead of nnU-Net's weights summing to 1)."""
import os

import pytest
import torch


def _student_plans(tiny_dataset) -> str:
    from nnpp.distill.student import write_student_plans
    pre = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    return write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, "unet")


def _outputs_and_targets(trainer, seed: int = 0):
    """Random logits and labels at every deep-supervision scale of ``trainer`` (nnU-Net's multi-scale target list)."""
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    n_cls = trainer.label_manager.num_segmentation_heads
    outputs, targets = [], []
    for scale in trainer._get_deep_supervision_scales():
        shape = [max(1, round(p * s)) for p, s in zip(patch, scale)]
        outputs.append(torch.randn((2, n_cls, *shape), generator=g) * 3)
        targets.append(torch.randint(0, n_cls, (2, 1, *shape), generator=g).float())
    return outputs, targets


def _nnunet_loss(tiny_dataset, plans_name):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnpp.run.train import make_trainer
    reference = make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", "nnUNetTrainer", plans_name,
                             torch.device("cpu"))
    assert type(reference) is nnUNetTrainer
    reference.initialize()
    return reference


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerNoKD", "nnUNetTrainerKD"])
def test_unet_trainers_loss_equals_nnunets(tiny_dataset, tmp_path, monkeypatch, trainer_name):
    from nnpp.run.train import make_trainer
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    plans_name = _student_plans(tiny_dataset)
    reference = _nnunet_loss(tiny_dataset, plans_name)
    ours = make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", trainer_name, plans_name, torch.device("cpu"))
    ours.initialize()
    assert len(reference._get_deep_supervision_scales()) >= 3
    outputs, targets = _outputs_and_targets(reference)
    expected = reference.loss(outputs, targets).item()
    assert ours.loss(outputs, targets).item() == pytest.approx(expected, rel=1e-6)
    # a continued run: older checkpoints recorded no shallow_heads (nnpp_train --c fills in "trained"), newer ones
    # "probe"; either way the U-Net's loss stays nnU-Net's
    for heads in ("trained", "probe"):
        ours.restore_run_settings({"shallow_heads": heads})
        ours.shallow_heads = heads
        ours.loss = ours._build_loss()
        assert ours.loss(outputs, targets).item() == pytest.approx(expected, rel=1e-6), heads


def test_unet_student_loss_through_nnunets_own_trainer_lookup(tiny_dataset, tmp_path, monkeypatch):
    """nnU-Net's nnUNetv2_train with nnUNet_extTrainer: nnU-Net finds and constructs nnUNetTrainerNoKD itself."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnpp.training.nnunet_ext import EXT_TRAINER_PATH
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_extTrainer", EXT_TRAINER_PATH)
    plans_name = _student_plans(tiny_dataset)
    reference = _nnunet_loss(tiny_dataset, plans_name)
    theirs = get_trainer_from_args(str(tiny_dataset["id"]), "3d_fullres", 0, "nnUNetTrainerNoKD", plans_name,
                                   device=torch.device("cpu"))
    assert type(theirs).__name__ == "nnUNetTrainerNoKD"
    theirs.initialize()
    outputs, targets = _outputs_and_targets(reference, seed=1)
    assert theirs.loss(outputs, targets).item() == pytest.approx(reference.loss(outputs, targets).item(), rel=1e-6)
