"""The attack campaign of issue 14, the longer run: a real ``voxeldose serve`` (its DICOM node, trigger and Ray)
on a temporary data folder, then

1. the DICOM mutation corpus of tests/fuzzcorpus.py (default 500 cases: one damaged instance each, with its
   valid carrier SPECT when the damage is on a CT or RTSTRUCT) — through the node (pynetdicom C-STORE, one
   association per case) and, every ``--stow-every``-th case and every case that damages the file meta, through
   STOW-RS over HTTP; then the trigger's rounds until every patient that has a stored instance has a row in
   ``GET /v1/dicom/cycles``;
2. schemathesis over the OpenAPI, over real HTTP, with each role (no token, submitter, physicist, admin),
   ``--examples`` examples per operation, generation mode and role.

Prints the counts (requests, 5xx, node crashes — the serve process gone or C-ECHO unanswered after the corpus,
trigger tracebacks in the service log, cycles shown as errors, bad instances neither refused nor shown as an
error, by kind), lines of the service log naming a test patient, and wall times; ``--json`` writes them.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_campaign.py [--cases 500] [--examples 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.py, fuzzcorpus.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))  # serverproc.py
import fuzzcorpus
import serverproc
import support

SCU = "FUZZER"
AET = "VOXELDOSE"
ROLES = ("anonymous", "submitter", "physicist", "admin")


def push_corpus(
    server: serverproc.ServerProc, token: str, cases: list[fuzzcorpus.Mutant], work: Path, stow_every: int
) -> dict[str, Any]:
    """Send every case; returns {index: (route, stored)} and counts."""
    routes: dict[int, str] = {}
    stored: dict[int, bool] = {}
    carriers_refused = 0
    http_5xx = 0
    requests = 0
    assert server.dicom_port is not None
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        for m in cases:
            if m.stow_only or m.index % stow_every == stow_every - 1:
                routes[m.index] = "stow"
                r = client.post(
                    "/dicomweb/studies",
                    content=fuzzcorpus.stow_body(m),
                    headers={"Authorization": f"Bearer {token}", "Content-Type": fuzzcorpus.STOW_CONTENT_TYPE},
                )
                requests += 1
                http_5xx += r.status_code >= 500
                ctype = r.headers.get("content-type", "")
                body = r.json() if ctype.startswith("application/dicom+json") else None
                stored[m.index] = m.sop_instance_uid in fuzzcorpus.stow_stored(ctype, body)
            else:
                routes[m.index] = "c-store"
                carrier, status = fuzzcorpus.c_store(server.dicom_port, m, work / "send", scu=SCU, aet=AET)
                carriers_refused += carrier != 0
                stored[m.index] = status == 0
    return {
        "routes": routes,
        "stored": stored,
        "stow_requests": requests,
        "stow_5xx": http_5xx,
        "carriers_refused": carriers_refused,
    }


def files_naming(ids: set[str], roots: list[Path], since: float, skip: Path) -> list[str]:
    """Files under ``roots`` (not below ``skip``) modified after ``since`` (epoch s) whose bytes contain one of
    ``ids`` — the corpus' PatientIDs and names, unique to this run."""
    needles = [i.encode() for i in ids]
    hits = []
    for root in roots:
        if not root.exists():
            continue
        walk = root.rglob("*") if root != Path(tempfile.gettempdir()) else root.iterdir()  # /tmp: top level only
        for p in walk:
            try:
                if skip in p.parents or p == skip or not p.is_file() or p.stat().st_mtime < since:
                    continue
                data = p.read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                hits.append(str(p))
    return hits


def cycles_by_patient(server: serverproc.ServerProc, token: str) -> dict[str, set[str]]:
    r = httpx.get(server.base_url + "/v1/dicom/cycles", headers={"Authorization": f"Bearer {token}"}, timeout=120)
    r.raise_for_status()
    out: dict[str, set[str]] = {}
    for row in r.json():
        out.setdefault(row["patient_id"], set()).add(row["state"])
    return out


