"""The one atomic writer (controlnet.files): a write that fails or is killed midway leaves the old
file or folder byte for byte, and no temporary behind for long.

Each crash test runs the same crash against a plain ``open(path, "wb")`` writer too and expects it
to lose the old file: that is what shows the test can see a non-atomic write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controlnet.files import atomic_file, atomic_folder, atomic_path

OLD = os.urandom(3 << 20)  # the file a write is replacing: 3 MiB of random bytes
CHUNK = b"n" * (1 << 20)


class Crash(Exception):
    """Raised by a writer halfway through its data."""


def _data_then_crash():
    yield CHUNK
    yield CHUNK
    raise Crash("halfway")


def _stream_writer(path: Path, chunks) -> None:
    with atomic_file(path) as handle:
        for chunk in chunks:
            handle.write(chunk)


def _named_writer(path: Path, chunks) -> None:
    """As safetensors' save_file or torch.save: the writer opens the file name it is given."""
    with atomic_path(path) as temporary:
        _plain_writer(temporary, chunks)


def _plain_writer(path: Path, chunks) -> None:
    with open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)


WRITERS = {"atomic_file": _stream_writer, "atomic_path": _named_writer, "plain": _plain_writer}


def _everything_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("writer", WRITERS)
def test_a_writer_that_fails_midway_keeps_the_old_file(tmp_path, writer):
    path = tmp_path / "model.bin"
    path.write_bytes(OLD)
    with pytest.raises(Crash):
        WRITERS[writer](path, _data_then_crash())
    if writer == "plain":
        assert path.read_bytes() == CHUNK * 2  # the old file is gone: what the atomic writers prevent
    else:
        assert path.read_bytes() == OLD
        assert _everything_in(tmp_path) == ["model.bin"]  # the temporary went with the error


class _FailsToPickle:
    def __reduce__(self):
        raise Crash("cannot be pickled")


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic_path", "plain"])
def test_torch_save_failing_midway_keeps_the_old_checkpoint(tmp_path, atomic):
    checkpoint = tmp_path / "state.pt"
    torch.save({"step": 1, "weights": torch.ones(3)}, checkpoint)
    old = checkpoint.read_bytes()
    state = {"weights": torch.zeros(1 << 18), "callback": _FailsToPickle()}  # fails after the tensor
    with pytest.raises(Crash):
        if atomic:
            with atomic_path(checkpoint) as temporary:
                torch.save(state, temporary)
        else:
            torch.save(state, checkpoint)
    assert (checkpoint.read_bytes() == old) is atomic
    if atomic:
        assert torch.load(checkpoint, weights_only=True)["step"] == 1
        assert _everything_in(tmp_path) == ["state.pt"]


def test_a_folder_writer_that_fails_midway_keeps_the_old_folder(tmp_path):
    path = tmp_path / "model"
    with atomic_folder(path) as folder:
        (folder / "weights.bin").write_bytes(OLD)
        (folder / "config.json").write_text("{}")
    with pytest.raises(Crash), atomic_folder(path) as folder:
        (folder / "weights.bin").write_bytes(CHUNK)
        raise Crash("halfway")
    assert (path / "weights.bin").read_bytes() == OLD
    assert _everything_in(tmp_path) == ["model", "model/config.json", "model/weights.bin"]


# -- a writer killed outright (SIGKILL): nothing of it runs after the kill ------------------------

# Writes 2 of 6 MiB, says so, and waits to be killed.
_KILLED_WRITER = """
import os, sys
from controlnet.files import atomic_file, atomic_path

path, writer = sys.argv[1], sys.argv[2]
chunk = b"n" * (1 << 20)

def write(handle):
    handle.write(chunk)
    handle.write(chunk)
    handle.flush()
    os.fsync(handle.fileno())  # the bytes are in the file, not only in our buffer
    print("halfway", flush=True)
    sys.stdin.read()  # blocks until killed
    for _ in range(4):
        handle.write(chunk)

if writer == "atomic_file":
    with atomic_file(path) as handle:
        write(handle)
elif writer == "atomic_path":
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        write(handle)
else:
    with open(path, "wb") as handle:
        write(handle)
"""

needs_posix = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and process ids as on POSIX")


