"""nnpp_export -o is safe: a new or empty folder, or a previous export of the same model with --overwrite (replaced
whole: no stale fold_*.onnx beside the new ones); anything else is one line and nothing is written."""
import json
import os

import pytest

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed (pip install -e '.[onnx]')")

UNETPP, UNET = "nnUNetPlusPlusTrainer", "nnUNetTrainer"


def export(monkeypatch, capsys, model_folder, ds, *args):
    from nnpp.run import export as cli
    monkeypatch.setenv("nnUNet_results", os.path.dirname(os.path.dirname(model_folder)))
    tr = os.path.basename(model_folder).split("__")[0]
    try:
        rc = cli.main([str(ds["id"]), "3d_fullres", "-tr", tr, "-f", "0", "--exporter", "torchscript", *map(str, args)])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def one_line(rc, err, *fragments):
    assert rc == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    for f in fragments:
        assert f in line, line


def snapshot(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, f))}


def test_output_folder_rules(trained_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    unetpp, unet = trained_model(UNETPP, 0), trained_model(UNET, 0)
    # a folder with someone's file: refused, untouched
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line(*export(monkeypatch, capsys, unetpp, tiny_dataset, "-o", busy, "--overwrite"),
             f"-o {busy} is not empty", "1 file(s) that are not an nnpp export of this model")
    assert os.listdir(busy) == ["notes.txt"]
    # the model folder itself (its plans.json / dataset.json would be replaced): refused, untouched
    before = snapshot(unetpp)
    one_line(*export(monkeypatch, capsys, unetpp, tiny_dataset, "-o", unetpp), "is not empty")
    assert snapshot(unetpp) == before
    # an empty folder is fine; exporting again needs --overwrite
    out = tmp_path / "out"
    out.mkdir()
    rc, err = export(monkeypatch, capsys, unetpp, tiny_dataset, "-o", out)
    assert rc == 0, err
    first = json.load(open(out / "nnpp_onnx.json"))
    one_line(*export(monkeypatch, capsys, unetpp, tiny_dataset, "-o", out),
             "holds a previous export of this model; add --overwrite")
    # --overwrite replaces the whole export: a stale fold file of the previous one does not survive
    (out / "fold_3.onnx").write_bytes(b"stale")
    rc, err = export(monkeypatch, capsys, unetpp, tiny_dataset, "-o", out, "--overwrite")
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["dataset.json", "fold_0.onnx", "nnpp_onnx.json", "plans.json"]
    assert json.load(open(out / "nnpp_onnx.json"))["created"] >= first["created"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".nnpp_export")]  # no temp folders left
    # an export of another model is not "a previous export of this model", even with --overwrite
    before = snapshot(out)
    one_line(*export(monkeypatch, capsys, unet, tiny_dataset, "-o", out, "--overwrite"),
             "holds an export of another model", unetpp)
    assert snapshot(out) == before
