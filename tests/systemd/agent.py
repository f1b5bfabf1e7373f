"""The agent of the system tier's [agents.ci]: reports what the unit left it, then waits.

One line on stdout (the journal): `pnt-agent {json}` with its /proc/self/status
credentials and whether it could create a user namespace; then it sleeps until stopped.
"""

import ctypes
import json
import os
import time

CLONE_NEWUSER = 0x10000000

status = {}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        if key in ("Uid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                   "Seccomp"):
            status[key] = value.strip()

libc = ctypes.CDLL(None, use_errno=True)
pid = os.fork()
if pid == 0:  # try in a child: success would change this process's namespaces
    os._exit(0 if libc.unshare(CLONE_NEWUSER) == 0 else 10 + ctypes.get_errno() % 100)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
userns = "created" if code == 0 else f"refused (errno {code - 10})"

print("pnt-agent " + json.dumps({"status": status, "userns": userns}), flush=True)
while True:
    time.sleep(3600)
