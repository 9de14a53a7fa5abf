"""Per-patch latency of fp32 vs int8 models on this machine's CPU, for machines without nnpp/nnunetv2 installed (it
needs only numpy, onnxruntime and/or openvino): ONNX Runtime (fp32 .onnx, ORT QDQ int8 .onnx) and OpenVINO (fp32 IR,
NNCF int8 IR, the QDQ file as IR); batch 1 and 8 (one tile's mirrored copies), 16 and 2 threads; median of 7 calls
after 3 warm-up calls.

    python benchmarks/bench_int8_latency.py ROOT OUT.json

ROOT holds one folder per model with ``meta.json`` ({"patch": [z, y, x]}) and any of ``fp32.onnx``,
``int8_qdq.onnx``, ``fp32.xml``, ``int8_nncf.xml``, ``int8_qdq.xml`` (+ .bin): copies of ``nnpp_export`` outputs
(``fold_0.onnx``, ``--quantizer nncf``'s ``fold_0.xml``), the fp32 IR made with
``openvino.save_model(openvino.Core().read_model("fp32.onnx"), "fp32.xml", compress_to_fp16=False)``.
Used for the Xeon/AMX figures in RESULTS.md (the device machine has no nnpp install).
"""
import glob, json, os, statistics, sys, time
import numpy as np
root, out = sys.argv[1:3]
rows = []
for model in sorted(glob.glob(os.path.join(root, "*"))):
    meta = json.load(open(os.path.join(model, "meta.json")))
    patch = meta["patch"]
    for threads in (16, 2):
        for batch in (1, 8):
            x = np.random.default_rng(0).standard_normal((batch, 1, *patch)).astype(np.float32)
            res = {}
            for name, kind, f in (("ort_fp32", "ort", "fp32.onnx"), ("ort_int8_qdq", "ort", "int8_qdq.onnx"),
                                  ("ov_fp32", "ov", "fp32.xml"), ("ov_int8_nncf", "ov", "int8_nncf.xml"),
                                  ("ov_int8_qdq", "ov", "int8_qdq.xml")):
                path = os.path.join(model, f)
                if not os.path.exists(path):
                    continue
                try:
                    if kind == "ort":
                        import onnxruntime as ort
                        so = ort.SessionOptions(); so.intra_op_num_threads = threads
                        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                        run = lambda: s.run(None, {s.get_inputs()[0].name: x})
                    else:
                        import openvino as ov
                        c = ov.Core().compile_model(path, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                                   "INFERENCE_PRECISION_HINT": "f32"})
                        r = c.create_infer_request()
                        run = lambda: r.infer({0: x})
                    for _ in range(3):
                        run()
                    ts = []
                    for _ in range(7):
                        t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)
                    res[name] = 1000 * statistics.median(ts)
                except Exception as e:
                    res[name] = f"{type(e).__name__}: {str(e)[:120]}"
            row = {"model": os.path.basename(model), "patch": patch, "threads": threads, "batch": batch, "ms": res}
            print(json.dumps(row), flush=True)
            rows.append(row)
json.dump(rows, open(out, "w"), indent=1)
