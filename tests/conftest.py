"""Shared fixtures: a tiny synthetic Task03-like dataset, planned and preprocessed once per session."""
import os
import subprocess
import sys

import pytest

from nnpp.distributed import free_port  # noqa: F401 (re-exported for the tests)

# Small, CPU-friendly nnU-Net settings for everything the tests start (in-process and subprocesses).
os.environ.setdefault("nnUNet_n_proc_DA", "0")      # single-threaded augmentation
os.environ.setdefault("nnUNet_def_n_proc", "1")     # export/validation worker pool
os.environ.setdefault("nnUNet_compile", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

DATASET_ID = 901
PLAN_KW = dict(base_features=8, max_features=32, max_patch=(16, 32, 32))


def make_nnunet_dirs(root) -> dict:
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders under ``root``: {variable: path}."""
    dirs = {k: os.path.join(str(root), k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        os.makedirs(d)
    return dirs


@pytest.fixture(scope="session")
def nnunet_dirs(tmp_path_factory):
    """nnU-Net folders for the session, exported for in-process use and returned for subprocess envs."""
    dirs = make_nnunet_dirs(tmp_path_factory.mktemp("nnunet"))
    old = {k: os.environ.get(k) for k in dirs}
    os.environ.update(dirs)
    yield dirs
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_dataset(nnunet_dirs, tmp_path_factory):
    """Dataset901_SynthLiver: 5 training cases (fold 0 validates on 1), 1 test case, 16x32x32 patches."""
    from nnpp.data.synthetic import make_msd_task, prepare_dataset
    msd = make_msd_task(str(tmp_path_factory.mktemp("msd")), DATASET_ID, n_train=5, n_test=1, seed=1,
                        size_scale=0.5)
    name = prepare_dataset(msd, DATASET_ID, num_processes=1, **PLAN_KW)
    return {"id": DATASET_ID, "name": name, "msd": msd, **nnunet_dirs}


def nnunet_env(dirs: dict | None = None, drop=(), **extra) -> dict:
    """os.environ for a subprocess: the session's nnU-Net folders, minus ``drop``, plus ``extra``."""
    env = dict(os.environ)
    env.update({k: v for k, v in (dirs or {}).items() if k.startswith("nnUNet_")})
    for k in drop:
        env.pop(k, None)
    env.update(extra)
    return env


def run_cli(module: str, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``python -m nnpp.run.<module> args`` as a user would run the console script."""
    return subprocess.run([sys.executable, "-m", f"nnpp.run.{module}", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def output_tail(p, n: int = 3000) -> str:
    """The end of a finished subprocess's stdout and stderr, for assertion messages."""
    return f"--- stdout (tail) ---\n{p.stdout[-n:]}\n--- stderr (tail) ---\n{p.stderr[-n:]}"


@pytest.fixture(scope="session")
def trained_model(tiny_dataset, tmp_path_factory):
    """``trained_model(trainer="nnUNetPlusPlusTrainer", fold=0)`` -> the model folder
    (``.../TRAINER__nnUNetPlans__3d_fullres``) of a 1-epoch x 2-iteration run on the tiny dataset, trained once
    per session and (trainer, fold), validated (``fold_F/validation/summary.json``), under a results tree of its
    own (returned folder's parents). Read-only for tests: copy it before changing anything in it."""
    results = tmp_path_factory.mktemp("trained_models")
    made = {}

    def get(trainer: str = "nnUNetPlusPlusTrainer", fold=0) -> str:
        if (trainer, str(fold)) not in made:
            env = nnunet_env(tiny_dataset, nnUNet_results=str(results))
            p = run_cli("train", tiny_dataset["id"], "3d_fullres", fold, "-tr", trainer, "-device", "cpu",
                        "--epochs", "1", "--iters", "2", "--val_iters", "1", env=env)
            assert p.returncode == 0, output_tail(p)
            made[trainer, str(fold)] = os.path.join(str(results), tiny_dataset["name"],
                                                    f"{trainer}__nnUNetPlans__3d_fullres")
        return made[trainer, str(fold)]
    return get
