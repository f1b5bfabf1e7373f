"""An append-only JSON-lines file, rotated by size, that several writers may share.

Pure of mitmproxy (the proxy's FlowLog uses it, and so may anything else that appends
records). The contract:

- `append(data)` writes one whole line with one write(2), or nothing: a write that
  fails halfway (disk full) is cut back with ftruncate, so a half line never merges
  with the next record; if even that fails, the next record starts on a new line.
- Every append holds an exclusive flock on the current file and checks, under the
  lock, that its descriptor still is PATH. A record therefore always lands in the
  current file, never in one that was rotated away (and possibly deleted), and two
  writers never rotate at once: only the holder of the current file's lock renames.
- Rotation by size: when a record would take PATH past `max_bytes`, PATH.keep is
  dropped, PATH.N becomes PATH.N+1, PATH becomes PATH.1, and the record goes to a new
  PATH. A record larger than `max_bytes` gets a file of its own; `max_bytes` 0 never
  rotates (an external logrotate that renames the file is still followed).
- A new file is mode 0640 whatever the umask; one created by root takes the owner of
  the file it replaces (the proxy user's), so readers keep their access.
- A rotation that fails (a directory the writer may not rename in) does not lose
  anything: the record is appended to the current file, `rotation_error` says why, and
  rotation is retried after `ROTATE_RETRY` seconds.

Readers (logread.py) list PATH.keep ... PATH.1, PATH: oldest first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable

MODE = 0o640
ROTATE_RETRY = 60.0
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW


def rotated_path(path: str, index: int) -> str:
    """The name of the `index`-th rotated file of `path` (1 is the newest)."""
    return f"{path}.{index}"


class LogFile:
    def __init__(
        self,
        path: str,
        *,
        max_bytes: int = 0,
        keep: int = 5,
        owner: tuple[int, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_bytes < 0 or keep < 1:
            raise ValueError("max_bytes must be >= 0 and keep >= 1")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.clock = clock
        self.rotation_error: str | None = None
        self._owner = owner  # (uid, gid) for files that root creates
        self._fd: int | None = None
        self._rotate_after = float("-inf")
        self._dangling = False  # a half line may end the file

    def append(self, data: bytes) -> None:
        """Append `data` (one line, newline included) whole; OSError if it could not be."""
        if self._dangling:
            data = b"\n" + data
        for _ in range(16):
            fd = self._fd if self._fd is not None else self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            reopen = True
            try:
                if self._is_current(fd):
                    st = os.fstat(fd)
                    if not (self._should_rotate(st.st_size, len(data)) and self._rotate(st)):
                        reopen = False
                        self._write(fd, data, st.st_size)
                        return
            finally:
                if reopen:
                    self.close()  # which releases the lock too
                else:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        raise OSError(errno.EAGAIN, f"{self.path} keeps being replaced")

    def open(self) -> None:
        """Open (or create) PATH now rather than at the first append; OSError if impossible."""
        if self._fd is None:
            self._open()

    def space_left(self) -> int | None:
        """Bytes an unprivileged writer may still use on the file's file system."""
        try:
            fd = self._fd if self._fd is not None else self._open()
            st = os.fstatvfs(fd)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    # --

    def _open(self) -> int:
        # Open, else create; other writers may create or rotate it away in between.
        for _ in range(16):
            try:
                fd, created = os.open(self.path, _OPEN_FLAGS), False
                break
            except FileNotFoundError:
                pass
            try:
                fd, created = os.open(self.path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, MODE), True
                break
            except FileExistsError:
                pass
        else:
            raise OSError(errno.EAGAIN, f"{self.path} keeps being replaced")
        if created:
            try:
                os.fchmod(fd, MODE)  # the umask may have taken the group's read bit
                if os.geteuid() == 0 and self._owner is not None:
                    os.fchown(fd, *self._owner)
            except OSError:
                os.close(fd)
                raise
        st = os.fstat(fd)
        if self._owner is None or st.st_uid != 0:
            self._owner = (st.st_uid, st.st_gid)
        self._fd = fd
        return fd

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        ours = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)

    def _should_rotate(self, size: int, adding: int) -> bool:
        return (
            self.max_bytes > 0
            and size > 0
            and size + adding > self.max_bytes
            and self.clock() >= self._rotate_after
        )

    def _rotate(self, st: os.stat_result) -> bool:
        try:
            for i in range(self.keep - 1, 0, -1):
                try:
                    os.rename(rotated_path(self.path, i), rotated_path(self.path, i + 1))
                except FileNotFoundError:
                    pass
            os.rename(self.path, rotated_path(self.path, 1))
        except OSError as e:
            self.rotation_error = f"cannot rotate {self.path}: {e.strerror or e}"
            self._rotate_after = self.clock() + ROTATE_RETRY
            return False
        self.rotation_error = None
        if st.st_uid != 0:
            self._owner = (st.st_uid, st.st_gid)
        return True

    def _write(self, fd: int, data: bytes, size: int) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            if len(view) != len(data):
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    self._dangling = True
            raise
        self._dangling = False
