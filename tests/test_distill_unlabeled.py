"""nnpp_distill --unlabeled: the mixed batch (counts, which loss each patch gets, computed by hand), the unlabeled
cases preprocessed into their own folder (the labeled data untouched, reused when unchanged), the teacher's pseudo-
labels, the leak refusal (same id, same image under another id), --c."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import nnunet_env, output_tail, run_cli

from nnpp import NnppError
from nnpp import device as dev
from nnpp.distill import unlabeled as U
from nnpp.distill.settings import KD_DEFAULTS
from nnpp.distill.trainer import nnUNetPlusPlusTrainerKD

SHORT = ("-device", "cpu", "--epochs", "1", "--iters", "2", "--val_iters", "1")
STUDENT = "nnUNetTrainerKD__nnUNetPlans_kd_unet_r2__3d_fullres"


def test_unlabeled_per_batch_and_bad_fractions():
    assert [U.unlabeled_per_batch(0.5, b) for b in (2, 3, 4, 8)] == [1, 2, 2, 4]  # round half to even: 1.5 -> 2
    assert U.unlabeled_per_batch(0.1, 4) == 1 and U.unlabeled_per_batch(0.9, 4) == 3  # one of each kind at least
    with pytest.raises(NnppError, match="at least 2 patches"):
        U.unlabeled_per_batch(0.5, 1)
    with pytest.raises(NnppError, match=r"must be in \(0, 1\)"):
        U.unlabeled_per_batch(1.0, 4)


def test_mixed_loader_draws_unlabeled_first_then_labeled():
    class Labeled:
        identifiers = ["a", "b"]

        def load_case(self, i):
            return ("L", i)

    class Unlabeled:
        identifiers = ["u1", "u2", "u3"]

        def load_case(self, i):
            return ("U", i)
    data = U.MixedDataset(Labeled(), Unlabeled())
    assert data.identifiers == ["a", "b"] and data.unlabeled_identifiers == ["unlabeled/u1", "unlabeled/u2", "unlabeled/u3"]
    assert data.load_case("unlabeled/u2") == ("U", "u2") and data.load_case("b") == ("L", "b")
    loader = U.MixedDataLoader.__new__(U.MixedDataLoader)  # get_indices needs only these
    loader._data, loader.indices, loader.batch_size, loader.n_unlabeled = data, data.identifiers, 5, 2
    for _ in range(20):
        keys = loader.get_indices()
        assert len(keys) == 5
        assert list(U.unlabeled_mask(keys)) == [True, True, False, False, False]
        assert set(keys[:2]) <= set(data.unlabeled_identifiers) and set(keys[2:]) <= {"a", "b"}


def _nnunet_share(batch_size: int, p: float) -> float:
    """The share of a batch nnU-Net's own loader forces to foreground (its rule, called on a bare instance)."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    plain = nnUNetDataLoader.__new__(nnUNetDataLoader)
    plain.batch_size, plain.oversample_foreground_percent = batch_size, p
    return sum(plain._oversample_last_XX_percent(j) for j in range(batch_size)) / batch_size


@pytest.mark.parametrize("batch_size,n_unlabeled", [(2, 1), (4, 1), (4, 2)])
def test_mixed_batches_keep_nnunets_share_of_foreground_patches(batch_size, n_unlabeled):
    """Counted over 4,000 batches: the labeled patches (and the unlabeled ones) of a mixed batch are forced to
    foreground in nnU-Net's share for that batch size (batch 2: 1 of 2; batch 4: 1 of 4), not per group (a group of
    one labeled patch would never be forced: round(1 x 0.67) = 1)."""
    assert _nnunet_share(2, 0.33) == 0.5 and _nnunet_share(4, 0.33) == 0.25  # nnU-Net's rule, by hand
    loader = U.MixedDataLoader.__new__(U.MixedDataLoader)
    loader.batch_size, loader.n_unlabeled, loader.oversample_foreground_percent = batch_size, n_unlabeled, 0.33
    loader._probabilistic = False
    np.random.seed(0)
    forced = np.array([[loader._oversample_per_group(j) for j in range(batch_size)] for _ in range(4000)])
    share = _nnunet_share(batch_size, 0.33)
    assert forced[:, n_unlabeled:].mean() == pytest.approx(share, abs=0.025)
    assert forced[:, :n_unlabeled].mean() == pytest.approx(share, abs=0.025)