def _one_role(schema: Any, role: str, headers: dict[str, str], examples: int) -> dict[str, Any]:
    """Every operation of ``schema``, positive and negative generation, ``examples`` each, with ``headers``."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    statuses: Counter[int] = Counter()
    server_errors: list[str] = []

    def run_operation(op: Any, mt: str | None, mode: Any) -> None:
        kwargs = {"media_type": mt} if mt else {}

        @given(case=op.as_strategy(generation_mode=mode, **kwargs))
        @settings(
            max_examples=examples,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,  # the same requests on every run: figures comparable between runs
        )
        def check(case: Any) -> None:
            if role == "anonymous" and case.headers:
                case.headers.pop("Authorization", None)
            resp = case.call(headers=headers, timeout=120)
            statuses[resp.status_code] += 1
            if resp.status_code >= 500:
                server_errors.append(f"{op.label} {resp.status_code} {resp.text[:200]}")

        try:
            check()
        except Unsatisfiable:
            pass  # an operation with nothing to get wrong (e.g. /healthz) in the negative mode

    for result in schema.get_all_operations():
        op = result.ok()
        media: list[str | None] = [None]
        if op.method.upper() == "POST" and op.path == "/v1/jobs":
            media = ["multipart/form-data", "application/json"]
        for mt, mode in itertools.product(media, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
            run_operation(op, mt, mode)
    return {
        "requests": sum(statuses.values()),
        "5xx": sum(n for s, n in statuses.items() if s >= 500),
        "statuses": dict(sorted(statuses.items())),
        "server_errors": server_errors[:20],
    }


def run_schemathesis(base_url: str, tokens: dict[str, str], examples: int) -> dict[str, Any]:
    """Schemathesis over /openapi.json (real HTTP) with each role: requests, 5xx and statuses per role."""
    import schemathesis

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    return {
        role: _one_role(
            schema, role, {} if role == "anonymous" else {"Authorization": f"Bearer {tokens[role]}"}, examples
        )
        for role in ROLES
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=500, help="mutation cases (damaged instances), default 500")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--stow-every", type=int, default=4, help="every n-th case through STOW-RS (default 4)")
    ap.add_argument("--examples", type=int, default=40, help="schemathesis examples per operation, mode and role")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (the service log, the data)")
    args = ap.parse_args()

    from voxeldose.phantom import PhantomSettings, write_phantom

    root = Path(tempfile.mkdtemp(prefix="bench-campaign-"))
    figures: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()} nproc={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.1f} python={platform.python_version()}",
        "cases": args.cases,
        "seed": args.seed,
    }
    t0, started_at = time.monotonic(), time.time()
    write_phantom(root / "phantom", PhantomSettings.small())
    cases = fuzzcorpus.corpus(root / "phantom" / "dicom", args.cases, args.seed)
    figures["corpus_s"] = round(time.monotonic() - t0, 1)
    figures["instances"] = len(cases) + sum(1 for m in cases if m.carrier)
    ids = {m.patient_id for m in cases} | {f"{fuzzcorpus.PATIENT_PREFIX}^CASE"}

    data = root / "data"
    data.mkdir()
    tokens = {r: serverproc.create_token(data, f"bench-{r}", r) for r in ROLES[1:]}
    server = serverproc.ServerProc(
        data,
        root / "server.log",
        min_free_disk_mb=64,
        dicom_min_free_mb=0,
        dicom_allowed_aets=json.dumps([SCU]),
        dicom_quiet_period_s=600,
        trigger_interval_s=1,
        ray_num_cpus=1,
    )
    server.start()
    try:
        t1 = time.monotonic()
        sent = push_corpus(server, tokens["submitter"], cases, root, args.stow_every)
        figures["push_s"] = round(time.monotonic() - t1, 1)
        alive = server.proc is not None and server.proc.poll() is None
        echo_ok = alive and fuzzcorpus.echo(server.dicom_port or 0, scu=SCU, aet=AET)
        figures["node_crashes"] = int(not (alive and echo_ok))

        # every patient with a stored instance (and its PatientID) gets a row once the trigger looked
        expected = {m.patient_id for m in cases if m.carrier or (sent["stored"][m.index] and m.expect != "orphan")}
        t2 = time.monotonic()
        rows = support.wait_for(
            lambda: cycles_by_patient(server, tokens["physicist"]),
            until=lambda seen: expected <= set(seen),
            timeout_s=support.STATE_WAIT_S * 3,
            interval_s=1.0,
            what="a cycle row for every patient with a stored instance",
            context=server.log_tail,
        )
        figures["trigger_s"] = round(time.monotonic() - t2, 1)
        wrong: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        for m in cases:
            states = rows.get(m.patient_id, set())
            key = f"{m.kind} on {m.target}"
            if not sent["stored"][m.index]:
                refused[key] += 1
            if m.expect == fuzzcorpus.BAD and sent["stored"][m.index] and "error" not in states:
                wrong[f"bad, waiting: {key}"] += 1
            if m.expect == fuzzcorpus.GOOD and (not sent["stored"][m.index] or "error" in states):
                wrong[f"good, refused or error: {key}"] += 1
        log = server.log_path.read_text(errors="replace")
        figures.update(
            c_stores=sum(1 for r in sent["routes"].values() if r == "c-store") * 2,
            stow_requests=sent["stow_requests"],
            stow_5xx=sent["stow_5xx"],
            carriers_refused=sent["carriers_refused"],
            damaged_refused=sum(refused.values()),
            cycles_error=sum(1 for s in rows.values() if "error" in s),
            patients_with_rows=len(rows),
            trigger_tracebacks=log.count("Traceback"),
            service_log_lines_naming_a_test_patient=sum(1 for line in log.splitlines() if any(i in line for i in ids)),
            verdicts_not_met=dict(sorted(wrong.items())),
        )
        t3 = time.monotonic()
        figures["schemathesis"] = run_schemathesis(server.base_url, tokens, args.examples)
        figures["schemathesis_s"] = round(time.monotonic() - t3, 1)
        figures["http_requests"] = sent["stow_requests"] + sum(r["requests"] for r in figures["schemathesis"].values())
        figures["http_5xx"] = sent["stow_5xx"] + sum(r["5xx"] for r in figures["schemathesis"].values())
        alive = server.proc is not None and server.proc.poll() is None
        figures["node_crashes"] += int(not (alive and fuzzcorpus.echo(server.dicom_port or 0, scu=SCU, aet=AET)))
        log = server.log_path.read_text(errors="replace")
        figures["trigger_tracebacks"] = log.count("Traceback")
        figures["service_log_lines_naming_a_test_patient"] = sum(
            1 for line in log.splitlines() if any(i in line for i in ids)
        )
    finally:
        server.stop()
    # issue 14 "Done when": no test patient's identifiers in Ray's logs or /tmp (the service log: above)
    figures["files_in_tmp_or_ray_naming_a_test_patient"] = files_naming(
        ids, [Path(tempfile.gettempdir()), Path(tempfile.gettempdir()) / "ray"], started_at, root
    )
    figures["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
