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
