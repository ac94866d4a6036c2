"""Faults at the edges: a write that fails (a full disk) is one line naming the file or folder with nothing
left behind; temporaries of a killed run are cleared; under torchrun one rank speaks; impossible values in
score files are refused where they are read; no transformers deprecation noise."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conftest import fail, listing
from gaprune import distributed, fileio
from gaprune.cli import run
from gaprune.errors import InputError, OutputError
from gaprune.features import sample
from gaprune.model import SparseModel
from gaprune.scorefiles import COSINE_PREFIX, open_score_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_DISK_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"  # as 0.8 says it






def dead_pid() -> int:
    """The pid of a process that has ended (reaped, so no longer alive)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# 1. a failure while saving is one line, and nothing is left at the final name -------------------------------

def prune_magnitude(bert_dir, out):
    return ["--model_path", bert_dir, "--output_dir", str(out), "--unstructured_pct", "0.5",
            "--unstructured_scoring", "magnitude", "--device", "cpu"]


def test_full_disk_in_safetensors_is_one_line_naming_the_folder(capsys, tmp_path, bert_dir, monkeypatch):
    """safetensors raises its own class (not an OSError) on a full disk, after writing part of the file."""
    def half_written(self, folder, **kwargs):
        with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
            handle.write(b"\0" * 1000)
        raise SafetensorError(FULL_DISK_SAFETENSORS)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_written)
    out = tmp_path / "out"
    line = fail(capsys, SparseModel.main, prune_magnitude(bert_dir, out))
    folder = out / f"{os.path.basename(bert_dir)}_magnitude_prune_50%"
    assert line == f"error: cannot write {folder}: No space left on device"
    assert listing(out) == []  # neither the folder nor its temporary


def test_full_disk_while_the_tokenizer_is_saved(capsys, tmp_path, bert_dir, monkeypatch):
    """An OSError that names no file (a write() on a full disk) is named by the folder being saved."""
    def full(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    out = tmp_path / "out"
    line = fail(capsys, SparseModel.main, prune_magnitude(bert_dir, out))
    assert line.startswith(f"error: cannot write {out / os.path.basename(bert_dir)}_magnitude_prune_50%: ")
    assert line.endswith(os.strerror(errno.ENOSPC))
    assert listing(out) == []


def test_a_file_in_an_atomic_folder_is_named_at_its_final_place(tmp_path, monkeypatch):
    target = tmp_path / "model"
    (target / "weights").parent.mkdir()
    (target / "weights").write_text("old")

    def full(obj, handle, **kwargs):
        handle.write("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fileio.json, "dump", full)
    with pytest.raises(OutputError) as raised:
        with fileio.atomic_dir(str(target)) as tmp:
            fileio.write_text(os.path.join(tmp, "weights"), "new")
            fileio.write_json(os.path.join(tmp, "config.json"), {"a": 1})
    assert str(raised.value) == f"cannot write {target / 'config.json'}: {os.strerror(errno.ENOSPC)}"
    assert isinstance(raised.value, OSError)  # callers catching OSError around a write still catch it
    assert listing(tmp_path) == ["model"] and listing(target) == ["weights"]
    assert (target / "weights").read_text() == "old"


def test_full_disk_on_an_output_file(capsys, tmp_path, bert_dir, data_files, monkeypatch):
    def full(obj, handle, **kwargs):
        handle.write("[")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fileio.json, "dump", full)
    output = tmp_path / "out" / "sample.json"
    line = fail(capsys, sample.main, ["--model_name", bert_dir, "--input_file", data_files["chem"],
                                      "--output_file", str(output), "--target_sample_size", "100"])
    assert line == f"error: cannot write {output}: {os.strerror(errno.ENOSPC)}"
    assert listing(tmp_path / "out") == []


def test_score_arrays_that_cannot_be_written_name_their_file(tmp_path, monkeypatch):
    """A raw write() on a full disk names no file; the error names the arrays' final file, and no file of
    the set is left (the results JSON is written last)."""
    from gaprune import scorefiles

    def pack(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fileio.struct, "pack", pack)
    paths = [str(tmp_path / "r.json"), str(tmp_path / "r.safetensors"), str(tmp_path / "s.json")]
    with pytest.raises(OutputError) as raised:
        scorefiles._write_result(paths, {"w": torch.ones(2)}, torch.float32, {}, {"r": 1}, {"s": 1})
    assert raised.value.path == paths[1] and raised.value.reason == os.strerror(errno.ENOSPC)
    assert listing(tmp_path) == []


def test_an_oserror_about_a_source_passes_unchanged(tmp_path):
    """Reading an input inside an atomic folder is not a write failure: its own error, its own file."""
    source = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError) as raised:
        with fileio.atomic_dir(str(tmp_path / "model")):
            open(source)
    assert not isinstance(raised.value, OutputError) and raised.value.filename == source
    assert listing(tmp_path) == []