def test_mixed_loader_forces_the_last_patches_of_each_group_and_crops_unlabeled_at_random():
    loader = U.MixedDataLoader.__new__(U.MixedDataLoader)
    loader.batch_size, loader.n_unlabeled, loader.oversample_foreground_percent = 16, 8, 0.33
    loader._probabilistic = False
    # nnU-Net forces 16 - round(16 x 0.67) = 5 of 16; each group of 8 gets 2.5: its last 2 always, the 3rd from last
    # in every other batch
    np.random.seed(0)
    batches = np.array([[loader._oversample_per_group(j) for j in range(16)] for _ in range(2000)])
    assert batches[:, [6, 7, 14, 15]].all() and not batches[:, [0, 1, 2, 3, 4, 8, 9, 10, 11, 12]].any()
    assert batches[:, 5].mean() == pytest.approx(0.5, abs=0.05) and batches[:, 13].mean() == pytest.approx(0.5, abs=0.05)
    # an unlabeled case without labels (empty class locations): a random patch, also with an ignore label
    loader.need_to_pad, loader.patch_size, loader.has_ignore = np.array([0, 0]), [4, 4], True
    loader.annotated_classes_key = (-1, 0, 1)
    for force in (False, True):
        lbs, ubs = loader.get_bbox(np.array([10, 12]), force, {})
        assert all(0 <= lb and ub - lb == 4 and ub <= n for lb, ub, n in zip(lbs, ubs, (10, 12)))
    assert loader.has_ignore is True  # restored


class _Net(torch.nn.Module):
    """Returns the batch itself as 2-class logits (1 voxel): the loss terms are then known in closed form."""
    def forward(self, x, features=False):
        return (x, [], {}) if features else x


def _kd_trainer(mode: str, teacher_logits: torch.Tensor):
    t = nnUNetPlusPlusTrainerKD.__new__(nnUNetPlusPlusTrainerKD)
    t.kd_config = dict(KD_DEFAULTS, kd=["soft"], a=0.5, T=2.0, pseudo=mode, unlabeled=["x"])
    t.unlabeled_dir, t.teachers, t._kd_terms = "x", [], []
    t.device, t.memory_format = torch.device("cpu"), torch.contiguous_format
    t.amp = dev.make_amp("O0", t.device)
    t.network = _Net()
    t.enable_deep_supervision = False  # one output, a plain loss
    t.loss = lambda out, target: torch.nn.functional.cross_entropy(out.flatten(2), target[:, 0].flatten(1).long())

    class LM:
        has_regions = False
    t.label_manager = LM()

    class Opt:
        def zero_grad(self, set_to_none=True):
            pass
    t.optimizer = Opt()
    t.teacher_outputs = lambda data: ([teacher_logits], [None])
    t.losses_seen = []
    t.backward_and_step = lambda loss: t.losses_seen.append(float(loss))
    return t


def _ce(logits, label):  # cross-entropy of one 2-class voxel, by hand
    return float(torch.logsumexp(logits, 0) - logits[label])


def _soft(s, t, T=2.0):  # T^2 * KL(p_t || p_s) at temperature T, one voxel, by hand
    ps, pt = torch.softmax(s / T, 0), torch.softmax(t / T, 0)
    return float(T * T * (pt * (pt.log() - ps.log())).sum())


