"""Entry point of the child processes that run python-iptables (see `firewall.py`).

multiprocessing's spawn method imports the module that holds the target in a fresh
interpreter. This one is tiny and imports nothing at the top, so the parent never loads
iptc by referring to it, and the child loads only what `firewall._child` needs.
"""

from __future__ import annotations

from typing import Any


def main(conn: Any, op: str, family: int, netns: str | None, payload: Any) -> None:
    """Send `firewall._child(...)`'s ("ok", result) or ("error", text) to the parent."""
    try:
        from panopticond import firewall

        result = firewall._child(op, family, netns, payload)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent as text
        result = ("error", f"{type(e).__name__}: {e}")
    try:
        conn.send(result)
    except (BrokenPipeError, EOFError, OSError):
        # The parent is gone (interrupted mid-start); it tears down without our answer.
        pass
    finally:
        conn.close()


def serve(conn: Any) -> None:
    """A warm child (`firewall.prestart`): pay for `import iptc` now, then run jobs.

    Nothing is applied before a job arrives, and each job is what `main` would run in a
    fresh child (every one re-opens its tables after entering its namespace, and comes
    home after: see `firewall._child_each`). EOF (the parent has no more jobs, or is
    gone) ends it.
    """
    import signal

    # Ctrl-C reaches the whole process group: the parent decides, and may still need us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from panopticond import firewall

    try:
        firewall._import_iptc()
        while True:
            op, family, netns, payload = conn.recv()
            try:
                result = firewall._child(op, family, netns, payload)
            except BaseException as e:  # noqa: BLE001 - reaches the parent as text
                result = ("error", f"{type(e).__name__}: {e}")
            conn.send(result)
            if result[0] != "ok":
                return  # the parent discards a child that failed
    except BaseException:  # noqa: BLE001 - EOF, or the parent is gone: just end
        return
    finally:
        conn.close()
