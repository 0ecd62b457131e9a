"""Run the numbered notebooks with papermill, for one seed or several, in parallel where they allow.

    python -m cip_helpers.run --profile quick                    # the whole course, seed 0
    python -m cip_helpers.run --profile quick --seeds 0,1,2      # per seed, then the aggregate
    python -m cip_helpers.run --profile smoke --only 01,03
    python -m cip_helpers.run --profile full --set dataset=cifar100 --set tag=full-cifar100

Executed copies go to ``results/<profile>/seed-<k>/executed/``. With two or more seeds the runner
then aggregates the seeds (``report.write_seed_aggregate``: ``summary.json`` and ``table.md`` with
mean, sd and n per row in ``results/<profile>/``). Wall times go to ``results/<profile>/timings.json``
under the run's seed list. Stops at the first failing notebook and exits non-zero, naming the
notebook, the seed and the failing cell.

**Scheduling.** Notebooks are jobs with dependencies (:data:`DEPENDS`): 01 -> 02, then 03-10 need
only 02 (10 also 09), and 11 needs everything of every seed in the run. Each job is a separate
process (a fresh kernel) with a FIXED number of torch threads (:data:`THREADS`: 2 for 01, 02 and
11, which run alone in a one-seed run, 1 for the rest), and ``--jobs`` CPU slots are filled greedily. A notebook's
numbers therefore never depend on how many jobs ran beside it: same machine, same seed, same
numbers. (Two 1-thread jobs do twice the work of one in the same time here; one 2-thread job only
1.3x, measured on the 2-core course machine: so parallel lanes beat threads.)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .config import PROFILES, REPO_ROOT, Profile, get_profile
from .store import read_json, write_json

NOTEBOOK_DIR = REPO_ROOT / "notebooks"

THREADS = {"01": 2, "02": 2, "11": 2}
"""torch threads per notebook (default 1). Fixed per notebook so results do not depend on --jobs:
2 for the notebooks that run alone on the critical path of a one-seed run (01, 02 and 11)."""

DEPENDS = {"02": ("01",), "10": ("09",)}
"""Prerequisites within one seed; every other notebook from 03 on needs 02, which trains the
OE-tuned victims and computes their thresholds (see :func:`prerequisites`)."""

PRIORITY = ("01", "02", "09", "08", "07", "10", "03", "06", "04", "05", "11")
"""Order in which ready notebooks are started: 09 first (10 waits for it), then the longest, so
the lanes finish together (on quick, one seed: 09 then 07 on one lane, 08 then 10 on the other)."""


def list_notebooks(only: list[str] | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks (``NN_*.ipynb``) in order, optionally only those whose number is in ``only``."""
    books = sorted(p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {o.strip().zfill(2) for o in only if o.strip()}
        missing = wanted - {p.name[:2] for p in books}
        if missing:
            raise SystemExit(f"no notebook numbered {sorted(missing)} in {notebook_dir}")
        books = [p for p in books if p.name[:2] in wanted]
    return books


def prerequisites(number: str, present: set[str]) -> set[str]:
    """The notebooks (numbers, among ``present``) that must finish before ``number`` of the SAME
    seed starts: 02 needs 01, 10 needs 09, 03-10 need 02 (it writes the thresholds), and 11 needs
    every other notebook (and, in :func:`schedule`, every seed)."""
    if number == "11":
        return present - {"11"}
    if number in DEPENDS:
        return set(DEPENDS[number]) & present
    if number > "02":
        return {"02"} & present
    return set()


def execute_one(path: Path, profile: str, out_path: Path, overrides: dict, cell_timeout: int) -> None:
    """Execute one notebook with papermill in THIS process (the worker side of the runner)."""
    import papermill as pm

    out_path.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(path), str(out_path), cwd=str(path.parent),
                        parameters={"profile": profile, "overrides": overrides},
                        kernel_name="python3", progress_bar=False, log_output=False,
                        execution_timeout=cell_timeout or None)


@dataclass
class Job:
    """One notebook of one seed."""

    seed: int
    book: Path
    threads: int
    needs: set[tuple[int, str]] = field(default_factory=set)
    proc: subprocess.Popen | None = None
    log: typing.IO[str] | None = None
    start: float = 0.0
    seconds: float | None = None

    @property
    def key(self) -> tuple[int, str]:
        return self.seed, self.book.name[:2]


