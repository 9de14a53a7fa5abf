"""ONNX deployment: nnpp_export (strict rebuild, op set, parity, metadata), nnpp_predict --onnx through nnU-Net's
predictor (masks and probabilities vs torch), pruned exports, tampered folders, missing dependency.

Needs the [onnx] extra (CI installs it through scripts/setup.sh); skipped only where onnxruntime is missing."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import nnunet_env, output_tail, run_cli

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed (pip install -e '.[onnx]')")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from nnpp.model_folder import sha256_file  # noqa: E402

UNETPP, UNET = "nnUNetPlusPlusTrainer", "nnUNetTrainer"


def results_of(model_folder):
    return os.path.dirname(os.path.dirname(model_folder))


def images_ts(ds):
    return os.path.join(ds["nnUNet_raw"], ds["name"], "imagesTs")


def export(monkeypatch, capsys, model_folder, ds, *args):
    """nnpp_export in-process; returns (exit code, stdout, stderr)."""
    from nnpp.run import export as cli
    monkeypatch.setenv("nnUNet_results", results_of(model_folder))
    tr = os.path.basename(model_folder).split("__")[0]
    try:
        rc = cli.main([str(ds["id"]), "3d_fullres", "-tr", tr, *map(str, args)])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def torch_net(model_folder, fold="0"):
    """The reference: the network nnU-Net's own predictor would build (its initialize_from_trained_model_folder)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    p = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    if os.path.basename(model_folder).startswith(UNETPP):
        from nnpp.model_folder import load_trained_model  # nnU-Net cannot find nnpp's trainer class by itself
        return load_trained_model(model_folder, [fold]).build_network(0)
    p.initialize_from_trained_model_folder(model_folder, (int(fold),))
    return p.network.eval()


def run_onnx(path, x):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x.numpy()})[0]


@pytest.fixture(scope="module")
def unetpp_export(trained_model, tiny_dataset, tmp_path_factory):
    """Fold 0 of the trained UNet++ exported with the console script (as a user runs it)."""
    folder = trained_model(UNETPP, 0)
    out = tmp_path_factory.mktemp("onnx_unetpp")
    p = run_cli("export", tiny_dataset["id"], "3d_fullres", "-f", "0", "-o", out,
                env=nnunet_env(tiny_dataset, nnUNet_results=results_of(folder)))
    assert p.returncode == 0, output_tail(p)
    return folder, str(out), p.stdout


