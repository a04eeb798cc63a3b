"""What the tests look at inside the systemd container, as one JSON object on stdout.

Runs as root with Debian's python3: HTTP answers of the running unit, its main
process's credentials and sandbox, its cache directory.
"""

import json
import os
import subprocess
import urllib.error
import urllib.request

URLS = {
    "healthz": "http://127.0.0.1:5000/healthz",
    "readyz": "http://127.0.0.1:5000/readyz",
    "v2": "http://127.0.0.1:5000/v2/",
    "metrics": "http://127.0.0.1:9090/metrics",
}


def get(url: str) -> list:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return [response.status, response.read().decode(errors="replace")]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode(errors="replace")]
    except Exception as e:  # noqa: BLE001 - reported, judged by the test
        return [None, repr(e)]


def show(*props: str) -> dict:
    out = subprocess.run(["systemctl", "show", "regproxy.service", *(f"--property={p}" for p in props)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


result: dict = {"http": {name: get(url) for name, url in URLS.items()}}
unit = show("MainPID", "ActiveState", "Result", "UID", "GID", "LimitNOFILE")
result["unit"] = unit
pid = int(unit["MainPID"])
if pid:
    with open(f"/proc/{pid}/status") as f:
        result["status"] = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        result["cmdline"] = [a.decode() for a in f.read().split(b"\0") if a]
    with open(f"/proc/{pid}/limits") as f:
        result["limits"] = f.read()

def is_worker(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"--worker" in f.read().split(b"\0")
    except OSError:
        return False


result["workers"] = sum(is_worker(p) for p in os.listdir("/proc") if p.isdigit())
cache = "/var/cache/regproxy"
result["cache"] = {
    "islink": os.path.islink(cache),
    "target": os.path.realpath(cache),
    "uid": os.stat(cache).st_uid,
    "mode": oct(os.stat(cache).st_mode & 0o7777),
    "files": sorted(os.listdir(cache)),
}
print(json.dumps(result))
