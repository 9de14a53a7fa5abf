"""One flag style on every command line, nnU-Net's: long options are spelled with underscores (``--disable_checkpointing``,
``--c``, ``-tr``, ``-device``); the former dashed spellings (``--mgd-ratio``, ``--allow-val-leak``, ...) and the
``--local-rank=N`` that ``python -m torch.distributed.launch`` passes still parse, to the same dest and value, but
--help shows only the underscore form. The seed tools keep their single-dash seed flags (``-path``, ``-size``,
``-mode``)."""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: every console script of setup.py -> (module, function building its argparse parser); None: takes no options
PARSERS = {
    "nnpp_train": ("nnpp.run.train", "build_parser"),
    "nnpp_distill": ("nnpp.run.distill", "build_parser"),
    "nnpp_predict": ("nnpp.run.predict", "parser"),
    "nnpp_export": ("nnpp.run.export", "parser"),
    "nnpp_demo": ("nnpp.run.demo", "build_parser"),
    "nnpp_change_bs": ("nnpp.tools.change_bs", "build_parser"),
    "nnpp_get_dice_result": ("nnpp.tools.get_dice_result", "build_parser"),
    "nnpp_convert_v1_model": ("nnpp.run.convert_v1_model", "build_parser"),
    "nnpp_plan_and_preprocess": ("nnpp.run.plan_and_preprocess", "parser"),
    "nnpp_prune": ("nnpp.run.prune", "build_parser"),
    "nnpp_ext_trainer_path": None,  # no argparse: it takes no arguments, only -h/--help
}

TRAIN_ARGS = ["3", "3d_fullres", "0"]
#: the former dashed spellings -> a value to give (None: a switch); each must parse like its underscore spelling
FORMER = {
    "nnpp_train": {"--local-rank": "3"},
    "nnpp_distill": {"--local-rank": "1", "--allow-val-leak": None, "--replace-student-plans": None,
                     "--soft-weight": "0.3", "--cwd-weight": "0.4", "--cwd-tau": "3", "--cwd-feat": None,
                     "--at-weight": "0.2", "--sp-weight": "0.1", "--sp-pool": "3", "--mgd-weight": "0.6",
                     "--mgd-ratio": "0.5", "--mgd-all-stages": None},
}
#: the seed's single-dash spellings, kept as they are
SEED_FLAGS = {"nnpp_change_bs": ("-path", "-size"), "nnpp_get_dice_result": ("-path", "-mode")}
DASHED = re.compile(r"(?<![\w-])--?[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*-[\w-]+")  # --a-b, -a-b (not ---, not a-b)


def console_scripts() -> dict:
    setup = open(os.path.join(ROOT, "setup.py")).read()
    start = setup.index("[", setup.index('"console_scripts"'))
    return dict(s.split("=") for s in ast.literal_eval(setup[start:setup.index("]", start) + 1]))


def build(script: str) -> argparse.ArgumentParser:
    module, func = PARSERS[script]
    return getattr(importlib.import_module(module), func)()


def visible_actions(parser):
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS]


WITH_PARSER = [s for s in PARSERS if PARSERS[s]]
CASES = [(script, old, value) for script, flags in FORMER.items() for old, value in flags.items()]


def test_every_console_script_is_listed():
    scripts = console_scripts()
    assert sorted(scripts) == sorted(PARSERS), "list the new entry point's parser builder in PARSERS"
    for script, target in PARSERS.items():
        if target:
            assert scripts[script].split(":")[0] == target[0], script


@pytest.mark.parametrize("script", WITH_PARSER)
def test_options_are_spelled_with_underscores(script):
    parser = build(script)
    visible = visible_actions(parser)
    bad = [o for a in visible for o in a.option_strings if "-" in o.lstrip("-")]
    assert not bad, f"{script}: spell {bad} with underscores (a dashed former spelling: cli.add_option alias)"
    # a hidden option that is no alias of a visible one (e.g. --local_rank) is also primarily underscored
    dests = {a.dest for a in visible}
    hidden = [a for a in parser._actions if a.help is argparse.SUPPRESS and a.dest not in dests]
    bad = [a.option_strings[0] for a in hidden if a.option_strings and "-" in a.option_strings[0].lstrip("-")]
    assert not bad, f"{script}: hidden options {bad} should list their underscore spelling first"
    for flag in SEED_FLAGS.get(script, ()):
        assert any(flag in a.option_strings for a in visible), f"{script}: the seed's {flag} is gone"


@pytest.mark.parametrize("script, old, value", CASES, ids=[f"{s}{o}" for s, o, _ in CASES])
def test_former_dashed_spelling_parses_like_the_underscore_one(script, old, value):
    new = "--" + old[2:].replace("-", "_")
    parser = build(script)
    extra = [] if value is None else [value]
    as_new = parser.parse_args(TRAIN_ARGS + [new, *extra])
    as_old = parser.parse_args(TRAIN_ARGS + [old, *extra])
    assert vars(as_old) == vars(as_new)
    assert vars(as_new) != vars(parser.parse_args(TRAIN_ARGS)), f"{new} changed nothing"
    if value is not None:  # --flag=value, as torch.distributed.launch passes --local-rank=N
        assert vars(parser.parse_args(TRAIN_ARGS + [f"{old}={value}"])) == vars(as_new)
        assert vars(parser.parse_args(TRAIN_ARGS + [f"{new}={value}"])) == vars(as_new)


@pytest.mark.parametrize("script", list(PARSERS))
def test_help_shows_no_dashed_spelling(script, capsys):
    module = importlib.import_module(console_scripts()[script].split(":")[0])
    try:
        module.main(["--help"])  # argparse exits 0; nnpp_ext_trainer_path prints its docstring and returns
    except SystemExit as e:
        assert e.code in (None, 0), script
    text = capsys.readouterr().out
    assert "usage" in text.lower() or script == "nnpp_ext_trainer_path"
    assert not DASHED.findall(text), f"{script} --help shows dashed options: {sorted(set(DASHED.findall(text)))}"
    for old in FORMER.get(script, {}):
        new = "--" + old[2:].replace("-", "_")
        assert old not in text
        assert new in text or new == "--local_rank", f"{script} --help does not show {new}"
