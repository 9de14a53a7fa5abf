"""torch inference per case: nnU-Net's predictor (one network call per tile and mirrored copy) vs nnppPredictor
(batched mirroring), file to file, with the time split of each case.

    OMP_NUM_THREADS=2 python benchmarks/bench_predict.py --model_folder RESULTS/Dataset900_.../TRAINER__PLANS__3d_fullres

Variants (``--variants``, comma-separated), all on the same network (built as nnpp_predict builds it) and the
fold's first ``--cases`` validation cases (raw images), mirroring on:

* ``nnunet``: nnU-Net's ``nnUNetPredictor`` itself, ``predict_from_files_sequential`` (the "before");
* ``nnpp``: ``nnppPredictor`` (tta_batch pinned to 8; nnpp_predict's default chooses per case, 8 for such models) through ``predict_cases`` sequentially, as ``nnpp_predict -npp 0 -nps 0``;
* ``nnpp_tb16``: the same with tta_batch 16 (two 3D tiles per call); ``nnpp_bf16``: the same in bf16 autocast;
* ``ort_fp32`` / ``ort_int8`` / ``ov_fp32`` / ``ov_int8``: the nnpp_export folders given by ``--onnx_fp32`` /
  ``--onnx_int8`` (e.g. ``nnpp_export ... --precision int8``) with ONNX Runtime's CPU provider or OpenVINO, in the
  same predictor (``nnpp_predict --onnx``), ``--threads`` intra-op threads.

The variants run interleaved (round 1: A, B, ...; round 2: A, B, ...) so background load hits all of them;
``uptime``'s load average is recorded around every run. Per case: seconds (wall), and the split read+preprocess /
network / resample+export (the network part of ``nnunet`` is timed around its ``predict_logits_from_preprocessed_data``).
Masks are compared with the first variant's; Dice against the labels (nnU-Net's ``compute_metrics_on_folder``).
Writes ``--out`` (JSON) and prints a markdown table (median over rounds).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import (RESULTS, dice_per_label, machine, machine_line, mask_agreement, md_row, md_table,  # noqa: E402
                    predictor_threads, read_masks, stage_val_cases, write_json)


def load_average() -> float:
    return os.getloadavg()[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_folder", required=True)
    p.add_argument("-f", default="0")
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--variants", default="nnunet,nnpp,nnpp_tb16,nnpp_bf16")
    p.add_argument("--onnx_fp32", default=None, help="nnpp_export folder (fp32) for the ort_fp32 / ov_fp32 variants")
    p.add_argument("--onnx_int8", default=None, help="nnpp_export --precision int8 folder for ort_int8 / ov_int8")
    p.add_argument("--out", default=os.path.join(RESULTS, "predict_cpu.json"))
    args = p.parse_args(argv)

    predictor_threads(args.threads)
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnpp import device as dev
    from nnpp.model_folder import load_trained_model
    from nnpp.deploy.ort import init_onnx
    from nnpp.predictor.build import init_torch, make_predictor

    folder = os.path.abspath(args.model_folder)
    model = load_trained_model(folder, [args.f])
    name = os.path.basename(os.path.dirname(folder))
    raw = os.path.join(os.environ["nnUNet_raw"], name)
    ending = model.dataset_json["file_ending"]
    fg = [v for k, v in model.dataset_json["labels"].items() if v != 0]
    work, inputs, cases = stage_val_cases(name, args.f, args.cases, ending, "bench_predict_")

    def build(variant):
        if variant == "nnunet":
            pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                   perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        elif variant.startswith(("ort_", "ov_")):
            pred = make_predictor(torch.device("cpu"), progress=False)
            onnx_dir = args.onnx_int8 if variant.endswith("int8") else args.onnx_fp32
            init_onnx(pred, onnx_dir, [args.f], "cpu" if variant.startswith("ort_") else "openvino", args.threads)
            return pred
        else:
            amp = dev.make_amp("bf16", torch.device("cpu")) if variant.endswith("bf16") else None
            pred = make_predictor(torch.device("cpu"), progress=False, amp=amp,
                                  tta_batch=16 if variant.endswith("tb16") else 8)
        init_torch(pred, folder, [args.f])
        return pred

    variants = args.variants.split(",")
    runs = {v: [] for v in variants}
    masks = {}
    try:
        for r in range(args.rounds):
            for v in variants:
                pred = build(v)
                out = os.path.join(work, f"{v}_{r}")
                os.makedirs(out)
                load0 = load_average()
                t0 = time.perf_counter()
                if v == "nnunet":
                    net_s = []
                    inner = pred.predict_logits_from_preprocessed_data

                    def timed(data, inner=inner, net_s=net_s):
                        t = time.perf_counter()
                        try:
                            return inner(data)
                        finally:
                            net_s.append(time.perf_counter() - t)
                    pred.predict_logits_from_preprocessed_data = timed
                    pred.predict_from_files_sequential(inputs, out)
                    records = [{"network_s": s} for s in net_s]
                else:
                    records = pred.predict_cases(inputs, out)
                wall = time.perf_counter() - t0
                run = {"case_s": wall / len(cases), "load_before": load0, "load_after": load_average(),
                       "network_s": sum(x["network_s"] for x in records) / len(cases)}
                if v != "nnunet":
                    run["read_preprocess_s"] = sum(x["read_preprocess_s"] for x in records) / len(cases)
                    run["export_s"] = sum(x["export_s"] for x in records) / len(cases)
                if r == 0:
                    run["dice"] = dice_per_label(os.path.join(raw, "labelsTr"), out, ending, fg)
                    masks[v] = read_masks(out, cases, ending)
                runs[v].append(run)
                print(f"[bench_predict] round {r} {v:10s} case {run['case_s']:7.2f} s  network {run['network_s']:7.2f} s"
                      f"  load {load0:.2f}->{run['load_after']:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = {}
    for v, rs in runs.items():
        row = {k: statistics.median(x[k] for x in rs) for k in rs[0] if k.endswith("_s")}
        row["dice"] = rs[0]["dice"]
        if v != variants[0]:
            row[f"mask_agreement_vs_{variants[0]}"] = mask_agreement(masks[v], masks[variants[0]])
        row["runs"] = rs
        rows[v] = row
    m = machine()
    result = {
        "machine": f"{machine_line(m)}, CPU only (no GPU)", **m, "threads": args.threads, "model_folder": folder,
        "fold": args.f, "cases": cases, "patch_size": model.patch_size, "rounds": args.rounds,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}, "rows": rows,
    }
    write_json(args.out, result)
    print(table(result))


def table(r: dict) -> str:
    first = next(iter(r["rows"]))
    base = r["rows"][first]
    labels = list(next(iter(r["rows"].values()))["dice"])
    lines = [f"{r['machine']}; CPU capability {r['cpu_capability']}, native bf16 {r['native_bf16']}, "
             f"{r['threads']} threads, median of {r['rounds']} interleaved rounds, load average "
             f"{min(x['load_before'] for v in r['rows'].values() for x in v['runs']):.1f}-"
             f"{max(x['load_after'] for v in r['rows'].values() for x in v['runs']):.1f}",
             *md_table(["variant", "per case (s)", "speed-up", "network (s)", "read+preprocess (s)",
                        "resample+export (s)", *(f"Dice {lab}" for lab in labels), f"mask = {first}'s"])]
    for v, row in r["rows"].items():
        sp = f"{base['case_s'] / row['case_s']:.2f}x" if base else ""
        f = lambda k: f"{row[k]:.2f}" if k in row else "-"  # noqa: E731
        key = f"mask_agreement_vs_{first}"
        agree = f"{100 * row[key]:.4f}%" if key in row else ""
        lines.append(md_row(v, f"{row['case_s']:.2f}", sp, f("network_s"), f("read_preprocess_s"), f("export_s"),
                            *(f"{row['dice'][lab]:.4f}" for lab in labels), agree))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
