"""Files the proxy runs as code must be root's alone.

Pure apart from `os.lstat`/`os.stat`: used by the daemon before a start (a clear error,
nothing touched) and by the proxy again right before it loads the file. The proxy's
user is exempt from the jail's redirect, so code it loads that the agent (or any
non-root user) could change would be a way out of the jail (threats.md, item 8).
"""

from __future__ import annotations

import os
import stat

from panopticond.errors import ExitStatus, PanopticonError


def _chain(path: str) -> list[str]:
    """`path` and every directory above it, top first."""
    out = [path]
    while True:
        parent = os.path.dirname(out[-1])
        if parent == out[-1]:
            return out[::-1]
        out.append(parent)


def problem(path: str, reader_gid: int | None = None) -> str | None:
    """Why `path` may not be loaded as code by the proxy, or None if it may.

    It must be an absolute path to a regular file; it, every directory above it, and
    the same for its target if symlinks are involved, must be owned by root and not
    writable by group or others. A directory with the sticky bit (such as /tmp) may be
    writable by others: they cannot rename or replace root's entries in it. With
    `reader_gid`, the file must also be readable by others or by that group.
    """
    if not os.path.isabs(path):
        return f"{path} is not an absolute path"
    real = os.path.realpath(path)
    for chain, look in ((_chain(os.path.normpath(path)), os.lstat), (_chain(real), os.stat)):
        for p in chain:
            try:
                st = look(p)
            except OSError as e:
                return f"cannot check {p}: {e.strerror or e}"
            if st.st_uid != 0:
                return f"{p} is not owned by root"
            if stat.S_ISLNK(st.st_mode):
                continue  # its target is checked in the second chain
            writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if writable and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
                return f"{p} is writable by others than root"
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if reader_gid is not None and not (
        st.st_mode & stat.S_IROTH or (st.st_gid == reader_gid and st.st_mode & stat.S_IRGRP)
    ):
        return f"{path} is not readable by the proxy user"
    return None


def check(path: str, what: str, reader_gid: int | None = None) -> None:
    """PanopticonError unless `problem(path, reader_gid)` is None."""
    why = problem(path, reader_gid)
    if why:
        raise PanopticonError(
            f"{what} {path}: {why}",
            hint=f"make it root's alone and readable by the proxy: chown root:root {path} && "
            f"chmod 644 {path} (and no directory above it writable by others)",
            status=ExitStatus.NOPERM,
        )
