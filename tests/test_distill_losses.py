"""Distillation unit tests: KD losses against hand-computed values, the probability ensemble, class-count
invariance, gradients (student and KD modules only), frozen teachers, leak and compatibility checks, student plans."""
import json
import math
import os

import pytest
import torch

from nnpp import NnppError
from nnpp.distill import losses as L


def logits(*values):
    """Class logits of one sample with one voxel: shape (1, C, 1, 1, 1)."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1, 1)


# KL([0.75, 0.25] || [0.5, 0.5]), by hand
KL_75_50 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # = 0.130812...


# ------------------------------------------------------------------------------------------------ soft KD
def test_soft_kd_is_hand_computed_kl():
    teacher = L.ensemble_log_probs([logits(math.log(3), 0)])  # softmax -> [0.75, 0.25]
    assert L.soft_kd(logits(0, 0), teacher, T=1) == pytest.approx(KL_75_50, abs=1e-6)
    assert KL_75_50 == pytest.approx(0.1308120, abs=1e-6)


def test_soft_kd_temperature_scales_by_T_squared():
    # at T=2 the teacher logits [2 ln 3, 0] give the same [0.75, 0.25]; the student [0, 0] stays uniform
    teacher = L.ensemble_log_probs([logits(2 * math.log(3), 0)], T=2)
    assert L.soft_kd(logits(0, 0), teacher, T=2) == pytest.approx(4 * KL_75_50, abs=1e-6)


def test_soft_kd_averages_over_voxels_and_batch():
    # voxel 1: KL_75_50; voxel 2: teacher == student -> 0; a second, identical sample: mean stays KL/2
    t = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 1, 2).repeat(2, 1, 1, 1, 1)
    s = torch.zeros_like(t)
    assert L.soft_kd(s, L.ensemble_log_probs([t]), T=1) == pytest.approx(KL_75_50 / 2, abs=1e-6)


def test_ensemble_averages_probabilities_not_logits():
    # teachers [0.9, 0.1] and [0.5, 0.5]: probability mean [0.7, 0.3]; the logit mean would give [0.75, 0.25]
    target = L.ensemble_log_probs([logits(math.log(9), 0), logits(0, 0)])
    assert target.log_p.exp().flatten().tolist() == pytest.approx([0.7, 0.3], abs=1e-6)
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert L.soft_kd(logits(0, 0), target, T=1) == pytest.approx(expected, abs=1e-6)
    assert abs(expected - KL_75_50) > 0.02  # the logit average would give a visibly different loss


def test_ensemble_of_three_at_temperature():
    # T=2: logits/2 -> softmax [0.9,0.1], [0.5,0.5], [0.1,0.9]; mean [0.5, 0.5] == the uniform student: KL 0
    ts = [logits(2 * math.log(9), 0), logits(0, 0), logits(0, 2 * math.log(9))]
    assert L.soft_kd(logits(5, 5), L.ensemble_log_probs(ts, T=2), T=2) == pytest.approx(0, abs=1e-6)


def test_soft_kd_keeps_its_size_when_classes_are_added():
    base = L.soft_kd(logits(0, 0), L.ensemble_log_probs([logits(math.log(3), 0)]), T=1)
    # six more classes that neither network predicts (logit -60: probability ~1e-26 against ~1)
    pad = [-60.0] * 6
    wide = L.soft_kd(logits(0, 0, *pad), L.ensemble_log_probs([logits(math.log(3), 0, *pad)]), T=1)
    assert wide == pytest.approx(base.item(), abs=1e-6)
    # what the issue warns about: reduction='mean' divides by the element count, classes included
    with pytest.warns(UserWarning):
        buggy = torch.nn.functional.kl_div(torch.log_softmax(logits(0, 0, *pad), 1),
                                           torch.log_softmax(logits(math.log(3), 0, *pad), 1),
                                           log_target=True, reduction="mean")
    assert buggy == pytest.approx(base.item() / 8, abs=1e-6)


def test_binary_form_for_region_tasks():
    # sigmoid(ln 3) = 0.75 vs sigmoid(0) = 0.5 on channel 1; channel 2 equal -> Bernoulli KL summed over channels
    target = L.ensemble_log_probs_binary([logits(math.log(3), 1.0)])
    assert L.soft_kd(logits(0, 1.0), target, T=1) == pytest.approx(KL_75_50, abs=1e-6)
    # ensemble of sigmoids: mean of 0.9 and 0.5 is 0.7
    target = L.ensemble_log_probs_binary([logits(math.log(9)), logits(0.0)])
    assert target.log_p.exp().item() == pytest.approx(0.7, abs=1e-6)
    assert target.log_q.exp().item() == pytest.approx(0.3, abs=1e-6)


def test_target_pooled_to_a_coarser_head():
    # 2 voxels along x with teacher probabilities [0.9, 0.1] and [0.5, 0.5]: pooled to 1 voxel -> [0.7, 0.3]
    t = torch.tensor([[math.log(9), 0.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 1, 2)
    pooled = L.ensemble_log_probs([t]).pooled_to((1, 1, 1))
    assert pooled.log_p.exp().flatten().tolist() == pytest.approx([0.7, 0.3], abs=1e-6)


# ------------------------------------------------------------------------------------------------- CWD
def test_cwd_is_hand_computed():
    tau = 4.0
    # one channel over 2 voxels: teacher map [tau ln 3, 0] -> spatial softmax [0.75, 0.25]; student uniform
    teacher = torch.tensor([tau * math.log(3), 0.0]).view(1, 1, 1, 1, 2)
    target = L.ensemble_spatial_log_probs([teacher], tau)
    assert L.cwd(torch.zeros(1, 1, 1, 1, 2), target, tau) == pytest.approx(tau ** 2 * KL_75_50, abs=1e-5)
    # a second channel that matches exactly: the mean over channels halves it
    two = torch.cat([teacher, torch.zeros_like(teacher)], 1)
    assert L.cwd(torch.zeros(1, 2, 1, 1, 2), L.ensemble_spatial_log_probs([two], tau), tau) == \
        pytest.approx(tau ** 2 * KL_75_50 / 2, abs=1e-5)


# ------------------------------------------------------------------------------------- feature losses
def test_attention_transfer_paper_normalisation():
    s = torch.zeros(1, 3, 1, 1, 2)
    t = torch.zeros(1, 5, 1, 1, 2)
    s[0, :, 0, 0, 0] = 2.0   # all attention on voxel 0
    t[0, :, 0, 0, 1] = 0.3   # all on voxel 1: orthogonal unit vectors -> distance sqrt(2)
    assert L.attention_transfer(s, [t]) == pytest.approx(math.sqrt(2), abs=1e-6)
    assert L.attention_transfer(s, [7 * s[:, :1]]) == pytest.approx(0, abs=1e-6)  # scale and width invariant


def test_similarity_preserving():
    x = torch.randn(2, 4, 8, 8, 8)
    assert L.similarity_preserving(x, [3 * x]) == pytest.approx(0, abs=1e-5)  # rows normalised: scale-free
    g = L.spatial_affinity(x, pool=4)
    assert g.shape == (2, 64, 64) and torch.allclose(g.norm(dim=2), torch.ones(2, 64), atol=1e-5)
    # two pooled voxels: student features e1, e2 (orthogonal), teacher e1, e1 -> G_s = I, G_t rows [.707 .707]
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 1, 2)
    t = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 1, 2)
    r = 1 / math.sqrt(2)
    expected = 2 * ((1 - r) ** 2 + r ** 2) / 4
    assert L.similarity_preserving(s, [t], pool=4) == pytest.approx(expected, abs=1e-6)


def test_mgd_loss_scale():
    g, t = torch.ones(2, 3, 2, 2, 2), torch.zeros(2, 3, 2, 2, 2)
    assert L.mgd(g, t) == pytest.approx(L.MGD_ALPHA_2D * L.MGD_REF_ELEMENTS, rel=1e-6)
    gen = L.MGDGenerator(4, 6, mask_ratio=0.75)
    assert gen(torch.randn(2, 4, 8, 8, 8)).shape == (2, 6, 8, 8, 8)


# ----------------------------------------------------------------------------------------- leak check
def _splits(tmp_path):
    pre = tmp_path / "pre" / "Dataset950_X"
    pre.mkdir(parents=True)
    cases = [f"c{i}" for i in range(5)]
    splits = [{"train": [c for c in cases if c != v], "val": [v]} for v in cases]
    (pre / "splits_final.json").write_text(json.dumps(splits))
    return str(tmp_path / "pre"), str(pre)


def _teacher(tmp_path, fold):
    from nnpp.distill.teachers import Teacher
    return Teacher(torch.nn.Conv3d(1, 1, 1), folder=str(tmp_path / "res" / "Dataset950_X" / "Tr__P__3d"), fold=fold)


def test_leak_check_refuses_leaky_and_accepts_leak_free(tmp_path):
    from nnpp.distill.teachers import check_leaks, split_cases
    root, pre = _splits(tmp_path)
    _, val0 = split_cases(pre, 0)
    assert val0 == ["c0"]
    assert check_leaks([_teacher(tmp_path, "0")], root, 0, val0) == []             # same fold: leak-free
    with pytest.raises(NnppError, match=r"fold_1 was trained on 1 of the student's fold-0 validation cases \(c0\)"):
        check_leaks([_teacher(tmp_path, "0"), _teacher(tmp_path, "1")], root, 0, val0)
    with pytest.raises(NnppError, match="--allow_val_leak"):                        # teacher on 'all'
        check_leaks([_teacher(tmp_path, "all")], root, 0, val0)
    five = [_teacher(tmp_path, str(f)) for f in range(5)]                           # 5-fold ensemble
    leaks = check_leaks(five, root, 0, val0, allow_val_leak=True)
    assert [(n.split("/")[-1], c) for n, c in leaks] == [(f"fold_{f}", ["c0"]) for f in range(1, 5)]
    assert check_leaks(five, root, "all", split_cases(pre, "all")[1]) == []        # student on all


# ------------------------------------------------------------------------------------------ student plans
def test_student_plans_reduce_features(tiny_dataset):
    from nnpp.distill.student import make_student_plans, reduce_features
    assert reduce_features([32, 64, 320], 4) == [8, 16, 80]
    assert reduce_features([8, 16, 32], 4) == [8, 8, 8]      # never below 8
    assert reduce_features([4, 16], 2) == [4, 8]             # a stage narrower than 8 keeps its width
    plans = json.load(open(os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"], "nnUNetPlans.json")))
    sp = make_student_plans(plans, "3d_fullres", 2, "unet")
    conf, src = sp["configurations"]["3d_fullres"], plans["configurations"]["3d_fullres"]
    assert sp["plans_name"] == "nnUNetPlans_kd_unet_r2"
    assert conf["data_identifier"] == src["data_identifier"]  # reuses the preprocessed data
    assert conf["architecture"]["network_class_name"].endswith("PlainConvUNet")
    assert conf["architecture"]["arch_kwargs"]["features_per_stage"] == \
        [max(8, f // 2) for f in src["architecture"]["arch_kwargs"]["features_per_stage"]]
    with pytest.raises(NnppError, match="-r 0"):
        make_student_plans(plans, "3d_fullres", 0)


# ------------------------------------------------------------------------------ trainer: grads, frozen teachers
@pytest.fixture
def kd_trainer(tiny_dataset, tmp_path, monkeypatch):
    """A UNet++ student (r=2) with one random UNet++ teacher built from the dataset's plans; every method on."""
    from nnpp.distill.student import write_student_plans
    from nnpp.distill.teachers import Teacher
    from nnpp.distill.settings import KD_DEFAULTS
    from nnpp.run.train import make_trainer
    from nnpp.training import nnUNetPlusPlusTrainer

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    pre = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    plans_name = write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2)
    trainer = make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", "nnUNetPlusPlusTrainerKD", plans_name,
                           torch.device("cpu"))
    teacher_trainer = make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", device=torch.device("cpu"))
    net = nnUNetPlusPlusTrainer.build_network_architecture(
        teacher_trainer.plans_manager, teacher_trainer.configuration_manager, 1,
        teacher_trainer.label_manager.num_segmentation_heads, False)
    config = {**KD_DEFAULTS, "kd": ["soft", "cwd", "at", "sp", "mgd"], "cwd_feat": True, "t": ["x"], "tf": ["0"],
              "r": 2, "student": "unetpp"}
    trainer.configure_kd([Teacher(net, folder="teacher", fold="0")], config)
    trainer.initialize()
    return trainer


