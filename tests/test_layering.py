"""The house's layering: low modules import nothing above them, and the trainer lookup reaches every nnpp trainer."""
import importlib
import inspect
import subprocess
import sys

import pytest


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["nnpp.distill.losses", "nnpp.distill.settings", "nnpp.nets", "nnpp.device",
                                    "nnpp.model_folder", "nnpp.checkpoints", "nnpp.saved_settings", "nnpp.file_safety",
                                    "nnpp.dataset_ids", "nnpp.dice"])
def test_low_modules_import_no_nnunet(module):
    p = _fresh(f"import {module}, sys; print(sorted(m for m in sys.modules if m.startswith('nnunetv2')))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", f"importing {module} loaded nnU-Net modules: {p.stdout}"


def test_training_does_not_import_distill_and_no_cycle():
    # each order of first import resolves (no partially initialised module), and nnpp.training alone leaves
    # nnpp.distill unloaded
    p = _fresh("import nnpp.training, sys; print(any(m.startswith('nnpp.distill') for m in sys.modules))")
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stdout + p.stderr
    p = _fresh("import nnpp.distill.trainer as t, nnpp.training as tr; print(t.nnUNetTrainerKD.__mro__[1:3])")
    assert p.returncode == 0, p.stderr


def test_lookup_finds_every_nnpp_trainer():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnpp.model_folder import NNPP_TRAINER_MODULES, find_trainer_class
    modules = [importlib.import_module(m) for m in ("nnpp.training.nnUNetPlusPlusTrainer", "nnpp.distill.trainer",
                                                    "nnpp.distill.prune")]
    defined = {name for mod in modules
               for name, obj in vars(mod).items()
               if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer) and obj.__module__ == mod.__name__}
    assert defined == set(NNPP_TRAINER_MODULES)
    for name in defined:
        assert find_trainer_class(name).__name__ == name


def test_library_imports_no_command_module():
    """Prediction, training, deployment and distillation are library code: importing them loads neither a command
    module (nnpp.run.*) nor the commands' argument/error module (nnpp.cli); benchmarks and trainers build
    predictors from nnpp.predictor, and put an ONNX export into one with nnpp.deploy.ort.init_onnx."""
    mods = ["nnpp.predictor", "nnpp.model_folder", "nnpp.training", "nnpp.deploy.export", "nnpp.deploy.quantize",
            "nnpp.deploy.ort", "nnpp.distill.trainer", "nnpp.distill.teachers", "nnpp.convert.v1_model",
            "nnpp.file_safety", "nnpp.dataset_ids", "nnpp.dice", "nnpp.saved_settings"]
    p = _fresh(f"import {', '.join(mods)}, sys; "
               "print(sorted(m for m in sys.modules if m == 'nnpp.cli' or m.startswith('nnpp.run')))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", f"library modules load command modules: {p.stdout}"
    from nnpp import predictor
    from nnpp.deploy import ort
    assert all(callable(getattr(predictor, f)) for f in ("make_predictor", "init_torch", "inference_amp"))
    assert callable(ort.init_onnx)


def test_predictor_imports_nothing_above_it():
    """nnpp.predictor sits below deployment, training, distillation and the commands: none of its files imports them,
    at the top or inside a function (ONNX Runtime sessions go into a predictor from nnpp.deploy.ort, not the other
    way round)."""
    import ast
    import pathlib

    import nnpp.predictor
    above = ("nnpp.deploy", "nnpp.training", "nnpp.distill", "nnpp.run", "nnpp.cli")
    found = []
    for path in sorted(pathlib.Path(nnpp.predictor.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.startswith(above)]
    assert not found, f"nnpp.predictor imports a higher layer: {found}"
