"""A distillation trainer's batches with unlabeled cases mixed in (``nnpp_distill --unlabeled``; a part of
:class:`nnpp.distill.kd_mixin.KDMixin`): nnU-Net's datasets and loaders, the training ones swapped for
:class:`nnpp.distill.unlabeled.MixedDataset` / :class:`~nnpp.distill.unlabeled.MixedDataLoader`, which put
``n_u`` unlabeled patches first in every batch. What each patch is trained with is :mod:`nnpp.distill.kd_step`'s."""
from __future__ import annotations

import os

from nnpp import NnppError


class MixedBatchesMixin:
    """The unlabeled cases of a run (``unlabeled_dir``, set by nnpp_distill) in its training batches."""

    @property
    def unlabeled_mode(self) -> str | None:
        """``--pseudo`` when this run trains on unlabeled cases, else None."""
        return self.kd_config["pseudo"] if self.kd_on and getattr(self, "unlabeled_dir", None) else None

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.unlabeled_mode:
            from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

            from nnpp.distill.unlabeled import MixedDataset
            dataset_tr = MixedDataset(dataset_tr, nnUNetDatasetBlosc2(self.unlabeled_dir))  # what prepare writes
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        """nnU-Net's loaders; with unlabeled cases the training loader is :class:`MixedDataLoader` (nnU-Net's trainer
        names its loader class in its module: it is swapped for the duration of this call only)."""
        if not self.unlabeled_mode:
            return super().get_dataloaders()
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer

        from nnpp.distill.unlabeled import MixedDataLoader, MixedDataset, unlabeled_per_batch
        original = nnunet_trainer.nnUNetDataLoader
        n_u = unlabeled_per_batch(self.kd_config["unlabeled_fraction"], self.batch_size)

        def loader(data, *args, **kwargs):
            if not isinstance(data, MixedDataset):
                return original(data, *args, **kwargs)
            dl = MixedDataLoader(data, *args, **kwargs)
            dl.n_unlabeled = n_u
            return dl
        self.print_to_log_file(f"unlabeled cases: {len(self.unlabeled_cases())} from {self.unlabeled_dir}; "
                               f"{n_u} of {self.batch_size} patches per batch, --pseudo {self.unlabeled_mode}")
        nnunet_trainer.nnUNetDataLoader = loader
        try:
            loaders = super().get_dataloaders()
        finally:
            nnunet_trainer.nnUNetDataLoader = original
        train = getattr(loaders[0], "generator", None) or getattr(loaders[0], "data_loader", None)
        if not isinstance(train, MixedDataLoader):  # nnU-Net no longer builds its loader through that name
            from importlib.metadata import version
            raise NnppError(f"nnunetv2 {version('nnunetv2')}: its trainer did not build the training loader through "
                            f"nnUNetTrainer.nnUNetDataLoader, so the unlabeled cases cannot be mixed in; nnpp is tested "
                            f"with nnunetv2 2.8.1")
        return loaders

    def unlabeled_cases(self) -> list:
        if not getattr(self, "unlabeled_dir", None):
            return []
        return sorted(f[:-len(".b2nd")] for f in os.listdir(self.unlabeled_dir)
                      if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))
