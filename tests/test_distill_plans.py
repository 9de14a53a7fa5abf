"""Student plans never lose anything: configurations are merged into the student plans file, a configuration the
user edited (e.g. its batch size with nnpp_change_bs) is kept and used (one line says so) unless
--replace_student_plans, and an unchanged file is not rewritten."""
import json
import os
import shutil

import pytest

from nnpp import NnppError


@pytest.fixture
def pre(tiny_dataset, tmp_path):
    """A private copy of the tiny dataset's plans files (its plans have 3d_fullres and 2d)."""
    src = os.path.join(tiny_dataset["nnUNet_preprocessed"], tiny_dataset["name"])
    dst = tmp_path / tiny_dataset["name"]
    dst.mkdir()
    for f in ("nnUNetPlans.json", "dataset.json"):
        shutil.copy(os.path.join(src, f), dst / f)
    assert {"2d", "3d_fullres"} <= set(json.loads((dst / "nnUNetPlans.json").read_text())["configurations"])
    return str(dst)


def _read(pre, name):
    with open(os.path.join(pre, name + ".json")) as f:
        return json.load(f)


def test_two_configurations_in_turn_are_both_kept(pre):
    from nnpp.distill.student import write_student_plans
    lines = []
    name = write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, log=lines.append)
    assert name == "nnUNetPlans_kd_r2" and list(_read(pre, name)["configurations"]) == ["3d_fullres"]
    assert write_student_plans(pre, "nnUNetPlans", "2d", 2, log=lines.append) == name
    confs = _read(pre, name)["configurations"]
    assert sorted(confs) == ["2d", "3d_fullres"]          # the first one is still there
    source_2d = _read(pre, "nnUNetPlans")["configurations"]["2d"]
    assert confs["2d"]["batch_size"] == source_2d["batch_size"] and confs["2d"]["patch_size"] == source_2d["patch_size"]
    assert confs["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 8, 16, 16]  # 8-16-32-32 // 2
    assert lines == []                                    # nothing kept against the derivation: nothing to say
    # distilling 3d_fullres again changes nothing: the file is not rewritten
    before = os.stat(os.path.join(pre, name + ".json")).st_mtime_ns
    write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, log=lines.append)
    assert os.stat(os.path.join(pre, name + ".json")).st_mtime_ns == before and lines == []


def test_edited_batch_size_is_kept_unless_replaced(pre):
    from nnpp.distill.student import write_student_plans
    from nnpp.tools.change_bs import change_batch_size
    name = write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2)
    write_student_plans(pre, "nnUNetPlans", "2d", 2)
    derived_bs = _read(pre, name)["configurations"]["3d_fullres"]["batch_size"]
    change_batch_size(os.path.join(pre, name + ".json"), derived_bs + 3, "3d_fullres")
    lines = []
    assert write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, log=lines.append) == name
    confs = _read(pre, name)["configurations"]
    assert confs["3d_fullres"]["batch_size"] == derived_bs + 3 and "2d" in confs
    assert len(lines) == 1 and "kept as it is in the file" in lines[0] and "batch_size" in lines[0]
    assert "--replace_student_plans" in lines[0]
    # distilling the other configuration leaves the edit alone too
    write_student_plans(pre, "nnUNetPlans", "2d", 2, log=lines.append)
    assert _read(pre, name)["configurations"]["3d_fullres"]["batch_size"] == derived_bs + 3
    # only the explicit flag re-derives it, and says so
    lines = []
    write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, replace=True, log=lines.append)
    confs = _read(pre, name)["configurations"]
    assert confs["3d_fullres"]["batch_size"] == derived_bs and "2d" in confs
    assert len(lines) == 1 and "re-derived" in lines[0]


def test_unreadable_student_plans_are_one_line_and_left_alone(pre):
    from nnpp.distill.student import write_student_plans
    path = os.path.join(pre, "nnUNetPlans_kd_r2.json")
    with open(path, "w") as f:
        f.write("{ not json")
    with pytest.raises(NnppError, match="student plans .* are not valid JSON"):
        write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2)
    assert open(path).read() == "{ not json"
    assert [f for f in os.listdir(pre) if ".tmp" in f] == []


def test_only_the_writer_rank_writes_the_others_wait_for_it(pre):
    """Under DDP rank 0 writes the student plans; another rank (writer=False) writes nothing, waits until the file
    holds rank 0's configuration and returns the same name; without rank 0 it gives up in one line."""
    import threading
    import time

    from nnpp.distill.student import write_student_plans
    path = os.path.join(pre, "nnUNetPlans_kd_r2.json")
    with pytest.raises(NnppError, match="waited 1 s for rank 0 to write configuration '3d_fullres'") as e:
        write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, writer=False, wait_s=1)
    assert "\n" not in str(e.value) and not os.path.exists(path)  # a non-writer created nothing
    rank0 = threading.Timer(1.0, write_student_plans, args=(pre, "nnUNetPlans", "3d_fullres", 2))
    rank0.start()
    t0 = time.monotonic()
    assert write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, writer=False, wait_s=30) == "nnUNetPlans_kd_r2"
    rank0.join()
    assert time.monotonic() - t0 >= 0.9 and list(_read(pre, "nnUNetPlans_kd_r2")["configurations"]) == ["3d_fullres"]
    # the file holds it now: a non-writer returns at once and leaves the file as it is
    before = os.stat(path).st_mtime_ns
    assert write_student_plans(pre, "nnUNetPlans", "3d_fullres", 2, writer=False, wait_s=0) == "nnUNetPlans_kd_r2"
    assert os.stat(path).st_mtime_ns == before


def test_concurrent_runs_do_not_lose_each_others_configuration(pre, monkeypatch):
    """Two runs merging different configurations at the same time (read, merge, write) both end up in the file:
    the merge is made slow so that, without the folder lock, the second write would drop the first one's."""
    import threading
    import time

    from nnpp.distill import student
    merge = student.merge_student_plans

    def slow_merge(*args, **kw):
        time.sleep(0.5)
        return merge(*args, **kw)
    monkeypatch.setattr(student, "merge_student_plans", slow_merge)
    runs = [threading.Thread(target=student.write_student_plans, args=(pre, "nnUNetPlans", c, 2))
            for c in ("3d_fullres", "2d")]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert sorted(_read(pre, "nnUNetPlans_kd_r2")["configurations"]) == ["2d", "3d_fullres"]
