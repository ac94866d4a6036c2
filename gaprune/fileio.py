"""Generic file handling: JSON in and out, atomic files and folders, timestamps and folder names."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import struct
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError

from gaprune.errors import InputError, OutputError, first_line

log = logging.getLogger(__name__)


def read_json(path: str, what: str = "file") -> Any:
    """Parse a JSON file; a missing, malformed or non-UTF-8 file is an InputError naming ``what`` and the path."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder, not a file")
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} is not a regular file")
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: a byte-order mark (Notepad) is skipped
            return json.load(handle)
    except json.JSONDecodeError as err:
        hint = " (JSON Lines? give one JSON list of records)" if err.msg == "Extra data" and err.colno == 1 else ""
        raise InputError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}{hint}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None


def _host() -> str:
    """This machine's name as it appears in temporary names: letters, digits and '_' only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _temporary_name(path: str, kind: str = "tmp") -> str:
    """``.<name>.<kind>-<host>-<pid>`` beside ``path``: kind tmp (being written) or old (an output being
    replaced). The host and pid tell a later run whether the writer may still be running."""
    folder = os.path.dirname(path) or "."
    return os.path.join(folder, f".{os.path.basename(path)}.{kind}-{_host()}-{os.getpid()}")


# .<target>.<kind>-<host>-<pid>; the host is missing in names written before it was recorded
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9_]+)-)?(?P<pid>\d+)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: alive, another user's; anything else: assume alive
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def clear_stale_temporaries(path: str) -> None:
    """Before writing ``path``: remove the temporaries that a writer killed midway left in its folder, and
    name in a warning those that may belong to a writer still running.

    A temporary is stale when its writer ran on this machine and its pid no longer runs, or when it is
    ``path``'s own and carries this process's pid (a process with the same number wrote it before, as
    happens in containers; this one has not started writing ``path``). Another machine's temporaries
    (a shared file system), a live pid's, and names without a host are left alone; those of ``path`` are
    named in a warning. An ``old`` folder (a previous output being swapped out) is removed only while its
    target exists: without the target it is the only copy of that output, and is named instead."""
    folder = os.path.dirname(path) or "."
    try:
        entries = sorted(os.listdir(folder))
    except OSError:  # no folder yet, or not listable: nothing of ours can be there
        return
    me, host = os.getpid(), _host()
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry)
        if match is None:
            continue
        own_target = match["target"] == os.path.basename(path)
        ours = match["host"] == host  # written on this machine, so its pid can be looked up
        if not (own_target or ours):
            continue  # another output's, from another machine or an older gaprune: not this run's to judge
        full, target, pid = os.path.join(folder, entry), os.path.join(folder, match["target"]), int(match["pid"])
        if match["kind"] == "old" and not os.path.lexists(target):
            log.warning("%s holds the previous %s, which is missing: move it back if you need it", full, target)
        elif ours and (own_target if pid == me else not _pid_alive(pid)):
            try:
                _remove(full)
            except FileNotFoundError:  # another run cleared it first
                continue
            except OSError as err:
                log.warning("cannot remove %s, left by a run that stopped midway: %s", full,
                            err.strerror or first_line(err))
                continue
            log.warning("removed %s, left by a run that stopped midway (pid %d)", full, pid)
        elif own_target:
            writer = f"pid {pid} on {match['host']}" if match["host"] else f"pid {pid}"
            log.warning("%s exists: another run (%s) may be writing %s now; if none is, remove it", full,
                        writer, target)


def _write_failure(err: BaseException) -> str:
    """What went wrong, in words: an OSError's strerror, or the I/O error inside safetensors' own message
    ('Error while serializing: I/O error: No space left on device (os error 28)')."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = first_line(err)
    if isinstance(err, SafetensorError):
        io = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
        return io.group(1) if io else f"safetensors: {text}"
    return text


def _within(name, roots: Sequence[str]) -> bool:
    if not isinstance(name, (str, bytes, os.PathLike)):  # a file descriptor
        return False
    name = os.path.abspath(os.fsdecode(name))
    return any(name == root or name.startswith(root + os.sep) for root in roots)


@contextlib.contextmanager
def writing(path: str, *scratch: str, claim_unnamed: bool = True) -> Iterator[None]:
    """Turn a failure to write ``path`` into one OutputError naming ``path``: safetensors' own error, and an
    OSError that names a file in ``path`` or in a ``scratch`` name (a temporary for ``path``), or names no
    file (unless not ``claim_unnamed``). An OutputError about a scratch name is renamed to the same place
    under ``path``. An OSError about another file (a source being read) passes unchanged."""
    roots = [os.path.abspath(p) for p in (path, *scratch)]
    try:
        yield
    except OutputError as err:
        inner = os.path.abspath(err.path)
        for root in roots[1:]:
            if _within(inner, [root]):
                raise OutputError(os.path.join(path, os.path.relpath(inner, root)) if inner != root else path,
                                  err.reason) from err.__cause__
        raise
    except (SafetensorError, OSError) as err:
        names = [n for n in (getattr(err, "filename", None), getattr(err, "filename2", None)) if n is not None]
        if (names and not any(_within(n, roots) for n in names)) or (not names and not claim_unnamed):
            raise
        raise OutputError(path, _write_failure(err)) from err