def _failed_cell(exc: Exception) -> str:
    cell = getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    return f"cell [{cell}]: {ename}: {evalue}"


def schedule(books: list[Path], seeds: list[int], jobs: int) -> list[Job]:
    """The jobs of a run with their prerequisites (notebook 11 waits for every seed)."""
    present = {b.name[:2] for b in books}
    out = []
    for seed in seeds:
        for book in books:
            n = book.name[:2]
            needs = {(seed, p) for p in prerequisites(n, present)}
            if n == "11":
                needs |= {(s, p) for s in seeds for p in present - {"11"}}
            out.append(Job(seed, book, min(THREADS.get(n, 1), jobs), needs))
    return out


def run_jobs(job_list: list[Job], profile: str, overrides: dict, cfg_for: dict[int, Profile],
             jobs: int, cell_timeout: int) -> tuple[bool, str]:
    """Run ``job_list`` on ``jobs`` CPU slots; returns ``(ok, failure message)``. On a failure no new
    job starts, the running ones are stopped, and the message names notebook, seed and cell."""
    pending = sorted(job_list, key=lambda j: (PRIORITY.index(j.book.name[:2])
                                              if j.book.name[:2] in PRIORITY else len(PRIORITY), j.seed))
    running: list[Job] = []
    try:
        return _run_loop(pending, running, profile, overrides, cfg_for, jobs, cell_timeout)
    finally:  # Ctrl-C or an error in the runner: no worker or kernel is left behind
        for job in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.proc.pid, signal.SIGTERM)


def _run_loop(pending: list[Job], running: list[Job], profile: str, overrides: dict,
              cfg_for: dict[int, Profile], jobs: int, cell_timeout: int) -> tuple[bool, str]:
    done: set[tuple[int, str]] = set()
    total = len(pending)
    while pending or running:
        free = jobs - sum(j.threads for j in running)
        for job in list(pending):
            if job.needs <= done and job.threads <= free:
                cfg = cfg_for[job.seed]
                out = cfg.results_dir / "executed" / job.book.name
                env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads),
                       "CIP_BATCH": "1"}  # slider cells draw their default view (plots.slider_view)
                arg = json.dumps({"path": str(job.book), "profile": profile, "out": str(out),
                                  "overrides": {**overrides, "seed": job.seed}, "cell_timeout": cell_timeout})
                job.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: never blocks
                job.proc = subprocess.Popen([sys.executable, "-m", "cip_helpers.run", "--worker", arg],
                                            env=env, stdout=subprocess.DEVNULL, stderr=job.log, text=True,
                                            start_new_session=True)  # its kernel is in its group
                job.start = time.perf_counter()
                running.append(job)
                pending.remove(job)
                free -= job.threads
                print(f"  start  seed {job.seed} {job.book.name} ({job.threads} thread"
                      f"{'s' if job.threads > 1 else ''})", flush=True)
        time.sleep(0.2)
        for job in list(running):
            if job.proc.poll() is None:
                continue
            running.remove(job)
            job.log.seek(0)
            err = job.log.read()
            job.log.close()
            job.seconds = round(time.perf_counter() - job.start, 1)
            if job.proc.returncode != 0:
                for other in running:  # stop the worker AND its kernel (same process group)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(other.proc.pid, signal.SIGTERM)
                for other in running:
                    other.proc.wait()
                running.clear()
                lines = [ln for ln in err.strip().splitlines() if ln.startswith("CIP-RUN-FAILED ")]
                if lines:
                    why = lines[-1][len("CIP-RUN-FAILED "):]
                elif job.proc.returncode < 0:
                    why = f"an unknown cell: the job was stopped by signal {-job.proc.returncode}"
                else:
                    why = f"an unknown cell (exit status {job.proc.returncode}): {err.strip()[-500:]}"
                out = cfg_for[job.seed].results_dir / "executed" / job.book.name
                return False, (f"{job.book.name} (seed {job.seed}) failed in {why}\n"
                               f"the partly executed copy is {out}")
            done.add(job.key)
            print(f"  done   seed {job.seed} {job.book.name} in {job.seconds:.1f} s "
                  f"[{len(done)}/{total}]", flush=True)
    return True, ""


