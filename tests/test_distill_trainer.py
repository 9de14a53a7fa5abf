"""The KD trainer's loss and hot path, pinned: the total loss against a hand sum on a real batch, soft KD over the
heads with the deep-supervision weights against a hand-computed KL, one real step of each feature method, MGD on
the deepest matched stage by default, the teachers' decoders skipped for feature-only KD, only the stages a
feature loss reads cast to fp32, and the U-Net student's pooled targets."""
import math
import os

import pytest
import torch

from nnpp import NnppError  # noqa: F401


def _make(tiny_dataset, tmp_path, monkeypatch, student="unetpp", **config):
    """A KD trainer on the tiny dataset (r=2 student of ``student``) with one random UNet++ teacher built from
    the dataset's plans, initialised."""
    from nnpp.distill.student import write_student_plans
    from nnpp.distill.teachers import Teacher
    from nnpp.distill.settings import KD_DEFAULTS
    from nnpp.run.distill import STUDENT_TRAINERS
    from nnpp.run.train import make_trainer
    from nnpp.training import nnUNetPlusPlusTrainer

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    pre = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    plans_name = write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, student)
    torch.manual_seed(0)
    trainer = make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", STUDENT_TRAINERS[student], plans_name,
                           torch.device("cpu"))
    teacher_trainer = make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", device=torch.device("cpu"))
    net = nnUNetPlusPlusTrainer.build_network_architecture(
        teacher_trainer.plans_manager, teacher_trainer.configuration_manager, 1,
        teacher_trainer.label_manager.num_segmentation_heads, False)
    trainer.configure_kd([Teacher(net, folder="teacher", fold="0")],
                         {**KD_DEFAULTS, "t": ["x"], "tf": ["0"], "r": 2, "student": student, **config})
    trainer.initialize()
    return trainer


def _batch(trainer):
    return next(trainer.get_dataloaders()[0])


def test_total_loss_is_the_hand_sum(tiny_dataset, tmp_path, monkeypatch):
    tr = _make(tiny_dataset, tmp_path, monkeypatch, kd=["soft", "cwd", "at", "sp", "mgd"], a=0.3, soft_weight=2.0,
               cwd_weight=0.5, at_weight=3.0, sp_weight=0.25, mgd_weight=4.0)
    # fixed numbers: (1-a)*seg + a*(2*soft + 0.5*cwd) + 3*at + 0.25*sp + 4*mgd
    terms = {k: torch.tensor(v) for k, v in dict(soft=1.0, cwd=2.0, at=3.0, sp=4.0, mgd=5.0).items()}
    assert tr.kd_total(torch.tensor(10.0), terms).item() == pytest.approx(0.7 * 10 + 0.3 * (2 + 1) + 9 + 1 + 20)
    # a real batch: the loss the step optimised is that sum of the terms it logged
    out = tr.train_step(_batch(tr))
    t = {k: v.item() for k, v in tr._kd_terms[-1].items()}
    assert set(t) == {"seg", "soft", "cwd", "at", "sp", "mgd"} and all(v > 0 for v in t.values())
    hand = 0.7 * t["seg"] + 0.3 * (2 * t["soft"] + 0.5 * t["cwd"]) + 3 * t["at"] + 0.25 * t["sp"] + 4 * t["mgd"]
    assert out["loss"].item() == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("shallow_heads", ["trained", "probe"])
def test_soft_kd_sums_the_heads_with_the_segmentation_loss_weights(tiny_dataset, tmp_path, monkeypatch,
                                                                    shallow_heads):
    """Teacher logits (2, 0, 0) everywhere at T=2: p_t = softmax(1, 0, 0). Head 0 equals the teacher (KL 0), every
    other head is uniform: KL(p_t || uniform) = sum p log p + log 3. With --ds_weights equal the heads weigh 1/L
    each when they are trained, so soft = (L-1)/L * T^2 * KL; under probe heads X^{0,L} weighs 1 as in the
    segmentation loss (and so does each probe), so soft = (L-1) * T^2 * KL."""
    tr = _make(tiny_dataset, tmp_path, monkeypatch, kd=["soft"], T=2.0)
    tr.ds_weights, tr.shallow_heads = "equal", shallow_heads  # nnpp_train --ds_weights equal --shallow_heads ...
    L = tr.num_heads
    assert L >= 2
    shape = (1, 3, 4, 4, 4)
    t_logits = torch.zeros(shape)
    t_logits[:, 0] = 2.0
    heads = [t_logits.clone()] + [torch.zeros(shape) for _ in range(L - 1)]
    e = math.e
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    kl = sum(q * math.log(q) for q in p) + math.log(3)
    terms = tr.kd_losses(heads, None, {}, [t_logits], [None])
    expected = (L - 1) / L * 4 * kl if shallow_heads == "trained" else (L - 1) * 4 * kl
    assert terms["soft"].item() == pytest.approx(expected, rel=1e-5)