def test_cli_turns_an_unwrapped_safetensors_error_into_one_line(capsys):
    def writes(argv):
        raise SafetensorError(FULL_DISK_SAFETENSORS)
    assert fail(capsys, writes, []) == f"error: safetensors: {FULL_DISK_SAFETENSORS}"


# 2. temporaries left by a killed run ------------------------------------------------------------------------

def stale(target, pid: int, host: str | None = None, kind: str = "tmp") -> str:
    folder, name = os.path.split(str(target))
    return os.path.join(folder, f".{name}.{kind}-{host or fileio._host()}-{pid}")


def test_a_dead_writers_temporary_folder_is_removed_not_merged(tmp_path, caplog):
    target = tmp_path / "model"
    left = stale(target, dead_pid())
    os.makedirs(left)
    open(os.path.join(left, "model.safetensors"), "wb").write(b"half")
    with caplog.at_level(logging.WARNING), fileio.atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    assert listing(tmp_path) == ["model"] and listing(target) == ["config.json"]
    assert f"removed {left}, left by a run that stopped midway" in caplog.text


def test_a_temporary_with_this_process_pid_is_stale(tmp_path, caplog):
    """In a container every run may get the same pid: a temporary of the target with ours is an earlier
    process's, never merged into the new output."""
    target = tmp_path / "model"
    left = fileio._temporary_name(str(target))
    os.makedirs(left)
    open(os.path.join(left, "junk"), "w").write("stale")
    with caplog.at_level(logging.WARNING), fileio.atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    assert listing(target) == ["config.json"] and listing(tmp_path) == ["model"]
    assert f"removed {left}" in caplog.text


def test_a_live_or_foreign_writers_temporary_is_kept_and_named(tmp_path, caplog):
    target = tmp_path / "scores.json"
    live, foreign = stale(target, os.getppid()), stale(target, dead_pid(), host="othermachine")
    for path in (live, foreign):
        open(path, "w").write("being written")
    with caplog.at_level(logging.WARNING):
        fileio.write_json(str(target), {"a": 1})
    assert json.load(open(target)) == {"a": 1}
    assert os.path.exists(live) and os.path.exists(foreign)
    assert f"{live} exists: another run (pid {os.getppid()} on {fileio._host()}) may be writing {target}" \
        in caplog.text
    assert f"{foreign} exists: another run" in caplog.text and "othermachine" in caplog.text


def test_stale_temporaries_of_other_names_in_the_folder_are_removed(tmp_path, caplog):
    """Score files get a new timestamped name each run: a killed run's temporaries are cleared by the next
    write into the folder, and a live run's are left alone without a word."""
    dead, live = stale(tmp_path / "a_20240101_000000.safetensors", dead_pid()), \
        stale(tmp_path / "b_20240101_000000.safetensors", os.getppid())
    for path in (dead, live):
        open(path, "w").write("half")
    with caplog.at_level(logging.WARNING):
        fileio.write_text(str(tmp_path / "c.md"), "text")
    assert listing(tmp_path) == sorted(["c.md", os.path.basename(live)])
    assert f"removed {dead}" in caplog.text and live not in caplog.text


def test_an_old_folder_whose_target_is_missing_is_kept(tmp_path, caplog):
    """Killed between the two renames of the fallback swap: the aside folder is the previous output's only
    copy, so it is named, not deleted."""
    target = tmp_path / "model"
    aside = stale(target, dead_pid(), kind="old")
    os.makedirs(aside)
    open(os.path.join(aside, "weights"), "w").write("previous")
    with caplog.at_level(logging.WARNING), fileio.atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "weights"), "w").write("new")
    assert os.path.exists(os.path.join(aside, "weights"))
    assert f"{aside} holds the previous {target}, which is missing" in caplog.text


# 3. under torchrun, a refusal is printed by one rank ---------------------------------------------------------

def refuses(argv):
    raise InputError("the same refusal on every rank")


def test_only_rank_zero_prints_a_refusal_before_the_process_group(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail("rank 0 waited"))
    with pytest.raises(SystemExit) as exit_info:
        run(refuses, [])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: the same refusal on every rank\n"


