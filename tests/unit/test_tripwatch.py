"""The daemon's side of on_tripwire = "kill": it follows the log and ends the jail's processes."""

import json
import time

from panopticond.tripwatch import TripwireWatch


def wait(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_a_kill_record_of_this_instance_ends_the_jail(tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text(json.dumps({"kind": "tripwire", "action": "kill", "instance": "x"}) + "\n")
    calls = []
    w = TripwireWatch(str(log), "x", "pnt-x", lambda: {42}, interval=0.01,
                      kill=lambda ns, spare: calls.append((ns, spare())) or 1)
    w.start()
    try:
        # What was there before it started is not its business.
        time.sleep(0.1)
        assert calls == []
        with open(log, "a") as f:
            f.write(json.dumps({"kind": "tripwire", "action": "deny", "instance": "x"}) + "\n")
            f.write(json.dumps({"kind": "tripwire", "action": "kill", "instance": "y"}) + "\n")
            f.write(json.dumps({"kind": "http", "action": "kill", "instance": "x"}) + "\n")
        time.sleep(0.1)
        assert calls == []
        with open(log, "a") as f:
            f.write(json.dumps({"kind": "tripwire", "action": "kill", "instance": "x",
                                "secret": "OPENAI", "host": "evil.example"}) + "\n")
        assert wait(lambda: calls)
        assert calls[0] == ("pnt-x", {42}) and w.tripped["secret"] == "OPENAI"
    finally:
        w.stop()


def test_it_follows_the_log_across_a_rotation(tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text("")
    calls = []
    w = TripwireWatch(str(log), "x", "pnt-x", set, interval=0.01,
                      kill=lambda ns, spare: calls.append(ns) or 1)
    w.start()
    try:
        log.rename(tmp_path / "requests.jsonl.1")
        log.write_text(json.dumps({"kind": "tripwire", "action": "kill", "instance": "x"}) + "\n")
        assert wait(lambda: calls)
    finally:
        w.stop()
