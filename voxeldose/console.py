"""Running a job in the terminal: progress lines, the outputs, the dose table and the warnings.

Shared by ``voxeldose run`` (:mod:`voxeldose.cli`) and ``voxeldose demo`` (:mod:`voxeldose.demo`).
"""

from __future__ import annotations

import time
from pathlib import Path

from .pipeline import Progress, Result, run, write_outputs
from .report import console_table
from .spec import JobSpec


def progress_printer() -> Progress:
    """A progress callback that prints each finished stage with its wall time (s)."""
    last: dict[str, str | None] = {"stage": None}
    started = [time.perf_counter()]

    def progress(stage: str, frac: float) -> None:
        if stage != last["stage"]:
            now = time.perf_counter()
            if last["stage"] is not None:
                print(f"  {last['stage']:<14} done in {now - started[0]:5.1f} s", flush=True)
            last["stage"] = stage
            started[0] = now

    return progress


def run_and_write(spec: JobSpec, out: Path) -> tuple[Result, dict[str, Path]]:
    """Run the pipeline with progress lines, write the outputs into ``out``, print the dose table."""
    result = run(spec, progress=progress_printer())
    paths = write_outputs(result, out)
    print()
    print(console_table(result.summary))
    for w in result.warnings:
        print(f"warning: {w}")
    print()
    for key, p in paths.items():
        print(f"{key:<8} {p}")
    return result, paths
