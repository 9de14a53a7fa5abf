"""The run settings an nnpp checkpoint records (``nnpp_run_settings``: what a ``--c`` must reuse) that change what
is trained, their choices, and what a setting that a run did not record means.

A setting added after runs were already being saved has a value that every earlier run trained with: the only
behaviour before the flag existed. A run records the setting only when it differs from that value, so the
checkpoints of older runs and of runs that chose that value read alike, and :data:`UNRECORDED` is the one place
that says what they mean (the trainer's own ``--c``, nnpp_train's ``--c`` and the model-folder loader read it).
A distillation's KD settings follow one rule instead: an unrecorded one is its default
(``nnpp.distill.settings.KD_DEFAULTS``). Imports nothing: the commands read it before nnU-Net's paths are set, the
bottom modules without nnU-Net.
"""

#: nnpp_train --ds_weights choices (nnUNetPlusPlusTrainer.deep_supervision_weights)
DS_WEIGHTS = ("equal", "descending", "decay")
#: nnpp_train --shallow_heads choices (nnUNetPlusPlusTrainer.shallow_heads)
SHALLOW_HEADS = ("probe", "trained")

#: setting -> what a run that did not record it trained with: equal head weights (every run before --ds_weights)
#: and shallow heads whose loss trains the network (every run before --shallow_heads)
UNRECORDED = {"ds_weights": "equal", "shallow_heads": "trained"}


def setting_of(settings: dict, key: str):
    """``key`` (one of :data:`UNRECORDED`) of a run from its recorded ``settings``: the recorded value, else what an
    unrecorded one means."""
    return settings.get(key, UNRECORDED[key])


def fill_unrecorded(settings: dict) -> dict:
    """``settings`` (an nnpp run's recorded ones) with each :data:`UNRECORDED` setting it lacks added, after its
    own keys; in place, and returned."""
    for key, value in UNRECORDED.items():
        settings.setdefault(key, value)
    return settings


def settings_to_record(values: dict) -> dict:
    """The entries of ``values`` (:data:`UNRECORDED` keys -> a run's values) that a checkpoint records: those that
    differ from what an unrecorded setting means."""
    return {key: value for key, value in values.items() if value != UNRECORDED[key]}
