"""Distillation costs: what each candidate student costs against its teacher, and what KD adds to a training step.

    python benchmarks/bench_distill.py                          # small CPU config (default), both parts
    python benchmarks/bench_distill.py --part sizes --steps 5 --case_rounds 3
    python benchmarks/bench_distill.py --config task03 -device cuda --amp O1

Sizes (``--part sizes``): the reference teacher is UNet++ at the config's full width; "U-Net r=1" is the plain
U-Net teacher nnU-Net itself trains. Students follow the student-plans rule (features // r, never below 8) as
nnpp's UNet++ (also with its deepest stage dropped) or nnU-Net's PlainConvUNet. Per network: parameters, forward
FLOPs of one patch (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matmuls, device-independent),
latency of one patch (batch 1, no grad, the AMP mode's autocast) and the time of one synthetic case
(``--case_shape``, spacing 1) through nnU-Net's own predictor (``predict_single_npy_array``: preprocessing,
sliding window with step 0.5 and Gaussian weighting, resampling back), three ways: nnU-Net's ``nnUNetPredictor``
as nnUNetv2_predict runs it without mirroring (one batch-1 network call per tile), and nnpp's ``nnppPredictor`` as
nnpp_predict runs it (tiles x mirrored copies in batches of 8), without and with mirroring (nnpp_predict's
default). Batch-1 3D convolutions with few channels take torch's slow im2col path on the CPU (oneDNN only
when N*C*D*H > 20480), which a narrow student's first stage hits at small patches. All networks in one process,
the rounds interleaved across them; the figures are the best of the rounds (other jobs on a shared machine only
add time), medians kept in the JSON.

KD step (``--part kd``): nnpp's default KD step (soft KD, a=0.5, T=2) of the default student (U-Net r=2) without KD
and with 1 and 3 UNet++ teachers, interleaved in one process (see :func:`kd_steps`).

The JSON (``--out``) names the machine: CPU model, cores, torch, CPU capability (what
``torch.backends.cpu.get_cpu_capability()`` reads), native bf16, load average before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import (CONFIGS, RESULTS, add_step_args, arch_kwargs, machine, md_table, seed_all,  # noqa: E402
                    synthetic_plans, timed_in_turns, write_json)

NETWORKS = {"unetpp": "nnpp.nets.unetpp.UNetPlusPlus",
            "unet": "dynamic_network_architectures.architectures.unet.PlainConvUNet"}
REQ = ["conv_op", "norm_op", "dropout_op", "nonlin"]


#: the networks compared: (name, kind, r, stages dropped); the first is the reference teacher (UNet++ at the config's
#: full width), "unet r=1" is the plain U-Net teacher nnU-Net itself would train
CANDIDATES = (("UNet++ (teacher)", "unetpp", 1, 0), ("UNet++ r=2", "unetpp", 2, 0), ("UNet++ r=4", "unetpp", 4, 0),
              ("UNet++ r=2, one stage less", "unetpp", 2, 1), ("U-Net r=1 (U-Net teacher)", "unet", 1, 0),
              ("U-Net r=2", "unet", 2, 0), ("U-Net r=3", "unet", 3, 0), ("U-Net r=4", "unet", 4, 0))


def student_kwargs(config: str, r: int, drop_stages: int = 0) -> dict:
    """The config's plans arch kwargs with the student-plans rule (features // r, never below 8) and, with
    ``drop_stages``, the deepest stages removed."""
    from nnpp.distill.student import reduce_features
    kwargs = arch_kwargs(CONFIGS[config])
    kwargs["features_per_stage"] = reduce_features(list(kwargs["features_per_stage"]), r)
    if drop_stages:
        n = kwargs["n_stages"] - drop_stages
        kwargs["n_stages"] = n
        for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
            kwargs[key] = list(kwargs[key])[:n]
        kwargs["n_conv_per_stage_decoder"] = list(kwargs["n_conv_per_stage_decoder"])[:n - 1]
    return kwargs


def build(kind: str, config: str, r: int, device, deep_supervision: bool, drop_stages: int = 0):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    return get_network_from_plans(NETWORKS[kind], student_kwargs(config, r, drop_stages), REQ, 1, 3, allow_init=True,
                                  deep_supervision=deep_supervision).to(device)


def flops_per_patch(net, x) -> int:
    """Forward FLOPs of one patch (torch.utils.flop_counter: convolutions and matmuls, 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return int(counter.get_total_flops())


def bench_plans(config: str, kind: str, r: int, drop_stages: int, case_shape: list) -> tuple:
    """(PlansManager, ConfigurationManager, dataset_json) of a 1-channel, 3-label dataset at spacing 1 whose
    3d_fullres configuration is ``config``'s patch with this network (what nnU-Net's predictor needs)."""
    kwargs = student_kwargs(config, r, drop_stages)
    kwargs = {k: (v.__module__ + "." + v.__name__ if k in REQ and v is not None and not isinstance(v, str) else v)
              for k, v in kwargs.items()}
    return synthetic_plans(NETWORKS[kind], kwargs, REQ, CONFIGS[config]["patch"], case_shape,
                           {"background": 0, "a": 1, "b": 2})


#: the predictors a case goes through: (JSON key, predictor class, mirroring). "nnunet": nnU-Net's own
#: ``nnUNetPredictor`` (what nnUNetv2_predict runs; one batch-1 network call per tile); "nnpp" and "nnpp_tta":
#: ``nnpp.predictor.nnppPredictor`` (what nnpp_predict runs: tiles x mirrored copies batched; the default tta_batch, chosen per case),
#: without and with test-time mirroring (nnpp_predict's default is with)
PREDICTORS = (("nnunet", "nnUNetPredictor", False), ("nnpp", "nnppPredictor", False),
              ("nnpp_tta", "nnppPredictor", True))


def make_predictor(net, config: str, kind: str, r: int, drop_stages: int, case_shape: list, device,
                   which: str = "nnUNetPredictor", mirroring: bool = False):
    """nnU-Net's own predictor (or nnpp's subclass of it) around ``net`` (step 0.5, Gaussian weighting), as the
    model folder would be loaded by nnUNetv2_predict (or nnpp_predict)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnpp.predictor.tiles import nnppPredictor
    pm, cm, dataset_json = bench_plans(config, kind, r, drop_stages, case_shape)
    cls = nnppPredictor if which == "nnppPredictor" else nnUNetPredictor
    predictor = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                    perform_everything_on_device=device.type != "cpu", device=device, verbose=False,
                    verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, [net.state_dict()], dataset_json, "nnUNetTrainer",
                                    (0, 1, 2) if mirroring else None)
    return predictor


def sizes(config: str, device_name: str, amp_mode: str, warmup: int, steps: int, case_shape: list,
          case_rounds: int) -> list:
    """Every candidate: parameters, FLOPs per patch, latency per patch (best of ``steps`` rounds) and per case
    through nnU-Net's predictor (best of ``case_rounds``; medians kept in the JSON too); the rounds are
    interleaved across the networks, so the machine's load falls on all of them alike."""
    import numpy as np
    import torch

    from nnpp import device as dev
    device = dev.resolve_device(device_name)
    amp = dev.make_amp(amp_mode, device)
    x = torch.randn(1, 1, *CONFIGS[config]["patch"], device=device)
    nets = [build(kind, config, r, device, False, drop).eval() for _, kind, r, drop in CANDIDATES]
    rows = [{"network": name, "kind": kind, "r": r, "stages_dropped": drop,
             "parameters": sum(p.numel() for p in net.parameters()), "flops_per_patch": flops_per_patch(net, x)}
            for (name, kind, r, drop), net in zip(CANDIDATES, nets)]
    with torch.no_grad(), amp.autocast():
        times = timed_in_turns({i: (lambda net=net: net(x)) for i, net in enumerate(nets)}, steps, warmup,
                               sync=lambda: dev.synchronize(device))
    for i, row in enumerate(rows):
        row["patch_ms"] = [1000 * t for t in times[i]]
    image = np.random.default_rng(0).normal(size=(1, *case_shape)).astype(np.float32)
    for key, which, mirroring in PREDICTORS:
        predictors = [make_predictor(net, config, kind, r, drop, case_shape, device, which, mirroring)
                      for (_, kind, r, drop), net in zip(CANDIDATES, nets)]
        for row in rows:
            row[f"case_s_{key}"] = []
        for k in range(case_rounds):
            for row, predictor in zip(rows, predictors):
                t0 = time.perf_counter()
                seg = predictor.predict_single_npy_array(image, {"spacing": [1.0, 1.0, 1.0]})
                row[f"case_s_{key}"].append(time.perf_counter() - t0)
                assert seg.shape == tuple(case_shape)
                print(f"  {key} round {k + 1}/{case_rounds} {row['network']}: {row[f'case_s_{key}'][-1]:.2f} s/case",
                      flush=True)
    for row in rows:  # best of the rounds: other jobs on a shared machine only ever add time
        row["latency_ms"] = min(row["patch_ms"])
        row["latency_ms_median"] = statistics.median(row["patch_ms"])
        for key, _, _ in PREDICTORS:
            row[f"case_latency_s_{key}"] = min(row[f"case_s_{key}"])
            row[f"case_latency_s_{key}_median"] = statistics.median(row[f"case_s_{key}"])
    for ref_name, ref in (("teacher", rows[0]), ("unet_teacher", next(r for r in rows if r["kind"] == "unet"
                                                                       and r["r"] == 1))):
        for row in rows:
            row[f"param_ratio_vs_{ref_name}"] = row["parameters"] / ref["parameters"]
            row[f"flops_ratio_vs_{ref_name}"] = row["flops_per_patch"] / ref["flops_per_patch"]
            row[f"latency_ratio_vs_{ref_name}"] = row["latency_ms"] / ref["latency_ms"]
            for key, _, _ in PREDICTORS:
                row[f"case_ratio_{key}_vs_{ref_name}"] = row[f"case_latency_s_{key}"] / ref[f"case_latency_s_{key}"]
    for row in rows:
        print(f"  {row['network']}: {row['parameters']:,} parameters, {row['flops_per_patch'] / 1e9:.2f} GFLOP/patch, "
              f"{row['latency_ms']:.0f} ms/patch, s/case " + ", ".join(f"{key} {row[f'case_latency_s_{key}']:.2f}"
                                                                       for key, _, _ in PREDICTORS), flush=True)
    return rows


def kd_steps(config: str, device_name: str, amp_mode: str, warmup: int, steps: int, student: str = "unet",
             r: int = 2) -> list:
    """No KD, KD from 1 and from 3 UNet++ teachers, all in this process, the rounds interleaved: one step of each
    configuration per round, the median over ``steps`` rounds after ``warmup``. The step is nnpp's KD step with the
    default settings (soft KD, a=0.5, T=2) on the default student: the teachers' forwards (nnpp.distill.teachers.
    Teacher.forward: no_grad, the run's autocast, logits only), the probability ensemble, soft KD over the
    student's heads with nnU-Net's deep-supervision weights (targets pooled coarse from fine), CE on every head,
    backward and an SGD step."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from nnpp import device as dev
    from nnpp.distill import losses as L
    from nnpp.distill.teachers import Teacher, ensemble_target
    cfg = CONFIGS[config]
    device = dev.resolve_device(device_name)
    amp = dev.make_amp(amp_mode, device)
    dev.configure_backends(device)
    seed_all(0)
    net = build(student, config, r, device, True)
    teachers = [Teacher(build("unetpp", config, 1, device, False)) for _ in range(3)]
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(cfg["batch"], 1, *cfg["patch"], device=device)
    y = torch.randint(0, 3, (cfg["batch"], 1, *cfg["patch"]), device=device).float()
    with torch.no_grad():
        shapes = [o.shape[2:] for o in net(x)]
    targets = [F.interpolate(y, size=tuple(s), mode="nearest")[:, 0].long() for s in shapes]
    w = np.array([1 / 2 ** i for i in range(len(shapes))])
    w[-1] = 0
    w = w / w.sum()

    def step(n_teachers: int):
        opt.zero_grad(set_to_none=True)
        t_logits = [t.forward(x, amp)[0] for t in teachers[:n_teachers]]
        with amp.autocast():
            out = net(x)
            seg = sum(float(wi) * F.cross_entropy(o, t) for wi, o, t in zip(w, out, targets) if wi)
        loss = seg
        if n_teachers:
            with dev.Amp("O0", device).autocast(exclusive=True):
                target, soft = ensemble_target(t_logits, 2.0, False), 0.0
                for wi, o in zip(w, out):
                    target = target.pooled_to(o.shape[2:])
                    if wi:
                        soft = soft + float(wi) * L.soft_kd(o, target, 2.0)
                loss = 0.5 * seg.float() + 0.5 * soft
        amp.backward_and_step(loss, opt)

    configs = (0, 1, 3)

    def progress(i, times):
        print(f"  round {i + 1}/{warmup + steps}: " + ", ".join(f"{n} teacher(s) {times[n][-1]:.2f} s"
                                                               for n in configs if times[n]), flush=True)
    times = timed_in_turns({n: (lambda n=n: step(n)) for n in configs}, steps, warmup,
                           sync=lambda: dev.synchronize(device), after_round=progress)
    rows = [{"teachers": n, "student": f"{student} r={r}", "step_s": statistics.median(times[n]),
             "step_s_min": min(times[n]), "steps_s": times[n], "device": str(device), "amp": amp.mode}
            for n in configs]
    for row in rows:
        row["step_ratio"] = row["step_s"] / rows[0]["step_s"]
        row["step_ratio_min"] = row["step_s_min"] / rows[0]["step_s_min"]
    return rows


def size_table(rows: list) -> str:
    head = ["network", "parameters", "x teacher", "GFLOP/patch", "x teacher", "x U-Net teacher", "ms/patch",
            "x teacher"] + [c for key, _, _ in PREDICTORS for c in (f"s/case {key}", "x teacher", "x U-Net teacher")]
    return "\n".join(md_table(head, ([
        r["network"], f"{r['parameters']:,}", f"{r['param_ratio_vs_teacher']:.3f}", f"{r['flops_per_patch'] / 1e9:.2f}",
        f"{r['flops_ratio_vs_teacher']:.3f}", f"{r['flops_ratio_vs_unet_teacher']:.3f}", f"{r['latency_ms']:.0f}",
        f"{r['latency_ratio_vs_teacher']:.2f}", *(c for key, _, _ in PREDICTORS for c in (
            f"{r[f'case_latency_s_{key}']:.2f}", f"{r[f'case_ratio_{key}_vs_teacher']:.2f}",
            f"{r[f'case_ratio_{key}_vs_unet_teacher']:.2f}"))] for r in rows)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(p, warmup=1, steps=4)
    p.add_argument("--part", default="all", choices=("all", "sizes", "kd"),
                   help="sizes: parameters/FLOPs/latency of the students; kd: the KD step; all: both")
    p.add_argument("--case_shape", type=int, nargs=3, default=[48, 96, 96],
                   help="the synthetic case predicted per network (voxels at spacing 1)")
    p.add_argument("--case_rounds", type=int, default=2, help="per-case predictions per network (interleaved)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/distill_CONFIG_DEVICE_AMP.json)")
    a = p.parse_args(argv)
    import torch
    result = {"config": a.config, "cfg": CONFIGS[a.config], "device": a.device, "amp": a.amp, "warmup": a.warmup,
              "steps": a.steps, "machine": machine(threads=torch.get_num_threads())}
    part = "" if a.part == "all" else "_" + a.part
    out = a.out or os.path.join(RESULTS, f"distill_{a.config}_{a.device}_{a.amp}{part}.json")
    print(f"[bench_distill] config {a.config}, {a.device}, AMP {a.amp}; {result['machine']}", flush=True)
    if a.part in ("all", "sizes"):
        result["case_shape"] = a.case_shape
        result["sizes"] = sizes(a.config, a.device, a.amp, a.warmup, a.steps, a.case_shape, a.case_rounds)
    if a.part in ("all", "kd"):
        print("[bench_distill] KD step: no KD vs 1 and 3 teachers, interleaved in this process", flush=True)
        result["kd_step"] = kd_steps(a.config, a.device, a.amp, a.warmup, a.steps)
    result["machine"]["load_average_after"] = os.getloadavg()
    print(f"\nwritten {write_json(out, result)}\n")
    if "sizes" in result:
        print(size_table(result["sizes"]))
    if "kd_step" in result:
        print("\n" + "\n".join(md_table(
            ["KD teachers", "student", "step (median s)", "x no KD", "step (best s)", "x no KD"],
            ([r["teachers"], r["student"], f"{r['step_s']:.3f}", f"{r['step_ratio']:.2f}", f"{r['step_s_min']:.3f}",
              f"{r['step_ratio_min']:.2f}"] for r in result["kd_step"]))))


if __name__ == "__main__":
    main()
