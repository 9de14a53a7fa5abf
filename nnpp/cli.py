"""What nnpp's command-line entry points share: argument types (numbers, folds, options with former spellings) and
the error boundary (one line, exit 2). Library code never imports this module; dataset ids, JSON files and Dice
live in the library (:mod:`nnpp.dataset_ids`, :mod:`nnpp.file_safety`, :mod:`nnpp.dice`)."""
from __future__ import annotations

import argparse
import functools
import os
import sys

from nnpp import NnppError
from nnpp.file_safety import load_json_file


def _number(kind: type, minimum: float, strict: bool, what: str):
    """An argparse ``type``: ``kind(text)`` that is > ``minimum`` (``strict``) or >= it, else one usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > minimum if strict else value >= minimum):  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
        return value
    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = _number(int, 0, True, "a positive integer")
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a positive number")
non_negative_float = _number(float, 0.0, False, "a number >= 0")


def check_fold(fold: str, preprocessed_dataset_dir: str):
    """'all' or an int in range of splits_final.json (nnU-Net's default: 5 folds)."""
    if str(fold) == "all":
        return "all"
    splits = os.path.join(preprocessed_dataset_dir, "splits_final.json")
    n = len(load_json_file(splits, "splits file")) if os.path.isfile(splits) else 5
    try:
        value = int(fold)
    except ValueError:
        value = -1
    if not 0 <= value < n:
        raise NnppError(f"fold '{fold}' is out of range: this dataset has {n} folds, use 0..{n - 1} or 'all'")
    return value


def entry_point(prog: str):
    """Decorator for console-script mains: NnppError -> one line on stderr, exit status 2."""
    def wrap(fn):
        @functools.wraps(fn)
        def main(argv=None):
            try:
                return fn(argv)
            except NnppError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                sys.exit(2)
        return main
    return wrap


def add_option(container, name: str, *hidden: str, **kwargs) -> argparse.Action:
    """``container.add_argument(name, **kwargs)`` (a parser or an argument group), plus each of ``hidden`` (a former
    spelling, e.g. ``--mgd-ratio`` of ``--mgd_ratio``) as an alias with the same dest, action, type and default that
    --help does not show. Long options are spelled nnU-Net's way, with underscores; the aliases keep old command
    lines working. Not for required options."""
    action = container.add_argument(name, **kwargs)
    for alias in hidden:
        container.add_argument(alias, **{**kwargs, "dest": action.dest, "help": argparse.SUPPRESS})
    return action
