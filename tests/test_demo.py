"""The README's main command: nnpp_demo end to end with its defaults (about 2 minutes on 2 CPU cores with native
bf16, 3-4 without)."""
import json
import os
import subprocess
import sys

import pytest
from conftest import output_tail


@pytest.mark.slow
def test_demo_reaches_organ_dice(tmp_path):
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}  # the demo sets its own
    p = subprocess.run([sys.executable, "-m", "nnpp.run.demo", "--workdir", str(work)], env=env,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, output_tail(p)
    summary = work / "nnUNet_results" / "Dataset900_SynthLiver" / \
        "nnUNetPlusPlusTrainer__nnppUNetPlusPlusPlans__3d_fullres" / "fold_0" / "validation" / "summary.json"
    liver = json.loads(summary.read_text())["mean"]["1"]["Dice"]
    assert liver >= 0.85, p.stdout[-3000:]
    assert f"liver Dice {liver:.4f}" in p.stdout and "training FPS" in p.stdout


def test_demo_refuses_foreign_workdir(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    p = subprocess.run([sys.executable, "-m", "nnpp.run.demo", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "was not made by nnpp_demo" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "mine.txt").read_text() == "user data"
