"""Reading a path image from the shared root without races, symlinks or hangs.

A path image is opened exactly once and everything is checked on the opened descriptor:

* no symlink is followed at any component below the root, not even one that points back inside it
  (Linux ``openat2`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``; elsewhere, or on kernels before 5.6,
  a walk that opens each directory with ``O_NOFOLLOW | O_DIRECTORY`` relative to the previous one);
  the root itself is opened by its configured name, so the root may be a symlink or a mount point;
* the last component is opened with ``O_NONBLOCK``, so a FIFO (or a device) never blocks ``open``;
* ``fstat`` on that descriptor must show a regular file no larger than the limit, and at most
  ``limit + 1`` bytes are read from it: a file that grows past the limit while it is read is refused.

Swapping a directory for a symlink, or a small file for a huge one, between the check and the read
therefore cannot make the worker read outside the root or hold more than the limit. Error messages
name the relative path and the reason only (and, for a file over the limit, its size), never its bytes.
Hard links are not symlinks: a hard link inside the root is read like any other file.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from producer.contract.codes import ErrorCode, JobFailure

# openat2(2): <linux/openat2.h>. The syscall number is 437 on every architecture that uses the generic table
# (aarch64) and on x86_64; other machines use the component walk.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_READ_FLAGS = (
    os.O_RDONLY
    | os.O_CLOEXEC
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
)
_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_DIRECTORY", 0)
_CHUNK = 1 << 20
_RETRIES = 16


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_syscall() -> Callable[..., int] | None:
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "aarch64"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()
# False once the kernel (or a seccomp filter) answered ENOSYS; tests set it to False to exercise the walk.
openat2_usable: bool = _syscall is not None


class _Unavailable(Exception):
    """openat2 cannot be used for this call; walk the components instead."""


def _openat2(root_fd: int, relative: str) -> int:
    global openat2_usable
    how = _OpenHow(_READ_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    for _ in range(_RETRIES):  # EAGAIN: a rename raced the lookup (the kernel asks RESOLVE_BENEATH callers to retry)
        assert _syscall is not None
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(root_fd),
            ctypes.c_char_p(os.fsencode(relative)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            break
    if err == errno.ENOSYS:
        openat2_usable = False
        raise _Unavailable
    if err in (errno.EPERM, errno.E2BIG):  # a seccomp filter that says EPERM, an older struct size: the walk is as safe
        raise _Unavailable
    raise OSError(err, os.strerror(err))


def _walk(root_fd: int, parts: tuple[str, ...]) -> int:
    fd = root_fd
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except (
                NotADirectoryError
            ):  # Linux says ENOTDIR for a symlink under O_NOFOLLOW | O_DIRECTORY: name the reason
                if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
                raise
            if fd != root_fd:
                os.close(fd)
            fd = nxt
        return os.open(parts[-1], _READ_FLAGS, dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.EXDEV, errno.EMLINK):  # EMLINK: O_NOFOLLOW on a symlink on some BSDs
        return "it is or passes through a symlink, and symlinks under the shared root are not followed"
    if exc.errno == errno.ENOENT:
        return "no such file under the shared root"
    if exc.errno == errno.ENOTDIR:
        return "a component of the path is not a directory"
    if exc.errno == errno.ENXIO:
        return "not a regular file"
    if exc.errno in (errno.EAGAIN, errno.EINTR):
        return "the path kept changing while it was being opened"
    return exc.strerror or f"errno {exc.errno}"


def _validate(root: Path | None, relative: str) -> tuple[str, ...]:
    if root is None:
        raise JobFailure(
            ErrorCode.PATH_NOT_ALLOWED, "path images are disabled: no shared root is configured (ARCFACE_SHARED_ROOT)"
        )
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"image path {relative!r} must be relative to the shared root")
    if "\x00" in relative:
        raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"image path {relative!r} may not contain a NUL character")
    parts = PurePosixPath(relative).parts
    if ".." in parts:
        raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"image path {relative!r} may not contain '..'")
    if not parts:
        raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"image path {relative!r} names no file")
    return parts


def _read_limited(fd: int, size: int, limit: int) -> bytes:
    """At most ``limit + 1`` bytes from ``fd``; one chunk (no copy) in the usual case."""
    chunks: list[bytes] = []
    total = 0
    want = min(size, limit) + 1
    while total <= limit:
        chunk = os.read(fd, min(want, _CHUNK) if total else want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = limit + 1 - total
    if total > limit:
        raise OverflowError
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_shared_file(root: Path | None, relative: str, limit: int) -> bytes:
    """The bytes of the regular file ``relative`` names under ``root``, read from one descriptor.

    Raises :class:`~producer.contract.codes.JobFailure`: ``path_not_allowed`` for a path that is absolute, contains
    ``..`` or NUL, passes through or ends in a symlink (even one pointing inside the root), does not exist,
    cannot be opened or is not a regular file (FIFO, socket, device, directory); ``image_too_large`` when the
    file has, or grows to, more than ``limit`` bytes. Never blocks on a FIFO; never reads more than
    ``limit + 1`` bytes; messages never contain the file's bytes.
    """
    parts = _validate(root, relative)
    assert root is not None
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise JobFailure(
            ErrorCode.PATH_NOT_ALLOWED, f"the shared root cannot be opened on this worker: {exc.strerror}"
        ) from None
    try:
        try:
            if openat2_usable:
                try:
                    fd = _openat2(root_fd, "/".join(parts))
                except _Unavailable:
                    fd = _walk(root_fd, parts)
            else:
                fd = _walk(root_fd, parts)
        except OSError as exc:
            raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"cannot read image {relative!r}: {_reason(exc)}") from None
    finally:
        os.close(root_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"cannot read image {relative!r}: not a regular file")
        if st.st_size > limit:
            raise JobFailure(
                ErrorCode.IMAGE_TOO_LARGE,
                f"image file {relative!r} has {st.st_size} bytes, over the {limit}-byte limit",
            )
        try:
            return _read_limited(fd, st.st_size, limit)
        except OverflowError:
            raise JobFailure(
                ErrorCode.IMAGE_TOO_LARGE, f"image file {relative!r} grew past the {limit}-byte limit while it was read"
            ) from None
        except OSError as exc:
            raise JobFailure(ErrorCode.PATH_NOT_ALLOWED, f"cannot read image {relative!r}: {_reason(exc)}") from None
    finally:
        os.close(fd)