def _random_batch(trainer, n=2):
    patch = tuple(trainer.configuration_manager.patch_size)
    g = torch.Generator().manual_seed(0)
    data = torch.randn((n, 1, *patch), generator=g)
    seg = torch.randint(0, 3, (n, 1, *patch), generator=g).float()
    return {"data": data, "target": [seg] * trainer.num_heads}


def test_every_kd_term_reaches_student_and_kd_modules_only(kd_trainer):
    from nnpp.distill.kd_network import KDStudent
    net = kd_trainer.network
    assert isinstance(net, KDStudent)
    assert set(net.state_dict()) == set(net.net.state_dict())  # checkpoints hold the student only
    teacher = kd_trainer.teachers[0].network
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    x = _random_batch(kd_trainer)["data"]
    t_logits, t_skips = kd_trainer.teacher_outputs(x)
    out, skips, extra = net(x, features=True)
    terms = kd_trainer.kd_losses(out, skips, extra, t_logits, t_skips)
    assert set(terms) == {"soft", "cwd", "at", "sp", "mgd"}
    for name, term in terms.items():
        net.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        enc = [p.grad for p in net.net.encoder.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in enc), name
        own = [m for k, m in net.kd_modules.items() if k.startswith(name + "_")]
        for m in own:  # this method's adapters/generators get a gradient
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), (name, m)
        assert all(p.grad is None for p in teacher.parameters()), name
    assert any(k.startswith("cwd_") for k in net.kd_modules) and any(k.startswith("mgd_") for k in net.kd_modules)


