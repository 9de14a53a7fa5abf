"""Learning curves: does nnpp's UNet++ learn as fast as nnU-Net's U-Net per iteration, per deep-supervision weighting?

    python benchmarks/bench_convergence.py --workdir /tmp/conv                       # all networks, 3 seeds
    python benchmarks/bench_convergence.py --networks unet unetpp --seeds 0 1 2 --points 100 200 400 800

A synthetic multi-structure 2D task (nnpp.data.synthetic_multi: a large organ, medium kidneys, thin vessels, small
low-contrast lesions) goes through nnU-Net's pipeline once (MSD conversion, fingerprint, small PlainConvUNet plans,
2d preprocessing; the batch size set with nnpp's change_bs). Every network trains on the same plans, fold 0, with
``nnpp_train`` (nnU-Net's own ``nnUNetTrainer`` for the U-Net), nnU-Net's own precision on ``-device`` (CUDA: fp16
autocast, ``--amp O1``; the CPU, the default, and others: fp32, ``--amp O0``), ``--seed`` per run, data
augmentation in the main process (``nnUNet_n_proc_DA=0``, so batches are seeded too). Each run trains ONCE to the
largest point (one poly-LR schedule); at every point nnU-Net's own validation (sliding-window predictor, export,
``compute_metrics_on_folder``) runs on the held-out fold-0 cases, and its per-structure Dice is kept.

Real data (``--task ts_example_ct``): the shared real CT of ``../shared/datasets/ts_example_ct.py`` (spleen,
liver, stomach, aorta; ``--chunks K`` cuts it into z-slabs so ``--fold`` can hold some out) planned with
``SmallUNetPlanner(950, base_features=8, max_patch=(32, 96, 96))`` (``--max_patch``), 2d or ``--config
3d_fullres``, the planner's batch; the final model of every run is also scored per head (pruned depth k, mean of
all heads) on the fold's validation cases and, with ``--unseen``, on a second patient (TotalSegmentator's DICOM
example CT). ``--table_only`` rebuilds the tables.

Networks (``--networks``; the UNet++ variants keep the network; the ``--ds_weights`` rows train every head):
  unet               nnU-Net's PlainConvUNet, nnUNetTrainer
  unet_nnpp          the same U-Net with nnpp's trainer (nnUNetTrainerNoKD: nnU-Net's multi-resolution deep supervision)
  unetpp_trained     ``--shallow_heads trained``: every head's loss trains the network (nnpp's earlier default)
  unetpp_last        deep supervision off: X^{0,L}'s loss alone (benchmark hook)
  unetpp_msds        nnU-Net's multi-resolution deep supervision on UNet++'s U-Net path added (benchmark hook)
  unetpp_pg03/_pg1   the default's probe heads passing 0.3 / 1.0 of their gradient to the network (decoder.probe_grad;
                     benchmark hook): X^{0,L} at weight 1, the shallower heads' loss at 1/2, 1/4, ... scaled by s
  unetpp             nnpp's UNet++ with ``--ds_weights equal`` (1/L per head: nnpp's first default)
  unetpp_descending  ``--ds_weights descending`` (nnU-Net's halving from X^{0,L} down; X^{0,L} gets ~1/2)
  unetpp_decay       ``--ds_weights decay`` (equal at the start, only X^{0,L} at the end)
  unetpp_sum         equal weights of 1 each (loss and gradients x L: the loss-scale / effective-LR question)
  unetpp_default     nnUNetPlusPlusTrainer as it is now, no flag (shallow heads as probes)

Speed (``--speed_iters``): one separate process times full iterations (batch from nnU-Net's loader with in-process
augmentation + train step) of the U-Net and UNet++ alternately, side by side, so both see the same load; the
"equal wall time" table re-indexes the curves by those s/it (DS weights change no compute: every UNet++ variant
has UNet++'s s/it). Runs are resumable: a finished run's JSON in <workdir>/runs is reused.

Writes ``--out`` (JSON), the same name with .md (tables) and .png (curves), machine and CPU capability named in each.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py (puts the checkout first)
from common import (RESULTS, TS_BUILDER, load_builder, machine, machine_line, md_table, mean_sd,  # noqa: E402
                    nnunet_env, print_result, result_of, run_for_result, timed_in_turns, write_json, write_text)

from nnpp.cli import entry_point  # noqa: E402  (nnpp.cli imports no nnunetv2: its paths are set later)
from nnpp.device import configure_backends, device_name, resolve_device, synchronize  # noqa: E402

DATASET_ID = 917
UNETPP = "nnUNetPlusPlusTrainer"
#: network -> (trainer, nnpp_train flags, hook variant); nnpp's trainers also get ``--amp precision(device)``
NETWORKS = {
    "unet": ("nnUNetTrainer", [], None),
    "unet_nnpp": ("nnUNetTrainerNoKD", [], None),
    "unetpp": (UNETPP, ["--ds_weights", "equal", "--shallow_heads", "trained"], None),
    "unetpp_descending": (UNETPP, ["--ds_weights", "descending", "--shallow_heads", "trained"], None),
    "unetpp_decay": (UNETPP, ["--ds_weights", "decay", "--shallow_heads", "trained"], None),
    "unetpp_sum": (UNETPP, ["--ds_weights", "equal", "--shallow_heads", "trained"], "sum"),
    "unetpp_trained": (UNETPP, ["--shallow_heads", "trained"], None),
    "unetpp_default": (UNETPP, [], None),
    "unetpp_last": (UNETPP, [], "last"),
    "unetpp_msds": (UNETPP, [], "msds"),
    # probe heads whose gradient reaches the network scaled by s (decoder.probe_grad): the main head at weight 1
    "unetpp_pg03": (UNETPP, [], "pg0.3"),
    "unetpp_pg1": (UNETPP, [], "pg1.0"),
}


def precision(device: str) -> str:
    """The ``--amp`` of nnpp's trainers on ``device``: the precision nnU-Net's own ``nnUNetTrainer`` (the U-Net row,
    which takes no ``--amp``) trains in there, so both networks compare at equal precision: fp16 autocast with a grad
    scaler (O1) on CUDA, fp32 elsewhere (nnU-Net autocasts on CUDA only)."""
    return "O1" if device == "cuda" else "O0"


#: the real-CT task (--task ts_example_ct, the shared builder common.TS_BUILDER): its dataset id
TS_ID = 950


# ------------------------------------------------------------------------------------------------------- data
def prepare(work: str, cases: int, size: int, batch: int, base: int) -> str:
    """The synthetic task through nnU-Net's pipeline, once per workdir; returns the preprocessed dataset name."""
    from nnunetv2.paths import nnUNet_preprocessed

    from nnpp.data.synthetic import prepare_dataset
    from nnpp.data.synthetic_multi import make_msd_multi_task
    from nnpp.tools.change_bs import change_batch_size
    msd = make_msd_multi_task(os.path.join(work, "msd"), DATASET_ID, n_train=cases, size=size)
    name = prepare_dataset(msd, DATASET_ID, configurations=("2d",), num_processes=2, planner="SmallUNetPlanner",
                           base_features=base, max_features=8 * base, max_patch=(size, size, size))
    change_batch_size(os.path.join(str(nnUNet_preprocessed), name, "nnUNetPlans.json"), batch, "2d")
    return name


