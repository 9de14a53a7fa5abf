"""Unlabeled scans as the transfer set of distillation (``nnpp_distill --unlabeled FOLDER ...``).

* :func:`find_cases`: raw images in nnU-Net's naming (``CASE_0000.nii.gz``, the dataset's file ending and channels).
* :func:`check_leaks`: an unlabeled case that is one of the student's validation cases (same id, or the same image
  content: the voxels and spacing read by the dataset's reader) is refused, naming it.
* :func:`pseudo_label`: the teacher model folders (their folds as nnU-Net's ensemble; several folders merged as
  ``nnUNetv2_ensemble`` merges them) predict every unlabeled case once with nnpp's predictor (batched mirroring);
  the masks are the hard pseudo-labels (``--pseudo hard|both``). Beside each pseudo-label, ``CASE.source.json``
  records the content (SHA-1 of the bytes) of the image files it was made from: a scan rewritten under the same name
  is labelled again, whatever its size and modification time say (with ``--pseudo soft`` there are no pseudo-labels
  and a changed scan is noticed by the size and modification time of its files, see :func:`prepare`).
* :func:`prepare`: nnU-Net's preprocessor with the student's plans writes the unlabeled cases (with their pseudo-
  labels, or with no label) into a folder of their own, ``PREPROCESSED/DATASET/nnpp_unlabeled/<name>/``, never
  into the labeled data. A manifest (the raw files' sizes and times, the configuration, the pseudo-labels' sizes and
  times and the image content each was made from) lets a later run reuse the folder when nothing changed; a changed
  input is prepared again into a new folder, written under a temporary name and renamed when complete.
* :class:`MixedDataset` / :class:`MixedDataLoader`: every training batch holds ``n_unlabeled`` unlabeled patches
  first and labeled ones after (nnU-Net's foreground oversampling within each group), both through nnU-Net's loader
  and augmentation; their keys carry :data:`PREFIX`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnpp import NnppError

PREFIX = "unlabeled/"  # identifiers of unlabeled cases in a mixed batch's keys
MANIFEST = "nnpp_unlabeled.json"


# ------------------------------------------------------------------------------------------------ finding cases
def find_cases(folders: list, file_ending: str, n_channels: int) -> dict:
    """{case id: [channel files]} of every folder, nnU-Net's naming (``ID_XXXX`` + file ending). One clear error
    for a missing folder, a folder without cases, a case without all its channels, an id in two folders."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder, \
        get_identifiers_from_splitted_dataset_folder
    cases: dict = {}
    for folder in folders:
        if not os.path.isdir(folder):
            raise NnppError(f"--unlabeled {folder}: no such folder (give folders of raw images named CASE_0000"
                            f"{file_ending})")
        ids = [str(i) for i in get_identifiers_from_splitted_dataset_folder(folder, file_ending)]
        if not ids:
            raise NnppError(f"--unlabeled {folder}: no images named CASE_0000{file_ending} (the dataset's file "
                            f"ending and nnU-Net's channel suffix)")
        for case, files in zip(ids, create_lists_from_splitted_dataset_folder(folder, file_ending, ids)):
            if len(files) != n_channels:
                raise NnppError(f"--unlabeled {folder}: case {case} has {len(files)} channel file(s), the dataset "
                                f"has {n_channels} (CASE_0000{file_ending} ... CASE_{n_channels - 1:04d}{file_ending})")
            if case in cases:
                raise NnppError(f"--unlabeled: case {case} is in {os.path.dirname(cases[case][0])} and in {folder}; "
                                f"case ids must be unique")
            cases[case] = [os.path.abspath(f) for f in files]
    return cases


def image_digest(files: list, reader) -> str:
    """SHA-1 of a case's voxels (as float32) and spacing, read by ``reader`` (nnU-Net's reader/writer): the same
    image saved twice, or compressed differently, has the same digest."""
    data, props = reader.read_images(files)
    h = hashlib.sha1(np.ascontiguousarray(data, dtype=np.float32).tobytes())
    h.update(np.asarray(props["spacing"], dtype=np.float64).tobytes())
    return h.hexdigest()