def _start(program: str, *arguments: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", program, *arguments], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    line = process.stdout.readline()
    assert line.strip() in (b"halfway", b"between"), line
    return process


def _kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    process.stdin.close()
    process.stdout.close()


@needs_posix
@pytest.mark.parametrize("writer", WRITERS)
def test_a_writer_killed_midway_keeps_the_old_file_and_the_next_write_removes_its_temporary(tmp_path, writer):
    path = tmp_path / "model.bin"
    path.write_bytes(OLD)
    _kill(_start(_KILLED_WRITER, str(path), writer))
    if writer == "plain":
        assert path.read_bytes() == CHUNK * 2  # the old file is lost, the new one half-written
        return
    assert path.read_bytes() == OLD
    [left] = [p for p in tmp_path.iterdir() if p != path]  # what the killed writer could not remove
    assert left.name.startswith(".model.bin.") and left.read_bytes() == CHUNK * 2
    with atomic_file(path) as handle:
        handle.write(b"the next write")
    assert path.read_bytes() == b"the next write"
    assert _everything_in(tmp_path) == ["model.bin"]


# Fills a folder for "model" and is killed between the swap's two renames: the old folder moved
# aside, the new one not yet in its place.
_KILLED_SWAP = """
import os, sys
from controlnet import files

rename = os.rename

def rename_then_wait(source, target):
    rename(source, target)
    if str(target).endswith(".old"):
        print("between", flush=True)
        sys.stdin.read()  # blocks until killed

os.rename = rename_then_wait
with files.atomic_folder(sys.argv[1]) as folder:
    (folder / "weights.bin").write_bytes(b"new weights")
"""


@needs_posix
def test_a_folder_swap_killed_between_its_renames_is_undone_by_the_next_write(tmp_path):
    path = tmp_path / "model"
    with atomic_folder(path) as folder:
        (folder / "weights.bin").write_bytes(OLD)
    _kill(_start(_KILLED_SWAP, str(path)))
    assert not path.exists()  # killed with the old folder aside: the state the next write repairs
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".old")]) == 1
    with pytest.raises(Crash), atomic_folder(path):
        raise Crash("the next write fails too")
    assert _everything_in(tmp_path) == ["model", "model/weights.bin"]  # the old folder is back, whole
    assert (path / "weights.bin").read_bytes() == OLD


# Holds a write to argv[1] open until told to finish.
_SLOW_WRITER = """
import sys
from controlnet.files import atomic_file

with atomic_file(sys.argv[1]) as handle:
    handle.write(b"the slow write")
    handle.flush()
    print("halfway", flush=True)
    sys.stdin.read()
"""


@needs_posix
def test_the_temporaries_of_running_writers_and_of_other_targets_are_left_alone(tmp_path):
    path, other = tmp_path / "model.bin", tmp_path / "other.bin"
    other.write_bytes(b"other")
    _kill(_start(_KILLED_WRITER, str(other), "atomic_file"))  # a dead writer's temporary, another target
    slow = _start(_SLOW_WRITER, str(path))  # a live writer of this target, in another process
    with atomic_file(path) as first:
        first.write(b"first")
        with atomic_file(path) as second:  # a live writer in this process
            second.write(b"second")
        assert path.read_bytes() == b"second"
    assert path.read_bytes() == b"first"
    assert len(list(tmp_path.glob(".model.bin.*.tmp"))) == 1  # the slow writer's, still there
    assert len(list(tmp_path.glob(".other.bin.*.tmp"))) == 1
    slow.communicate(timeout=30)
    assert slow.returncode == 0 and path.read_bytes() == b"the slow write"
    with atomic_file(other) as handle:  # the next write of the other target removes the dead one's
        handle.write(b"other, again")
    assert _everything_in(tmp_path) == ["model.bin", "other.bin"]


def test_text_is_utf8_unless_told_otherwise_and_only_write_modes_are_allowed(tmp_path):
    with atomic_file(tmp_path / "a.json", "w") as handle:
        handle.write('{"prompt": "café ☕"}')
    assert (tmp_path / "a.json").read_bytes() == '{"prompt": "café ☕"}'.encode()
    with atomic_file(tmp_path / "b.txt", "w", encoding="latin-1") as handle:
        handle.write("café")
    assert (tmp_path / "b.txt").read_bytes() == "café".encode("latin-1")
    for mode in ("ab", "r", "x", "wb+"):
        with pytest.raises(ValueError, match="mode"), atomic_file(tmp_path / "c", mode):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt"]
