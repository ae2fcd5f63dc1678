"""Service benchmark: N jobs submitted at once to a real ``voxeldose serve`` with a warm Ray.

    .venv/bin/python benchmarks/bench_service.py [--jobs 100] [--json out.json] [--keep DIR] [--accept-only]

1. writes the small phantom, starts ``voxeldose serve`` (subprocess, own session, free loopback port, SQLite in a
   temp data folder, default settings: ``jobs_in_flight`` 2, ``dispatch_interval_s`` 0.5), makes a physicist
   token with ``voxeldose token create``;
2. warm-up: one job run to success (Ray workers started, the pipeline imported in them);
3. N distinct jobs (same upload, ``cycle_number`` 1..N — a different spec is a different job) submitted at once
   from N threads;
4. one poller lists ``/v1/jobs?state=running`` every 0.1 s and notes when each job is first seen running (polling
   N jobs one by one at 10 Hz each would itself load the 2-core server); the server's ``created_at`` /
   ``started_at`` / ``finished_at`` give the same times without polling error;
5. checks: all N ``succeeded``, each once (ids unique, attempts 1), ``/v1/jobs`` total = N + 1.

``--accept-only``: steps 1-3 only (no warm-up, the jobs not awaited): the time to 202 of N concurrent uploads, for a
machine where N whole jobs do not fit in the time at hand; the "all succeed once" check is then not made.

Figures (seconds):
- *accept*: POST → 202 (upload received, fsynced and hashed, job queued: issue 15 — the DICOM checks are the job's
  first stage; before that change they came before the 202), under N concurrent uploads;
- *submit→running*: 202 → first seen running.  With 2 jobs in flight this is mostly queueing (job k waits for
  ~k/2 jobs before it);
- *dispatch latency*: ``started_at`` − the moment a slot was free for the job (max of its ``created_at`` and
  the last ``finished_at`` before it started).  ``finished_at`` is written when the dispatcher collects the
  result, and it claims the next job in the same round, so this is ~0 once the queue is full; the time from the
  worker's return to that collection (up to ``dispatch_interval_s``) is not in it;
- *first-slot submit→running*: submit→running of the jobs that found a free slot (the first 2).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.py, imported by serverproc
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))
import serverproc
from serverproc import auth, submit, wait_for


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "median": statistics.median(xs) if xs else float("nan"),
        "p95": pct(xs, 0.95),
        "max": max(xs) if xs else float("nan"),
        "min": min(xs) if xs else float("nan"),
    }


def fmt(s: dict[str, float]) -> str:
    return f"median {s['median']:.3f}  p95 {s['p95']:.3f}  max {s['max']:.3f}  (min {s['min']:.3f}, n={s['n']})"


def ts(s: str | None) -> float | None:
    return None if s is None else datetime.fromisoformat(s).timestamp()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=3600.0, help="for all jobs to finish, s")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--keep", type=Path, default=None, help="data folder to use and keep (default: a temp one)")
    ap.add_argument("--accept-only", action="store_true", help="measure the time to 202 only (see the doc)")
    args = ap.parse_args(argv)

    from voxeldose.phantom import PhantomSettings, write_phantom

    tmp = tempfile.TemporaryDirectory(prefix="bench-service-")
    root = Path(tmp.name)
    data_dir = args.keep or root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_phantom(root / "phantom", PhantomSettings.small())
    truth = json.loads((root / "phantom" / "truth" / "truth.json").read_text())
    payload = serverproc.zip_folder(root / "phantom" / "dicom")
    base_spec = {"calibration": {"cps_per_mbq": truth["calibration_cps_per_mbq"]}}
    token = serverproc.create_token(data_dir, "bench", "physicist")
    server = serverproc.ServerProc(data_dir, root / "server.log", min_free_disk_mb=64)
    t0 = time.monotonic()
    server.start()
    print(f"server ready in {time.monotonic() - t0:.1f} s on {server.base_url} (log {root / 'server.log'})", flush=True)
    out: dict = {}
    try:
        client = httpx.Client(
            base_url=server.base_url,
            timeout=600,
            limits=httpx.Limits(max_connections=args.jobs + 10, max_keepalive_connections=args.jobs + 10),
        )

        # ---- warm-up
        if not args.accept_only:
            t0 = time.monotonic()
            r = submit(client, token, payload, {**base_spec, "limits": {"planned_activity_mbq": 7000.0}})
            assert r.status_code == 202, r.text
            warm_id = r.json()["id"]
            wait_for(client, token, warm_id, ["succeeded"], timeout=600, server=server)
            warm_s = time.monotonic() - t0
            print(f"warm-up job succeeded in {warm_s:.1f} s", flush=True)

        # ---- poller
        seen_running: dict[str, float] = {}
        stop = threading.Event()
        poll_errors = [0]

        def poll() -> None:
            with httpx.Client(base_url=server.base_url, timeout=30) as pc:
                while not stop.is_set():
                    t = time.time()
                    try:
                        rr = pc.get("/v1/jobs", params={"state": "running", "limit": 50}, headers=auth(token))
                        for j in rr.json()["items"]:
                            seen_running.setdefault(j["id"], t)
                    except Exception:  # noqa: BLE001
                        poll_errors[0] += 1
                    stop.wait(max(0.0, 0.1 - (time.time() - t)))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

        # ---- N at once
        barrier = threading.Barrier(args.jobs)
        accepted: list[dict] = [None] * args.jobs  # type: ignore[list-item]

        def one(i: int) -> None:
            spec = {**base_spec, "cycle_number": i + 1}
            barrier.wait()
            t_send = time.time()
            resp = submit(client, token, payload, spec)
            t_202 = time.time()
            accepted[i] = {
                "i": i,
                "status": resp.status_code,
                "id": resp.json().get("id"),
                "t_send": t_send,
                "t_202": t_202,
                "body": resp.text if resp.status_code != 202 else None,
            }

        t_sub = time.time()
        with ThreadPoolExecutor(max_workers=args.jobs) as ex:
            list(ex.map(one, range(args.jobs)))
        submit_all_s = time.time() - t_sub
        bad = [a for a in accepted if a["status"] != 202]
        print(f"{args.jobs} submissions answered in {submit_all_s:.1f} s; non-202: {len(bad)}", flush=True)
        for a in bad[:5]:
            print("  ", a["status"], (a["body"] or "")[:300])
        ids = [a["id"] for a in accepted if a["status"] == 202]
        if args.accept_only:
            accept_only = stats([a["t_202"] - a["t_send"] for a in accepted])
            print(f"POST→202 {fmt(accept_only)}; unique ids {len(set(ids))}/{args.jobs}", flush=True)
            out = {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.node()} nproc={__import__('os').cpu_count()}",
                "jobs": args.jobs,
                "accept_only": True,
                "submit_all_s": submit_all_s,
                "non_202": len(bad),
                "unique_ids": len(set(ids)),
                "accept_s": accept_only,
            }
            stop.set()
            if args.json:
                args.json.write_text(json.dumps(out, indent=2))
            return 0 if not bad and len(set(ids)) == args.jobs else 1

        # ---- wait for all
        deadline = time.monotonic() + args.timeout
        final: dict[str, dict] = {}
        last_print = 0.0
        while time.monotonic() < deadline:
            rr = client.get("/v1/jobs", params={"limit": args.jobs + 50}, headers=auth(token)).json()
            final = {j["id"]: j for j in rr["items"] if j["id"] in set(ids)}
            states: dict[str, int] = {}
            for j in final.values():
                states[j["state"]] = states.get(j["state"], 0) + 1
            if time.monotonic() - last_print > 30:
                print(f"  t+{time.time() - t_sub:.0f} s: {states}", flush=True)
                last_print = time.monotonic()
            if sum(states.get(s, 0) for s in serverproc.TERMINAL) == len(ids):
                break
            time.sleep(1.0)
        all_done_s = time.time() - t_sub
        stop.set()
        poller.join(5)
        listing = client.get("/v1/jobs", params={"limit": 500}, headers=auth(token)).json()

        # ---- figures
        states = {}
        for j in final.values():
            states[j["state"]] = states.get(j["state"], 0) + 1
        by_id = {a["id"]: a for a in accepted if a["id"]}
        accept = [a["t_202"] - a["t_send"] for a in accepted]
        sub_run = [seen_running[i] - by_id[i]["t_202"] for i in ids if i in seen_running]
        missed = [i for i in ids if i not in seen_running]
        started = {i: ts(j["started_at"]) for i, j in final.items()}
        created = {i: ts(j["created_at"]) for i, j in final.items()}
        finished = sorted(ts(j["finished_at"]) for j in final.values() if j["finished_at"])
        warm = client.get(f"/v1/jobs/{warm_id}", headers=auth(token)).json()
        finished_all = sorted(finished + [ts(warm["finished_at"])])
        dispatch = []
        for i in ids:
            s = started.get(i)
            if s is None:
                continue
            prior = [f for f in finished_all if f <= s]
            free_at = max([created[i]] + prior[-1:])
            dispatch.append(s - free_at)
        order = sorted(ids, key=lambda i: started.get(i) or 1e18)
        first_slot = [seen_running[i] - by_id[i]["t_202"] for i in order[:2] if i in seen_running]
        server_sub_run = [started[i] - created[i] for i in ids if started.get(i)]
        run_s = [ts(j["finished_at"]) - ts(j["started_at"]) for j in final.values() if j["finished_at"]]
        attempts = sorted({j["attempts"] for j in final.values()})
        out = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} nproc={__import__('os').cpu_count()} "
            f"Python {platform.python_version()}",
            "jobs": args.jobs,
            "warmup_s": warm_s,
            "submit_all_s": submit_all_s,
            "all_done_s": all_done_s,
            "non_202": len(bad),
            "states": states,
            "unique_ids": len(set(ids)),
            "attempts": attempts,
            "list_total": listing["total"],
            "expected_total": args.jobs + 1,
            "missed_by_poller": len(missed),
            "poll_errors": poll_errors[0],
            "accept_s": stats(accept),
            "submit_to_running_s": stats(sub_run),
            "server_created_to_started_s": stats(server_sub_run),
            "dispatch_latency_s": stats(dispatch),
            "first_slot_submit_to_running_s": stats(first_slot),
            "job_run_s": stats(run_s),
            "throughput_jobs_per_min": 60.0 * states.get("succeeded", 0) / all_done_s,
        }
    finally:
        server.stop()
    print()
    print(f"machine: {out.get('machine')}   date: {out.get('date')}")
    print(f"warm-up job: {out['warmup_s']:.1f} s")
    print(f"{args.jobs} uploads at once, all answered in {out['submit_all_s']:.1f} s; POST→202 {fmt(out['accept_s'])}")
    print(f"submit→running (client, 0.1 s poll): {fmt(out['submit_to_running_s'])}")
    print(f"created→started (server clock):      {fmt(out['server_created_to_started_s'])}")
    print(f"dispatch latency (free slot→running): {fmt(out['dispatch_latency_s'])}")
    print(f"first-slot jobs submit→running:       {fmt(out['first_slot_submit_to_running_s'])}")
    print(f"job run time (started→finished):      {fmt(out['job_run_s'])}")
    print(
        f"all {args.jobs} finished {out['all_done_s']:.1f} s after the first submit "
        f"({out['throughput_jobs_per_min']:.1f} jobs/min); states {out['states']}"
    )
    print(
        f"ids unique: {out['unique_ids']}/{args.jobs}; attempts {out['attempts']}; /v1/jobs total "
        f"{out['list_total']} (expected {out['expected_total']}); non-202 {out['non_202']}; "
        f"jobs the poller never saw running {out['missed_by_poller']}"
    )
    ok = (
        out["states"].get("succeeded", 0) == args.jobs
        and out["unique_ids"] == args.jobs
        and out["list_total"] == out["expected_total"]
        and out["attempts"] == [1]
        and not out["non_202"]
    )
    print("RESULT:", "OK" if ok else "PROBLEM")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
