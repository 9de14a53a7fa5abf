"""nnpp_predict: nnU-Net's predictor for nnpp trainers (and nnU-Net's own), any device, torch or ONNX Runtime.

Same flags as nnUNetv2_predict (-i -o -d -c -p -tr -f -chk -step_size --disable_tta --save_probabilities
--continue_prediction -npp -nps -prev_stage_predictions -num_parts -part_id --disable_progress_bar
--not_on_device --verbose); -tr defaults to nnUNetPlusPlusTrainer and -device to auto (npu, cuda, mps, cpu).

nnpp builds nnU-Net's predictor (``nnppPredictor(device=...)``, nnpp/predictor/) itself and initialises it manually: the network comes from the
checkpoint's trainer class (found by :func:`nnpp.model_folder.find_trainer_class`: nnpp's trainers, nnU-Net's, and
those under ``nnUNet_extTrainer``) and plans.json + dataset.json, every fold's weights loaded strictly. So
Ascend NPUs work (nnU-Net's own entry point only accepts cuda/mps/cpu) and nnU-Net's modules stay untouched.
Preprocessing, Gaussian sliding window, mirroring, fold averaging, resampling and export are nnU-Net's; nnpp
batches the mirrored copies of each tile (``--tta_batch``), writes each case atomically (a killed run leaves no
file that ``--continue_prediction`` takes as finished) and prints each case's time split (read+preprocess, network,
resample+export; exact with -npp 0 -nps 0) and the cases/min.

Many processes: ``torchrun --nproc_per_node=N -m nnpp.run.predict ...`` splits the cases this run predicts by
RANK/WORLD_SIZE into one output folder (each rank on its LOCAL_RANK device, with usable cores / local ranks threads
unless OMP_NUM_THREADS was set by the user); rank 0 prints progress and the total cases/min.

Ours:
  --depth k             UNet++ pruned to depth k (only the nodes X^{0,k} needs run; 1..L); a depth whose head was
                        only a probe (--shallow_heads probe) is refused unless --allow_untrained_depth
  --onnx FOLDER         run an nnpp_export folder with ONNX Runtime instead of torch (-d/-c/-tr/-p/-chk/--depth
                        are then read from the folder; -f picks exported folds, default all of them)
  --ort_provider P      cpu (default) | cuda (onnxruntime-gpu; tiles stay on the GPU through IO binding) |
                        tensorrt (onnxruntime-gpu with TensorRT; CUDA takes what TensorRT cannot) | cann (Ascend:
                        onnxruntime-cann) | openvino (OpenVINO on the CPU: the `openvino` package, [openvino] extra,
                        or onnxruntime-openvino's execution provider). The session is checked to really run on it:
                        a provider that does not load is an error, never a silent CPU run
  --trt_cache DIR       TensorRT engine cache folder (engines built once, then loaded; default: no cache)
  --ort_threads N       ONNX Runtime intra-op threads (default 0 = ONNX Runtime's choice, one per physical core)
  --tta_batch N         at most N tiles x mirrored copies per network call (default: chosen per case, at most 8 =
                        one 3D tile's 8 mirrors, two 2D tiles' 4 each, or 8 tiles without mirroring; fewer when the
                        logits and activations of more copies exceed 10% of the case's logits or 512 MiB beyond
                        nnU-Net's own, e.g. 1 for 105 classes x 128^3 or Task03's UNet++); 1 = nnU-Net's one per call
  --resample plans|torch  logits back to the original grid with the plans' own function (default: what nnU-Net's
                        final validation and nnUNetv2_predict use, so the Dice of training's summary.json is the Dice
                        of these masks; for the default plans nnU-Net's scipy resampling, whose mask nnpp computes
                        sparsely and exactly) or nnU-Net's resample_torch_fornnunet (on the device with -nps 0; masks
                        differ at near-ties: nnU-Net stores scipy's resampled logits in fp16, torch's in fp32)
  --amp MODE            torch precision: auto (default; nnU-Net's choice: fp16 autocast on cuda and npu, fp32 on
                        the CPU and mps) | O0 (fp32) | O1 (fp16 autocast) | bf16 (bfloat16 autocast)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from nnpp import NnppError
from nnpp.paths import setup_paths
from nnpp.cli import entry_point, non_negative_int, positive_int
from nnpp.dataset_ids import dataset_name
from nnpp import DEFAULT_TRAINER


def parser() -> argparse.ArgumentParser:
    from nnpp.device import AMP_CHOICES, DEVICE_CHOICES
    from nnpp.deploy.ort import PROVIDERS
    from nnpp.predictor.resample import DEFAULT_RESAMPLE, RESAMPLE_CHOICES
    from nnpp.predictor.tiles import DEFAULT_TTA_BATCH
    env_int = lambda name, default: int(os.environ.get(name, default))  # noqa: E731 (nnU-Net's nnUNet_npp/nps)
    p = argparse.ArgumentParser(prog="nnpp_predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, help="input folder of CASE_XXXX.nii.gz (channel-suffixed) images")
    p.add_argument("-o", required=True, help="output folder (created)")
    p.add_argument("-d", help="dataset id (3, 003, Dataset003_Liver, Task003_Liver); not with --onnx")
    p.add_argument("-c", help="configuration, e.g. 3d_fullres; not with --onnx")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer (default {DEFAULT_TRAINER})")
    p.add_argument("-f", nargs="+", default=None, help="folds (default 0 1 2 3 4; with --onnx all exported folds)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no test-time mirroring")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--save_probabilities", action="store_true", help="also write .npz probabilities")
    p.add_argument("--continue_prediction", action="store_true", help="keep existing outputs")
    p.add_argument("-npp", type=int, default=None, help=f"preprocessing processes (default: nnUNet_npp or 3 "
                   f"[{env_int('nnUNet_npp', 3)}], divided among the local ranks under torchrun)")
    p.add_argument("-nps", type=int, default=None, help=f"segmentation export processes (default: nnUNet_nps or 3 "
                   f"[{env_int('nnUNet_nps', 3)}], divided among the local ranks under torchrun)")
    p.add_argument("-prev_stage_predictions", default=None, help="previous stage's predictions (cascade)")
    p.add_argument("-num_parts", type=int, default=1)
    p.add_argument("-part_id", type=int, default=0)
    p.add_argument("-device", default="auto", choices=DEVICE_CHOICES, help="torch device (default auto)")
    p.add_argument("--disable_progress_bar", action="store_true")
    p.add_argument("--not_on_device", action="store_true", help="keep the logits on the CPU (large cases on cuda)")
    p.add_argument("--depth", type=positive_int, default=None, help="UNet++ pruning depth k (1..L)")
    p.add_argument("--allow_untrained_depth", action="store_true",
                   help="run a --depth whose head was only a probe (the network never learned for it)")
    p.add_argument("--onnx", default=None, metavar="FOLDER", help="an nnpp_export folder: predict with ONNX Runtime")
    p.add_argument("--ort_provider", default="cpu", choices=tuple(PROVIDERS), help="ONNX Runtime provider")
    p.add_argument("--trt_cache", default=None, metavar="DIR", help="TensorRT engine cache folder (--ort_provider tensorrt)")
    p.add_argument("--ort_threads", type=non_negative_int, default=0, help="ONNX Runtime intra-op threads (0 = auto)")
    p.add_argument("--tta_batch", type=positive_int, default=None,
                   help=f"tiles x mirrors per network call (default: chosen per case, up to {DEFAULT_TTA_BATCH}, so "
                        f"the logits and activations held stay within 1.1x nnU-Net's; 1 = nnU-Net's one per call)")
    p.add_argument("--resample", default=DEFAULT_RESAMPLE, choices=RESAMPLE_CHOICES,
                   help="how the logits go back to each case's original grid: plans (default: the plans' own function, "
                   "as nnU-Net's validation and nnUNetv2_predict: the same masks; nnU-Net's scipy resampling for its "
                   "default plans) | torch (nnU-Net's resample_torch_fornnunet, on the device when exports run in "
                   "this process (-nps 0), on the CPU in export workers; masks differ at near-ties)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="torch precision (default auto: fp16 autocast on cuda/npu as nnU-Net, fp32 on the CPU)")
    return p


@entry_point("nnpp_predict")
def main(argv=None):
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isdir(args.i):
        raise NnppError(f"input folder '{args.i}' does not exist; -i takes a folder of CASE_0000.nii.gz images")
    if not 0 <= args.part_id < args.num_parts:
        raise NnppError(f"-part_id {args.part_id} must be in 0..{args.num_parts - 1} (-num_parts {args.num_parts})")

    from nnpp import cpu_threads
    from nnpp import device as dev
    from nnpp.distributed import dist_env
    from nnpp.deploy.ort import init_onnx
    from nnpp.predictor.build import AMP_TEXT, inference_amp, init_torch, make_predictor
    env = dist_env()
    if env.enabled:  # torchrun: the ranks split the cases as nnU-Net's -num_parts/-part_id would
        if args.num_parts != 1:
            raise NnppError("under torchrun the cases are split by WORLD_SIZE/RANK: drop -num_parts/-part_id")
        args.num_parts, args.part_id = env.world_size, env.rank

    if args.onnx is not None:
        if args.amp != "auto":
            raise NnppError(f"--amp {args.amp} is torch's inference precision; an ONNX export's precision is set at "
                            f"export (nnpp_export --precision fp32|fp16|int8): drop --amp")
        if args.depth is not None:
            raise NnppError("--depth is fixed at export with --onnx; export with nnpp_export --depth k instead")
        from nnpp.deploy.ort import check_provider
        check_provider(args.ort_provider)  # before the device: a missing provider is the error to report
        setup_paths(required=())
        # tiles go where the provider computes: CUDA memory for cuda/tensorrt (IO binding), the host otherwise
        device = dev.resolve_device("cuda" if args.ort_provider in ("cuda", "tensorrt") else "cpu",
                                    env.local_rank if env.enabled else None)
    else:
        if args.d is None or args.c is None:
            raise NnppError("-d DATASET and -c CONFIGURATION are required (or --onnx FOLDER from nnpp_export)")
        setup_paths(required=("nnUNet_results",))
        device = dev.resolve_device(args.device, env.local_rank if env.enabled else None)
    local_world = cpu_threads.local_ranks() if env.enabled else 1
    share_resources(args, local_world)
    if device.type == "cpu":
        cpu_threads.set_cpu_threads(args.threads)  # every core once over the local ranks (nnU-Net's choice for one process)

    amp = inference_amp(args.amp, device) if args.onnx is None else None
    predictor = make_predictor(device, args.step_size, not args.disable_tta, not args.not_on_device, args.verbose,
                               not args.disable_progress_bar, amp, args.tta_batch)
    predictor.export_threads = args.export_threads
    print(f"[nnpp_predict] rank {env.rank if env.enabled else 0}: " + (f"torch {args.threads} CPU thread(s), " if
          device.type == "cpu" else "") + f"ONNX Runtime threads {args.ort_threads or 'auto'}, -npp {args.npp} "
          f"-nps {args.nps}, export {args.export_threads} thread(s) per case ({args.threads_why})", flush=True)
    most = args.tta_batch or f"{predictor.tta_cap} (fewer for large models or many classes)"
    tta = (f"mirroring on, up to {most} tiles x mirrors per network call" if not args.disable_tta else
           f"mirroring off, up to {most} tiles per network call")
    if args.onnx is not None:
        if args.trt_cache and args.ort_provider != "tensorrt":
            raise NnppError("--trt_cache is the TensorRT engine cache: use it with --ort_provider tensorrt")
        meta = init_onnx(predictor, args.onnx, args.f, args.ort_provider, args.ort_threads, args.trt_cache,
                         env.local_rank if env.enabled else None)
        print(f"[nnpp_predict] ONNX Runtime ({args.ort_provider}, threads {args.ort_threads or 'auto'}): "
              f"{args.onnx}, folds {', '.join(str(f['fold']) for f in meta['folds'] if not args.f or str(f['fold']) in args.f)}, "
              f"depth {meta['depth']} ({meta.get('depth_from') or 'not recorded'}); {tta}")
        if meta.get("depth_from") == "untrained" and not args.allow_untrained_depth:
            raise NnppError(f"{args.onnx} was exported at depth {meta['depth']}, whose head was only a probe (the "
                            f"network never learned for it): re-export a trained depth, or pass "
                            f"--allow_untrained_depth to run it anyway")
    else:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        from nnpp.model_folder import find_trainer_class
        find_trainer_class(args.tr)  # unknown trainer -> clear error before anything is loaded
        folds = args.f or ["0", "1", "2", "3", "4"]
        model_folder = get_output_folder(dataset_name(args.d), args.tr, args.p, args.c)
        init_torch(predictor, model_folder, folds, args.chk, args.depth, args.allow_untrained_depth)
        print(f"[nnpp_predict] torch on {device}: {model_folder}, folds {', '.join(folds)}"
              f"{f', depth {args.depth}' if args.depth else ''}; precision {AMP_TEXT[amp.mode]} (--amp {args.amp}); "
              f"{tta}")

    if args.resample == "torch":  # in-process exports resample on the prediction device, export workers on the CPU
        from nnpp.predictor.resample import use_torch_resampling
        use_torch_resampling(predictor, device if args.nps == 0 else dev.resolve_device("cpu"),
                             args.export_threads)
    print(f"[nnpp_predict] resampling to the original grid: "
          f"{predictor.configuration_manager.configuration['resampling_fn_probabilities']} (--resample {args.resample})")
    os.makedirs(args.o, exist_ok=True)  # as nnUNetv2_predict does, once the model is known to load
    if env.is_main:
        write_run_files(predictor, args.o)
    if env.enabled:
        return predict_distributed(predictor, args, env)
    t0 = time.perf_counter()
    records = predictor.predict_cases(args.i, args.o, save_probabilities=args.save_probabilities,
                                      overwrite=not args.continue_prediction,
                                      folder_with_segs_from_prev_stage=args.prev_stage_predictions,
                                      num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps,
                                      num_parts=args.num_parts, part_id=args.part_id)
    print(time_split_text(records))
    if records:
        print(f"[nnpp_predict] {len(records)} case(s) in {time.perf_counter() - t0:.1f} s: "
              f"{60 * len(records) / (time.perf_counter() - t0):.2f} cases/min")
    return 0


def share_resources(args, local_world: int) -> None:
    """This rank's share of the machine, in ``args``: ``threads`` (torch on the CPU: the user's OMP_NUM_THREADS, else
    the usable cores / local ranks; torchrun's default of 1 per worker does not count as the user's), ONNX Runtime's
    threads (0 = its own choice of every core: under torchrun the rank's share instead, unless --ort_threads was
    given), ``-npp/-nps`` (nnU-Net's defaults divided among the local ranks where the flags were not given) and
    ``export_threads`` (torch threads of each export: the rank's threads over its export workers)."""
    from nnpp import cpu_threads
    args.threads, args.threads_why = cpu_threads.threads_per_rank(local_world)
    if local_world > 1 and args.ort_threads == 0:
        args.ort_threads = args.threads
    for flag, var in (("npp", "nnUNet_npp"), ("nps", "nnUNet_nps")):
        if getattr(args, flag) is None:
            setattr(args, flag, max(1, int(os.environ.get(var, 3)) // local_world) if local_world > 1
                    else int(os.environ.get(var, 3)))
    args.export_threads = max(1, args.threads // max(1, args.nps))


def case_files(predictor, args) -> dict:
    """{output name (case id): [its channel files]} of every case in -i, in nnU-Net's order."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    ending = predictor.dataset_json["file_ending"]
    return {os.path.basename(c[0])[:-(len(ending) + 5)]: c
            for c in create_lists_from_splitted_dataset_folder(args.i, ending)}


def cases_to_predict(predictor, args, files: dict) -> list:
    """The output file names (without ending) of the cases of -i (``files``: :func:`case_files`) that this run
    predicts (all parts): those without a finished segmentation (and .npz with --save_probabilities) under
    --continue_prediction."""
    ending = predictor.dataset_json["file_ending"]
    cases = list(files)
    if not args.continue_prediction:
        return cases
    return [c for c in cases if not (os.path.isfile(os.path.join(args.o, c + ending)) and
                                     (not args.save_probabilities or os.path.isfile(os.path.join(args.o, c + ".npz"))))]


def predict_distributed(predictor, args, env) -> int:
    """One rank of ``torchrun --nproc_per_node=N -m nnpp.run.predict ...``. Rank 0 lists the cases this run predicts
    (with --continue_prediction: those not finished) and every rank takes ``todo[RANK::WORLD_SIZE]``, so a rerun
    splits what is left evenly; each case is written atomically into the shared output folder (checked to be the same
    folder on every node, as training checks its results folder). Rank 0 prints the progress of this run (cases
    written since it started) and the total throughput once every rank is done (gloo barrier: any device). A rank
    that fails writes the case and the traceback to ``nnpp_predict_rankR.log`` in the output folder and says so in
    one line; torchrun then stops the others, and finished cases stay (rerun with --continue_prediction)."""
    import threading
    import traceback

    import torch.distributed as dist

    from nnpp.distributed import check_shared_folder, init, teardown
    init(env, "gloo", timeout_s=7 * 24 * 3600)  # only for the final barrier: ranks may finish hours apart
    check_shared_folder(args.o, "output folder (-o)")
    files = case_files(predictor, args)
    shared = [cases_to_predict(predictor, args, files) if env.is_main else None]
    dist.broadcast_object_list(shared, src=0)  # one listing: ranks starting later must not see others' new files
    todo = shared[0]
    mine = todo[env.rank::env.world_size]
    ending = predictor.dataset_json["file_ending"]
    stop = threading.Event()
    t0, started = time.perf_counter(), time.time()

    def written(case: str) -> bool:
        try:
            return os.stat(os.path.join(args.o, case + ending)).st_mtime >= started - 1
        except OSError:
            return False

    def progress():
        last = -1
        while not stop.wait(10):
            done = sum(written(c) for c in todo)
            if done != last:
                minutes = (time.perf_counter() - t0) / 60
                print(f"[nnpp_predict] progress: {done}/{len(todo)} cases of this run, {done / minutes:.2f} cases/min "
                      f"({env.world_size} processes)", flush=True)
                last = done
    if env.is_main:
        threading.Thread(target=progress, daemon=True).start()
    try:
        records = predictor.predict_cases([files[c] for c in mine], [os.path.join(args.o, c) for c in mine],
                                          save_probabilities=args.save_probabilities, overwrite=True,
                                          folder_with_segs_from_prev_stage=args.prev_stage_predictions,
                                          num_processes_preprocessing=args.npp,
                                          num_processes_segmentation_export=args.nps)
    except Exception as e:
        stop.set()
        log = os.path.join(args.o, f"nnpp_predict_rank{env.rank}.log")
        with open(log, "w") as f:
            f.write(f"rank {env.rank} of {env.world_size}, case {predictor.current_case}\n{traceback.format_exc()}")
        teardown(finished=False)
        raise NnppError(f"rank {env.rank} of {env.world_size} failed on case {predictor.current_case} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; traceback in {log}); "
                        f"torchrun stops the other ranks; finished cases are complete files: rerun with "
                        f"--continue_prediction to predict the rest") from None
    print(time_split_text(records).replace("[nnpp_predict]", f"[nnpp_predict rank {env.rank}]"), flush=True)
    teardown(finished=True)  # waits for every rank
    stop.set()
    if env.is_main:
        seconds = time.perf_counter() - t0
        print(f"[nnpp_predict] all {env.world_size} processes done: {len(todo)} case(s) in {seconds:.1f} s, "
              f"{60 * len(todo) / seconds:.2f} cases/min total", flush=True)
    return 0


def write_run_files(predictor, out: str) -> None:
    """dataset.json and plans.json beside the predictions, as nnU-Net's predictor writes them (its postprocessing
    and evaluation read them), each atomically."""
    import json
    for name, obj in (("dataset.json", predictor.dataset_json), ("plans.json", predictor.plans_manager.plans)):
        tmp = os.path.join(out, f".{name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=4, sort_keys=False)
        os.replace(tmp, os.path.join(out, name))


def time_split_text(records: list) -> str:
    """Where each case's time went: reading + preprocessing, network (sliding window, mirroring, folds),
    resampling + export; and the totals. With worker processes the first and last overlap the network (say so)."""
    if not records:
        return "[nnpp_predict] nothing to predict (every case already predicted, or no input)"
    lines = []
    for r in records:
        lines.append(f"[nnpp_predict] {r['case']}: read+preprocess {r['read_preprocess_s']:.2f} s, network "
                     f"{r['network_s']:.2f} s, resample+export {r['export_s']:.2f} s")
    tot = {k: sum(r[k] for r in records) for k in ("read_preprocess_s", "network_s", "export_s")}
    n = len(records)
    note = (" (worker processes: read+preprocess = time waited for a preprocessed case, resample+export = the "
            "export workers' own time, overlapping the network; -npp 0 -nps 0 for an exact split)"
            if records[0]["overlapped"] else "")
    lines.append(f"[nnpp_predict] time per case over {n} case(s): read+preprocess {tot['read_preprocess_s'] / n:.2f} s, "
                 f"network {tot['network_s'] / n:.2f} s, resample+export {tot['export_s'] / n:.2f} s{note}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