def prepare_ts(work: str, chunks: int, builder: str, config: str = "2d", max_patch=(32, 96, 96)) -> str:
    """The real CT of the shared builder (TotalSegmentator's example CT, spleen/liver/stomach/aorta, ``chunks`` z-slabs)
    planned small: ``SmallUNetPlanner(950, base_features=8, max_patch=max_patch)``, ``config`` preprocessed."""
    from nnpp.data.synthetic import plan_and_preprocess
    subprocess.run([sys.executable, builder, os.environ["nnUNet_raw"], "--id", str(TS_ID), "--chunks", str(chunks)],
                   check=True)
    return plan_and_preprocess(TS_ID, (config,), 2, "SmallUNetPlanner", base_features=8, max_patch=tuple(max_patch))


def prepare_unseen(work: str, builder: str, labels: dict) -> str:
    """A second, unseen patient: the DICOM CT of TotalSegmentator's reference files (another scanner: 512 x 512 x 20,
    0.98 x 0.98 x 2 mm) with TotalSegmentator's segmentation of it, written as ``unseen/imagesTs`` + ``labelsTs`` with
    the dataset's label values (``labels``: dataset.json's name -> value). Returns the folder."""
    import tarfile

    import SimpleITK as sitk

    from nnpp.data.align import check_ct_labels, labels_onto_image
    out = os.path.join(work, "unseen")
    if os.path.isfile(os.path.join(out, "labelsTs", "dicom_patient.nii.gz")) and os.path.isfile(
            os.path.join(out, "aligned")):
        return out
    mod = load_builder(builder)
    tar_path, ref = mod.sdist(None), f"totalsegmentator-{mod.VERSION}/tests/reference_files"
    src = os.path.join(mod.CACHE, "src")
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"{ref}/example_ct_dicom/")
                   or m.name in (f"{ref}/example_seg_dicom.nii.gz",
                                 f"totalsegmentator-{mod.VERSION}/totalsegmentator/map_to_binary.py")]
        tar.extractall(src, members=members, filter="data")
    names = mod.class_names(os.path.join(src, f"totalsegmentator-{mod.VERSION}/totalsegmentator/map_to_binary.py"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(os.path.join(src, ref, "example_ct_dicom")))
    image = reader.Execute()
    seg = labels_onto_image(sitk.ReadImage(os.path.join(src, ref, "example_seg_dicom.nii.gz")), image)
    seg_arr = sitk.GetArrayFromImage(seg)
    lab = seg_arr * 0
    for name, value in labels.items():
        ids = [k for k, n in names.items() if n == name]
        if value and ids:
            lab[seg_arr == ids[0]] = value
    try:
        means = check_ct_labels(sitk.GetArrayFromImage(image), lab, labels, "unseen patient's labels")
    except ValueError as e:
        raise SystemExit(f"bench_convergence: {e}")
    print("unseen patient, mean HU inside each label:", {n: round(m) for n, m in means.items()}, flush=True)
    lab_img = sitk.GetImageFromArray(lab.astype("uint8"))
    lab_img.CopyInformation(image)  # lab was resampled into image's grid above
    for sub in ("imagesTs", "labelsTs"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), os.path.join(out, "imagesTs", "dicom_patient_0000.nii.gz"))
    sitk.WriteImage(lab_img, os.path.join(out, "labelsTs", "dicom_patient.nii.gz"))
    with open(os.path.join(out, "aligned"), "w") as f:  # labels resampled by world coordinates (older folders: not)
        json.dump({"mean_hu": means}, f)
    return out