def test_unet_student_pools_each_head_target_from_the_finer_one(tiny_dataset, tmp_path, monkeypatch):
    """U-Net student: heads at 1, 1/2, 1/4 (weights 2/3, 1/3, 0). A teacher whose class-0 logit is 4 on one
    octant of every 2x2x2 block and 0 elsewhere: at the 1/2 head the pooled target is the block mean of the
    probabilities; the step's soft term equals the hand value from those means."""
    from nnpp.distill import losses as L
    tr = _make(tiny_dataset, tmp_path, monkeypatch, student="unet", kd=["soft"], T=1.0)
    w = tr.deep_supervision_weights()
    assert w.tolist() == pytest.approx([2 / 3, 1 / 3, 0])
    t_logits = torch.zeros((1, 3, 4, 8, 8))
    t_logits[:, 0, ::2, ::2, ::2] = 4.0
    heads = [torch.zeros((1, 3, 4, 8, 8)), torch.zeros((1, 3, 2, 4, 4)), torch.zeros((1, 3, 1, 2, 2))]
    soft = tr.kd_losses(heads, None, {}, [t_logits], [None])["soft"].item()
    hot = [math.exp(4) / (math.exp(4) + 2), 1 / (math.exp(4) + 2), 1 / (math.exp(4) + 2)]
    kl_full = (sum(q * math.log(q) for q in hot) + math.log(3)) / 8  # 1 voxel in 8 is "hot", the rest uniform
    mean = [(hot[0] + 7 / 3) / 8, (hot[1] + 7 / 3) / 8, (hot[2] + 7 / 3) / 8]
    kl_half = sum(q * math.log(q) for q in mean) + math.log(3)
    assert soft == pytest.approx(2 / 3 * kl_full + 1 / 3 * kl_half, rel=1e-4)
    assert L.Target(torch.zeros(1)).binary is False


@pytest.mark.parametrize("method", ["at", "sp", "mgd"])
def test_one_real_step_of_each_feature_method(tiny_dataset, tmp_path, monkeypatch, method):
    tr = _make(tiny_dataset, tmp_path, monkeypatch, kd=[method])
    before = {k: v.clone() for k, v in tr.network.state_dict().items()}
    out = tr.train_step(_batch(tr))
    assert torch.isfinite(out["loss"]) and tr._kd_terms[-1][method].item() > 0
    assert any(not torch.equal(before[k], v) for k, v in tr.network.state_dict().items())
    if method == "mgd":  # the deepest matched stage only, by default
        deepest = tr.kd_pairs[0][-1][0]
        assert list(tr.network.kd_modules) == [f"mgd_t0_s{deepest}"] and len(tr.kd_pairs[0]) > 1


def test_mgd_all_stages_by_flag(tiny_dataset, tmp_path, monkeypatch):
    tr = _make(tiny_dataset, tmp_path, monkeypatch, kd=["mgd"], mgd_all_stages=True)
    assert sorted(tr.network.kd_modules) == sorted(f"mgd_t0_s{s}" for s, _ in tr.kd_pairs[0])


def test_feature_only_kd_skips_the_teacher_decoder(tiny_dataset, tmp_path, monkeypatch):
    tr = _make(tiny_dataset, tmp_path, monkeypatch, kd=["mgd"])
    teacher = tr.teachers[0].network
    calls = []
    teacher.decoder.register_forward_hook(lambda *a: calls.append(1))
    x = _batch(tr)["data"]
    logits, skips = tr.teacher_outputs(x)
    assert logits == [None] and calls == []
    deepest = tr.kd_pairs[0][-1][1]
    assert [i for i, s in enumerate(skips[0]) if s is not None] == [deepest]   # only what MGD reads
    assert skips[0][deepest].dtype == torch.float32
    tr.kd_config["kd"] = ["soft", "mgd"]                                        # a logit method: the decoder runs
    logits, _ = tr.teacher_outputs(x)
    assert calls == [1] and logits[0].shape[2:] == x.shape[2:]


def test_region_task_through_the_kd_trainer(tiny_dataset, tmp_path, monkeypatch):
    """A sigmoid/region task (liver = labels 1+2, lesion = label 2) on the same preprocessed data: the student has
    one output channel per region, the teacher's target is the binary (per-channel Bernoulli) form, and a real
    step's soft term is finite and positive."""
    import json

    from nnpp.distill import kd_step
    from nnpp.distill.student import write_student_plans
    from nnpp.distill.teachers import Teacher
    from nnpp.distill.settings import KD_DEFAULTS
    from nnpp.distill.trainer import nnUNetPlusPlusTrainerKD
    from nnpp.training import nnUNetPlusPlusTrainer

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    pre = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    plans_name = write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, "unetpp")
    plans = {**json.load(open(os.path.join(pre, plans_name + ".json"))), "continue_training": False}
    dj = json.load(open(os.path.join(pre, "dataset.json")))
    names = sorted((k for k in dj["labels"] if k != "background"), key=lambda k: dj["labels"][k])
    dj = {**dj, "labels": {"background": 0, names[0]: [1, 2], names[1]: 2}, "regions_class_order": [1, 2]}
    tr = nnUNetPlusPlusTrainerKD(plans=plans, configuration="3d_fullres", fold=0, dataset_json=dj,
                                 device=torch.device("cpu"))
    assert tr.label_manager.has_regions and tr.label_manager.num_segmentation_heads == 2
    net = nnUNetPlusPlusTrainer.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 2, False)
    tr.configure_kd([Teacher(net, folder="teacher", fold="0")],
                    {**KD_DEFAULTS, "kd": ["soft"], "t": ["x"], "tf": ["0"], "r": 2, "student": "unetpp"})
    tr.initialize()
    seen = []
    real = kd_step.ensemble_target
    monkeypatch.setattr(kd_step, "ensemble_target",
                        lambda logits, T, binary: seen.append(binary) or real(logits, T, binary))
    batch = _batch(tr)
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    assert target.shape[1] == 2  # the dataloader made one channel per region
    out = tr.train_step(batch)
    assert seen == [True] and torch.isfinite(out["loss"]) and tr._kd_terms[-1]["soft"].item() > 0