@pytest.mark.slow
def test_export_unetpp_parity_and_metadata(unetpp_export):
    folder, out, stdout = unetpp_export
    assert sorted(os.listdir(out)) == ["dataset.json", "fold_0.onnx", "nnpp_onnx.json", "plans.json"]
    meta = json.load(open(os.path.join(out, "nnpp_onnx.json")))
    plans = json.load(open(os.path.join(folder, "plans.json")))
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    assert meta["patch_size"] == patch and meta["input_shape"] == ["batch", 1, *patch]
    assert meta["num_classes"] == 3 and meta["depth"] == meta["full_depth"] >= 2 and not meta["pruned"]
    assert meta["inference_allowed_mirroring_axes"] == [0, 1, 2] and meta["exporter"] == "dynamo"
    (f0,) = meta["folds"]
    assert f0["checkpoint_sha256"] == sha256_file(os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    assert f0["sha256"] == sha256_file(os.path.join(out, "fold_0.onnx"))
    assert json.load(open(os.path.join(out, "plans.json"))) == plans
    # the op set: instance norm stays InstanceNormalization (no training-mode BatchNormalization)
    model = onnx.load(os.path.join(out, "fold_0.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "ConvTranspose", "InstanceNormalization"} <= ops and "BatchNormalization" not in ops
    assert meta["ops"] == sorted(ops)
    # static patch, dynamic batch
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, *patch]
    # the parity line (that the check can fail: test_parity_check_refuses_a_perturbed_model), and an independent
    # check: 3 patches at once, against the network built by hand
    assert f"max abs diff {f0['parity']['max_abs_diff']:.3g}" in stdout and "-> OK" in stdout
    x = torch.randn(3, 1, *patch)
    with torch.no_grad():
        ref = torch_net(folder)(x).numpy()
    got = run_onnx(os.path.join(out, "fold_0.onnx"), x)
    assert got.shape == (3, 3, *patch)
    assert np.abs(got - ref).max() < 1e-3 and (got.argmax(1) == ref.argmax(1)).mean() > 0.999


def test_export_plain_unet(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    """nnU-Net's own trainer and network (PlainConvUNet) export and pass the parity check too; TorchScript exporter."""
    folder = trained_model(UNET, 0)
    rc, out, err = export(monkeypatch, capsys, folder, tiny_dataset, "-f", "0", "-o", tmp_path / "o",
                          "--exporter", "torchscript")
    assert rc == 0, err
    meta = json.load(open(tmp_path / "o" / "nnpp_onnx.json"))
    assert meta["source"]["trainer"] == UNET and meta["depth"] is None and meta["exporter"] == "torchscript"
    assert "InstanceNormalization" in meta["ops"] and "BatchNormalization" not in meta["ops"]
    x = torch.randn(2, 1, *meta["patch_size"])
    with torch.no_grad():
        ref = torch_net(folder)(x).numpy()
    assert np.abs(run_onnx(str(tmp_path / "o" / "fold_0.onnx"), x) - ref).max() < 1e-3


def test_pruned_export_matches_net_depth_k(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    folder = trained_model(UNETPP, 0)
    # the session's model trained its shallow heads as probes: depth 1 is refused, nothing written, unless allowed
    rc, _, err = export(monkeypatch, capsys, folder, tiny_dataset, "-f", "0", "--depth", "1")
    assert rc == 2 and "was trained as a probe" in err and "--allow_untrained_depth" in err
    out = os.path.join(folder, "onnx_depth1")  # default output folder of a pruned export
    assert not os.path.exists(out)
    rc, _, err = export(monkeypatch, capsys, folder, tiny_dataset, "-f", "0", "--depth", "1", "--allow_untrained_depth")
    assert rc == 0, err
    try:
        meta = json.load(open(os.path.join(out, "nnpp_onnx.json")))
        assert meta["depth"] == 1 and meta["pruned"] and meta["full_depth"] >= 2
        assert meta["depth_from"] == "untrained"
        net = torch_net(folder)
        x = torch.randn(2, 1, *meta["patch_size"])
        with torch.no_grad():
            pruned, full = net(x, depth=1).numpy(), net(x).numpy()
        got = run_onnx(os.path.join(out, "fold_0.onnx"), x)
        assert np.abs(got - pruned).max() < 1e-4
        assert np.abs(got - full).max() > 1e-2  # it is not the full network
    finally:
        shutil.rmtree(out)  # the model folder is shared by the session


@pytest.mark.slow
def test_predict_onnx_agrees_with_torch(unetpp_export, tiny_dataset, tmp_path):
    """nnpp_predict --onnx (nnU-Net's pipeline: preprocessing, Gaussian sliding window, mirroring, export) vs the
    torch network: >= 99.9% of voxels agree, and the probabilities agree closely. Both resample in fp32
    (--resample torch): the default plans path stores the logits in fp16 as nnU-Net does, which turns the backends'
    1e-6 differences into flipped ties on the tiny model's nearly flat logits -- a property of the export, not of
    the backends compared here."""
    folder, out, _ = unetpp_export
    env = nnunet_env(tiny_dataset, nnUNet_results=results_of(folder))
    common = ("-i", images_ts(tiny_dataset), "-f", "0", "-npp", "0", "-nps", "0", "--save_probabilities",
              "--disable_progress_bar", "-step_size", "0.5", "--resample", "torch")
    p = run_cli("predict", *common, "-o", tmp_path / "onnx", "--onnx", out, "--ort_threads", "1", env=env)
    assert p.returncode == 0, output_tail(p)
    assert "ONNX Runtime (cpu, threads 1)" in p.stdout
    p = run_cli("predict", *common, "-o", tmp_path / "torch", "-d", tiny_dataset["id"], "-c", "3d_fullres",
                "-device", "cpu", env=env)
    assert p.returncode == 0, output_tail(p)
    compare_outputs(tmp_path / "onnx", tmp_path / "torch")


def test_memory_rule_counts_the_exported_networks_activations(unetpp_export, tmp_path):
    """--tta_batch auto under --onnx: the predictor's rule counts the activations of the torch network the export
    was built from (nnpp_export records its count; an export without the record has it rebuilt from its plans) and
    the logits at the precision the session returns (fp32), on a GPU device too (before: 0 activations, and 2-byte
    logits on cuda). The count against ONNX Runtime's measured peak: tests/test_memory.py."""
    from nnpp.deploy.ort import init_onnx
    from nnpp.predictor.build import make_predictor
    folder, out, _ = unetpp_export
    meta = json.load(open(os.path.join(out, "nnpp_onnx.json")))
    count = int(torch_net(folder).compute_conv_feature_map_size(meta["patch_size"]))
    assert meta["feature_map_size"] == count > 0
    older = str(tmp_path / "older_export")
    shutil.copytree(out, older)
    del meta["feature_map_size"]
    json.dump(meta, open(os.path.join(older, "nnpp_onnx.json"), "w"))
    logits = meta["num_classes"] * int(np.prod(meta["patch_size"])) * 4
    for export_folder in (out, older):
        pred = make_predictor(torch.device("cpu"), progress=False)
        init_onnx(pred, export_folder)
        net = pred.network
        assert (net.feature_map_size, net.logits_itemsize, net.activations_itemsize) == (count, 4, 4)
        # 8 mirrors of one tile per call: 7 logits (8 outputs + 1 sum - nnU-Net's 2) and the batch's 8 samples'
        # activations (ONNX Runtime's arena keeps the batch-1 calls' blocks beside them)
        assert pred.tta_surplus_bytes(8) == 7 * logits + 8 * count * 4
        pred.device = torch.device("cuda")  # where --ort_provider cuda puts the tiles: the session still returns fp32
        assert pred.tta_surplus_bytes(8) == 7 * logits + 8 * count * 4
        assert pred.tta_surplus_bytes(1) == 0  # nnU-Net's own one copy per call


@pytest.mark.slow
def test_predict_openvino_agrees_with_onnxruntime(unetpp_export, tiny_dataset, tmp_path):
    """--ort_provider openvino (OpenVINO's runtime on the same .onnx; the [openvino] extra) in nnU-Net's predictor."""
    pytest.importorskip("openvino", reason="the [openvino] extra is not installed")
    from nnpp.run import predict
    _, out, _ = unetpp_export
    common = ["-i", images_ts(tiny_dataset), "--onnx", out, "-npp", "0", "-nps", "0", "--save_probabilities",
              "--disable_progress_bar", "--disable_tta", "--ort_threads", "1"]
    assert predict.main(common + ["-o", str(tmp_path / "ov"), "--ort_provider", "openvino"]) == 0
    assert predict.main(common + ["-o", str(tmp_path / "ort")]) == 0
    # OpenVINO's and ONNX Runtime's logits differ by ~2e-4; nnU-Net accumulates Gaussian-weighted (x10) logits in
    # fp16, where such differences round apart: up to ~5e-3 on a few probabilities was seen on some fixture models
    # (the same with and without batched mirroring)
    compare_outputs(tmp_path / "ov", tmp_path / "ort", prob_tol=1e-2)


def compare_outputs(a, b, min_agreement=0.999, prob_tol=1e-3):
    import SimpleITK as sitk
    segs = sorted(f for f in os.listdir(a) if f.endswith(".nii.gz"))
    assert segs and segs == sorted(f for f in os.listdir(b) if f.endswith(".nii.gz"))
    for f in segs:
        sa, sb = (sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(d, f))) for d in (a, b))
        assert sa.shape == sb.shape and (sa == sb).mean() >= min_agreement, (f, (sa == sb).mean())
        pa, pb = (np.load(os.path.join(d, f.replace(".nii.gz", ".npz")))["probabilities"] for d in (a, b))
        assert np.abs(pa - pb).max() < prob_tol


def test_multi_fold_averaging_onnx_vs_torch(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    """Two folds (fold 1 = fold 0 with perturbed weights): --onnx averages the folds' probabilities as the torch
    predictor does, each fold through its own session."""
    src = trained_model(UNETPP, 0)
    folder = tmp_path / "results" / os.path.basename(os.path.dirname(src)) / os.path.basename(src)
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("validation", "onnx*", "fold_[1-9]"))  # fold 0 only
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    g = torch.Generator().manual_seed(0)
    ckpt["network_weights"] = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point()
                               and v.numel() > 1 else v for k, v in ckpt["network_weights"].items()}
    os.makedirs(folder / "fold_1")
    torch.save(ckpt, folder / "fold_1" / "checkpoint_final.pth")
    rc, _, err = export(monkeypatch, capsys, str(folder), tiny_dataset, "-f", "0", "1", "-o", tmp_path / "x")
    assert rc == 0, err
    from nnpp.run import predict
    common = ["-i", images_ts(tiny_dataset), "-f", "0", "1", "-npp", "0", "-nps", "0", "--save_probabilities",
              "--disable_progress_bar", "--disable_tta"]
    assert predict.main(common + ["-o", str(tmp_path / "onnx"), "--onnx", str(tmp_path / "x")]) == 0
    assert predict.main(common + ["-o", str(tmp_path / "torch"), "-d", str(tiny_dataset["id"]), "-c", "3d_fullres",
                                  "-device", "cpu"]) == 0
    compare_outputs(tmp_path / "onnx", tmp_path / "torch")
    # and the average is not just one fold's prediction
    assert predict.main(common[:2] + ["-f", "0"] + common[5:] + ["-o", str(tmp_path / "f0"), "--onnx",
                                                                 str(tmp_path / "x")]) == 0
    f = next(n for n in os.listdir(tmp_path / "f0") if n.endswith(".npz"))
    assert np.abs(np.load(tmp_path / "f0" / f)["probabilities"] - np.load(tmp_path / "onnx" / f)["probabilities"]).max() > 1e-3


# ------------------------------------------------------------------------------------------ what must fail
def copy_model(trained_model, tmp_path, trainer=UNETPP):
    src = trained_model(trainer, 0)
    dst = tmp_path / "results" / os.path.basename(os.path.dirname(src)) / os.path.basename(src)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("validation", "onnx*", "fold_[1-9]"))  # fold 0 only
    return str(dst)