@pytest.mark.parametrize("mode", ["soft", "both"])
def test_mixed_batch_loss_terms_by_hand(mode):
    # batch of 3 single-voxel patches: position 0 unlabeled (its target is a pseudo-label, 1), 1 and 2 labeled
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 3.0], [1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([1, 1, 0])
    trainer = _kd_trainer(mode, t.view(3, 2, 1, 1, 1))
    batch = {"data": s.view(3, 2, 1, 1, 1), "target": target.view(3, 1, 1, 1, 1), "keys": ["unlabeled/u", "a", "b"]}
    trainer.train_step(batch)
    seg_on = [1, 2] if mode == "soft" else [0, 1, 2]  # soft: the unlabeled patch gets the KD terms only
    seg = np.mean([_ce(s[i], target[i]) for i in seg_on])
    soft = np.mean([_soft(s[i], t[i]) for i in range(3)])  # every patch, labeled and unlabeled
    assert trainer.losses_seen == [pytest.approx(0.5 * seg + 0.5 * soft, rel=1e-5)]
    terms = trainer._kd_terms[0]
    assert float(terms["seg"]) == pytest.approx(seg, rel=1e-5) and float(terms["soft"]) == pytest.approx(soft, rel=1e-5)


def test_hard_mode_runs_no_teacher(monkeypatch):
    trainer = _kd_trainer("hard", None)
    trainer.teacher_outputs = lambda data: pytest.fail("--pseudo hard must not run the teacher in the step")
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([1, 0])
    trainer.train_step({"data": s.view(2, 2, 1, 1, 1), "target": target.view(2, 1, 1, 1, 1),
                        "keys": ["unlabeled/u", "a"]})
    assert trainer.losses_seen == [pytest.approx(np.mean([_ce(s[0], 1), _ce(s[1], 0)]), rel=1e-5)]  # seg on both


def test_pseudo_labels_split_by_rank_whatever_is_done(monkeypatch, tmp_path):
    """Under torchrun each rank predicts sorted(cases)[rank::world]: the same split on every rank although another
    rank may already have written some of its files (a rank computing its list from what exists would skip or
    repeat cases); files already there are kept (when made from the image as it is: a record beside each); a rank
    with nothing left builds no predictor."""
    import nnpp.predictor.build as P
    built = []

    class FakePredictor:
        def predict_cases(self, files, outs, overwrite):
            for f, o in zip(files, outs):
                with open(o + ".nii.gz", "w") as fh:
                    fh.write(os.path.basename(f[0]))
    monkeypatch.setattr(P, "make_predictor", lambda *a, **k: built.append(1) or FakePredictor())
    monkeypatch.setattr(P, "init_torch", lambda *a, **k: None)
    (tmp_path / "images").mkdir()
    cases = {}
    for c in ("e", "a", "d", "b", "c"):
        (tmp_path / "images" / f"{c}_0000.nii.gz").write_text(f"image {c}")
        cases[c] = [str(tmp_path / "images" / f"{c}_0000.nii.gz")]
    out = tmp_path / "pseudo"
    out.mkdir()
    (out / "c.nii.gz").write_text("kept")  # done by an earlier, killed run, with the record of its image
    (out / "c.source.json").write_text(json.dumps({"image_sha1": U.image_sha1(cases["c"])}))
    (out / "a.nii.gz").write_text("no record")  # a pseudo-label without its record: made again
    args = (["teacher"], [0], cases, str(out), torch.device("cpu"), "checkpoint_final.pth", ".nii.gz")
    assert U.pseudo_label(*args, part=(1, 2)) == ["b", "d"]  # rank 1 first: a c e are rank 0's
    assert U.pseudo_label(*args, part=(0, 2)) == ["a", "e"]  # c is kept
    assert (out / "c.nii.gz").read_text() == "kept" and (out / "e.nii.gz").read_text() == "e_0000.nii.gz"
    assert (out / "a.nii.gz").read_text() == "a_0000.nii.gz"
    assert sorted(os.listdir(out)) == sorted(f"{c}{e}" for c in "abcde" for e in (".nii.gz", ".source.json"))
    assert len(built) == 2
    assert U.pseudo_label(*args, part=(0, 2)) == [] and len(built) == 2


def test_pseudo_labels_of_several_teacher_folders_average_their_probabilities(monkeypatch, tmp_path):
    """Several -t folders: per case every folder's probabilities (as nnU-Net's predictor saves them), merged by their
    mean (not a vote, not logits) into one mask; the per-folder files are gone afterwards. Probabilities by hand:
    voxel 0: A 0.9 / B 0.45 for background -> mean 0.675 -> 0 (B alone says 1); voxel 1: A 0.49 / B 0.2 -> 1
    (A alone says 1 too); voxel 2: A 0.4 / B 0.7 -> 0.55 -> 0 and voxel 3: A 0.2 / B 0.6 -> 0.4 -> 1 (ties of
    votes that the mean decides both ways; a vote, or the more confident folder, gives 0 and 0)."""
    import nibabel as nib
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnpp.predictor.build as P
    background = {"A": [0.9, 0.49, 0.4, 0.2], "B": [0.45, 0.2, 0.7, 0.6]}
    plans = PlansManager({"image_reader_writer": "NibabelIO", "plans_name": "p", "configurations": {}})

    class FakePredictor:
        plans_manager, dataset_json = plans, {"labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}

        def __init__(self):
            self.name = None

        def predict_cases(self, files, outs, save_probabilities, overwrite):
            assert save_probabilities and len(outs) == 1
            bg = np.array(background[self.name], dtype=np.float32).reshape(1, 1, 4)
            assert os.path.isdir(os.path.dirname(outs[0]))  # as nnpp's predictor needs
            np.savez_compressed(outs[0] + ".npz", probabilities=np.stack([bg, 1 - bg]))
            import pickle
            with open(outs[0] + ".pkl", "wb") as f:
                pickle.dump({"nibabel_stuff": {"original_affine": np.eye(4)}}, f)
    monkeypatch.setattr(P, "make_predictor", lambda *a, **k: FakePredictor())
    monkeypatch.setattr(P, "init_torch", lambda predictor, folder, *a: setattr(predictor, "name", folder))
    out = tmp_path / "pseudo"
    (out / ".ensemble.0.owner999999999-00000000").mkdir(parents=True)  # another node's, maybe running: kept
    (out / ".ensemble.0.killed").mkdir()  # a killed run's: removed
    (tmp_path / "scan_0000.nii.gz").write_bytes(b"image")  # read only for its record (the fake folders predict)
    done = U.pseudo_label(["A", "B"], [0], {"scan": [str(tmp_path / "scan_0000.nii.gz")]}, str(out),
                          torch.device("cpu"), "checkpoint_final.pth", ".nii.gz")
    assert done == ["scan"]  # the per-folder probabilities are gone, the other node's folder is not
    assert sorted(os.listdir(out)) == [".ensemble.0.owner999999999-00000000", "scan.nii.gz", "scan.source.json"]
    mask = np.asarray(nib.load(out / "scan.nii.gz").dataobj).transpose(2, 1, 0)  # NibabelIO's axis order
    assert mask.ravel().tolist() == [0, 1, 0, 1]
    # the folder is keyed by every teacher folder: another set of folders labels again
    for t in "AB":
        (tmp_path / t / "fold_0").mkdir(parents=True)
        (tmp_path / t / "fold_0" / "checkpoint_final.pth").write_bytes(b"weights")
    keys = [U.pseudo_folder("pre", [str(tmp_path / t) for t in ts], [0], "checkpoint_final.pth") for ts in ("AB", "A")]
    assert keys[0] != keys[1]


def test_a_rewritten_scan_is_labelled_and_preprocessed_again(tiny_dataset, monkeypatch, tmp_path):
    """Two unlabeled scans pseudo-labelled and preprocessed (as nnpp_distill --pseudo hard does, with a fake teacher),
    then one scan's voxels rewritten under the same name (its modification time put back, so only its content
    says it changed): the next run predicts that scan again and only it, keeps the other's pseudo-label as it is, and
    the preprocessed case of the rewritten scan holds the new pseudo-label (the old one's case is not reused)."""
    import nibabel as nib
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import nnpp.predictor.build as P
    ds = tiny_dataset
    pre = os.path.join(ds["nnUNet_preprocessed"], ds["name"])
    dataset_json = json.loads(open(os.path.join(pre, "dataset.json")).read())
    pm = PlansManager(os.path.join(pre, "nnUNetPlans.json"))
    cm = pm.get_configuration("3d_fullres")
    images = os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTr")
    unl = tmp_path / "unlabeled"
    unl.mkdir()
    for i, f in enumerate(sorted(os.listdir(images))[:2]):
        shutil.copy(os.path.join(images, f), unl / f"scan{i}_0000.nii.gz")
    predicted = []

    class FakeTeacher:  # labels a whole scan 1, or 2 where its intensities are all above 5000 (the rewritten one)
        def predict_cases(self, files, outs, overwrite):
            for f, o in zip(files, outs):
                predicted.append(os.path.basename(o))
                img = nib.load(f[0])
                label = 2 if np.asarray(img.dataobj).min() > 5000 else 1
                nib.save(nib.Nifti1Image(np.full(img.shape, label, dtype=np.uint8), img.affine), o + ".nii.gz")
    monkeypatch.setattr(P, "make_predictor", lambda *a, **k: FakeTeacher())
    monkeypatch.setattr(P, "init_torch", lambda *a, **k: None)
    base = str(tmp_path / "preprocessed")
    pseudo_dir = os.path.join(base, "nnpp_unlabeled", "pseudo_x")

    def run():
        cases = U.find_cases([str(unl)], ".nii.gz", 1)
        done = U.pseudo_label(["teacher"], [0], cases, pseudo_dir, torch.device("cpu"), "checkpoint_final.pth",
                              ".nii.gz")
        return done, U.prepare(cases, base, pm, cm, "3d_fullres", dataset_json, pseudo_dir)

    def segs(folder):  # {case: the labels of its preprocessed segmentation, outside the crop's -1}
        data = nnUNetDatasetBlosc2(folder)
        return {c: sorted(set(np.unique(np.asarray(data.load_case(c)[1]))) - {-1}) for c in data.identifiers}

    done, first = run()
    assert done == predicted == ["scan0", "scan1"] and segs(first) == {"scan0": [1], "scan1": [1]}
    label0 = os.path.join(pseudo_dir, "scan0.nii.gz")
    kept = os.stat(label0).st_mtime_ns, open(label0, "rb").read()

    scan = unl / "scan1_0000.nii.gz"  # new voxels, same name, same modification time
    st = os.stat(scan)
    img = nib.load(scan)
    nib.save(nib.Nifti1Image(np.abs(np.asarray(img.dataobj, dtype=np.float32)) + 6000, img.affine, img.header), scan)
    os.utime(scan, ns=(st.st_atime_ns, st.st_mtime_ns))
    predicted.clear()
    done, second = run()
    assert done == predicted == ["scan1"]  # the rewritten scan only
    assert (os.stat(label0).st_mtime_ns, open(label0, "rb").read()) == kept  # the other's pseudo-label reused
    assert np.unique(np.asarray(nib.load(os.path.join(pseudo_dir, "scan1.nii.gz")).dataobj)).tolist() == [2]
    assert second != first and segs(second) == {"scan0": [1], "scan1": [2]}  # preprocessed with the new label
    assert run() == ([], second) and predicted == ["scan1"]  # nothing changed since: all reused


# ------------------------------------------------------------------------------------------------- end to end
def _tree(folder):
    """{relative path: (size, mtime_ns)} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_distill_with_unlabeled_cases(tiny_dataset, trained_model, tmp_path):
    ds = tiny_dataset
    teacher_src = trained_model("nnUNetPlusPlusTrainer", 0)
    teacher = str(tmp_path / "teachers" / ds["name"] / os.path.basename(teacher_src))
    shutil.copytree(teacher_src, teacher, ignore=shutil.ignore_patterns("fold_[1-9]"))
    env = nnunet_env(ds, nnUNet_results=str(tmp_path / "results"))
    pre = os.path.join(ds["nnUNet_preprocessed"], ds["name"])
    splits = json.loads(open(os.path.join(pre, "splits_final.json")).read())
    val, train = splits[0]["val"], splits[0]["train"]
    images = os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTr")
    unl = tmp_path / "unlabeled"
    unl.mkdir()
    for i, case in enumerate(train[:2]):  # training images under new ids: unlabeled scans of the same kind
        shutil.copy(os.path.join(images, f"{case}_0000.nii.gz"), unl / f"scan{i}_0000.nii.gz")
    labeled = lambda: {k: v for k, v in _tree(pre).items()  # noqa: E731 (the labeled data: cases, labels, splits)
                       if k.startswith(("nnUNetPlans_3d_fullres", "gt_segmentations", "splits_final", "dataset.json"))}
    labeled_before = labeled()
    prepared = lambda kind="hard": set(glob.glob(os.path.join(  # noqa: E731 (other tests' folders are there too)
        pre, "nnpp_unlabeled", f"nnUNetPlans_kd_unet_r2_3d_fullres_{kind}_*")))
    prepared_before = prepared("*")

    p = run_cli("distill", ds["id"], "3d_fullres", 0, "-t", teacher, "--unlabeled", str(unl), *SHORT, env=env)
    assert p.returncode == 0, output_tail(p)
    assert "pseudo-labels: the teacher predicts 2 unlabeled case(s)" in p.stdout
    assert "unlabeled cases: 2 from" in p.stdout and "1 of 2 patches per batch, --pseudo hard" in p.stdout
    assert "--unlabeled: --pseudo hard (the default with --unlabeled; --pseudo soft|both keeps online KD terms): " \
           "unlabeled patches learn the teacher's pseudo-labels" in p.stdout and "no KD terms on any patch" in p.stdout
    assert labeled() == labeled_before and len(labeled_before) > 10  # untouched
    folders = sorted(prepared() - prepared_before)  # what this run prepared
    assert len(folders) == 1 and sorted(os.listdir(folders[0])) == sorted(
        ["nnpp_unlabeled.json"] + [f"scan{i}{e}" for i in range(2) for e in (".b2nd", "_seg.b2nd", ".pkl")])
    pseudo = glob.glob(os.path.join(pre, "nnpp_unlabeled", "pseudo_*", "scan*.nii.gz"))
    assert len(pseudo) == 2
    fold = tmp_path / "results" / ds["name"] / STUDENT / "fold_0"
    record = json.loads((fold / "kd_config.json").read_text())
    assert record["unlabeled_cases"] == ["scan0", "scan1"] and record["pseudo"] == "hard"
    assert record["unlabeled_preprocessed"] == folders[0] and {"scan0", "scan1"} <= set(record["training_cases"])

    # --c: the run's unlabeled settings come back and the prepared folder is reused as it is
    stamp = _tree(folders[0])
    p = run_cli("distill", ds["id"], "3d_fullres", 0, "--c", "-device", "cpu", env=env)
    assert p.returncode == 0, output_tail(p)
    assert "unlabeled cases: reusing" in p.stdout and _tree(folders[0]) == stamp

    # --pseudo soft: the unlabeled cases without labels (random patches), the teacher online; --kd with hard: refused
    out3 = str(tmp_path / "results3")
    p = run_cli("distill", ds["id"], "3d_fullres", 0, "-t", teacher, "--unlabeled", str(unl), "--pseudo", "soft",
                *SHORT, env=nnunet_env(ds, nnUNet_results=out3))
    assert p.returncode == 0 and "1 of 2 patches per batch, --pseudo soft" in p.stdout, output_tail(p)
    assert "KD terms (epoch means, unweighted): seg " in p.stdout and ", soft " in p.stdout
    none = sorted(prepared("none") - prepared_before)
    assert len(none) == 1 and not any(f.endswith("_seg.b2nd") and os.path.getsize(os.path.join(none[0], f)) == 0
                                      for f in os.listdir(none[0]))
    p = run_cli("distill", ds["id"], "3d_fullres", 0, "-t", teacher, "--unlabeled", str(unl), "--kd", "soft",
                *SHORT, env=nnunet_env(ds, nnUNet_results=str(tmp_path / "results4")))
    assert p.returncode == 2 and "--kd soft with --pseudo hard" in p.stderr and p.stderr.count("\n") == 1, output_tail(p)

    # leaks: a validation case's image under a new id, then under its own id -> one line, exit 2, nothing prepared
    shutil.copy(os.path.join(images, f"{val[0]}_0000.nii.gz"), unl / "copy_0000.nii.gz")
    out2 = str(tmp_path / "results2")
    p = run_cli("distill", ds["id"], "3d_fullres", 0, "-t", teacher, "--unlabeled", str(unl), *SHORT,
                env=nnunet_env(ds, nnUNet_results=out2))
    assert p.returncode == 2 and f"copy = {val[0]} (same voxels and spacing)" in p.stderr, output_tail(p)
    os.replace(unl / "copy_0000.nii.gz", unl / f"{val[0]}_0000.nii.gz")
    p = run_cli("distill", ds["id"], "3d_fullres", 0, "-t", teacher, "--unlabeled", str(unl), *SHORT,
                env=nnunet_env(ds, nnUNet_results=out2))
    assert p.returncode == 2 and f"validation case(s) {val[0]} (same id)" in p.stderr, output_tail(p)
    assert len(prepared("*") - prepared_before) == 2  # this test's hard and none folders: the leaks prepared none
