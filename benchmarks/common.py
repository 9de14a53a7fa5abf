"""What the benchmark scripts share, so that each script holds only what it measures.

Where a benchmark works: the nnU-Net folders of a work folder and a child's environment for them
(:func:`nnunet_dirs`, :func:`nnunet_env`), a trained model's validation cases staged as input
(:func:`stage_val_cases`, :func:`model_id`). How it runs things: a command with its output or its log
(:func:`run_checked`, :func:`run_logged`), a worker process that answers with one RESULT line
(:func:`print_result`, :func:`run_for_result`), torchrun (:func:`torchrun`), calls timed in turns
(:func:`timed_in_turns`), fixed seeds (:func:`seed_all`), threads (:func:`predictor_threads`). What it writes: JSON
and text never half-written (:func:`write_json`, :func:`write_text`), markdown tables (:func:`md_table`), the machine
line (:func:`machine_line`). And what several scripts measure on: the network configurations (:data:`CONFIGS`), the
shared real-CT builder (:data:`TS_BUILDER`), masks and Dice of a prediction folder, synthetic plans.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout: the checkout's nnpp, installed or not
    sys.path.insert(0, ROOT)
#: where the scripts write their results by default
RESULTS = os.path.join(HERE, "results")
#: the shared real-CT builder (TotalSegmentator's example CT), beside the checkout
TS_BUILDER = os.path.join(ROOT, "..", "shared", "datasets", "ts_example_ct.py")
NNUNET_PATHS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")

#: the network configurations of bench_network, bench_norm_layout, bench_split_conv and bench_distill
CONFIGS = {
    "cpu-small": dict(n_stages=5, features=[16, 32, 64, 128, 128], patch=[32, 64, 64], batch=2,
                      strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
    "cpu-deep": dict(n_stages=6, features=[8, 16, 32, 64, 128, 256], patch=[64, 64, 64], batch=2,
                     strides=[[1, 1, 1]] + [[2, 2, 2]] * 5),
    "task03": dict(n_stages=6, features=[32, 64, 128, 256, 320, 320], patch=[128, 128, 128], batch=2,
                   strides=[[1, 1, 1]] + [[2, 2, 2]] * 5),
}
#: a configuration's earlier name -> its name: still accepted by --config (older commands in RESULTS.md, README)
CONFIG_ALIASES = {"issue9": "cpu-deep"}


def add_config_arg(p, default: str) -> None:
    """``--config NAME`` (one of :data:`CONFIGS`; an earlier name is read as the configuration's name)."""
    p.add_argument("--config", default=default, type=lambda v: CONFIG_ALIASES.get(v, v), choices=CONFIGS)


def add_step_args(p, warmup: int, steps: int) -> None:
    """The options of a network-step benchmark: ``--config`` (default cpu-small), ``-device`` (cpu), ``--amp`` (O0),
    ``--warmup`` and ``--steps`` (the defaults given)."""
    add_config_arg(p, "cpu-small")
    p.add_argument("-device", default="cpu")
    p.add_argument("--amp", default="O0")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--steps", type=int, default=steps)


def arch_kwargs(cfg: dict) -> dict:
    """nnU-Net plans ``arch_kwargs`` of a :data:`CONFIGS` entry."""
    from nnpp.nets import plans
    return plans.arch_kwargs(cfg["features"], cfg["strides"])


# ------------------------------------------------------------------------------------------ where it works
def nnunet_dirs(work: str, results: str | None = None, short: bool = False, make: bool = True) -> dict:
    """nnU-Net's path variables for a work folder: WORK/nnUNet_raw, WORK/nnUNet_preprocessed, WORK/nnUNet_results
    (``short``: WORK/raw, WORK/preprocessed, WORK/results), ``results`` in place of the last; the folders are made
    unless ``make`` is false."""
    dirs = {var: os.path.join(work, var.split("_", 1)[1] if short else var) for var in NNUNET_PATHS}
    if results:
        dirs["nnUNet_results"] = results
    for d in dirs.values() if make else ():
        os.makedirs(d, exist_ok=True)
    return dirs


def nnunet_env(work: str, results: str | None = None, short: bool = False, make: bool = True,
               threads: int | None = None, serial: bool = False, **extra: str) -> dict:
    """A child process's environment: ``os.environ`` with :func:`nnunet_dirs`, ``threads`` as OMP_NUM_THREADS and
    MKL_NUM_THREADS, with ``serial`` augmentation in the main process and one preprocessing process
    (nnUNet_n_proc_DA=0, nnUNet_def_n_proc=1: batches follow the seed), and the ``extra`` variables."""
    env = dict(os.environ)
    env.update(nnunet_dirs(work, results, short, make))
    if serial:
        env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def model_id(folder: str) -> tuple[str, str, str, str]:
    """(dataset, trainer, plans, configuration) of a model folder ``.../DATASET/TRAINER__PLANS__CONFIGURATION``."""
    folder = os.path.abspath(folder)
    trainer, plans, configuration = os.path.basename(folder).split("__")
    return os.path.basename(os.path.dirname(folder)), trainer, plans, configuration


def load_builder(path: str):
    """The shared real-dataset builder (``../shared/datasets/ts_example_ct.py``, :data:`TS_BUILDER`) as a module."""
    import importlib.util
    if not os.path.isfile(path):
        raise SystemExit(f"{prog()}: no dataset builder at {path}; pass --builder PATH/ts_example_ct.py")
    spec = importlib.util.spec_from_file_location("ts_example_ct", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------- how it runs things
def prog() -> str:
    """The running script's name (``bench_kd``), the first word of its messages."""
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]


def run_checked(cmd: list, what: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` with its output captured (text): (the finished process, wall seconds). A non-zero exit stops the
    benchmark with one message: ``what`` failed, and the end of the command's output."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{prog()}: {what} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return proc, wall


def run_logged(cmd: list, env: dict, log: str) -> float:
    """``python -m CMD...`` with its output into the file ``log``; prints a line (exit code, seconds, log) and stops
    the benchmark if it failed. Returns the wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-m", *cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    print(f"  {' '.join(cmd[:4])} ... rc {p.returncode}, {wall:.0f} s (log {log})", flush=True)
    if p.returncode:
        raise SystemExit(f"{prog()}: failed: {' '.join(cmd)} (see {log})")
    return wall


def print_result(obj) -> None:
    """A worker process's answer to the benchmark that started it: one line ``RESULT <json>`` on stdout."""
    print("RESULT " + json.dumps(obj), flush=True)


def result_of(output: str):
    """The object of the last RESULT line in a worker's output (:func:`print_result`); None if it printed none."""
    found = [line for line in output.splitlines() if line.startswith("RESULT ")]
    return json.loads(found[-1][len("RESULT "):]) if found else None


def run_for_result(cmd: list, what: str, env: dict | None = None):
    """Run a worker (:func:`run_checked`) and return the object it printed (:func:`print_result`); a worker that
    fails or prints none stops the benchmark."""
    proc, _ = run_checked(cmd, what, env)
    result = result_of(proc.stdout)
    if result is None:
        raise SystemExit(f"{prog()}: {what} printed no RESULT line:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return result


def torchrun(nproc: int, module: str, *args, port: int | str | None = "free") -> list:
    """The command ``python -m torch.distributed.run --nproc_per_node=N --master_port=P -m MODULE ARGS...``;
    ``port`` "free": a port free now (nnpp.distributed.free_port), None: torchrun's default."""
    if port == "free":
        from nnpp.distributed import free_port
        port = free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            *([f"--master_port={port}"] if port else []), "-m", module, *map(str, args)]


def latest_fps_perf(results: str) -> str | None:
    """The perf.json that ``nnpp_train --other_use fps`` wrote last under the nnU-Net results folder ``results``."""
    import glob
    found = sorted(glob.glob(os.path.join(results, "nnpp_perf", "fps", "**", "perf.json"), recursive=True),
                   key=os.path.getmtime)
    return found[-1] if found else None


def timed_in_turns(calls: dict, rounds: int, warmup: int = 0, sync=None, after_round=None) -> dict:
    """{key: [seconds of each timed call]}: each of ``calls`` called once per round, in turns (round i: A, B, ...),
    so that load which comes and goes falls on all of them alike; ``warmup`` untimed rounds first; ``sync()`` before
    and after every call (an accelerator's queue); ``after_round(i, times)`` after every round (progress lines)."""
    times = {key: [] for key in calls}
    for i in range(warmup + rounds):
        for key, call in calls.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            call()
            if sync:
                sync()
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
        if after_round:
            after_round(i, times)
    return times


def seed_all(seed: int) -> None:
    """The same random numbers on every run: Python's, numpy's and torch's generators seeded with ``seed``."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def predictor_threads(n: int) -> None:
    """``n`` torch threads, also inside nnU-Net's predictor (it caps torch's threads at nnUNet_def_n_proc, which
    nnunetv2 reads when it is imported: call this before)."""
    os.environ["nnUNet_def_n_proc"] = str(n)
    import torch
    torch.set_num_threads(n)


def mean_sd(values) -> tuple[float, float]:
    """(mean, sample standard deviation) of the values that are not NaN; sd 0 for one value, NaN for none."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, sd


# ------------------------------------------------------------------------------------------- what it writes
def write_text(path: str, text: str) -> str:
    """``text`` into ``path`` (its folder made), never half-written: a temp file beside it, then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: str, obj, indent: int | None = 2) -> str:
    """``obj`` as JSON into ``path`` (:func:`write_text`)."""
    return write_text(path, json.dumps(obj, indent=indent))


def md_row(*cells) -> str:
    """One markdown table line."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(head: list, rows=()) -> list[str]:
    """A markdown table's lines: the header cells, the rule, one line per row (a list of cells)."""
    return [md_row(*head), "|" + "---|" * len(head), *(md_row(*r) for r in rows)]


def machine(**extra) -> dict:
    """The machine a figure was taken on (nnpp.device.machine_info: CPU model, visible cores, torch, CPU capability,
    native bf16, load average now), with ``extra`` entries."""
    from nnpp.device import machine_info
    return {**machine_info(), **extra}


def machine_line(m: dict | None = None) -> str:
    """e.g. "Intel(R) Xeon(R) Processor, 2 cores visible, torch 2.5.1, CPU capability AVX512, native bf16" (``m``:
    a :func:`machine` dict, default this machine now)."""
    m = m or machine()
    return f"{m['cpu']}, {m['cores']} cores visible, torch {m['torch']}, CPU capability {m['cpu_capability']}"


# ------------------------------------------------------------------------------------ predictions and plans
def read_masks(folder: str, cases: list, ending: str) -> list:
    """The segmentations ``folder/CASE+ending`` of ``cases`` as arrays."""
    import SimpleITK as sitk
    return [sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, c + ending))) for c in cases]


def mask_agreement(masks: list, reference: list) -> float:
    """The share of voxels, over all cases, where ``masks`` equal ``reference``."""
    import numpy as np
    return float(np.mean(np.concatenate([(a == b).ravel() for a, b in zip(masks, reference)])))


def dice_per_label(labels_dir: str, pred_dir: str, ending: str, labels: list) -> dict:
    """{label (str): Dice, mean over the cases} of ``pred_dir`` against ``labels_dir`` (nnU-Net's
    ``compute_metrics_on_folder``)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    m = compute_metrics_on_folder(labels_dir, pred_dir, None, SimpleITKIO(), ending, labels, num_processes=1,
                                  chill=True)
    return {str(lab): m["mean"][lab]["Dice"] for lab in labels}


def stage_val_cases(dataset_name: str, fold, n: int, file_ending: str, prefix: str) -> tuple[str, str, list]:
    """The first ``n`` validation cases of ``fold`` (splits_final.json) as a prediction input folder of symlinks to
    the raw images. Returns (work folder to delete afterwards, input folder, case ids)."""
    raw = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    with open(os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "splits_final.json")) as f:
        cases = sorted(json.load(f)[int(fold)]["val"])[:n]
    work = tempfile.mkdtemp(prefix=prefix)
    inputs = os.path.join(work, "in")
    os.makedirs(inputs)
    images = os.path.join(raw, "imagesTr")
    for c in cases:
        for f in os.listdir(images):
            if f.startswith(c + "_") and f.endswith(file_ending):
                os.symlink(os.path.join(images, f), os.path.join(inputs, f))
    return work, inputs, cases


def synthetic_plans(network_class: str, arch_kwargs: dict, requires_import: list, patch: list, case_shape: list,
                    labels: dict) -> tuple:
    """(PlansManager, ConfigurationManager, dataset_json) of a 1-channel dataset at spacing 1 whose 3d_fullres
    configuration is ``patch`` with this network (import strings in ``arch_kwargs``) and ``labels``: what nnU-Net's
    predictor needs to predict preprocessed arrays."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    resampling = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                  "resampling_fn_seg": "resample_data_or_seg_to_shape",
                  "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                  "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                         "force_separate_z": None}}
    conf = {"data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": list(patch), "median_image_size_in_voxels": list(case_shape),
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            **resampling, "batch_dice": False,
            "architecture": {"network_class_name": network_class, "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": list(requires_import)}}
    plans = {"dataset_name": "Dataset999_Bench", "plans_name": "bench", "original_median_spacing_after_transp":
             [1.0, 1.0, 1.0], "original_median_shape_after_transp": list(case_shape), "image_reader_writer":
             "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": conf}, "experiment_planner_used": "bench", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": {"max": 4.0, "mean": 0.0, "median": 0.0, "min": -4.0,
                                                                   "percentile_00_5": -3.0, "percentile_99_5": 3.0,
                                                                   "std": 1.0}}}
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    pm = PlansManager(plans)
    return pm, pm.get_configuration("3d_fullres"), dataset_json
