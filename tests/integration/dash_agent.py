"""Run as the jailed agent by test_dashboard.py. Stdlib only.

argv: token, an allowed name, an allowed address, a trigger file. Makes an allowed HTTPS
request and a refused plain-HTTP one (Host: denied.example) at once, then, when the
trigger file appears, one more allowed request (`/dash/TOKEN/live`), then idles.
"""

import os
import ssl
import sys
import time
import urllib.request

TOKEN, ALLOWED, ADDRESS, GO = sys.argv[1:5]
CTX = ssl.create_default_context()  # SSL_CERT_FILE: the bundle with the instance CA


def get(url, host=None):
    try:
        req = urllib.request.Request(url, headers={"Host": host} if host else {})
        with urllib.request.urlopen(req, timeout=5, context=CTX if url.startswith("https")
                                    else None) as r:
            r.read()
    except Exception as e:  # noqa: BLE001 - the refused one fails; the log tells
        print(f"{url}: {type(e).__name__}: {e}", flush=True)


get(f"https://{ALLOWED}/dash/{TOKEN}/early")
get(f"http://{ADDRESS}/dash/{TOKEN}/denied", host="denied.example")
print("early done", flush=True)
while not os.path.exists(GO):
    time.sleep(0.2)
get(f"https://{ALLOWED}/dash/{TOKEN}/live")
print("live done", flush=True)
while True:
    time.sleep(60)