def test_another_rank_is_silent_when_torchrun_stops_it(capsys, monkeypatch):
    """Rank 1 waits before it speaks; torchrun stops it there (SIGTERM) once rank 0 has printed and exited."""
    def stopped_by_torchrun(seconds):
        assert seconds == distributed.QUIET_RANK_WAIT_S
        raise SystemExit(-signal.SIGTERM)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(time, "sleep", stopped_by_torchrun)
    with pytest.raises(SystemExit) as exit_info:
        run(refuses, [])
    assert exit_info.value.code not in (0, None)
    assert capsys.readouterr().err == ""


def test_another_rank_still_running_says_its_own_refusal(capsys, monkeypatch):
    """Rank 0 did not meet it (it would have exited and torchrun stopped this rank): never a silent failure."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    with pytest.raises(SystemExit) as exit_info:
        run(refuses, [])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: the same refusal on every rank (rank 1)\n"


def test_torchrun_refusal_is_printed_once(tmp_path, bert_dir):
    """Both ranks join the process group, then meet the same missing input: one error line (rank 0's; rank 1
    is stopped by torchrun while it waits), exit non-zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gaprune.features.sample", "--model_name", bert_dir, "--input_file",
                           str(tmp_path / "missing.json"), "--output_file", str(tmp_path / "out.json"),
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "rank 1 of 2 (gloo)" in done.stderr  # both ranks were in the group when they refused
    errors = [line for line in done.stderr.splitlines() if "error: " in line and "missing.json" in line]
    assert len(errors) == 1 and "(rank" not in errors[0], done.stderr[-3000:]