def check_leaks(cases: dict, student_val: list, raw_dataset_dir: str, dataset_json: dict, reader_class,
                cache: str | None = None) -> None:
    """Refuse unlabeled cases that are the student's validation cases: by id, then by image content (the raw
    validation images of ``raw_dataset_dir/imagesTr``). Raises :class:`NnppError` naming them. ``cache``: a JSON
    file of digests by file (size and modification time), so that a later run reads only new or changed images."""
    same_id = sorted(set(cases) & set(student_val))
    if same_id:
        raise NnppError(f"--unlabeled holds the student's validation case(s) {', '.join(same_id)} (same id): the "
                        f"student would learn them from its teacher; remove them from the unlabeled folders")
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder
    images = os.path.join(raw_dataset_dir, "imagesTr")
    if not student_val:
        return
    if not os.path.isdir(images):
        raise NnppError(f"cannot check the unlabeled cases against the validation images: {images} does not exist "
                        f"(the raw dataset is needed; set nnUNet_raw)")
    reader, known = reader_class(), {}
    if cache and os.path.isfile(cache):
        with open(cache) as f:
            known = json.load(f)
    fresh = {}

    def digest(files):
        key = json.dumps([_file_stamp(f) for f in files])
        fresh[key] = known.get(key) or image_digest(files, reader)
        return fresh[key]
    val_files = create_lists_from_splitted_dataset_folder(images, dataset_json["file_ending"], sorted(student_val))
    val_digests = {digest(files): case for case, files in zip(sorted(student_val), val_files) if files}
    same = [(case, val_digests[d]) for case, files in sorted(cases.items()) if (d := digest(files)) in val_digests]
    if cache and fresh != known:
        from nnpp.file_safety import write_atomic
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        write_atomic(cache, json.dumps(fresh))
    if same:
        raise NnppError("--unlabeled holds the student's validation image(s): " + ", ".join(
            f"{c} = {v}" for c, v in same) + " (same voxels and spacing); remove them from the unlabeled folders")


# ------------------------------------------------------------------------------------------------ pseudo-labels
def pseudo_folder(preprocessed_dataset_dir: str, teacher_folders: list, folds: list, checkpoint_name: str) -> str:
    """``PREPROCESSED/DATASET/nnpp_unlabeled/pseudo_<digest>``: one folder per set of teacher folders, folds and
    checkpoint files (their sizes and times), so a retrained teacher labels again and an unchanged one is reused."""
    digests = []
    for folder in teacher_folders:
        stamps = [_file_stamp(os.path.join(folder, f"fold_{f}", checkpoint_name)) for f in folds]
        digests.append([folder, list(folds), stamps])
    # several folders: their mean does not depend on the order of -t, nor does the key
    key = hashlib.sha1(json.dumps(digests[0] if len(digests) == 1 else sorted(digests)).encode()).hexdigest()[:12]
    return os.path.join(preprocessed_dataset_dir, "nnpp_unlabeled", f"pseudo_{key}")


SOURCE = ".source.json"  # beside a pseudo-label: CASE + SOURCE, the image it was made from


def image_sha1(files: list) -> list:
    """The SHA-1 of each of a case's image files (their bytes, read in 1 MiB blocks): how a pseudo-label knows the
    image it was made from. A content hash, not the files' size and modification time: a rewrite that keeps both
    (a copy that preserves times, a coarse file-system clock) is still a change, and a scan moved or touched is
    not one (labelling again costs a prediction; hashing, one read of the file)."""
    out = []
    for path in files:
        h = hashlib.sha1()
        try:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except OSError as e:
            raise NnppError(f"--unlabeled: cannot read {path} ({type(e).__name__}: {e})") from None
        out.append(h.hexdigest())
    return out