def check_output_dir(path: str, flag: str = "--output_dir") -> None:
    """``path`` is, or can become, a writable folder: checked before any work, so nothing is computed for nothing."""
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"{flag} {path} is a link to nothing")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{flag} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path} is not writable ({existing})")


def check_output_file(path: str, flag: str = "--output_file", inputs: Sequence[str] = ()) -> None:
    """``path`` can be written as a file: not a folder, not one of the run's ``inputs``, in a folder that is
    or can become writable."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder, not a file")
    for source in inputs:
        if os.path.realpath(source) == os.path.realpath(path):
            raise InputError(f"{flag} {path} is an input of this run; writing it would overwrite {source}")
    check_output_dir(os.path.dirname(path) or ".", f"the folder of {flag}")


@contextlib.contextmanager
def atomic_files(*paths: str) -> Iterator[list[str]]:
    """Temporary names beside ``paths``; on success each is renamed to its path in the order given (put the
    file that makes the set usable last), on failure all are removed. Stale temporaries of earlier runs
    are cleared first (clear_stale_temporaries); a failure to write is an OutputError naming the file."""
    for path in paths:
        with writing(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        clear_stale_temporaries(path)
    tmps = [_temporary_name(path) for path in paths]
    try:
        with contextlib.ExitStack() as stack:
            for path, tmp in zip(paths, tmps):  # each names its own file; one that names no file, all of them
                stack.enter_context(writing(path, tmp, claim_unnamed=len(paths) == 1))
            try:
                yield tmps
                for tmp, path in zip(tmps, paths):
                    os.replace(tmp, path)
            except (SafetensorError, OSError) as err:
                if isinstance(err, OutputError) or (isinstance(err, OSError) and err.filename is not None):
                    raise
                raise OutputError(", ".join(paths), _write_failure(err)) from err
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary name beside ``path``; rename it to ``path`` on success, remove it on failure."""
    with atomic_files(path) as (tmp,):
        yield tmp


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), b)


def replace_dir(new: str, path: str) -> None:
    """Put the folder ``new`` at ``path``. An existing folder is swapped out in one atomic step where the
    system allows it (else renamed aside first), then deleted: at every moment ``path`` holds the old or the
    new folder complete. Files of the old folder that the new one lacks are named in a warning."""
    if not os.path.lexists(path):
        os.replace(new, path)
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise InputError(f"{path} exists and is not a folder; remove it or choose another output folder")
    lost = sorted(set(os.listdir(path)) - set(os.listdir(new)))
    if lost:
        log.warning("replacing %s, whose %s not in the new output: %s", path,
                    "file is" if len(lost) == 1 else f"{len(lost)} files are", ", ".join(lost[:8]))
    if _exchange(new, path):
        shutil.rmtree(new)
        return
    aside = _temporary_name(path, "old")
    os.replace(path, aside)
    os.replace(new, path)
    shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (replace_dir), on failure
    it is removed. Stale temporaries of earlier runs are cleared first (clear_stale_temporaries); a failure
    to write is an OutputError naming ``path`` (or the file in it), the temporary's name replaced."""
    with writing(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    clear_stale_temporaries(path)
    tmp = _temporary_name(path)
    try:
        with writing(path, tmp):
            os.makedirs(tmp)
            yield tmp
            replace_dir(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def unique_stem(make_paths: Callable[[str], Sequence[str]], now: datetime | None = None) -> list[str]:
    """The paths ``make_paths(stamp)`` for the first of ``<ts>``, ``<ts>_1``, ``<ts>_2``, ... whose paths
    are all free, so two runs started in the same second never share a name. The name is claimed with
    an exclusive hidden marker beside the first path, removed by release_stem after the files are written."""
    stamp = timestamp(now)
    for attempt in range(1000):
        paths = list(make_paths(stamp if attempt == 0 else f"{stamp}_{attempt}"))
        os.makedirs(os.path.dirname(paths[0]) or ".", exist_ok=True)
        if any(os.path.lexists(p) for p in paths):
            continue
        try:
            os.close(os.open(_claim_marker(paths[0]), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return paths
    raise InputError(f"no free file name for {paths[0]}")


def release_stem(paths: Sequence[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(_claim_marker(paths[0]))


def _claim_marker(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.claimed")


def write_json(path: str, obj: Any) -> None:
    """Indented UTF-8 JSON (non-ASCII kept as is), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_tensors(path: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time, so only one tensor is ever copied to host memory."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for tensor in tensors.values():
            host = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
            handle.write(host.view(torch.uint8).numpy().tobytes() if host.numel() else b"")


def timestamp(now: datetime | None = None) -> str:
    """%Y%m%d_%H%M%S, the suffix of every file name the stages write."""
    return (now or datetime.now()).strftime("%Y%m%d_%H%M%S")


def domain_name(data_path: str) -> str:
    """data/sample/chem-example-output.json -> chem-example-output (cut at the first '_', then the first '.')."""
    return os.path.basename(data_path).split("_")[0].split(".")[0]


def model_dirname(model_name: str) -> str:
    """The last path part of a model name or folder, with characters outside [A-Za-z0-9_-] replaced by '_'."""
    last = os.path.basename(os.path.normpath(model_name))
    return re.sub(r"[^A-Za-z0-9_-]", "_", last)
