"""Do a trained UNet++'s pruned depths work after ``nnpp_prune``? Several trained models (seeds), each pruned to each
depth with each pruning variant, scored beside the full network on the same sets.

    python benchmarks/bench_prune.py --work /tmp/tsconv --models /tmp/tsconv/results/unetpp_default_s*/*/*__2d \
        --fold all --depths 3 2 --unseen /tmp/tsconv/unseen --out benchmarks/results/prune_ts_2d.json
    python benchmarks/bench_prune.py ... --variants default "a09:-a 0.9" "e40:--epochs 16"    # pruning settings

``--work`` holds the models' nnUNet_raw and nnUNet_preprocessed (e.g. ``bench_convergence.py --task ts_example_ct``'s
work folder, whose ``results/<run>/DATASET/TRAINER__PLANS__CONFIG`` are the models). Each (variant, model, depth) is
one job, ``--parallel`` at a time with ``--threads`` each: the model folder is copied to
``WORK/prune/VARIANT/RUN__MODEL/fold_F/`` (the original is never written), ``nnpp_prune DATASET CONFIG FOLD --depth K
VARIANT_FLAGS --seed --prune_seed`` runs there (a half-done pruning continues with ``--c``), and ``nnpp_predict
--depth K`` (the distilled weights, no flag) predicts every set. The full network of each model predicts the same
sets. Sets: ``val``, the fold's validation cases (fold ``all``: the training cases) with the dataset's labels, and
with ``--unseen DIR`` its ``imagesTs``/``labelsTs``. Dice: nnU-Net's metrics.

The table gives, per variant, depth and set, the Dice of each structure (mean ± sd over the models) and the gap to
the full network: the mean, over the structures the full network fits (Dice >= ``--fits``, per model), of
full - pruned; and, with ``--rounds``, each network's forward FLOPs and time per patch beside the full network's
and ``--unet``'s (a U-Net on the same plans). Writes ``--out`` (JSON) and the same name with .md, the machine
named. Finished jobs are reused when they ran with the same flags on the same sets.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py (puts the checkout first)
from common import (RESULTS, dice_per_label, machine, machine_line, md_table, mean_sd, model_id,  # noqa: E402
                    nnunet_env, run_logged, timed_in_turns, write_json, write_text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--work", required=True, help="holds nnUNet_raw and nnUNet_preprocessed of the models' dataset")
    p.add_argument("--models", nargs="+", required=True, help="model folders DATASET/TRAINER__PLANS__CONFIG (seeds)")
    p.add_argument("--fold", default="0", help="the models' fold (0..4 or all)")
    p.add_argument("--depths", nargs="+", type=int, required=True, help="pruning depths k (1..L-1)")
    p.add_argument("--variants", nargs="+", default=["default"],
                   help="NAME or 'NAME:nnpp_prune flags' (default: nnpp_prune's defaults)")
    p.add_argument("--unseen", help="a folder with imagesTs/ and labelsTs/ to score as well")
    p.add_argument("--unet", help="a U-Net model folder (same plans) whose cost per patch to show beside the depths")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds of the cost table (0: none)")
    p.add_argument("--prune_seed", type=int, default=0)
    p.add_argument("--fits", type=float, default=0.5, help="a structure the full network scores at least this "
                   "counts in the gap (default 0.5)")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table_only", action="store_true", help="no new jobs: the table from the finished ones (the "
                   "cost table of an existing --out is kept)")
    p.add_argument("--out", default=os.path.join(RESULTS, "prune.json"))
    return p


def variant_flags(spec: str) -> tuple[str, list[str]]:
    name, _, flags = spec.partition(":")
    return name, shlex.split(flags)


def sets_of(work: str, dataset: str, fold: str, unseen: str | None) -> dict:
    """{set: [images folder, labels folder]}: the fold's validation cases as symlinks (fold all: imagesTr)."""
    raw = os.path.join(work, "nnUNet_raw", dataset)
    sets = {"val": [os.path.join(raw, "imagesTr"), os.path.join(raw, "labelsTr")]}
    if fold != "all":
        with open(os.path.join(work, "nnUNet_preprocessed", dataset, "splits_final.json")) as f:
            cases = json.load(f)[int(fold)]["val"]
        staged = os.path.join(work, "prune", f"val_fold{fold}")
        os.makedirs(staged, exist_ok=True)
        for name in os.listdir(sets["val"][0]):
            if name.rsplit("_", 1)[0] in cases and not os.path.exists(os.path.join(staged, name)):
                os.symlink(os.path.join(sets["val"][0], name), os.path.join(staged, name))
        sets["val"] = [staged, sets["val"][1]]
    if unseen:
        unseen = os.path.abspath(unseen)
        sets["unseen"] = [os.path.join(unseen, "imagesTs"), os.path.join(unseen, "labelsTs")]
    return sets


def run_of(model: str) -> str:
    """The run a model folder belongs to: ``<run>`` of ``results/<run>/DATASET/MODEL``."""
    return os.path.basename(os.path.dirname(os.path.dirname(model)))


