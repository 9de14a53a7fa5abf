"""The KD settings of a distillation run (nnpp_distill's distillation flags, saved as run settings so that ``--c``
reuses them): the methods, every setting with its default, and the keys that name the run's teachers and student.
A KD setting that an older run did not record counts as its default. Imports nothing: nnpp_distill reads these
before nnU-Net's paths are set."""

#: the KD methods, in the order nnpp_distill normalises --kd to
METHODS = ("soft", "cwd", "at", "sp", "mgd")
#: the methods that distil encoder features (the others distil logits)
FEATURE_METHODS = ("at", "sp", "mgd")
#: KD settings and their defaults; keys are nnpp_distill's argparse dests (saved as run settings, --c reuses them)
KD_DEFAULTS = {"kd": ["soft"], "a": 0.5, "T": 2.0, "tchk": "checkpoint_final.pth", "allow_val_leak": False,
               "da5": False, "soft_weight": 1.0, "cwd_weight": 1.0, "cwd_tau": 4.0, "cwd_feat": False,
               "at_weight": 1.0, "sp_weight": 1.0, "sp_pool": 4, "mgd_weight": 1.0, "mgd_ratio": 0.75,
               "mgd_all_stages": False, "unlabeled": None, "unlabeled_fraction": 0.5, "pseudo": "hard"}
#: the run's teachers (-t, -tf) and student (-r, --student): saved with the KD settings, no defaults here
KD_IDENTITY = ("t", "tf", "r", "student")