def label_source(out_dir: str, case: str, file_ending: str) -> list | None:
    """The image content (:func:`image_sha1`) the pseudo-label ``out_dir/CASE + file_ending`` was made from, as
    recorded beside it; None when the pseudo-label or its record is missing or unreadable (made by a killed run or
    an nnpp before the records: labelled again)."""
    if not os.path.isfile(os.path.join(out_dir, case + file_ending)):
        return None
    try:
        with open(os.path.join(out_dir, case + SOURCE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record.get("image_sha1") if isinstance(record, dict) else None


def pseudo_label(teacher_folders: list, folds: list, cases: dict, out_dir: str, device, checkpoint_name: str,
                 file_ending: str, part: tuple = (0, 1)) -> list:
    """The teacher ensemble predicts cases into ``out_dir/CASE + file_ending``: each model folder of
    ``teacher_folders`` with ``folds`` (nnU-Net's fold ensemble, mirroring on, nnpp's predictor); several folders
    (different plans or trainers) are merged per case as ``nnUNetv2_ensemble`` does, by nnU-Net's ``merge_files``
    (the mean of the folders' probabilities, then the label manager's segmentation), each folder's probabilities
    removed once the case is written. Share ``part = (k, n)`` of the cases, ``sorted(cases)[k::n]`` (under
    torchrun: k = rank, n = world size; the same split on every rank whatever is already done); a rank hashes,
    removes and writes only the files of its own cases.

    A case is kept when its pseudo-label is there and was made from the image as it is now: ``CASE.source.json``
    records the image content (:func:`image_sha1`, a content hash of the image files) it was made from. Any other
    case (no pseudo-label, no record, or an image whose content changed since: the same name with new voxels) is
    labelled again: its old pseudo-label is removed, the record of the image as it is now written (atomically), then
    the pseudo-label (atomically, by the predictor); a killed run leaves a case without its pseudo-label, labelled
    again next time. :func:`manifest` takes the record into the preprocessed folder's key, so a case preprocessed
    with an old pseudo-label is never reused. Returns the cases predicted now."""
    from nnpp.file_safety import write_atomic
    os.makedirs(out_dir, exist_ok=True)
    k, n = part
    mine = sorted(cases)[k::n]
    sources = {c: image_sha1(cases[c]) for c in mine}
    recorded = {c: label_source(out_dir, c, file_ending) for c in mine}
    todo = [c for c in mine if recorded[c] != sources[c]]
    if not todo:
        return todo
    changed = [c for c in todo if recorded[c] is not None]
    for c in todo:
        label = os.path.join(out_dir, c + file_ending)
        if os.path.exists(label):
            os.remove(label)
        write_atomic(os.path.join(out_dir, c + SOURCE), json.dumps(
            {"image_sha1": sources[c], "images": [os.path.basename(f) for f in cases[c]]}))
    from nnpp.predictor.build import inference_amp, init_torch, make_predictor
    predictors = []
    for folder in teacher_folders:
        predictors.append(make_predictor(device, amp=inference_amp("auto", device), progress=False))
        init_torch(predictors[-1], folder, folds, checkpoint_name)
    who = f" (rank {k} of {n}, on {device})" if n > 1 else ""
    teachers = f"an ensemble of {len(predictors)} teacher folders" if len(predictors) > 1 else "the teacher"
    again = f" ({len(changed)} again: image changed since labelled: {', '.join(changed[:5])}" \
            f"{', ...' if len(changed) > 5 else ''})" if changed else ""
    print(f"[nnpp_distill] pseudo-labels: {teachers} predicts {len(todo)} unlabeled case(s){again} into "
          f"{out_dir}{who}", flush=True)
    if len(predictors) == 1:
        predictors[0].predict_cases([cases[c] for c in todo], [os.path.join(out_dir, c) for c in todo], overwrite=True)
        return todo
    from nnunetv2.ensembling.ensemble import merge_files
    pm, dataset_json = predictors[0].plans_manager, predictors[0].dataset_json
    from nnpp.file_safety import owner_alive, owner_suffix
    for d in os.listdir(out_dir):  # what a killed ensemble left (not a live one's: runs may share the folder)
        if d.startswith(".ensemble.") and not owner_alive(d):
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    work = os.path.join(out_dir, f".ensemble.{k}{owner_suffix()}")
    for i in range(len(predictors)):
        os.makedirs(os.path.join(work, str(i)), exist_ok=True)  # nnpp's predictor writes beside existing outputs
    try:
        for c in todo:
            parts = [os.path.join(work, str(i), c) for i in range(len(predictors))]
            for predictor, part_out in zip(predictors, parts):
                predictor.predict_cases([cases[c]], [part_out], save_probabilities=True, overwrite=True)
            merge_files([f + ".npz" for f in parts], os.path.join(work, c), file_ending, pm.image_reader_writer_class(),
                        pm.get_label_manager(dataset_json))
            os.replace(os.path.join(work, c + file_ending), os.path.join(out_dir, c + file_ending))
            for f in parts:
                for ext in (".npz", ".pkl", file_ending):
                    if os.path.exists(f + ext):
                        os.remove(f + ext)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return todo


# ------------------------------------------------------------------------------------------------ preprocessing
def _file_stamp(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def manifest(cases: dict, configuration: dict, plans_name: str, pseudo_dir: str | None, file_ending: str) -> dict:
    """What a prepared folder was made from: raw files (size, mtime), the student configuration, the pseudo-labels
    (size, mtime, and the image content each was made from, :func:`label_source`: a scan labelled again for new
    voxels is prepared again even where its file's size and time did not change)."""
    return {"plans": plans_name, "configuration": configuration,
            "cases": {c: [_file_stamp(f) for f in files] for c, files in sorted(cases.items())},
            "pseudo_labels": None if pseudo_dir is None else
            {c: _file_stamp(os.path.join(pseudo_dir, c + file_ending)) + [label_source(pseudo_dir, c, file_ending)]
             for c in sorted(cases)}}


def prepared_folder(preprocessed_dataset_dir: str, plans_name: str, configuration: str, record: dict) -> str:
    """``PREPROCESSED/DATASET/nnpp_unlabeled/<plans>_<configuration>_<hard|none>_<digest of the manifest>``."""
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:12]
    kind = "hard" if record["pseudo_labels"] is not None else "none"
    return os.path.join(preprocessed_dataset_dir, "nnpp_unlabeled", f"{plans_name}_{configuration}_{kind}_{digest}")


def prepare(cases: dict, preprocessed_dataset_dir: str, plans_manager, configuration_manager, configuration: str,
            dataset_json: dict, pseudo_dir: str | None = None) -> str:
    """Preprocess the unlabeled cases with the student's plans (nnU-Net's preprocessor of the configuration) into
    their own folder (see the module docstring), with the pseudo-labels of ``pseudo_dir`` as their segmentation or
    with none (``class_locations`` empty: random patches). Returns the folder; an existing complete one with the
    same manifest is reused."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    record = manifest(cases, configuration_manager.configuration, plans_manager.plans_name, pseudo_dir,
                      dataset_json["file_ending"])
    folder = prepared_folder(preprocessed_dataset_dir, plans_manager.plans_name, configuration, record)
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        print(f"[nnpp_distill] unlabeled cases: reusing {folder} ({len(cases)} cases)", flush=True)
        return folder
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    if not isinstance(preprocessor, DefaultPreprocessor):
        raise NnppError(f"the student's preprocessor {type(preprocessor).__name__} is not nnU-Net's "
                        f"DefaultPreprocessor (or a subclass): unlabeled cases cannot be preprocessed")
    tmp = f"{folder}.partial{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    print(f"[nnpp_distill] unlabeled cases: preprocessing {len(cases)} case(s) with {plans_manager.plans_name} "
          f"{configuration} into {folder}", flush=True)
    try:
        for i, (case, files) in enumerate(sorted(cases.items())):
            seg_file = None if pseudo_dir is None else os.path.join(pseudo_dir, case + dataset_json["file_ending"])
            try:
                data, seg, props = preprocessor.run_case(files, seg_file, plans_manager, configuration_manager,
                                                         dataset_json)
            except Exception as e:
                raise NnppError(f"--unlabeled: case {case} ({files[0]}) cannot be read and preprocessed: "
                                f"{type(e).__name__}: {e}") from None
            if seg_file is None:
                props["class_locations"] = {}  # no labels: MixedDataLoader takes random patches
            data, seg = data.astype(np.float32, copy=False), seg.astype(np.int16, copy=False)
            patch = tuple(configuration_manager.patch_size)  # nnU-Net's chunking (DefaultPreprocessor.run_case_save)
            blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
            blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
            nnUNetDatasetBlosc2.save_case(data, seg, props, os.path.join(tmp, case), chunks=chunks, blocks=blocks,
                                          chunks_seg=chunks_seg, blocks_seg=blocks_seg)
            if (i + 1) % 10 == 0 or i + 1 == len(cases):
                print(f"[nnpp_distill] unlabeled cases: {i + 1}/{len(cases)}", flush=True)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(record, f, indent=1, default=str)
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, MANIFEST)):
            shutil.rmtree(folder)  # an incomplete folder of an older run
        try:
            os.replace(tmp, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, MANIFEST)):  # else another run finished the same folder first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------------------------ mixed batches
def unlabeled_per_batch(fraction: float, batch_size: int) -> int:
    """Unlabeled patches in a batch of ``batch_size``: ``round(fraction * batch)``, at least 1 and at most batch - 1
    (every batch holds both kinds)."""
    if not 0 < fraction < 1:
        raise NnppError(f"--unlabeled_fraction {fraction}: must be in (0, 1) (the share of each batch that is "
                        f"unlabeled)")
    if batch_size < 2:
        raise NnppError(f"--unlabeled needs a batch of at least 2 patches per device (labeled and unlabeled in "
                        f"every batch); this run's is {batch_size} (nnpp_change_bs, or fewer devices)")
    return min(batch_size - 1, max(1, round(fraction * batch_size)))


class MixedDataset:
    """nnU-Net's dataset of the labeled training cases plus one of the unlabeled cases; ``load_case`` dispatches on
    :data:`PREFIX`. ``identifiers`` are the labeled ones (what nnU-Net's code iterates over)."""

    def __init__(self, labeled, unlabeled):
        self.labeled, self.unlabeled = labeled, unlabeled
        self.identifiers = list(labeled.identifiers)
        self.unlabeled_identifiers = [PREFIX + i for i in unlabeled.identifiers]

    def __len__(self):
        return len(self.identifiers)

    def load_case(self, identifier: str):
        if identifier.startswith(PREFIX):
            return self.unlabeled.load_case(identifier[len(PREFIX):])
        return self.labeled.load_case(identifier)


class MixedDataLoader(nnUNetDataLoader):
    """nnU-Net's loader over a :class:`MixedDataset`: each batch is ``n_unlabeled`` unlabeled patches, then labeled
    ones (each drawn with replacement, as nnU-Net draws). Each group keeps nnU-Net's share of foreground-forced
    patches for the whole batch (:meth:`_oversample_per_group`), so the labeled patches are forced as often as
    nnU-Net forces them in a batch of this size; an unlabeled case without labels (``--pseudo soft``: no class
    locations) gets a random patch."""
    n_unlabeled = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._probabilistic = self.get_do_oversample == self._probabilistic_oversampling
        self.get_do_oversample = self._oversample_per_group

    def _oversample_per_group(self, j: int) -> bool:
        """Whether batch position ``j`` is forced to foreground. nnU-Net forces the last
        ``B - round(B (1 - p))`` of a batch of B, a share s of it (B = 2, p = 0.33: 1 of 2). A group of n patches
        gets s * n on average: its last ``floor(s n)`` patches, and the one before them with probability
        ``s n - floor(s n)`` (a group of 1 in a batch of 2: forced every other batch on average, where a rule per
        group, ``round(1 x 0.67) = 1``, would never force it)."""
        if self._probabilistic:
            return self._probabilistic_oversampling(j)
        b = self.batch_size
        share = (b - round(b * (1 - self.oversample_foreground_percent))) / b
        i, n = (j, self.n_unlabeled) if j < self.n_unlabeled else (j - self.n_unlabeled, b - self.n_unlabeled)
        forced = share * n
        sure = int(np.floor(forced + 1e-9))
        if i >= n - sure:
            return True
        return i == n - sure - 1 and np.random.uniform() < forced - sure

    def get_bbox(self, data_shape, force_fg: bool, class_locations, overwrite_class=None, verbose: bool = False):
        if class_locations is not None and len(class_locations) == 0:  # no labels at all: a random patch
            has_ignore, self.has_ignore = self.has_ignore, False
            try:
                return super().get_bbox(data_shape, False, None, overwrite_class, verbose)
            finally:
                self.has_ignore = has_ignore
        return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)

    def get_indices(self):
        n_u = self.n_unlabeled
        return list(np.random.choice(self._data.unlabeled_identifiers, n_u, replace=True)) + list(
            np.random.choice(self.indices, self.batch_size - n_u, replace=True))


def unlabeled_mask(keys) -> np.ndarray:
    """True for the batch positions holding unlabeled patches (their keys start with :data:`PREFIX`)."""
    return np.array([str(k).startswith(PREFIX) for k in keys], dtype=bool)
