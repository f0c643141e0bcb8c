"""Path images under the shared root (issue 11, items 4 and 9): one open, no symlink at any component, a
regular file only, never more than the limit, never a hang, never a byte of a file in an error message.

Every test runs against both ways of opening: ``openat2`` (when this kernel has it) and the
per-component ``O_NOFOLLOW`` walk used elsewhere. Real files, FIFOs, sockets and symlinks in tmp dirs.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from producer.contract.codes import ErrorCode, JobFailure
from tests.patience import patience
from worker.inference import files
from worker.inference.files import read_shared_file

HAS_OPENAT2 = files.openat2_usable


@pytest.fixture(params=["openat2", "walk"])
def method(request, monkeypatch):
    if request.param == "openat2" and not HAS_OPENAT2:
        pytest.skip("this kernel has no openat2")
    monkeypatch.setattr(files, "openat2_usable", request.param == "openat2")
    yield request.param
    if request.param == "openat2":
        assert files.openat2_usable, "openat2 answered ENOSYS: the walk ran instead"


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "a.png").write_bytes(b"A-IMAGE" * 10)
    (r / "sub" / "b.png").write_bytes(b"B-IMAGE" * 10)
    return r


def call_in_thread(fn, timeout: float = patience(5.0)):
    """Run ``fn`` in a daemon thread; (result or exception, seconds). A hang fails the test instead of hanging it."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["value"] = exc

    start = time.monotonic()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return t.is_alive(), box.get("value"), time.monotonic() - start


def refused(root: Path, rel: str, limit: int = 1 << 20) -> JobFailure:
    with pytest.raises(JobFailure) as info:
        read_shared_file(root, rel, limit)
    return info.value


def test_reads_regular_files_at_any_depth(root, method):
    assert read_shared_file(root, "a.png", 1000) == b"A-IMAGE" * 10
    assert read_shared_file(root, "sub/b.png", 1000) == b"B-IMAGE" * 10
    assert read_shared_file(root, "./sub//b.png", 1000) == b"B-IMAGE" * 10
    assert read_shared_file(root, "a.png", 70) == b"A-IMAGE" * 10  # exactly the limit is allowed
    (root / "empty.png").write_bytes(b"")
    assert read_shared_file(root, "empty.png", 10) == b""


def test_a_root_reached_through_a_symlink_is_fine(root, tmp_path, method):
    (tmp_path / "root-link").symlink_to(
        root
    )  # the operator's configured name may be a link; only what lies below is checked
    assert read_shared_file(tmp_path / "root-link", "sub/b.png", 1000) == b"B-IMAGE" * 10


@pytest.mark.parametrize(
    "rel, why",
    [
        ("/etc/passwd", "must be relative"),
        ("\\x.png", "must be relative"),
        ("", "must be relative"),
        ("../root/a.png", "'..'"),
        ("sub/../a.png", "'..'"),
        ("a.png\x00.jpg", "NUL"),
        (".", "names no file"),
    ],
)
def test_invalid_paths_are_refused_before_anything_is_opened(root, rel, why):
    err = refused(root, rel)
    assert err.code == ErrorCode.PATH_NOT_ALLOWED and why in err.message


def test_no_shared_root_and_a_missing_root(root, tmp_path):
    assert "no shared root is configured" in refused(None, "a.png").message  # type: ignore[arg-type]
    err = refused(tmp_path / "nope", "a.png")
    assert err.code == ErrorCode.PATH_NOT_ALLOWED and "shared root cannot be opened" in err.message


def test_missing_file_and_file_used_as_directory(root, method):
    assert "no such file" in refused(root, "missing.png").message
    err = refused(root, "a.png/x.png")
    assert err.code == ErrorCode.PATH_NOT_ALLOWED and "not a directory" in err.message


def test_a_fifo_is_refused_at_once_not_waited_on(root, method):
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    alive, value, seconds = call_in_thread(lambda: read_shared_file(root, "pipe.png", 1000))
    try:
        assert not alive, "read_shared_file blocked on a FIFO"
        assert isinstance(value, JobFailure) and value.code == ErrorCode.PATH_NOT_ALLOWED, value
        assert "not a regular file" in value.message
        assert seconds < 1.0
    finally:
        if alive:  # unblock the stuck open so the thread can end
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_with_a_writer_holding_it_open_is_refused_too(root, method):
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY)
    try:
        os.write(writer, b"FIFO-BYTES")
        alive, value, _ = call_in_thread(lambda: read_shared_file(root, "pipe.png", 1000))
        assert not alive and isinstance(value, JobFailure) and "not a regular file" in value.message
        assert "FIFO-BYTES" not in value.message
    finally:
        os.close(writer)
        os.close(reader)


