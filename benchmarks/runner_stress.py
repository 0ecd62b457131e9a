"""Stress test of the batch runner on the widget notebooks (issue 14, case 11): does it always end?

    python benchmarks/runner_stress.py                        # 01,02 once, then 03,05 x 10
    python benchmarks/runner_stress.py --mode all --reps 10   # 01,02,03,05 x 10 (about 2x longer)
    python benchmarks/runner_stress.py --out benchmarks/runner_stress.txt

Notebooks 03 and 05 hold the slider cells (``plots.slider_view``) whose ``widgets.interactive``
deadlocked under papermill (notebook 03: 3 hangs in 5 tries of ``--only 01,02,03``). Every run is
``python -m cip_helpers.tools.run --profile smoke --only ...`` in a fresh process on one temporary
``CIP_RESULTS_ROOT`` (so 01/02 train once and later runs load their checkpoints), under a hard
wall-clock limit (``--limit``, far above a normal run, far below the smoke profile's 600 s cell
timeout): a run still going at the limit is counted as a HANG and stopped (SIGTERM to the runner,
which stops its workers; then SIGKILL). After every run, processes that carry the run's marker in
their environment (runner, workers, kernels) are counted as LEFT BEHIND and killed.

``--mode split`` (default) runs 01,02 once and then repeats only 03,05: ten full rounds of
01,02,03,05 take about 20 minutes on the shared 2-core course machine, too close to the budget.
Exit status 0 when every run completed with no hang and nothing left behind.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MARKER_ENV = "CIP_STRESS_MARKER"


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose environment holds ``CIP_STRESS_MARKER=marker`` (this run's tree, orphans too)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARKER_ENV) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def run_once(only: str, root: Path, limit: float, jobs: int) -> tuple[str, float, int, str]:
    """One runner invocation; returns ``(status, seconds, processes left behind, last stderr line)``
    with status ``ok``, ``FAILED (exit k)`` or ``HANG``."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "CIP_RESULTS_ROOT": str(root), MARKER_ENV: marker}
    cmd = [sys.executable, "-m", "cip_helpers.tools.run", "--profile", "smoke", "--only", only, "--jobs", str(jobs)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = "HANG"
        proc.send_signal(signal.SIGTERM)  # the runner stops its workers and their kernels
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    seconds = time.perf_counter() - start
    time.sleep(1.0)  # an orphaned kernel notices its dead parent within about a second
    left = marked_processes(marker)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    last = next((ln for ln in reversed((err or "").strip().splitlines()) if ln.strip()), "")
    return status, seconds, len(left), last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="repetitions of the widget notebooks (default 10)")
    parser.add_argument("--mode", choices=("split", "all"), default="split",
                        help="split: 01,02 once, then 03,05 x reps; all: 01,02,03,05 x reps")
    parser.add_argument("--limit", type=float, default=300.0, help="hard wall-clock limit per run, seconds")
    parser.add_argument("--jobs", type=int, default=2, help="the runner's --jobs (CPU slots)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    from cip_helpers.tools import run as runner

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    threads = ", ".join(f"{n}: {t}" for n, t in sorted(runner.THREADS.items()))
    say(f"runner stress test (issue 14, case 11), {datetime.datetime.now().isoformat(timespec='seconds')}")
    say("command: python benchmarks/runner_stress.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    say(f"machine: {os.cpu_count()} cores, {platform.platform(terse=True)}, Python {platform.python_version()}, "
        f"load average at start {os.getloadavg()[0]:.2f} (the course machine, shared with other work)")
    say(f"torch threads per notebook: {threads}, others 1 (OMP/MKL_NUM_THREADS set by the runner); "
        f"--jobs {args.jobs}; CIP_BATCH=1 in every kernel")
    say(f"each run: python -m cip_helpers.tools.run --profile smoke --only <notebooks> --jobs {args.jobs}, "
        f"hard limit {args.limit:.0f} s; profile cell_timeout "
        f"{runner.get_profile('smoke').cell_timeout} s")
    if args.mode == "split":
        plan = [("01,02", "warm-up")] + [("03,05", "widget")] * args.reps
        say(f"mode split: 01,02 once (trains the victims and OE models), then only the widget notebooks "
            f"03,05 x {args.reps}, reusing the checkpoints (10 rounds of 01,02,03,05 take about 20 min here)")
    else:
        plan = [("01,02,03,05", "widget")] * args.reps
        say(f"mode all: 01,02,03,05 x {args.reps} (the first run trains, later runs load checkpoints)")
    say()
    counts = {"ok": 0, "hang": 0, "failed": 0, "left": 0}
    widget_runs = 0
    total_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cip_stress_") as tmp:
        root = Path(tmp) / "results"
        for i, (only, kind) in enumerate(plan):
            status, seconds, left, last = run_once(only, root, args.limit, args.jobs)
            label = f"run {i:2d} ({kind}, --only {only})"
            say(f"{label:<34} {status:<16} {seconds:7.1f} s"
                + (f"  {left} process(es) LEFT BEHIND" if left else "")
                + (f"  [{last[:160]}]" if status != "ok" else ""))
            counts["left"] += left
            if kind == "widget":
                widget_runs += 1
                counts["ok" if status == "ok" else "hang" if status == "HANG" else "failed"] += 1
            elif status != "ok":
                say("warm-up failed: no point in repeating the widget notebooks")
                return 1
    say()
    say(f"total {time.perf_counter() - total_start:.0f} s")
    summary = f"{counts['ok']} of {widget_runs} completed, {counts['hang']} hangs"
    if counts["failed"]:
        summary += f", {counts['failed']} failed"
    summary += f", {counts['left']} processes left behind"
    say(summary)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0 if counts["ok"] == widget_runs and counts["left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