def export_err(*args):
    rc, _, err = export(*args)
    return rc, err


def _one_line(rc, err, *fragments):
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_export_refuses_tampered_folders(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    folder = copy_model(trained_model, tmp_path)
    out = tmp_path / "out"
    # plans.json edited after training: a different network than the one trained
    plans_path = os.path.join(folder, "plans.json")
    original = open(plans_path).read()
    plans = json.loads(original)
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][0] *= 2
    json.dump(plans, open(plans_path, "w"))
    _one_line(*export_err(monkeypatch, capsys, folder, tiny_dataset, "-f", "0", "-o", out),
              "plans.json in", "differs from the plans", "checkpoint_final.pth was trained with")
    open(plans_path, "w").write(original)
    # a checkpoint of another run (nnU-Net's U-Net) dropped into the UNet++ folder
    ckpt = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    shutil.copy(os.path.join(trained_model(UNET, 0), "fold_0", "checkpoint_final.pth"), ckpt)
    rc, _, err = export(monkeypatch, capsys, folder, tiny_dataset, "-f", "0", "-o", out)
    _one_line(rc, err, "checkpoint_final.pth was written by nnUNetTrainer / 3d_fullres, but this is the "
                       "nnUNetPlusPlusTrainer / 3d_fullres model folder; it mixes runs")
    # a truncated checkpoint
    with open(ckpt, "r+b") as f:
        f.truncate(2000)
    _one_line(*export_err(monkeypatch, capsys, folder, tiny_dataset, "-f", "0", "-o", out), "truncated or corrupt")
    # a missing fold, --depth on nnU-Net's U-Net, a parity failure: one line each, nothing written
    _one_line(*export_err(monkeypatch, capsys, folder, tiny_dataset, "-f", "3", "-o", out),
              "no checkpoint_final.pth for fold(s) 3")
    _one_line(*export_err(monkeypatch, capsys, trained_model(UNET, 0), tiny_dataset, "-f", "0", "-o", out, "--depth", "1"),
              "--depth is a UNet++ option; PlainConvUNet cannot be pruned")
    _one_line(*export_err(monkeypatch, capsys, trained_model(UNETPP, 0), tiny_dataset, "-f", "0", "-o", out,
                      "--tol", "1e-12"), "ONNX Runtime differs from torch by", "nothing was written")
    assert not out.exists()


