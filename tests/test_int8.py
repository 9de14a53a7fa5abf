"""nnpp_export --precision int8|fp16: ONNX Runtime's static quantization calibrated on the model's own training
tiles (or fp16 conversion), scored against fp32 through nnU-Net's predictor on the validation cases, refused past
--max_dice_drop."""
import json
import os

import pytest

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed (pip install -e '.[onnx]')")
import onnx  # noqa: E402

UNETPP = "nnUNetPlusPlusTrainer"


def export(monkeypatch, capsys, model_folder, ds, *args, precision="int8"):
    from nnpp.run import export as cli
    monkeypatch.setenv("nnUNet_results", os.path.dirname(os.path.dirname(model_folder)))
    try:
        rc = cli.main([str(ds["id"]), "3d_fullres", "-tr", UNETPP, "-f", "0", "--exporter", "torchscript",
                       "--precision", precision, "--calib_tiles", "4", *map(str, args)])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_int8_export_records_its_dice(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    rc, out, err = export(monkeypatch, capsys, trained_model(UNETPP, 0), tiny_dataset, "-o", tmp_path / "q",
                          "--max_dice_drop", "1")
    assert rc == 0, err
    meta = json.load(open(tmp_path / "q" / "nnpp_onnx.json"))
    (f0,) = meta["folds"]
    q = f0["quantization"]
    assert meta["precision"] == "int8" and q["calibration_tiles"] == 4 and q["score_cases"]
    assert q["guard_cases"] == 8 and q["score_cases"] == sorted(q["score_cases"])  # at most 8, named
    assert set(q["dice_fp32"]) == set(q["dice_int8"]) == {"1", "2"} and 0 <= q["mask_agreement"] <= 1
    assert "Dice fp32 -> int8 on" in out and "-> OK" in out
    lat = f0["latency"]  # timed on this machine with ONNX Runtime's CPU provider, printed and recorded
    assert lat["backend"] == "ONNX Runtime (CPU)" and lat["fp32_ms"] > 0 and lat["int8_ms"] > 0
    assert f"fold 0: latency per patch fp32 {lat['fp32_ms']:.1f} ms, int8 {lat['int8_ms']:.1f} ms " \
           f"({lat['speedup']:.2f}x) with ONNX Runtime (CPU) on this machine" in out
    assert meta["runtime"] == "onnxruntime" and meta["quantizer"] == "ort"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "fold_0.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "InstanceNormalization"} <= ops
    # (the scoring above already ran the int8 file through nnU-Net's predictor, as nnpp_predict --onnx does)


def test_fp16_export_is_scored(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    rc, out, err = export(monkeypatch, capsys, trained_model(UNETPP, 0), tiny_dataset, "-o", tmp_path / "h",
                          "--max_dice_drop", "1", precision="fp16")
    assert rc == 0, err
    meta = json.load(open(tmp_path / "h" / "nnpp_onnx.json"))
    q = meta["folds"][0]["quantization"]
    assert meta["precision"] == "fp16" and set(q["dice_fp16"]) == {"1", "2"} and "Dice fp32 -> fp16 on" in out
    model = onnx.load(str(tmp_path / "h" / "fold_0.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(i for i in model.graph.initializer if i.name == conv.input[1])
    assert weight.data_type == onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # the predictor feeds fp32


def test_guard_refuses_a_quantized_model_that_loses_dice(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    """A quantizer that returns a model predicting background everywhere, against an fp32 model (the session's,
    trained for 2 iterations, made to predict liver everywhere so that its liver Dice is > 0 whatever the training
    gave): the liver Dice drops beyond the default --max_dice_drop 0.01; one line, nothing written."""
    from onnx import numpy_helper

    from nnpp.deploy import quantize as q

    def constant_head(src, dst, winner):
        model = onnx.load(src)
        head = [n for n in model.graph.node if n.op_type == "Conv"][-1]
        for name, value in zip(head.input[1:], (0.0, None)):
            init = next(i for i in model.graph.initializer if i.name == name)
            arr = numpy_helper.to_array(init).copy()
            if value is None:  # bias: class `winner` wins everywhere
                arr[:] = 0
                arr[winner] = 10
            else:
                arr[:] = value
            init.CopyFrom(numpy_helper.from_array(arr, name))
        onnx.save(model, dst)

    def background_only(fp32_path, out_path, reader):
        constant_head(fp32_path, fp32_path, 1)  # the reference the guard scores against: liver everywhere
        constant_head(fp32_path, out_path, 0)
        return {"tool": "test"}
    monkeypatch.setattr(q, "quantize_int8", background_only)
    rc, out, err = export(monkeypatch, capsys, trained_model(UNETPP, 0), tiny_dataset, "-o", tmp_path / "q")
    assert rc == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "fold 0: int8 lowers the Dice of label 1 by" in line and "(> --max_dice_drop 0.01)" in line
    assert "nothing was written" in line and "-> REFUSED" in out
    assert not (tmp_path / "q").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".nnpp_export")]
    report = json.load(open(tmp_path / "q.guard.json"))  # the scores, beside (not into) the refused output
    assert f"(scores in {tmp_path / 'q.guard.json'})" in line
    assert report["refused"] and report["worst_label"] == "1" and report["dice_drop"]["1"] > 0.01


def test_output_folder_is_per_precision_and_stale_temp_folders_go(tmp_path):
    """The default folder names the precision and depth; a previous export of the same model at another precision is
    never replaced (not even with --overwrite); temp folders of killed exports on this host are removed, those of
    running exports and other hosts kept."""
    import socket
    import subprocess
    import sys
    from types import SimpleNamespace

    from nnpp import NnppError
    from nnpp.deploy.export_folder import TMP_PREFIX, check_output_folder, default_output_folder, remove_stale_temp_folders
    assert default_output_folder("M") == os.path.join("M", "onnx")
    assert default_output_folder("M", 2, "int8") == os.path.join("M", "onnx_depth2_int8")
    model = SimpleNamespace(folder=str(tmp_path / "model"), configuration="3d_fullres")
    out = tmp_path / "onnx"
    out.mkdir()
    json.dump({"format": "nnpp-onnx", "source": {"model_folder": model.folder, "configuration": "3d_fullres"},
               "precision": "fp32", "depth": 3, "full_depth": 3, "pruned": False}, open(out / "nnpp_onnx.json", "w"))
    assert check_output_folder(str(out), model, overwrite=True) is True
    with pytest.raises(NnppError, match="holds a fp32 export of this model .*not int8"):
        check_output_folder(str(out), model, overwrite=True, precision="int8")

    from nnpp.deploy.export_folder import _temp_folder
    from nnpp.file_safety import owner_space
    space = owner_space()
    other = "0" * 8 if space != "0" * 8 else "1" * 8  # another host, or a container with its own pids
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(dead.stdout)
    names = {"dead": f"{TMP_PREFIX}ab_c.owner{dead}-{space}", "old": f"{TMP_PREFIX}old_x.owner{dead}-{space}",
             "nameless": f"{TMP_PREFIX}{socket.gethostname()}_{dead}_x",  # older nnpp's: no owner to ask
             "alive": f"{TMP_PREFIX}xy.owner{os.getppid()}-{space}", "other": f"{TMP_PREFIX}z.owner{dead}-{other}"}
    for n in names.values():
        (tmp_path / n).mkdir()
    mine = _temp_folder(str(tmp_path))  # this process's own, while it works
    removed = remove_stale_temp_folders(str(tmp_path))
    assert sorted(removed) == sorted(str(tmp_path / names[k]) for k in ("dead", "old", "nameless"))
    assert (tmp_path / names["alive"]).exists() and (tmp_path / names["other"]).exists() and os.path.isdir(mine)


def test_guard_refuses_when_no_label_can_be_scored(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    """Validation cases in which no label occurs give no Dice to compare: the export is refused (a guard that
    measured nothing must not pass), one line, nothing written."""
    from nnpp.deploy import quantize as q

    def no_labels(model, fold, sessions, **kwargs):
        return {"cases": ["c0"], "dice": {n: {"1": None, "2": None} for n in sessions}, "agreement": 1.0}
    monkeypatch.setattr(q, "score", no_labels)
    rc, out, err = export(monkeypatch, capsys, trained_model(UNETPP, 0), tiny_dataset, "-o", tmp_path / "h",
                          precision="fp16")
    assert rc == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "no label occurs in the 1 validation case(s)" in line
    assert not (tmp_path / "h").exists()


def test_guard_dice_leaves_the_ignore_label_unscored():
    """Labels {0 background, 1 organ, 2 ignore}: one annotated slice, the rest ignore. A prediction that is right
    on the annotated slice scores 1.0 as in nnU-Net's evaluation, whatever it says in the unannotated slices
    (counted as false positives there, it scored 2 * 4 / (4 * 4 + 4) = 0.4)."""
    import numpy as np

    from nnpp.deploy.quantize import _dice
    ref = np.full((4, 4, 4), 2)
    ref[0] = 0
    ref[0, 1:3, 1:3] = 1  # 4 organ voxels annotated in slice 0
    pred = np.zeros((4, 4, 4), dtype=int)
    pred[:, 1:3, 1:3] = 1  # the organ runs through every slice
    assert _dice(pred, ref, 1, ignore_label=2) == 1.0
    assert _dice(pred, ref, 1) == pytest.approx(0.4)
    pred[0, 0, 0] = 1  # one false positive in the annotated slice still counts: 2 * 4 / (5 + 4)
    assert _dice(pred, ref, 1, ignore_label=2) == pytest.approx(8 / 9)