def test_teacher_bit_identical_after_training_steps(kd_trainer):
    teacher = kd_trainer.teachers[0].network
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in kd_trainer.network.state_dict().items()}
    kd_before = {k: v.clone() for k, v in kd_trainer.network.kd_modules.state_dict().items()}
    for _ in range(2):
        out = kd_trainer.train_step(_random_batch(kd_trainer))
        assert torch.isfinite(out["loss"])
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    assert any(not torch.equal(student_before[k], v) for k, v in kd_trainer.network.state_dict().items())
    assert any(not torch.equal(kd_before[k], v) for k, v in kd_trainer.network.kd_modules.state_dict().items())
    assert set(kd_trainer._kd_terms[-1]) == {"seg", "soft", "cwd", "at", "sp", "mgd"}


def test_checkpoint_has_student_weights_and_kd_modules_apart(kd_trainer, tmp_path):
    kd_trainer.train_step(_random_batch(kd_trainer))
    path = str(tmp_path / "ck.pth")
    kd_trainer.save_checkpoint(path)
    ck = torch.load(path, map_location="cpu", weights_only=False)
    assert set(ck["network_weights"]) == set(kd_trainer.network.net.state_dict())
    assert not any("kd_modules" in k for k in ck["network_weights"])
    assert set(ck["nnpp_kd"]["modules"]) == set(kd_trainer.network.kd_modules.state_dict())
    assert ck["nnpp_run_settings"]["kd"] == ["soft", "cwd", "at", "sp", "mgd"] and ck["nnpp_kd"]["config"]["leaky"] is False
    # a fresh trainer restores the KD modules exactly; another KD configuration is refused
    saved = {k: v.clone() for k, v in kd_trainer.network.kd_modules.state_dict().items()}
    with torch.no_grad():
        for p in kd_trainer.network.kd_modules.parameters():
            p.zero_()
    kd_trainer.load_checkpoint(path)
    assert all(torch.equal(saved[k], v) for k, v in kd_trainer.network.kd_modules.state_dict().items())
    kd_trainer.kd_config["T"] = 5.0
    with pytest.raises(NnppError, match="another KD configuration.*T: 2.0 there, 5.0 now"):
        kd_trainer.load_checkpoint(path)