def where(a, variant: str, model: str, depth: int | None) -> tuple[str, str, str]:
    """(the job's folder, its result file, the model's copy): ``WORK/prune/VARIANT/RUN__MODEL/fold_F/``."""
    home = os.path.join(a.work, "prune", variant_flags(variant)[0] if depth else "full",
                        f"{run_of(model)}__{os.path.basename(model)}", f"fold_{a.fold}")
    return (home, os.path.join(home, f"depth{depth or 'full'}.json"),
            os.path.join(home, "results", model_id(model)[0], os.path.basename(model)))


def finished(a, variant: str, model: str, depth: int | None, sets: dict) -> dict | None:
    """The job's saved result, if it ran with these pruning flags on these sets; a result of other settings in the
    same place stops the benchmark (delete it, or use another --work)."""
    _, done_file, _ = where(a, variant, model, depth)
    if not os.path.isfile(done_file):
        return None
    saved = json.load(open(done_file))
    if saved.get("flags") != (variant_flags(variant)[1] if depth else []) or saved.get("sets") != sets:
        sys.exit(f"bench_prune: {done_file} was measured with other flags or sets ({saved.get('flags')}, "
                 f"{saved.get('sets')}); delete it or use another --work")
    return saved


def job(a, variant: str, model: str, depth: int | None, sets: dict) -> dict:
    """One model's full network (``depth`` None) or its pruning to ``depth`` with ``variant``; Dice on every set.
    The model's copy must exist (:func:`where`; made before the jobs start, one job never copies for another)."""
    dataset, trainer, plans, config = model_id(model)
    name, flags = variant_flags(variant)
    tag = run_of(model)
    home, done_file, copy = where(a, variant, model, depth)
    results = os.path.join(home, "results")
    env = nnunet_env(a.work, results, threads=a.threads, serial=True, NNPP_THREADS=str(a.threads))
    log = os.path.join(home, f"depth{depth or 'full'}")  # + _prune.log, _predict_SET.log
    ident = [dataset, config, a.fold, "-tr", trainer, "-p", plans, "-device", "cpu"]
    out = {"variant": name if depth else None, "flags": flags if depth else [], "model": tag, "depth": depth,
           "sets": sets}
    if depth:
        half_done = os.path.isdir(os.path.join(copy, f"fold_{a.fold}", f"prune_depth{depth}"))
        out["prune_seconds"] = run_logged(["nnpp.run.prune", *ident, "--depth", str(depth), "--seed",
                                           str(a.prune_seed), *flags, *(["--c"] if half_done else [])], env,
                                          log + "_prune.log")
    dataset_json = json.load(open(os.path.join(copy, "dataset.json")))
    labels = [v for v in dataset_json["labels"].values() if v]
    names = {v: k for k, v in dataset_json["labels"].items()}
    out["dice"] = {}
    for set_name, (images, label_dir) in sets.items():
        pred = os.path.join(home, f"pred_depth{depth or 'full'}", set_name)
        run_logged(["nnpp.run.predict", "-i", images, "-o", pred, "-d", dataset, "-c", config, "-f", a.fold, "-tr",
                    trainer, "-p", plans, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar",
                    *(["--depth", str(depth)] if depth else [])], env, log + f"_predict_{set_name}.log")
        dice = dice_per_label(label_dir, pred, dataset_json["file_ending"], labels)
        out["dice"][set_name] = {names[int(k)]: v for k, v in dice.items()}
    print(f"[bench_prune] {tag} {out['variant'] or 'full'} depth {depth or 'full'}: {out['dice']}", flush=True)
    write_json(done_file, out, indent=None)
    return out


def table(jobs: list, fits: float) -> tuple[list, list]:
    """Rows per (variant, depth, set) and the structures: Dice mean ± sd over models, and the gap to the full
    network over the structures it fits."""
    full = {j["model"]: j["dice"] for j in jobs if j["depth"] is None}
    missing = sorted({j["model"] for j in jobs} - set(full))
    if missing:
        print(f"[bench_prune] left out of the table (no full-network result): {', '.join(missing)}", flush=True)
        jobs = [j for j in jobs if j["model"] in full]
    structures = list(next(iter(full.values()))["val"]) if full else []
    rows = []
    keys = list(dict.fromkeys((j["variant"], j["depth"]) for j in jobs))  # as run: full, then variant by variant
    for variant, depth in keys:
        these = [j for j in jobs if (j["variant"], j["depth"]) == (variant, depth)]
        for set_name in these[0]["dice"]:
            gaps = []
            for j in these:
                fitted = [s for s in structures if full[j["model"]][set_name][s] >= fits]
                if fitted and depth:
                    gaps.append(sum(full[j["model"]][set_name][s] - j["dice"][set_name][s] for s in fitted)
                                / len(fitted))
            rows.append({"variant": variant, "depth": depth, "set": set_name, "models": len(these),
                         "dice": {s: mean_sd([j["dice"][set_name][s] for j in these]) for s in structures},
                         "gap": mean_sd(gaps) if gaps else None,
                         "prune_seconds": mean_sd([j["prune_seconds"] for j in these]) if depth else None})
    return rows, structures


