"""ONNX Runtime (and OpenVINO, when installed) vs torch eager on the CPU, for the full UNet++ and each pruning depth.

    OMP_NUM_THREADS=2 python benchmarks/bench_onnx.py --model_folder RESULTS/Dataset900_.../nnUNetPlusPlusTrainer__nnUNetPlans__3d_fullres

For every depth k = 1..L (L = full network; a plain U-Net has only "full"), in one process with the same thread
count for every backend (``--threads``, default OMP_NUM_THREADS or 2):

* export fold ``-f`` with :func:`nnpp.deploy.export.export_model` (parity-checked); for the int8 backends also
  ``--precision int8`` (calibrated on ``--calib_tiles`` training tiles, guard not enforced: ``max_dice_drop`` 1,
  ``--guard_cases`` scored): ``ort_int8`` / ``ov_int8`` ONNX Runtime's QDQ ``.onnx`` run by ONNX Runtime (CPU) /
  OpenVINO, ``ov_nncf`` NNCF's OpenVINO IR (``--quantizer nncf``, ``--nncf_preset``) run by OpenVINO,
* **per patch**: median wall time of one forward pass, batch 1 (and ``--batch_b``) x the plans' patch, after
  ``--warmup`` passes (``--patches`` timed passes, the backends in turns), for torch eager (fp32,
  ``torch.inference_mode``), ONNX Runtime (CPU provider, ``intra_op_num_threads`` = threads) and OpenVINO (its
  CPU plugin reading the same ``.onnx``, ``INFERENCE_NUM_THREADS`` = threads, latency hint, fp32 precision hint)
  if ``openvino`` imports,
* **per case**: nnU-Net's predictor as ``nnpp_predict -npp 0 -nps 0`` runs it (``nnppPredictor.predict_cases``:
  preprocessing, Gaussian sliding window, batched mirroring unless ``--disable_tta``, resampling, export) over the
  fold's first ``--cases`` validation cases; seconds per case (total wall time / cases) and its split into
  read+preprocess / network / resample+export, after one warm-up case, median of ``--case_rounds`` rounds (the
  backends in turns),
* **Dice** per foreground label of each backend's masks against the labels (nnU-Net's
  ``compute_metrics_on_folder``; mean over the cases) and the share of voxels where ONNX Runtime's mask equals
  torch's.

Writes ``--out`` (JSON) and prints a markdown table. Speed-up = torch seconds / backend seconds (> 1: faster);
``vs fp32`` = the same runtime's fp32 seconds / the int8 backend's (ort for ort_int8, openvino for ov_int8/ov_nncf).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import (RESULTS, dice_per_label, machine_line, mask_agreement, md_row, md_table,  # noqa: E402
                    predictor_threads, read_masks, stage_val_cases, timed_in_turns, write_json)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_folder", required=True, help="trained model folder (TRAINER__PLANS__CONFIG)")
    p.add_argument("-f", default="0", help="fold (default 0): exported model and validation cases")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--depths", default="all", help="comma-separated depths or 'all' (1..L)")
    p.add_argument("--backends", default="torch,ort,openvino",
                   help="comma-separated: torch, ort, openvino, ort_int8, ov_int8, ov_nncf (int8 needs nnUNet_preprocessed)")
    p.add_argument("--calib_tiles", type=int, default=32, help="int8 backends: calibration tiles")
    p.add_argument("--guard_cases", type=int, default=2, help="int8 backends: validation cases the export scores")
    p.add_argument("--nncf_preset", default="performance", choices=("performance", "mixed"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--patches", type=int, default=10)
    p.add_argument("--cases", type=int, default=2, help="validation cases for the per-case latency and Dice")
    p.add_argument("--batch_b", type=int, default=8, help="second per-patch batch size (the predictor's TTA batch)")
    p.add_argument("--case_rounds", type=int, default=1, help="per-case rounds (backends in turns; median)")
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring in the per-case runs")
    p.add_argument("--machine", default=None, help="machine description for the table (default: CPU model)")
    p.add_argument("--out", default=os.path.join(RESULTS, "onnx_cpu.json"))
    args = p.parse_args(argv)

    predictor_threads(args.threads)  # the same threads for every backend, nnU-Net's predictor included
    import torch

    from nnpp.deploy.export import export_model
    from nnpp.model_folder import load_trained_model, set_depth
    from nnpp.deploy.ort import OpenVinoSession, init_onnx, make_session
    from nnpp.predictor.build import init_torch, make_predictor

    backends = args.backends.split(",")
    if any(b in backends for b in ("openvino", "ov_int8", "ov_nncf")):
        try:
            import openvino
            ov_version = openvino.__version__
        except ImportError:
            print("[bench_onnx] openvino is not installed: skipping it (pip install openvino)")
            backends = [b for b in backends if b not in ("openvino", "ov_int8", "ov_nncf")]
            ov_version = None
    folder = os.path.abspath(args.model_folder)
    model = load_trained_model(folder, [args.f])
    net0 = model.build_network(0)
    full = getattr(net0, "depth", None) if hasattr(net0, "prune_depth") else None
    depths = ([None] if full is None else list(range(1, full + 1))) if args.depths == "all" else \
        [int(d) for d in args.depths.split(",")]

    # validation cases of the fold, from nnU-Net's splits; their raw images and labels
    name = os.path.basename(os.path.dirname(folder))
    raw = os.path.join(os.environ["nnUNet_raw"], name)
    ending = model.dataset_json["file_ending"]
    work, inputs, cases = stage_val_cases(name, args.f, args.cases, ending, "bench_onnx_")
    labels = os.path.join(raw, "labelsTr")
    fg = [v for k, v in model.dataset_json["labels"].items() if v != 0]
    patch = model.patch_size
    x = torch.randn(1, model.num_input_channels, *patch)
    rows = []
    try:
        for k in depths:
            tag = "full" if k is None or k == full else f"depth{k}"
            onnx_dir = os.path.join(work, f"onnx_{tag}")
            meta = export_model(model, onnx_dir, depth=None if k == full else k, log=lambda *_: None,
                                allow_untrained_depth=True)  # latency of every depth, whatever its training
            onnx_path = os.path.join(onnx_dir, f"fold_{args.f}.onnx")
            net = set_depth(model.build_network(0), None if k == full else k)
            res = {"depth": k, "tag": tag, "parity_max_abs_diff": meta["folds"][0]["parity"]["max_abs_diff"],
                   "onnx_bytes": os.path.getsize(onnx_path), "backends": {}, "int8_exports": {}}
            dirs = {b: onnx_dir for b in ("torch", "ort", "openvino")}
            for quantizer, users in (("ort", ("ort_int8", "ov_int8")), ("nncf", ("ov_nncf",))):
                if not any(b in backends for b in users):
                    continue
                qdir = os.path.join(work, f"onnx_{tag}_int8_{quantizer}")
                t = time.perf_counter()
                qmeta = export_model(model, qdir, depth=None if k == full else k, precision="int8",
                                     quantizer=quantizer, nncf_preset=args.nncf_preset, max_dice_drop=1.0,
                                     calib_tiles=args.calib_tiles, guard_cases=args.guard_cases, latency_runs=0,
                                     log=lambda *_: None, allow_untrained_depth=True)
                q = qmeta["folds"][0]["quantization"]
                res["int8_exports"][quantizer] = {
                    "export_s": time.perf_counter() - t, "settings": {k2: v for k2, v in q.items() if k2 in (
                        "tool", "format", "preset", "weights", "activations", "calibration", "calibration_tiles")},
                    "guard_cases": q["score_cases"], "dice_fp32": q["dice_fp32"], "dice_int8": q["dice_int8"],
                    "mask_agreement": q["mask_agreement"],
                    "bytes": sum(os.path.getsize(os.path.join(qdir, f)) for f in os.listdir(qdir)
                                 if f.startswith("fold_"))}
                for b in users:
                    dirs[b] = qdir
            masks = {}
            # per patch: every backend's session held at once and timed in turns (round r: A, B, ...), so load that
            # comes and goes (other jobs on a shared machine) hits them alike; batch 1 and --batch_b
            xb = torch.randn(args.batch_b, *x.shape[1:])
            fwds = {}
            for b in backends:
                for n, inp in ((1, x), (args.batch_b, xb)):
                    if b == "torch":
                        def fwd(inp=inp):
                            with torch.inference_mode():
                                net(inp)
                    else:
                        entry = json.load(open(os.path.join(dirs[b], "nnpp_onnx.json")))["folds"][0]
                        path = os.path.join(dirs[b], entry["file"])
                        if n == 1:
                            sess = OpenVinoSession(path, args.threads) if path.endswith(".xml") else \
                                make_session(path, "cpu" if b.startswith("ort") else "openvino", args.threads)
                        feed = {sess.get_inputs()[0].name: inp.numpy()}

                        def fwd(sess=sess, feed=feed):
                            sess.run(None, feed)
                    fwds[b, n] = fwd
            patch_times = timed_in_turns(fwds, args.patches, args.warmup)
            fwds = sess = fwd = None
            for b in backends:
                res["backends"][b] = {"patch_s_median": statistics.median(patch_times[b, 1]),
                                      "patch_s": patch_times[b, 1],
                                      "patch_b_s_median": statistics.median(patch_times[b, args.batch_b]),
                                      "patch_b_s": patch_times[b, args.batch_b], "case_runs": []}
            # per case: nnU-Net's predictor, file to file; --case_rounds rounds, the backends in turns
            for r in range(args.case_rounds):
                for b in backends:
                    pred = make_predictor(torch.device("cpu"), mirroring=not args.disable_tta, progress=False)
                    if b == "torch":
                        init_torch(pred, folder, [args.f], depth=None if k == full else k,
                                   allow_untrained_depth=True)
                    else:
                        init_onnx(pred, dirs[b], provider="cpu" if b.startswith("ort") else "openvino",
                                  threads=args.threads)
                    out = os.path.join(work, f"pred_{tag}_{b}_{r}")
                    os.makedirs(out)
                    pred.predict_cases(inputs[:1], os.path.join(work, f"warm_{tag}_{b}_{r}"))  # warm-up: 1 case
                    t = time.perf_counter()
                    records = pred.predict_cases(inputs, out)  # nnpp_predict -npp 0 -nps 0: exact time split
                    case_s = (time.perf_counter() - t) / len(cases)
                    split = {k2: sum(rec[k2] for rec in records) / len(cases)
                             for k2 in ("read_preprocess_s", "network_s", "export_s")}
                    res["backends"][b]["case_runs"].append({"case_s": case_s, "split": split})
                    pred = None
                    if r == 0:
                        res["backends"][b]["dice"] = dice_per_label(labels, out, ending, fg)
                        masks[b] = read_masks(out, cases, ending)
            for b in backends:
                v = res["backends"][b]
                v["case_s"] = statistics.median(c["case_s"] for c in v["case_runs"])
                v["split"] = {k2: statistics.median(c["split"][k2] for c in v["case_runs"]) for k2 in v["case_runs"][0]["split"]}
                print(f"[bench_onnx] {tag:7s} {b:8s} patch {v['patch_s_median'] * 1e3:8.1f} ms (batch {args.batch_b}: "
                      f"{v['patch_b_s_median'] * 1e3:.1f} ms)  case {v['case_s']:7.2f} s (network "
                      f"{v['split']['network_s']:.2f})  Dice {v['dice']}", flush=True)
            for b in backends:
                if b != "torch" and "torch" in masks:
                    res["backends"][b]["mask_agreement_vs_torch"] = mask_agreement(masks[b], masks["torch"])
            rows.append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import onnxruntime
    result = {
        "machine": args.machine or f"{machine_line()}, CPU only",
        "threads": args.threads, "model_folder": folder, "fold": args.f, "patch_size": patch,
        "full_depth": full, "cases": cases, "tta": not args.disable_tta,
        "warmup": args.warmup, "patches": args.patches, "backend_order": backends, "batch_b": args.batch_b,
        "case_rounds": args.case_rounds,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "openvino": ov_version
                     if "openvino" in args.backends else None, "python": sys.version.split()[0]},
        "rows": rows,
    }
    write_json(args.out, result)
    print(table(result))


FP32_OF = {"ort_int8": "ort", "ov_int8": "openvino", "ov_nncf": "openvino"}  # the same runtime's fp32


def table(r: dict) -> str:
    first = next(iter(r["rows"][0]["backends"].values()), None) if r["rows"] else None
    labels = list(first["dice"]) if first else []
    lines = md_table(["depth", "backend", "per patch (ms)", "speed-up", "vs fp32", f"batch {r.get('batch_b', '')} (ms)",
                      "vs fp32", "per case (s)", "speed-up", "vs fp32", *(f"Dice {lab}" for lab in labels),
                      "mask = torch"])
    for row in r["rows"]:
        t = row["backends"].get("torch")
        for b, v in row["backends"].items():
            sp = f"{t['patch_s_median'] / v['patch_s_median']:.2f}x" if t else ""
            sc = f"{t['case_s'] / v['case_s']:.2f}x" if t else ""
            f32 = row["backends"].get(FP32_OF.get(b))
            fp = f"{f32['patch_s_median'] / v['patch_s_median']:.2f}x" if f32 else ""
            fc = f"{f32['case_s'] / v['case_s']:.2f}x" if f32 else ""
            pb = v.get("patch_b_s_median")
            fb = f"{f32['patch_b_s_median'] / pb:.2f}x" if f32 and pb else ""
            pbs = f"{pb * 1e3:.1f}" if pb else ""
            agree = f"{100 * v['mask_agreement_vs_torch']:.3f}%" if "mask_agreement_vs_torch" in v else ""
            lines.append(md_row(row["tag"], b, f"{v['patch_s_median'] * 1e3:.1f}", sp, fp, pbs, fb,
                                f"{v['case_s']:.2f}", sc, fc, *(f"{v['dice'][lab]:.4f}" for lab in labels), agree))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
