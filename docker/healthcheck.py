"""Container health checks of the voxeldose images (standard library only; no curl in the images).

    python /opt/voxeldose/healthcheck.py http      # API: GET http://127.0.0.1:$VOXELDOSE_PORT/healthz answers 200
    python /opt/voxeldose/healthcheck.py raylet    # Ray node: a raylet process runs in this container
    python /opt/voxeldose/healthcheck.py gcs       # Ray head: a gcs_server and a raylet run in this container

Exit status 0 healthy, 1 not (the reason on stderr).  ``ray health-check`` would also do for the head, but it
imports Ray (≈2 s of CPU every interval); the process check is enough to see a crashed head, and a head that
hangs shows up in the API's /readyz (``checks.ray``).
"""

from __future__ import annotations

import os
import sys
import urllib.request


def _processes() -> set[str]:
    names = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    names.add(f.read().strip())
            except OSError:
                continue
    return names


def check(kind: str) -> str | None:
    """None when healthy, else why not."""
    if kind == "http":
        port = os.environ.get("VOXELDOSE_PORT", "8000")
        url = f"http://127.0.0.1:{port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=4) as r:
                return None if r.status == 200 else f"{url}: HTTP {r.status}"
        except OSError as exc:
            return f"{url}: {exc}"
    if kind in ("raylet", "gcs"):
        running = _processes()
        # /proc/<pid>/comm holds at most 15 characters: "gcs_server" and "raylet" fit
        wanted = {"raylet"} | ({"gcs_server"} if kind == "gcs" else set())
        missing = wanted - running
        return f"not running: {', '.join(sorted(missing))}" if missing else None
    return f"unknown check {kind!r} (http, raylet, gcs)"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    why = check(argv[0])
    if why:
        print(f"unhealthy: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
