"""Performance modes (the seed's ``--other_use fps|prof``), on one device or under DDP.

``fps``:  warm up W steps, time S steps with device synchronisation; images/s per rank and in total
          (all-reduced), mean/median step time, the share of time spent waiting for data. Rank 0 writes
          ``perf.json`` and prints one line starting with ``[nnpp fps]``.
``prof``: warm up W steps, profile S steps with the device layer's profiler (Ascend's on NPU); each rank
          writes a chrome trace (``output.prof``, the seed's name; ``output_rank{R}.prof`` under DDP) and a
          key-averages table (``prof_table[_rank{R}].txt``).

Both run the real training step of the trainer (data loader, augmentation, AMP, DDP) but never write
checkpoints: nnpp_train points them at a separate results tree (``$nnUNet_results/nnpp_perf/...``).
"""
from __future__ import annotations

import json
import os
import statistics
import time

from nnpp import device as dev
from nnpp.distributed import all_reduce_sum, world
from nnpp.file_safety import write_atomic

DEFAULT_WARMUP = {"fps": 10, "prof": 5}
DEFAULT_STEPS = {"fps": 100, "prof": 5}


def _start(trainer):
    trainer.disable_checkpointing = True
    trainer.on_train_start()
    trainer.on_train_epoch_start()


def _finish(trainer):
    trainer.on_train_end()  # stops the augmentation workers; checkpointing is disabled


def measure_fps(trainer, warmup: int = DEFAULT_WARMUP["fps"], steps: int = DEFAULT_STEPS["fps"]) -> dict:
    device = trainer.device
    _start(trainer)
    try:
        for _ in range(warmup):
            trainer.train_step(next(trainer.dataloader_train))
        dev.synchronize(device)
        data_s, step_s = [], []
        t_start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(trainer.dataloader_train)
            t1 = time.perf_counter()
            trainer.train_step(batch)
            dev.synchronize(device)
            data_s.append(t1 - t0)
            step_s.append(time.perf_counter() - t0)
        total_s = time.perf_counter() - t_start
    finally:
        _finish(trainer)
    rank, n_ranks = world()
    per_rank = trainer.batch_size * steps / total_s
    result = {
        "mode": "fps", "images_per_s_total": all_reduce_sum(per_rank, device), "images_per_s_rank": per_rank,
        "rank": rank, "world_size": n_ranks, "batch_per_rank": trainer.batch_size,
        "step_s_mean": statistics.fmean(step_s), "step_s_median": statistics.median(step_s),
        "data_wait_share": sum(data_s) / total_s, "warmup_steps": warmup, "timed_steps": steps,
        "device": str(device), "device_name": dev.device_name(device), "amp": trainer.amp.mode,
        "patch_size": list(trainer.configuration_manager.patch_size), "trainer": trainer.__class__.__name__,
        "peak_memory_MiB": dev.peak_memory_bytes(device) / 2 ** 20,
    }
    if rank == 0:
        path = os.path.join(trainer.output_folder, "perf.json")
        write_atomic(path, json.dumps(result, indent=2))
        print(f"[nnpp fps] FPS {result['images_per_s_total']:.2f} img/s total ({n_ranks} x "
              f"{per_rank:.2f} img/s/rank), step mean {result['step_s_mean']:.4f} s median "
              f"{result['step_s_median']:.4f} s, data wait {100 * result['data_wait_share']:.1f}%, "
              f"device {result['device_name']}, AMP {result['amp']}, batch/rank {trainer.batch_size} -> {path}",
              flush=True)
    return result


def profile(trainer, warmup: int = DEFAULT_WARMUP["prof"], steps: int = DEFAULT_STEPS["prof"]) -> dict:
    device = trainer.device
    rank, n_ranks = world()
    suffix = f"_rank{rank}" if n_ranks > 1 else ""
    trace = os.path.join(trainer.output_folder, f"output{suffix}.prof")
    table = os.path.join(trainer.output_folder, f"prof_table{suffix}.txt")
    _start(trainer)
    try:
        for _ in range(warmup):
            trainer.train_step(next(trainer.dataloader_train))
        dev.synchronize(device)
        with dev.make_profiler(device) as prof:
            for _ in range(steps):
                trainer.train_step(next(trainer.dataloader_train))
            dev.synchronize(device)
    finally:
        _finish(trainer)
    prof.export_chrome_trace(trace)
    with open(table, "w") as f:
        f.write(dev.profiler_table(prof, device))
    print(f"[nnpp prof] rank {rank}: {steps} profiled steps -> {trace}, {table}", flush=True)
    return {"mode": "prof", "trace": trace, "table": table, "rank": rank}


def run(trainer, mode: str, warmup: int | None = None, steps: int | None = None) -> dict:
    warmup = DEFAULT_WARMUP[mode] if warmup is None else warmup
    steps = DEFAULT_STEPS[mode] if steps is None else steps
    return (measure_fps if mode == "fps" else profile)(trainer, warmup, steps)