def test_compatibility_checks(kd_trainer):
    import copy
    from nnpp.distill.teachers import Teacher, check_compatible
    tr = kd_trainer
    t = tr.teachers[0]
    t.plans_manager, t.configuration_manager, t.dataset_json = tr.plans_manager, tr.configuration_manager, tr.dataset_json
    check_compatible(t, tr.plans_manager, tr.configuration_manager, tr.dataset_json)  # same data: fine
    other = Teacher(t.network, "teacher", "0", t.plans_manager, t.configuration_manager,
                    {**tr.dataset_json, "labels": {"background": 0, "liver": 1}})
    with pytest.raises(NnppError, match="labels"):
        check_compatible(other, tr.plans_manager, tr.configuration_manager, tr.dataset_json)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = copy.deepcopy(tr.plans_manager.plans)
    plans["configurations"]["3d_fullres"]["spacing"] = [9.0, 9.0, 9.0]
    pm = PlansManager(plans)
    spaced = Teacher(t.network, "teacher", "0", pm, pm.get_configuration("3d_fullres"), tr.dataset_json)
    with pytest.raises(NnppError, match="spacing"):
        check_compatible(spaced, tr.plans_manager, tr.configuration_manager, tr.dataset_json)


def test_unet_student_pools_the_target_to_each_head(tiny_dataset, tmp_path, monkeypatch):
    """--student unet: nnU-Net's PlainConvUNet from the student plans, nnU-Net's head weights (lowest 0), the
    soft-KD target average-pooled to each head's scale, and a training step on a real batch."""
    from nnpp.distill.student import write_student_plans
    from nnpp.distill.teachers import Teacher
    from nnpp.distill.kd_network import KDStudent
    from nnpp.distill.settings import KD_DEFAULTS
    from nnpp.run.train import make_trainer
    from nnpp.training import nnUNetPlusPlusTrainer

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    pre = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    plans_name = write_student_plans(pre, "nnUNetPlans", "3d_fullres", 4, "unet")
    trainer = make_trainer(str(tiny_dataset["id"]), "3d_fullres", "0", "nnUNetTrainerKD", plans_name,
                           torch.device("cpu"))
    net = nnUNetPlusPlusTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                           trainer.label_manager.num_segmentation_heads, False)
    trainer.configure_kd([Teacher(net, folder="teacher", fold="0")],
                         {**KD_DEFAULTS, "kd": ["soft"], "t": ["x"], "tf": ["0"], "r": 4, "student": "unet"})
    trainer.initialize()
    assert isinstance(trainer.network, KDStudent) and type(trainer.network.net).__name__ == "PlainConvUNet"
    w = trainer.deep_supervision_weights()
    assert w.tolist() == pytest.approx([2 / 3, 1 / 3, 0])  # nnU-Net's 1, 1/2, (1/4 -> 0), normalised
    batch = next(trainer.get_dataloaders()[0])
    outputs = trainer.network(batch["data"])
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[2:]) for t in batch["target"]]
    assert outputs[1].shape[2] < outputs[0].shape[2]  # coarser heads exist
    out = trainer.train_step(batch)
    assert torch.isfinite(out["loss"]) and trainer._kd_terms[-1]["soft"] > 0