def parse_overrides(items: list[str]) -> dict:
    """``["a=1", "tag=x"]`` -> ``{"a": 1, "tag": "x"}`` (JSON values where they parse)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (distinct non-negative integers, order kept)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds expects comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"--seeds expects distinct non-negative integers, got {text!r}")
    return seeds


def _worker(arg: str) -> int:
    spec = json.loads(arg)
    try:
        execute_one(Path(spec["path"]), spec["profile"], Path(spec["out"]), spec["overrides"],
                    spec["cell_timeout"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print("CIP-RUN-FAILED " + _failed_cell(exc).replace("\n", " "), file=sys.stderr, flush=True)
        return 1
    return 0


def _absolute_roots() -> None:
    """Resolve relative ``CIP_RESULTS_ROOT`` / ``CIP_DATA_ROOT`` against the directory the command
    was run from, once, so every kernel (which runs in notebooks/) sees the same absolute path."""
    for var in ("CIP_RESULTS_ROOT", "CIP_DATA_ROOT"):
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).expanduser().resolve())


def main(argv: list[str] | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> int:
    """Command-line entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 01,03")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds, e.g. 0,1,2 (default: the profile's seed); two or "
                             "more also write the aggregate summary.json / table.md")
    parser.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)),
                        help="CPU slots for parallel notebooks (default: the number of cores, at most 8)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one profile field in every notebook (value parsed as JSON "
                             "when possible), e.g. --set dataset=cifar100 --set tag=full-cifar100")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    _absolute_roots()

    overrides = parse_overrides(args.set)
    if args.seeds is not None and "seed" in overrides:
        raise SystemExit("give the seed either with --seeds or with --set seed=..., not both")
    seeds = parse_seeds(args.seeds) if args.seeds else [int(overrides.pop("seed", PROFILES[args.profile].seed))]
    cfg_for = {s: get_profile(args.profile, **{**overrides, "seed": s}) for s in seeds}
    books = list_notebooks(args.only.split(",") if args.only else None, notebook_dir)
    if not books:
        raise SystemExit(f"no notebooks found in {notebook_dir}")
    first = cfg_for[seeds[0]]
    print(f"running {len(books)} notebook(s) x {len(seeds)} seed(s) on profile '{args.profile}' "
          f"-> {first.profile_dir}/seed-<k>/executed ({args.jobs} CPU slot(s))", flush=True)
    job_list = schedule(books, seeds, args.jobs)
    start = time.perf_counter()
    ok, why = run_jobs(job_list, args.profile, overrides, cfg_for, args.jobs, first.cell_timeout)
    wall = round(time.perf_counter() - start, 1)
    if not ok:
        print(f"\n{why}", file=sys.stderr)
        return 1
    per_seed = {f"seed-{s}": {j.book.stem: j.seconds for j in job_list if j.seed == s} for s in seeds}
    print("\nwall time per notebook (seconds; parallel jobs overlap):")
    for s, times in per_seed.items():
        print(f"  {s}: " + ", ".join(f"{name[:2]} {sec:.0f}" for name, sec in times.items()))
    print(f"  total wall time {wall:.1f} s")
    if not args.only:  # a partial run must not overwrite the record of a full one
        record_timings(first, seeds, args.jobs, wall, per_seed)
        if len(seeds) >= 2:
            from . import report

            paths = report.write_seed_aggregate(first.profile_dir, seeds)
            print("aggregate over seeds " + ",".join(map(str, seeds)) + ": "
                  + ", ".join(str(p) for p in paths))
            if first.profile_dir == REPO_ROOT / "results" / "quick":  # the README quotes this one
                changed = report.update_readme(REPO_ROOT / "README.md", first.profile_dir / "summary.json")
                print("README.md results block " + ("rewritten" if changed else "unchanged"))
    return 0


def record_timings(cfg: Profile, seeds: list[int], jobs: int, wall: float, per_seed: dict) -> Path:
    """Add this run to ``<profile_dir>/timings.json`` under ``"seeds=<list>"`` (other runs kept)."""
    path = cfg.profile_dir / "timings.json"
    old = read_json(path) if path.exists() else {}
    runs = old.get("runs", {}) if isinstance(old.get("runs"), dict) else {}
    runs["seeds=" + ",".join(map(str, seeds))] = {
        "seeds": seeds, "jobs": jobs, "wall_seconds": wall, "notebook_seconds": per_seed,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(terse=True)},
        "date": datetime.date.today().isoformat()}
    return write_json(path, {"profile": cfg.name, "runs": runs})


if __name__ == "__main__":
    sys.exit(main())
