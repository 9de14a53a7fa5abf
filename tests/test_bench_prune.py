"""benchmarks/bench_prune.py's table: the gap of a pruned depth to the full network, over the structures the full
network fits (per model), mean and sd over the models; and its refusal of folders that are not trained models."""
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _job(model, depth, val, variant="default"):
    return {"variant": variant if depth else None, "model": model, "depth": depth, "prune_seconds": 10.0,
            "dice": {"val": dict(zip(("spleen", "liver"), val))}}


def test_gap_counts_only_the_structures_the_full_network_fits():
    import bench_prune
    jobs = [_job("s0", None, (0.8, 0.9)), _job("s1", None, (0.3, 0.9)),      # s1's spleen is not fitted (< 0.5)
            _job("s0", 3, (0.7, 0.8)), _job("s1", 3, (0.0, 0.88)), _job("s0", 3, (0.8, 0.9), "b"),
            _job("s1", 3, (0.3, 0.9), "b")]
    rows, structures = bench_prune.table(jobs, fits=0.5)
    assert structures == ["spleen", "liver"]
    assert [(r["variant"], r["depth"], r["models"]) for r in rows] == [(None, None, 2), ("default", 3, 2), ("b", 3, 2)]
    assert rows[2]["gap"] == (0.0, 0.0)  # variant b equals the full network
    full, pruned = rows[:2]
    assert full["gap"] is None
    # s0: ((0.8 - 0.7) + (0.9 - 0.8)) / 2 = 0.1; s1: liver only, 0.9 - 0.88 = 0.02
    mean, sd = pruned["gap"]
    assert mean == pytest.approx(0.06)
    assert sd == pytest.approx(math.sqrt(2 * 0.04 ** 2))
    assert pruned["dice"]["spleen"][0] == pytest.approx(0.35)


def test_refuses_a_folder_without_a_trained_fold(tmp_path):
    model = tmp_path / "Dataset950_X" / "nnUNetPlusPlusTrainer__nnUNetPlans__2d"
    model.mkdir(parents=True)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_prune.py"), "--work", str(tmp_path),
                        "--models", str(model), "--depths", "1", "--out", str(tmp_path / "out.json")],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert "has no fold_0/checkpoint_final.pth" in p.stderr
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "prune").exists()


def test_a_result_of_other_pruning_flags_is_not_reused(tmp_path):
    """A finished job is reused only when it ran with the same nnpp_prune flags on the same sets; otherwise the
    benchmark stops with a line naming the file, instead of tabulating it under the new flags."""
    import argparse
    import json

    import bench_prune
    a = argparse.Namespace(work=str(tmp_path), fold="all")
    model = str(tmp_path / "results" / "run0" / "Dataset950_X" / "nnUNetPlusPlusTrainer__nnUNetPlans__2d")
    sets = {"val": ["/images", "/labels"]}
    _, done_file, _ = bench_prune.where(a, "v:-a 0.9", model, 3)
    os.makedirs(os.path.dirname(done_file))
    with open(done_file, "w") as f:
        json.dump({"flags": ["-a", "0.9"], "sets": sets, "dice": {}}, f)
    assert bench_prune.finished(a, "v:-a 0.9", model, 3, sets)["flags"] == ["-a", "0.9"]
    assert bench_prune.finished(a, "v:-a 0.9", model, 2, sets) is None          # another depth: not run yet
    with pytest.raises(SystemExit, match="measured with other flags or sets"):
        bench_prune.finished(a, "v:-a 0.5", model, 3, sets)
    with pytest.raises(SystemExit, match="measured with other flags or sets"):
        bench_prune.finished(a, "v:-a 0.9", model, 3, {"val": ["/images", "/labels"], "unseen": ["/u", "/l"]})