def costs(a, model: str) -> dict:
    """{network: {"gflop", "ms"}} per patch of the first model's full network, each pruned depth and ``--unet``:
    forward FLOPs (torch's flop counter) and the median time of a batch of 2 patches per patch, fp32, no grad,
    ``--threads`` threads, the networks called in turns so that load falls on all alike."""
    import statistics

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nnpp.model_folder import load_trained_model, set_depth
    torch.set_num_threads(a.threads)
    loaded = load_trained_model(model, [a.fold])
    nets = {"full network": loaded.build_network()}
    for depth in sorted(a.depths, reverse=True):
        nets[f"depth {depth}"] = set_depth(loaded.build_network(), depth)
    if a.unet:
        nets["U-Net"] = load_trained_model(os.path.abspath(a.unet), [a.fold]).build_network()
    x = torch.randn(2, loaded.num_input_channels, *loaded.patch_size)
    out = {}
    with torch.no_grad():
        for name, net in nets.items():
            with FlopCounterMode(display=False) as counter:
                net(x[:1])
            out[name] = {"gflop": counter.get_total_flops() / 1e9}
        times = timed_in_turns({name: (lambda net=net: net(x)) for name, net in nets.items()}, a.rounds, warmup=2)
    for name in nets:
        out[name]["ms"] = statistics.median(times[name]) * 1000 / len(x)
    return out


def markdown(result: dict) -> str:
    structures = result["structures"]
    pm = lambda ms: "—" if ms is None else f"{ms[0]:.3f} ± {ms[1]:.3f}"  # noqa: E731
    lines = [f"Machine: {machine_line(result['machine'])}; {result['threads']} thread(s) per job, {result['parallel']} "
             f"jobs at a time. Models: {len(result['models'])}, fold {result['fold']}. Gap: full - pruned, mean over "
             f"the structures the full network fits (Dice >= {result['fits']}), mean ± sd over the models.", "",
             *md_table(["network", "set", *structures, "gap to full", "nnpp_prune (s)"],
                       ([("full network" if r["depth"] is None else f"depth {r['depth']}, {r['variant']}"),
                         r["set"], *(pm(r["dice"][s]) for s in structures), pm(r["gap"]),
                         "—" if r["prune_seconds"] is None else f"{r['prune_seconds'][0]:.0f}"]
                        for r in result["rows"]))]
    if result.get("costs"):
        full = result["costs"]["full network"]
        lines += ["", f"Cost per patch {tuple(result['patch'])} (forward, fp32, batch of 2, median of "
                  f"{result['rounds']} rounds in turns, {result['threads']} thread(s)):", "",
                  *md_table(["network", "GFLOP", "ms", "x the full network's FLOPs", "x its time"],
                            ([name, f"{c['gflop']:.3f}", f"{c['ms']:.1f}", f"{c['gflop'] / full['gflop']:.2f}",
                              f"{c['ms'] / full['ms']:.2f}"] for name, c in result["costs"].items()))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    a.work = os.path.abspath(a.work)
    models = [os.path.abspath(m.rstrip("/")) for m in a.models]
    for m in models:
        if not os.path.isfile(os.path.join(m, f"fold_{a.fold}", "checkpoint_final.pth")):
            sys.exit(f"bench_prune: {m} has no fold_{a.fold}/checkpoint_final.pth; give trained model folders")
    datasets = {model_id(m)[0] for m in models}
    if len(datasets) != 1:
        sys.exit(f"bench_prune: the models belong to {len(datasets)} datasets ({', '.join(sorted(datasets))}); give one")
    sets = sets_of(a.work, datasets.pop(), a.fold, a.unseen)
    todo = [("default", m, None) for m in models] + [(v, m, d) for v in a.variants for d in a.depths for m in models]
    done = {t: finished(a, *t, sets) for t in todo}
    if a.table_only:
        todo = [t for t in todo if done[t]]
    for t in todo:  # the copies first: jobs of one model at two depths share one
        copy = where(a, *t)[2]
        if not done[t] and not os.path.isdir(copy):
            shutil.copytree(t[1], copy, ignore=shutil.ignore_patterns("prune_depth*", "bench_eval", "onnx*"))
    with ThreadPoolExecutor(max(1, a.parallel)) as pool:
        jobs = list(pool.map(lambda t: done[t] or job(a, *t, sets), todo))
    rows, structures = table(jobs, a.fits)
    old = json.load(open(a.out)) if a.table_only and os.path.isfile(a.out) else {}
    if not old.get("costs") and a.rounds:
        print("[bench_prune] cost per patch ...", flush=True)
    result = {"machine": machine(), "threads": a.threads, "parallel": a.parallel, "fold": a.fold, "fits": a.fits,
              "models": models, "variants": a.variants, "structures": structures, "rows": rows, "jobs": jobs,
              "rounds": old.get("rounds", a.rounds), "patch": json.load(open(os.path.join(models[0], "plans.json")))[
                  "configurations"][model_id(models[0])[3]]["patch_size"],
              "costs": old.get("costs") or (costs(a, models[0]) if a.rounds else {})}
    write_json(a.out, result, indent=1)
    write_text(os.path.splitext(a.out)[0] + ".md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