# ---------------------------------------------------------------------------------------------------- one run
def head_mean(network):
    """The UNet++ paper's "accurate mode": the mean of every head's probabilities (returned as log-probabilities,
    which nnU-Net's predictor averages and argmaxes like logits)."""
    import torch

    class HeadMeanNet(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            self.net.deep_supervision = True
            try:
                outs = self.net(x)
            finally:
                self.net.deep_supervision = False
            return torch.stack([o.float().softmax(1) for o in outs]).mean(0).clamp_min(1e-8).log()
    return HeadMeanNet(network)


def evaluate_modes(trainer, sets: dict, out_root: str, amp: str = "O0", mirroring: bool = True) -> dict:
    """{set: {mode: {structure: Dice}}}: ``sets`` maps a name to (list of image-file lists, labels folder); modes are
    ``full`` (the network as nnU-Net predicts with it) and, for UNet++, ``depth{k}`` for k < L (pruned to X^{0,k})
    and ``mean`` (all heads' probabilities averaged). nnpp's predictor on the trainer's device, with the trainer's
    test-time mirroring unless ``mirroring`` is False, in ``amp`` (fp32 by default); nnU-Net's metrics."""
    import copy

    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from nnpp import device as dev
    from nnpp.dice import label_names, read_dice
    from nnpp.predictor.tiles import nnppPredictor

    net = getattr(trainer, "bare_network", None) or getattr(trainer.network, "_orig_mod", trainer.network)
    net = copy.deepcopy(net).float().eval()
    net.__dict__.pop("forward", None)  # a bench variant's training forward (install_multiscale_ds)
    net.decoder.deep_supervision = False
    modes = {"full": net}
    if hasattr(net, "prune_depth"):
        for k in range(1, net.depth):
            pruned = copy.deepcopy(net)
            pruned.prune_depth = k
            modes[f"depth{k}"] = pruned
        modes["mean"] = head_mean(net)
    names = label_names(trainer.dataset_json)
    labels = [v for v in trainer.dataset_json["labels"].values() if v]
    rw = determine_reader_writer_from_dataset_json(trainer.dataset_json)()
    out = {}
    for set_name, (files, label_dir) in sets.items():
        out[set_name] = {}
        for mode, model in modes.items():
            pred_dir = os.path.join(out_root, set_name, mode)
            predictor = nnppPredictor(device=trainer.device, amp=dev.make_amp(amp, trainer.device), allow_tqdm=False)
            predictor.manual_initialization(model, trainer.plans_manager, trainer.configuration_manager,
                                            [model.state_dict()], trainer.dataset_json, type(trainer).__name__,
                                            trainer.inference_allowed_mirroring_axes if mirroring else None)
            predictor.predict_from_files(files, pred_dir, save_probabilities=False, overwrite=True,
                                         num_processes_preprocessing=1, num_processes_segmentation_export=1)
            compute_metrics_on_folder(label_dir, pred_dir, os.path.join(pred_dir, "summary.json"), rw,
                                      trainer.dataset_json["file_ending"], labels, num_processes=1)
            out[set_name][mode] = {names.get(k, k): v for k, v in
                                   read_dice(os.path.join(pred_dir, "summary.json")).items()}
            print(f"[bench_convergence] {set_name} {mode}: {out[set_name][mode]}", flush=True)
    return out


def install_multiscale_ds(trainer) -> None:
    """Diagnostic: nnU-Net's multi-resolution deep supervision on UNet++'s U-Net path. Extra 1x1 heads on
    X^{i,L-i} (i = 1..L-1, the nodes a U-Net decoder has) see nnU-Net's downsampled targets (weights 1/2^i, as
    nnU-Net's), beside the top-row full-resolution heads (descending weights); all weights normalised together."""
    import torch
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer._get_deep_supervision_scales = lambda: nnUNetTrainer._get_deep_supervision_scales(trainer)
    initialize = trainer.initialize

    def init():
        initialize()
        net = trainer.bare_network
        dec, n_levels = net.decoder, net.depth
        f, n_cls = list(net.encoder.output_channels), dec.num_classes
        net.aux_heads = torch.nn.ModuleList(net.encoder.conv_op(f[i], n_cls, 1, 1, 0, bias=True)
                                            for i in range(1, n_levels))
        net.aux_heads.apply(InitWeights_He(1e-2))
        net.aux_heads.to(trainer.device, memory_format=trainer.memory_format)
        trainer.optimizer.add_param_group({"params": list(net.aux_heads.parameters())})

        def forward(x, depth=None):
            if not dec.deep_supervision:
                return type(net).forward(net, x, depth)
            skips = []
            for stage in net.encoder.stages:
                x = stage(x)
                skips.append(x)
            rows = [[skips[i]] for i in range(n_levels + 1)]
            for j in range(1, n_levels + 1):
                for i in range(n_levels - j + 1):
                    rows[i].append(dec._node(i, j, rows[i + 1][j - 1], *rows[i]))
            return [dec.seg_layers[j - 1](rows[0][j]) for j in range(n_levels, 0, -1)] + \
                [net.aux_heads[i - 1](rows[i][n_levels - i]) for i in range(1, n_levels)]
        net.forward = forward
        base = trainer.loss.loss
        raw = [0.5 ** j for j in range(n_levels)] + [0.5 ** i for i in range(1, n_levels)]
        weights = [w / sum(raw) for w in raw]

        def loss(outputs, targets):
            return sum(w * base(o, targets[0] if h < n_levels else targets[h - n_levels + 1])
                       for h, (o, w) in enumerate(zip(outputs, weights)))
        trainer.loss = loss
    trainer.initialize = init


def validate_without_mirroring(trainer) -> None:
    """Make ``trainer``'s nnU-Net validation (``perform_actual_validation``) predict without test-time mirroring; the
    mirroring axes are put back after it, so the checkpoints and later predictions keep them."""
    validate = trainer.perform_actual_validation

    def validate_unmirrored(*args, **kwargs):
        axes, trainer.inference_allowed_mirroring_axes = trainer.inference_allowed_mirroring_axes, None
        try:
            return validate(*args, **kwargs)
        finally:
            trainer.inference_allowed_mirroring_axes = axes
    trainer.perform_actual_validation = validate_unmirrored


def run_one(network: str, seed: int, points: list[int], iters_per_epoch: int, dataset_id: int = DATASET_ID,
            fold: str = "0", unseen: str | None = None, config: str = "2d", device: str = "cpu",
            mirroring: bool = True) -> dict:
    """Train ``network`` with ``seed`` once to max(points) iterations with nnpp_train; nnU-Net's validation Dice
    at every point. Runs inside a worker process whose environment names the nnU-Net folders."""
    import torch

    from nnpp.dice import label_names, read_dice
    from nnpp.run import train

    trainer_name, flags, hook = NETWORKS[network]
    flags = flags if trainer_name == "nnUNetTrainer" else [*flags, "--amp", precision(device)]
    epochs = max(points) // iters_per_epoch
    dice, seconds = {}, {}

    def summary(trainer) -> dict:
        names = label_names(trainer.dataset_json)
        return {names.get(k, k): v for k, v in read_dice(os.path.join(trainer.output_folder, "validation",
                                                                      "summary.json")).items()}

    clock = {"total": 0.0}  # training wall time: epochs (train + 1 pseudo-Dice step + logging), no evaluations

    def setup(trainer, args):
        if hook == "sum":  # loss scale L: every head weighted 1
            trainer.deep_supervision_weights = lambda: [1.0] * trainer.num_heads
        if hook == "msds":
            install_multiscale_ds(trainer)
        if hook and hook.startswith("pg"):  # probe heads passing the fraction s of their gradient to the network
            initialize = trainer.initialize

            def init_probe_grad():
                initialize()
                trainer.bare_network.decoder.probe_grad = float(hook[2:])
            trainer.initialize = init_probe_grad
        if not mirroring:
            validate_without_mirroring(trainer)
        if hook == "last":  # deep supervision off: X^{0,L} alone (the other heads get no gradient)
            trainer.deep_supervision_weights = lambda: [1.0] + [0.0] * (trainer.num_heads - 1)
        on_epoch_start, on_epoch_end = trainer.on_epoch_start, trainer.on_epoch_end

        def start_clock():
            clock["t0"] = time.perf_counter()
            on_epoch_start()

        def evaluate_at_points():
            done = (trainer.current_epoch + 1) * trainer.num_iterations_per_epoch
            on_epoch_end()
            clock["total"] += time.perf_counter() - clock["t0"]
            seconds[done] = clock["total"]
            if done in points and done < max(points):  # the last point is nnpp_train's own final validation
                trainer.perform_actual_validation(False)
                dice[done] = summary(trainer)
                print(f"[bench_convergence] {network} seed {seed} it {done}: {dice[done]}", flush=True)
        trainer.on_epoch_start, trainer.on_epoch_end = start_clock, evaluate_at_points

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    argv = [str(dataset_id), config, fold, "-tr", trainer_name, "-device", device, "--epochs", str(epochs), "--iters",
            str(iters_per_epoch), "--val_iters", "1", "--seed", str(seed), *flags]
    trainer = train.run(train.build_parser().parse_args(argv), setup=setup)
    dice[max(points)] = summary(trainer)
    extra = {}
    if dataset_id == TS_ID:  # per head / pruned / accurate mode on the validation cases, and the unseen patient
        raw = os.path.join(os.environ["nnUNet_raw"], trainer.plans_manager.dataset_name)
        ending = trainer.dataset_json["file_ending"]
        _, val_keys = trainer.do_split()
        sets = {"val": ([[os.path.join(raw, "imagesTr", k + "_0000" + ending)] for k in sorted(val_keys)],
                        os.path.join(raw, "labelsTr"))}
        if unseen:
            sets["unseen"] = (os.path.join(unseen, "imagesTs"), os.path.join(unseen, "labelsTs"))
        extra = evaluate_modes(trainer, sets, os.path.join(trainer.output_folder, "bench_eval"), precision(device),
                               mirroring)
    return {"network": network, "seed": seed, "trainer": trainer_name, "flags": flags, "variant": hook,
            "device": device, "mirroring": mirroring, "fold": fold, "eval": extra,
            "epochs": epochs, "iters_per_epoch": iters_per_epoch,
            "ds_weights": [float(w) for w in getattr(trainer, "deep_supervision_weights", lambda: [])()],
            "dice": {str(k): v for k, v in sorted(dice.items())},
            "train_seconds": {str(k): v for k, v in sorted(seconds.items()) if k in dice}}


def measure_speed(networks: list[str], iters: int, block: int = 5, dataset_id: int = DATASET_ID,
                  fold: str = "0", config: str = "2d", device: str = "cpu") -> dict:
    """Seconds per full training iteration (next batch + train step) for each network, measured alternately in
    blocks of ``block`` iterations in this one process (same threads, same load); median over blocks."""
    import statistics

    import torch

    from nnpp.run import train
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    target = resolve_device(device)
    configure_backends(target)  # as nnpp_train does (cudnn.benchmark on CUDA)
    trainers, loaders = {}, {}
    for net in networks:
        trainer_name, flags, _ = NETWORKS[net]
        t = train.make_trainer(str(dataset_id), config, fold, trainer_name, device=target)
        if hasattr(t, "configure_amp"):
            t.configure_amp(precision(device))
        t.initialize()
        t.network.train()
        loaders[net], _ = t.get_dataloaders()
        trainers[net] = t
        for _ in range(3):  # warm-up
            t.train_step(next(loaders[net]))
    block = max(1, min(block, iters))

    def run_block(net):
        for _ in range(block):
            trainers[net].train_step(next(loaders[net]))
    times = timed_in_turns({net: (lambda net=net: run_block(net)) for net in networks}, max(1, iters // block),
                           sync=lambda: synchronize(target))
    return {net: statistics.median(v) / block for net, v in times.items()}


# --------------------------------------------------------------------------------------------------- reporting
def stat_row(dices: list[dict], structures: list[str]) -> dict:
    """{structure or 'mean': [mean, sd, n]} over runs' {structure: Dice}; 'mean' is each run's mean over the
    structures (NaN structures left out, as nnU-Net's foreground_mean), then mean +- sd over the runs."""
    row = {}
    for s in structures + ["mean"]:
        vals = [mean_sd([d.get(x, math.nan) for x in structures])[0] if s == "mean" else d.get(s, math.nan)
                for d in dices]
        row[s] = [*mean_sd(vals), len(vals)]
    return row


def aggregate(runs: list[dict], structures: list[str]) -> dict:
    """{network: {point: stat_row}} over seeds."""
    out = {}
    for net in dict.fromkeys(r["network"] for r in runs):
        mine = [r for r in runs if r["network"] == net]
        out[net] = {point: stat_row([r["dice"].get(point, {}) for r in mine], structures) for point in mine[0]["dice"]}
    return out


def aggregate_eval(runs: list[dict], structures: list[str]) -> dict:
    """{network: {set: {mode: stat_row}}} over seeds, from the runs' final-model evaluations (ts_example_ct:
    ``val`` = the fold's validation cases, ``unseen`` = the second patient)."""
    out = {}
    for net in dict.fromkeys(r["network"] for r in runs):
        mine = [r for r in runs if r["network"] == net and r.get("eval")]
        for set_name, modes in (mine[0]["eval"] if mine else {}).items():
            out.setdefault(net, {})[set_name] = {
                mode: stat_row([r["eval"].get(set_name, {}).get(mode, {}) for r in mine], structures)
                for mode in modes}
    return out


def at_equal_time(curves: dict, speed: dict, reference: str = "unet") -> dict:
    """Curves re-indexed by wall time: at the time ``reference`` needs for each of its points (its s/it x point),
    each network has done time / its s/it iterations and shows its snapshot at the largest point <= that count
    (None before its first point)."""
    out = {}
    if reference not in speed:
        return out
    for net, curve in curves.items():
        s_it = speed[net]
        rows = {}
        for point in curves[reference]:
            budget = int(point) * speed[reference]
            reached = budget / s_it
            done = [p for p in curve if int(p) <= reached + 1e-6]
            rows[point] = {"seconds": budget, "iterations": reached,
                           "snapshot": done[-1] if done else None,
                           "dice": curve[done[-1]] if done else None}
        out[net] = rows
    return out


def fmt(cell) -> str:
    mean, sd, _ = cell
    return "—" if math.isnan(mean) else f"{mean:.3f} ± {sd:.3f}"


def cells(row: dict, cols: list[str]) -> list[str]:
    return [fmt(row[c]) for c in cols]


def markdown(result: dict) -> str:
    curves, structures = result["curves"], result["structures"]
    cols = structures + ["mean"]
    seeds = ", ".join(f"{n} {k}" for n, k in result["seeds_per_network"].items())
    m = result["machine"]
    mirrored = "test-time mirroring" if result.get("mirroring", True) else "no test-time mirroring"
    precision_name = ("fp32" if m.get("amp", "O0") == "O0" else "fp16 autocast (O1)") + ", " + mirrored
    lines = [f"Machine: {machine_line(m)}; device {m.get('device', 'cpu')}. Task: {result['task']}. Seeds per "
             f"network: {seeds}. {precision_name}; validation Dice of nnU-Net's own validation on the fold-0 cases, "
             f"mean ± sd over seeds; each run trained once to {max(result['points'])} iterations (one poly-LR "
             f"schedule), validated on the way.", "",
             *md_table(["network", "iterations", *cols], ([net, point, *cells(row, cols)]
                                                          for net, curve in curves.items() for point, row in curve.items()))]
    speed = result.get("seconds_per_iteration")
    if speed:
        lines += ["", "Seconds per iteration (batch + train step, measured side by side in one process, "
                  f"{result['threads']} thread(s)): " + ", ".join(f"{k} {v:.3f} s" for k, v in speed.items()),
                  "", "Equal wall time (the U-Net's time to each of its points; each network shows the snapshot it "
                  "had reached by then, — if none):", "",
                  *md_table(["wall time (s)", "network", "iterations reached", "snapshot", *cols],
                            ([f"{r['seconds']:.0f}", net, f"{r['iterations']:.0f}", r["snapshot"] or "—",
                              *(cells(r["dice"], cols) if r["dice"] else ["—"] * len(cols))]
                             for net, rows in result["equal_wall_time"].items() for r in rows.values()))]
    final = result.get("final_models")
    if final:
        lines += ["", f"Final models (mean ± sd over seeds; nnpp's predictor, the training's precision, {mirrored}): "
                  "`val` = the fold's "
                  "validation cases, `unseen` = a second patient (TotalSegmentator's DICOM example CT: another "
                  "scanner, 0.98 x 0.98 x 2 mm); modes: `full` = X^{0,L} as nnU-Net predicts, `depthK` = pruned to "
                  "X^{0,K}, `mean` = mean of all heads' probabilities (the UNet++ paper's accurate mode).", "",
                  *md_table(["network", "set", "mode", *cols],
                            ([net, set_name, mode, *cells(row, cols)] for net, sets in final.items()
                             for set_name, modes in sets.items() for mode, row in modes.items()))]
    seconds = result.get("train_seconds")
    if seconds:
        lines += ["", "Training wall time per run to the last point (s, mean ± sd; runs two at a time, 1 thread each, "
                  "evaluations excluded): " + ", ".join(f"{n} {m:.0f} ± {sd:.0f}" for n, (m, sd) in seconds.items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = result["structures"] + ["mean"]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.6), sharey=True)
    for ax, col in zip(axes, cols):
        for net, curve in result["curves"].items():
            x = [int(p) for p in curve]
            m = [curve[p][col][0] for p in curve]
            sd = [curve[p][col][1] for p in curve]
            line, = ax.plot(x, m, marker="o", ms=3, label=net)
            ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(col)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation Dice (mean ± sd over seeds)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(machine_line(result["machine"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="bench_convergence_work", help="data, runs and logs (kept; runs resume)")
    p.add_argument("--networks", nargs="+", default=["unet", "unetpp", "unetpp_descending", "unetpp_decay"],
                   choices=list(NETWORKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--points", nargs="+", type=int, default=[100, 200, 400, 800],
                   help="iteration counts to validate at (multiples of --iters_per_epoch)")
    p.add_argument("--iters_per_epoch", type=int, default=50)
    p.add_argument("--cases", type=int, default=30, help="synthetic cases (6 slices each; fold 0 validates 1/5)")
    p.add_argument("--size", type=int, default=80, help="slice size in pixels (also the 2d patch cap)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--base", type=int, default=16, help="base features of the plans (max 8x)")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda", "npu", "mps"),
                   help="where every run trains and is scored; nnpp's trainers take the precision nnU-Net's own "
                        "trainer has there (CUDA: fp16 autocast, --amp O1; otherwise fp32, --amp O0)")
    p.add_argument("--no_mirroring", action="store_true",
                   help="score without test-time mirroring (nnU-Net's validation and the final models' modes): it "
                        "costs up to 8 passes per tile in 3D, up to 4 in 2D")
    p.add_argument("--parallel", type=int, default=None, help="runs at a time (default: 2 on the CPU, 1 on an "
                   "accelerator, whose runs would share it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--speed_iters", type=int, default=40, help="iterations per network for s/it (0: skip)")
    p.add_argument("--task", choices=("synthetic", "ts_example_ct"), default="synthetic",
                   help="synthetic: nnpp.data.synthetic_multi; ts_example_ct: the real CT of the shared builder "
                        "(spleen, liver, stomach, aorta; --config, SmallUNetPlanner base 8, patch <= --max_patch, the "
                        "planner's batch), with per-head / pruned / head-mean Dice of the final models")
    p.add_argument("--config", choices=("2d", "3d_fullres"), default="2d",
                   help="ts_example_ct: the nnU-Net configuration every network trains (the synthetic task is 2d)")
    p.add_argument("--max_patch", nargs=3, type=int, default=[32, 96, 96], metavar=("Z", "Y", "X"),
                   help="ts_example_ct: SmallUNetPlanner's largest patch (2d plans use Y x X); default 32 96 96")
    p.add_argument("--chunks", type=int, default=1, help="ts_example_ct: z-slabs (cases); 1 = one case, fold all")
    p.add_argument("--fold", default=None, help="fold to train (default: 0; 'all' for ts_example_ct with 1 chunk)")
    p.add_argument("--builder", default=TS_BUILDER, help="path of the shared ts_example_ct.py builder")
    p.add_argument("--unseen", action="store_true", help="ts_example_ct: also score a second, unseen patient (the "
                   "DICOM CT of TotalSegmentator's reference files, another scanner and resolution)")
    p.add_argument("--table_only", action="store_true", help="no new runs: tables and plot from the finished runs")
    p.add_argument("--out", default=os.path.join(RESULTS, "convergence.json"))
    p.add_argument("--worker", nargs=2, metavar=("NETWORK", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--speed_worker", action="store_true", help=argparse.SUPPRESS)
    return p


def check_args(a) -> None:
    from nnpp import NnppError
    bad = [p for p in a.points if p <= 0 or p % a.iters_per_epoch]
    if bad:
        raise NnppError(f"--points {' '.join(map(str, bad))}: every point must be a positive multiple of "
                        f"--iters_per_epoch {a.iters_per_epoch}")
    if len(set(a.seeds)) != len(a.seeds):
        raise NnppError("--seeds: give each seed once")
    if a.task != "ts_example_ct" and (a.config != "2d" or a.max_patch != [32, 96, 96]):
        raise NnppError("--config and --max_patch plan the real CT: use them with --task ts_example_ct")
    try:  # an absent accelerator: one line, before anything is written
        resolve_device(a.device)
    except NnppError:
        raise NnppError(f"-device {a.device}: no {a.device} device is available here; use -device cpu") from None


@entry_point("bench_convergence")
def main(argv=None) -> dict | None:
    a = build_parser().parse_args(argv)
    a.points = sorted(set(a.points))
    a.parallel = a.parallel or (2 if a.device == "cpu" else 1)
    work = os.path.abspath(a.workdir)
    ts = a.task == "ts_example_ct"
    a.fold = a.fold or ("all" if ts and a.chunks == 1 else "0")
    unseen = os.path.join(work, "unseen") if ts and a.unseen else None
    if a.worker:  # child: environment set by the parent
        result = run_one(a.worker[0], int(a.worker[1]), a.points, a.iters_per_epoch, TS_ID if ts else DATASET_ID,
                         a.fold, unseen, a.config, a.device, not a.no_mirroring)
        print_result(result)
        return None
    if a.speed_worker:
        print_result(measure_speed(["unet", "unetpp"], a.speed_iters, dataset_id=TS_ID if ts else DATASET_ID,
                                   fold=a.fold, config=a.config, device=a.device))
        return None

    check_args(a)
    os.makedirs(os.path.join(work, "runs"), exist_ok=True)
    if ts:
        patch = a.max_patch[1:] if a.config == "2d" else a.max_patch
        task = {"dataset": "ts_example_ct (TotalSegmentator's example CT, 3 mm)", "chunks": a.chunks, "fold": a.fold,
                "plans": f"SmallUNetPlanner base 8, max patch {' x '.join(map(str, patch))}, {a.config}"}
    else:
        task = {"cases": a.cases, "slices_per_case": 6, "size": a.size, "batch": a.batch, "base_features": a.base}
    marker = os.path.join(work, "prepared.json")
    prepared = json.load(open(marker)) if os.path.isfile(marker) else None
    finished = [os.path.join(work, "runs", f) for f in os.listdir(os.path.join(work, "runs")) if f.endswith(".json")]
    speed_file = os.path.join(work, "speed.json")

    def setting(path: str, default_mirroring: bool = True) -> str:  # files from before these options: CPU, mirrored
        with open(path) as f:
            r = json.load(f)
        return f"device {r.get('device', 'cpu')}, mirroring {'on' if r.get('mirroring', default_mirroring) else 'off'}"
    asked = f"device {a.device}, mirroring {'off' if a.no_mirroring else 'on'}"
    ran = {setting(f) for f in finished}
    if os.path.isfile(speed_file):  # the s/it belong to a device (mirroring: none)
        ran.add(setting(speed_file, not a.no_mirroring))
    if (finished and prepared not in (None, task)) or ran - {asked}:
        from nnpp import NnppError  # its finished runs (and speed) belong to the data, device and scoring they had
        raise NnppError(f"--workdir {work} holds runs on other data, plans, devices or test-time mirroring (prepared: "
                        f"{prepared}; runs: {'; '.join(sorted(ran))}; asked: {asked}); give a new --workdir for "
                        f"these options")
    os.environ.update(nnunet_env(work, threads=a.threads, serial=True))
    if prepared != task:
        # nnunetv2 is first imported here, after its paths are set
        if ts:
            prepare_ts(work, a.chunks, a.builder, a.config, a.max_patch)
        else:
            prepare(work, a.cases, a.size, a.batch, a.base)
        write_json(marker, task, indent=None)
    if unseen:
        labels = json.load(open(os.path.join(os.environ["nnUNet_raw"], f"Dataset{TS_ID}_TSExampleCT", "dataset.json")))
        prepare_unseen(work, a.builder, labels["labels"])

    base_cmd = [sys.executable, os.path.abspath(__file__), "-device", a.device,
                *(["--no_mirroring"] if a.no_mirroring else []), "--iters_per_epoch",
                str(a.iters_per_epoch), "--points", *map(str, a.points), "--workdir", work, "--task", a.task,
                "--chunks", str(a.chunks), "--fold", a.fold, "--config", a.config, "--max_patch",
                *map(str, a.max_patch), *(["--unseen"] if unseen else [])]
    def done(n, s) -> bool:  # a finished run; with --unseen, scored against the aligned labels (older runs: not)
        path = os.path.join(work, "runs", f"{n}_s{s}.json")
        return os.path.isfile(path) and (not unseen or json.load(open(path)).get("unseen_labels") == "aligned")
    jobs = [(n, s) for s in a.seeds for n in a.networks if not done(n, s) and not a.table_only]
    running: list = []
    while jobs or running:
        while jobs and len(running) < a.parallel:
            n, s = jobs.pop(0)
            log = open(os.path.join(work, "runs", f"{n}_s{s}.log"), "w")
            env = nnunet_env(work, os.path.join(work, "results", f"{n}_s{s}"), threads=a.threads, serial=True)
            proc = subprocess.Popen(["nice", "-n", "10", *base_cmd, "--worker", n, str(s)], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, text=True)
            running.append((n, s, proc, log))
            print(f"[bench_convergence] started {n} seed {s}", flush=True)
        time.sleep(5)
        for job in list(running):
            n, s, proc, log = job
            if proc.poll() is None:
                continue
            running.remove(job)
            log.close()
            with open(log.name) as f:
                found = result_of(f.read())
            if proc.returncode != 0 or found is None:
                print(f"[bench_convergence] {n} seed {s} FAILED (rc {proc.returncode}); see {log.name}", flush=True)
                continue
            found["unseen_labels"] = "aligned" if unseen else None  # see prepare_unseen
            write_json(os.path.join(work, "runs", f"{n}_s{s}.json"), found, indent=None)
            print(f"[bench_convergence] finished {n} seed {s}", flush=True)

    if a.speed_iters and not os.path.isfile(speed_file) and not a.table_only:
        write_json(speed_file, {"device": a.device} | run_for_result(
            ["nice", "-n", "10", *base_cmd, "--speed_worker", "--speed_iters", str(a.speed_iters)],
            "speed measurement", nnunet_env(work, threads=a.threads, serial=True)), indent=None)
    speed = json.load(open(speed_file)) if os.path.isfile(speed_file) else {}
    speed = {n: speed.get(n, speed.get("unetpp" if n.startswith("unetpp") else "unet")) for n in a.networks if speed}

    runs = [json.load(open(os.path.join(work, "runs", f"{n}_s{s}.json"))) for n in a.networks for s in a.seeds
            if os.path.isfile(os.path.join(work, "runs", f"{n}_s{s}.json"))]
    if not runs:
        sys.exit("bench_convergence: no run finished; see the logs in " + os.path.join(work, "runs"))
    structures = list(runs[0]["dice"][str(a.points[-1])])
    curves = aggregate(runs, structures)
    result = {"machine": machine(device=device_name(resolve_device(a.device)), amp=precision(a.device)),
              "task": ("" if ts else "nnpp.data.synthetic_multi, ") + ", ".join(f"{k} {v}" for k, v in task.items()),
              "mirroring": not a.no_mirroring, "threads": a.threads, "parallel_runs": a.parallel,
              "points": a.points, "seeds": a.seeds,
              "seeds_per_network": {n: sum(r["network"] == n for r in runs) for n in curves},
              "structures": structures, "curves": curves, "seconds_per_iteration": speed,
              "equal_wall_time": at_equal_time(curves, speed) if speed else {},
              "final_models": aggregate_eval(runs, structures),
              "train_seconds": {n: mean_sd([r["train_seconds"][str(max(a.points))] for r in runs if r["network"] == n
                                          and str(max(a.points)) in r.get("train_seconds", {})]) for n in curves},
              "runs": runs}
    write_json(a.out, result, indent=1)
    stem = os.path.splitext(a.out)[0]
    write_text(stem + ".md", markdown(result))
    plot(result, stem + ".png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