def test_every_rank_refuses_more_processes_than_gpus(monkeypatch):
    """The check reads LOCAL_WORLD_SIZE, so rank 0 refuses too (and prints it) when only higher ranks lack a GPU."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("joined"))
    with pytest.raises(InputError, match="more processes per node than there are GPUs"):
        distributed.init_from_env("auto")


# 4. values no computation of ours gives ----------------------------------------------------------------------

SHAPES = {"layer.0.dense.weight": [4, 3], "layer.1.dense.weight": [3, 4]}


def score_file(folder, kind: str, arrays: dict, name: str = "scores") -> str:
    """A fisher or alignment results JSON with its safetensors arrays, as scorefiles writes them."""
    os.makedirs(folder, exist_ok=True)
    metadata = {"model_name": "tiny", "tensor_file": f"{name}.safetensors"}
    if kind == "fisher":
        data = {"metadata": metadata, "complete_scores": {n: {"shape": s} for n, s in SHAPES.items()}}
    else:
        metadata.update(parameter_shapes=SHAPES, alignment_mode="local_cosine")
        data = {"metadata": metadata, "alignment_scores": {n: 0.0 for n in SHAPES}}
    save_file({n: a.contiguous() for n, a in arrays.items()}, os.path.join(folder, f"{name}.safetensors"))
    path = os.path.join(folder, f"{name}.json")
    json.dump(data, open(path, "w"))
    return path


def good_fisher():
    return {n: torch.rand(s) for n, s in SHAPES.items()}


def good_alignment(cosine=None):
    arrays = {n: torch.randn(s) for n, s in SHAPES.items()}
    arrays.update({COSINE_PREFIX + n: torch.rand(s) * 2 - 1 for n, s in SHAPES.items()})
    arrays.update(cosine or {})
    return arrays


def read_all(paths: dict):
    array = open_score_files(paths, SHAPES, torch.device("cpu"), need_cosine="alignment" in paths)
    sides = [*paths, *(["alignment_cosine"] if "alignment" in paths else [])]
    return {(side, name): array(side, name) for side in sides for name in SHAPES}


def test_good_files_are_read(tmp_path):
    arrays = read_all({"domain_fisher": score_file(tmp_path, "fisher", good_fisher(), "f"),
                       "alignment": score_file(tmp_path, "alignment", good_alignment(), "a")})
    assert len(arrays) == 6 and all(a.dtype == torch.float32 for a in arrays.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_fisher_values(tmp_path, dtype):
    arrays = {n: a.to(dtype) for n, a in good_fisher().items()}
    arrays["layer.1.dense.weight"][2, 1] = -0.25
    path = score_file(tmp_path, "fisher", arrays)
    with pytest.raises(InputError) as raised:
        read_all({"general_fisher": path})
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'scores.safetensors'}: the fisher array layer.1.dense.weight holds "
                              f"1 negative value(s) (down to -0.25)")


@pytest.mark.parametrize("dtype, side", [(torch.int32, "domain_fisher"), (torch.int64, "alignment")])
def test_integer_arrays_are_refused(tmp_path, dtype, side):
    kind = "fisher" if side.endswith("fisher") else "alignment"
    arrays = good_fisher() if kind == "fisher" else good_alignment()
    arrays["layer.0.dense.weight"] = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(InputError) as raised:
        read_all({side: score_file(tmp_path, kind, arrays)})
    name = str(dtype).removeprefix("torch.")
    assert str(raised.value) == (f"{tmp_path / 'scores.safetensors'}: the {kind} array layer.0.dense.weight holds "
                                 f"{name} values; {kind} scores are floating-point")


@pytest.mark.parametrize("value", [1.02, -1.5])
def test_cosines_outside_minus_one_to_one(tmp_path, value):
    name = "layer.0.dense.weight"
    cosine = (torch.rand(4, 3) * 2 - 1)
    cosine[1, 1] = value
    path = score_file(tmp_path, "alignment", good_alignment({COSINE_PREFIX + name: cosine}))
    with pytest.raises(InputError) as raised:
        read_all({"alignment": path})
    assert str(raised.value).startswith(f"{tmp_path / 'scores.safetensors'}: the local_cosine array "
                                        f"{COSINE_PREFIX}{name} holds 1 value(s) outside [-1, 1]")


def test_cosines_rounded_past_one_and_any_product_are_accepted(tmp_path):
    """bfloat16 rounds 0.9999 to 1.0 and a float32 sum may land at 1.0000001; the element-wise product
    (the published alignment) has no bound."""
    cosine = torch.full((4, 3), 1.0002)
    cosine[0, 0] = -1.0005
    arrays = good_alignment({COSINE_PREFIX + "layer.0.dense.weight": cosine})
    arrays["layer.1.dense.weight"] = torch.full((3, 4), -7.5)
    read = read_all({"alignment": score_file(tmp_path, "alignment", arrays)})
    assert read[("alignment", "layer.1.dense.weight")].min() == -7.5


def test_negative_and_integer_values_in_published_npy_folders(tmp_path):
    folder = tmp_path / "scores_tensors"
    folder.mkdir()
    data = {"metadata": {"model_name": "tiny"}, "complete_scores": {n: {"shape": s} for n, s in SHAPES.items()}}
    path = str(tmp_path / "scores.json")
    json.dump(data, open(path, "w"))
    for name, shape in SHAPES.items():
        np.save(folder / f"{name}.npy", np.ones(shape, dtype=np.float16))
    np.save(folder / "layer.1.dense.weight.npy", -np.ones((3, 4), dtype=np.float16))
    with pytest.raises(InputError, match=r"layer\.1\.dense\.weight\.npy: the fisher array of layer\.1\.dense\.weight "
                                         r"holds 12 negative value\(s\)"):
        read_all({"domain_fisher": path})
    np.save(folder / "layer.1.dense.weight.npy", np.ones((3, 4), dtype=np.int16))
    with pytest.raises(InputError, match="holds int16 values; fisher scores are floating-point"):
        read_all({"domain_fisher": path})


# 5. no deprecation noise ------------------------------------------------------------------------------------

def test_reading_the_dtype_of_an_old_config_does_not_touch_torch_dtype(bert_dir, monkeypatch):
    """A config.json without a dtype (all-MiniLM's) gave transformers' "`torch_dtype` is deprecated" on every
    load, because the fallback read config.torch_dtype."""
    from transformers import AutoConfig, PretrainedConfig

    from gaprune import modeling
    config = AutoConfig.from_pretrained(bert_dir)
    config.dtype = None
    monkeypatch.setattr(PretrainedConfig, "torch_dtype", property(lambda self: pytest.fail("read torch_dtype")))
    assert modeling._config_dtype(config) == torch.float32
    config.dtype = torch.bfloat16
    assert modeling._config_dtype(config) == torch.bfloat16


def test_loading_a_model_prints_no_deprecation(tmp_path, bert_dir):
    """In a fresh process (transformers warns once per process), with Python's warnings shown, a model whose
    config names no dtype (the packaged all-MiniLM-L6-v2's does not)."""
    config = json.load(open(os.path.join(bert_dir, "config.json")))
    config.pop("dtype", None)
    config.pop("torch_dtype", None)  # all-MiniLM-L6-v2's config (transformers 4.8) names no dtype
    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(bert_dir):
        if os.path.isfile(os.path.join(bert_dir, name)):
            os.symlink(os.path.join(bert_dir, name), model / name)
    os.remove(model / "config.json")
    json.dump(config, open(model / "config.json", "w"))
    done = subprocess.run([sys.executable, "-W", "default", "-c",
                           f"from gaprune.modeling import load_embedder; "
                           f"print(load_embedder({str(model)!r}, device='cpu').source_dtype)"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "torch.float32"
    assert "deprecat" not in done.stderr.lower(), done.stderr[-2000:]