def test_a_socket_and_a_directory_are_refused(root, method, monkeypatch):
    monkeypatch.chdir(root)  # a relative bind keeps the socket path under the 108-byte limit
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("sock.png")
        sock.listen(1)
        alive, value, _ = call_in_thread(lambda: read_shared_file(root, "sock.png", 1000))
        assert not alive and isinstance(value, JobFailure) and value.code == ErrorCode.PATH_NOT_ALLOWED, value
        assert "not a regular file" in value.message
    finally:
        sock.close()
    err = refused(root, "sub")
    assert err.code == ErrorCode.PATH_NOT_ALLOWED and "not a regular file" in err.message


def test_symlinks_are_never_followed_even_when_they_point_inside(root, tmp_path, method):
    (root / "last.png").symlink_to("a.png")  # last component, target inside
    (root / "mid").symlink_to("sub")  # middle component, target inside
    (root / "abs-mid").symlink_to(root / "sub")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.png").write_bytes(b"OUTSIDE-SECRET")
    (root / "out").symlink_to(outside)
    (root / "out.png").symlink_to(outside / "b.png")
    for rel in ("last.png", "mid/b.png", "abs-mid/b.png", "out/b.png", "out.png"):
        err = refused(root, rel)
        assert err.code == ErrorCode.PATH_NOT_ALLOWED and "symlink" in err.message, (rel, err.message)
        assert "OUTSIDE-SECRET" not in err.message


def test_a_file_over_the_limit_is_refused_without_echoing_it(root, method):
    (root / "big.png").write_bytes(b"Z" * 1001)
    err = refused(root, "big.png", limit=1000)
    assert err.code == ErrorCode.IMAGE_TOO_LARGE and "1001 bytes" in err.message and "ZZZ" not in err.message


# --- races --------------------------------------------------------------------------------------------------------
class Loop(threading.Thread):
    """Runs ``step`` in a loop while the ``with`` block runs, counting rounds; an error in ``step`` fails the test."""

    def __init__(self, step) -> None:
        super().__init__(daemon=True)
        self.step, self.rounds, self.error = step, 0, None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self.step()
                self.rounds += 1
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def __enter__(self) -> "Loop":
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # interleave the two threads finely
        self.start()
        while self.rounds == 0 and self.error is None:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc) -> None:
        self._stop_event.set()
        self.join(patience(10))
        sys.setswitchinterval(self._interval)
        assert not self.is_alive() and self.error is None, self.error


SECRET = b"TOP-SECRET-4f1c9a-do-not-leak" * 4


def outcome(root: Path, rel: str, limit: int) -> tuple[str, bytes | JobFailure]:
    try:
        return "ok", read_shared_file(root, rel, limit)
    except JobFailure as exc:
        return exc.code.value, exc


def race(
    loop_step, read, classify, want: set[str], minimum: int = 500, cap: int = 20_000, min_rounds: int = 50
) -> tuple[Counter, int]:
    """Read while ``loop_step`` runs in a loop: at least ``minimum`` reads, and on until every outcome in
    ``want`` has been seen (so the race really happened), at most ``cap``. ``classify`` checks one outcome
    and names it. Returns the outcome counts and the number of swap rounds."""
    seen: Counter = Counter()
    with Loop(loop_step) as loop:
        while sum(seen.values()) < minimum or not want <= set(seen):
            assert sum(seen.values()) < cap, f"the loop never showed every state to a reader: {seen}"
            seen[classify(*read())] += 1
    assert loop.rounds >= min_rounds, (loop.rounds, seen)
    return seen, loop.rounds