def test_parity_check_refuses_a_perturbed_model(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    """The exporter writes a model whose last convolution (the segmentation head; an earlier one would be mostly
    normalised away by instance norm) is 1% off, as a faulty exporter or op lowering would:
    the parity check against torch must refuse it, one line, nothing written."""
    from onnx import numpy_helper

    from nnpp.deploy import export as exp
    original = exp.export_network

    def perturbed(network, path, *args, **kwargs):
        original(network, path, *args, **kwargs)
        model = onnx.load(path)
        conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
        init = next(i for i in model.graph.initializer if i.name == conv.input[1])
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
        onnx.save(model, path)
    monkeypatch.setattr(exp, "export_network", perturbed)
    out = tmp_path / "o"
    _one_line(*export_err(monkeypatch, capsys, trained_model(UNETPP, 0), tiny_dataset, "-f", "0", "-o", out),
              "fold 0: ONNX Runtime differs from torch by", "nothing was written")
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".nnpp_export")]


def test_predict_onnx_refuses_tampered_export(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    folder = trained_model(UNETPP, 0)
    out = tmp_path / "x"
    rc, _, err = export(monkeypatch, capsys, folder, tiny_dataset, "-f", "0", "-o", out, "--depth", "2",
                        "--allow_untrained_depth")
    assert rc == 0, err
    from nnpp.run import predict

    def run(*args):
        try:
            rc = predict.main(["-i", images_ts(tiny_dataset), "-o", str(tmp_path / "o"), *map(str, args)])
        except SystemExit as e:
            rc = e.code
        return rc, capsys.readouterr().err
    _one_line(*run("--onnx", out, "-f", "1"), "has fold(s) 0, not 1")
    _one_line(*run("--onnx", out, "--depth", "1"), "--depth is fixed at export")
    _one_line(*run("--onnx", out, "--ort_provider", "cuda") if "CUDAExecutionProvider" not in
              ort.get_available_providers() else (2, "error: --ort_provider cuda skip"), "--ort_provider cuda")
    _one_line(*run("--onnx", out), "exported at depth 2, whose head was only a probe", "--allow_untrained_depth")
    with open(out / "fold_0.onnx", "r+b") as f:  # one flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    _one_line(*run("--onnx", out), "fold_0.onnx is not the file nnpp_export wrote")
    _one_line(*run("--onnx", tmp_path / "nothing"), "no such folder")
    assert not (tmp_path / "o").exists()


def test_missing_onnxruntime_is_one_line(trained_model, tiny_dataset, tmp_path):
    """Without the [onnx] extra: one line naming it (simulated by a module that fails to import)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "onnxruntime.py").write_text("raise ImportError('No module named onnxruntime')\n")
    folder = trained_model(UNETPP, 0)
    env = nnunet_env(tiny_dataset, nnUNet_results=results_of(folder),
                     PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]))
    p = run_cli("export", tiny_dataset["id"], "3d_fullres", "-f", "0", "-o", tmp_path / "o", env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr, output_tail(p)
    assert "onnxruntime is not installed" in p.stderr and "pip install 'nnpp[onnx]'" in p.stderr