@pytest.mark.parametrize("where", ["middle", "last"])
def test_swapping_a_component_for_a_symlink_to_outside_never_reads_outside(root, tmp_path, method, where):
    inside = b"INSIDE-IMAGE" * 8
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "img.png").write_bytes(SECRET)
    (root / "d").mkdir()
    (root / "d" / "img.png").write_bytes(inside)
    if where == "middle":  # root/d: the real directory <-> a symlink to outside/d
        real, name, link = root / "d.real", root / "d", root / "d.link"
        link.symlink_to(outside / "d")
    else:  # root/d/img.png: the real file <-> a symlink to the outside file
        real, name, link = root / "d" / "img.real", root / "d" / "img.png", root / "d" / "img.link"
        link.symlink_to(outside / "d" / "img.png")

    def swap() -> None:
        os.rename(name, real)
        os.rename(link, name)  # now a symlink to outside
        os.rename(name, link)
        os.rename(real, name)

    def classify(kind: str, value) -> str:
        if kind == "ok":
            assert value == inside, "read a file outside the shared root"
            return "inside"
        assert value.code == ErrorCode.PATH_NOT_ALLOWED, value.message
        assert b"TOP-SECRET" not in value.message.encode() and str(len(SECRET)) not in value.message, value.message
        for reason, words in (
            ("symlink", "symlink"),
            ("missing", "no such file"),
            ("not a dir", "not a directory"),
            ("changing", "kept changing"),
        ):
            if (
                words in value.message
            ):  # "not a directory": the walk met the symlink, which was a directory again by the time it asked why
                return reason
        return value.message

    # 3,000 reads: the old resolve-stat-read code leaked on about 1 to 3 reads in 1,000 of this loop
    seen, _ = race(swap, lambda: outcome(root, "d/img.png", 1 << 20), classify, {"inside", "symlink"}, minimum=3000)
    assert set(seen) <= {"inside", "symlink", "missing", "not a dir", "changing"}, seen


def test_swapping_a_file_for_a_64mb_one_never_returns_more_than_the_limit(root, method):
    limit = 1 << 20
    small, big = root / "small.src", root / "big.src"
    small.write_bytes(b"S" * 1000)
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    target, tmp = root / "img.png", root / "img.tmp"
    os.link(small, target)

    def swap() -> None:
        for src in (big, small):
            os.link(src, tmp)
            os.replace(tmp, target)

    def classify(kind: str, value) -> str:
        if kind == "ok":
            assert value == b"S" * 1000
        else:
            assert kind == ErrorCode.IMAGE_TOO_LARGE.value, value.message
            assert "SSS" not in value.message
        return kind

    # 3,000 reads: the old stat-then-read code returned the 64 MB file on about 2 reads in 1,000 of this loop
    race(swap, lambda: outcome(root, "img.png", limit), classify, {"ok", "image_too_large"}, minimum=3000)


def test_a_file_growing_in_place_while_read_is_refused_not_returned_whole(root, method):
    limit = 256 << 10
    target = root / "grow.png"
    target.write_bytes(b"G" * 1000)
    chunk = b"G" * (64 << 10)
    f = open(target, "r+b")

    def grow() -> None:  # the same inode: 1,000 bytes, then appended to 1 MiB, then cut back
        f.truncate(1000)
        f.seek(0, os.SEEK_END)
        for _ in range(16):
            f.write(chunk)
            f.flush()

    def classify(kind: str, value) -> str:
        if kind == "ok":
            assert len(value) <= limit
            return kind
        assert kind == ErrorCode.IMAGE_TOO_LARGE.value, value.message
        return "grew" if "grew past" in value.message else "over at open"

    try:
        seen, rounds = race(
            grow, lambda: outcome(root, "grow.png", limit), classify, {"ok", "over at open"}, minimum=1000, min_rounds=5
        )
    finally:
        f.close()
    print(f"in-place growth: {dict(seen)} over {rounds} rounds")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_file_with_more_bytes_than_fstat_said_is_refused_after_limit_plus_one_bytes(method):
    """Deterministic form of the growth race: a /proc file is a regular file whose fstat size is 0 but
    which reads as about 1.5 KB, exactly what a file growing between fstat and read looks like."""
    assert os.stat("/proc/self/status").st_size == 0
    err = refused(Path("/proc/self"), "status", limit=100)
    assert err.code == ErrorCode.IMAGE_TOO_LARGE and "grew past the 100-byte limit" in err.message
    assert "Name:" not in err.message  # none of the file's text
    assert read_shared_file(Path("/proc/self"), "status", 1 << 20).startswith(b"Name:")
