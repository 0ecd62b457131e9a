"""Run the numbered notebooks with papermill, for one seed or several, in parallel where they allow.

    python -m cip_helpers.tools.run --profile quick                    # the whole course, seed 0
    python -m cip_helpers.tools.run --profile quick --seeds 0,1,2      # per seed, then the aggregate
    python -m cip_helpers.tools.run --profile smoke --only 01,03
    python -m cip_helpers.tools.run --profile full --set dataset=cifar100 --set tag=full-cifar100
    python -m cip_helpers.tools.run --profile smoke --executor slurm     # one SLURM job per notebook

Executed copies go to ``results/<profile>/seed-<k>/executed/``. With two or more seeds the runner
then aggregates the seeds (``report.write_seed_aggregate``: ``summary.json`` and ``table.md`` with
mean, sd and n per row in ``results/<profile>/``). Wall times go to ``results/<profile>/timings.json``
under the run's seed list. Stops at the first failing notebook and exits non-zero, naming the
notebook, the seed and the failing cell; a cell that runs longer than the profile's
``cell_timeout`` (seconds, 0 = no limit) fails the same way, and its kernel is shut down.

``--set FIELD=VALUE`` converts VALUE by the field's declared type (``config.coerce_field``): a str
field takes the text as it is (``--set tag=2024`` is the string ``"2024"``), tuple fields take a
list literal (``--set knockoff_curve=[500,1000]``). ``CIP_RESULTS_ROOT`` / ``CIP_DATA_ROOT`` are
resolved once against the directory the command runs from and passed absolute to every kernel.

**Scheduling.** Notebooks are jobs with dependencies (:data:`DEPENDS`): 01 -> 02, then 03-10 need
only 02 (07 also 03 and 06, 08 also 06, 10 also 09), 12 needs 06, 07, 09 and 10 of its seed, and
11 needs everything of
every seed in the run; 11 and 12 also wait for the ``innocents`` task (:data:`TASKS`), which trains
the innocent models of the ownership test in a lane of its own. Each job is a separate
process (a fresh kernel) with a FIXED number of torch threads (:data:`THREADS`: 2 for 01, 02 and
11, which run alone in a one-seed run, 1 for the rest), and ``--jobs`` CPU slots are filled greedily. A notebook's
numbers therefore never depend on how many jobs ran beside it: same machine, same seed, same
numbers. (Two 1-thread jobs do twice the work of one in the same time here; one 2-thread job only
1.3x, measured on the 2-core course machine: so parallel lanes beat threads.)

**Executors.** ``--executor local`` (the default) fills this machine's slots as above;
``--executor slurm`` submits the same jobs to a SLURM cluster through submitit
(:mod:`cip_helpers.tools.cluster`: prerequisites as ``afterok`` dependencies, resources from the
profile's ``job_*`` fields). Both run the same worker command with the same thread counts, so the
metrics are the same. The local scheduler stays our own: submitit's local executor has neither
dependencies nor slot packing, and it would add a second process layer for no change in numbers.
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
from typing import Any

from ..course.config import PROFILES, REPO_ROOT, Profile, coerce_field, get_profile
from ..course.progress import BATCH_ENV
from ..course.store import read_json, write_json

NOTEBOOK_DIR = REPO_ROOT / "notebooks"

THREADS = {"01": 2, "02": 2, "11": 2}
"""torch threads per notebook (default 1). Fixed per notebook so results do not depend on --jobs:
2 for the notebooks that run alone on the critical path of a one-seed run (01, 02 and 11)."""

DEPENDS = {"02": ("01",), "07": ("03", "06"), "08": ("06",), "10": ("09",), "12": ("06", "07", "09", "10")}
"""Prerequisites within one seed; every other notebook from 03 on needs 02, which trains the
OE-tuned victims and computes their thresholds (see :func:`prerequisites`). 07 waits for 03,
whose threshold trade-off grid trains the mixed-pool CIP surrogate that 07 then reuses. 12 (the
adaptive attackers) waits for the attack notebooks (its evidence-run thieves reuse 07's mixed-pool
surrogates and run after the attacks' own runs). 06 trains AM's misinformation model of the ``all``
victim, which 07 and 08 (in the evidence run) and 12 use, so they wait for it: no two jobs train
one checkpoint or write ``am_calibration.json`` at once (the ``half`` model is trained by 09, which
10 waits for)."""

TASKS = {"innocents": ("11", "12"), "evidence": ("11",)}
"""Stages that run as jobs of their own, ahead of the notebooks that need them (task -> notebooks):
``innocents`` trains the innocent models of notebooks 11 and 12 (``pipeline.get_innocent_models``;
they need only the ID data), so that 11 (which waits for every other notebook) and 12's ownership
verdicts only load them; ``evidence`` runs the queries-to-conviction grid and the memorisation
runs (``evidence.run_evidence``; nothing unless the profile's ``evidence`` is on). A task is
scheduled (once per seed) only when one of its notebooks is in the run, and every one of them in
the run waits for it; the notebook still trains what is missing."""

TASK_NEEDS = {"evidence": ("07", "09", "10")}
"""Notebooks (of the same seed, among those in the run) a task waits for: the evidence grid reuses
the surrogates and records of the attack notebooks."""

PRIORITY = ("01", "02", "09", "06", "03", "07", "08", "10", "evidence", "innocents", "12", "04", "05", "00",
            "11")
"""Order in which ready jobs are started: 09 first (10 waits for it), 06 (07, 08 and 12 wait for
its misinformation model), 03 (07 reuses its surrogates), then the longest, so the lanes finish
together (12 is long only in the evidence run)."""


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
    seed starts: 02 needs 01, 07 needs 03 and 06, 08 needs 06, 10 needs 09, 12 needs 06, 07, 09 and
    10, 03-10 and 12 need
    02 (it writes the thresholds), and 11 needs every other notebook (and, in :func:`schedule`,
    every seed)."""
    if number == "11":
        return present - {"11"}
    needs = set(DEPENDS.get(number, ()))
    if number > "02":
        needs.add("02")
    return needs & present


class CellTimeout(Exception):
    """A cell ran longer than ``cell_timeout`` seconds. Carries the fields :func:`_failed_cell`
    reports: ``exec_count`` (the cell's ``In [k]``), ``cell_index``, ``ename``, ``evalue``."""

    def __init__(self, exec_count: int | None, cell_index: int | None, source: str, timeout: int) -> None:
        first = next((ln.strip() for ln in source.splitlines() if ln.strip()), "")
        self.exec_count, self.cell_index, self.source = exec_count, cell_index, source
        self.ename = "CellTimeoutError"
        self.evalue = (f"the cell (index {cell_index} of the executed copy, starting `{first[:80]}`) ran "
                       f"longer than cell_timeout = {timeout} s and was stopped; raise the limit with "
                       f"--set cell_timeout=SECONDS (0 = no limit)")
        super().__init__(self.evalue)


def _mark_timed_out_cell(out_path: Path, timeout: int) -> CellTimeout:
    """Find the cell that was running when ``timeout`` fired in the partly executed copy (papermill
    saves it after every cell: the last cell with a start time), mark it failed with an error
    output there, and return the :class:`CellTimeout` naming it."""
    import nbformat

    try:
        nb = nbformat.read(out_path, as_version=4)
    except (OSError, ValueError):  # no readable copy: still say what happened
        return CellTimeout(None, None, "", timeout)
    started = [i for i, c in enumerate(nb.cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    if not started:
        return CellTimeout(None, None, "", timeout)
    index = started[-1]
    cell = nb.cells[index]
    err = CellTimeout(cell.get("execution_count"), index, cell.source, timeout)
    if cell.cell_type == "code":
        cell.outputs.append(nbformat.v4.new_output("error", ename=err.ename, evalue=err.evalue, traceback=[]))
    cell.metadata.papermill.update({"status": "failed", "exception": True})
    nb.metadata.setdefault("papermill", {})["exception"] = True
    nbformat.write(nb, out_path)
    return err


def execute_one(path: Path, profile: str, out_path: Path, overrides: dict, cell_timeout: int) -> None:
    """Execute one notebook with papermill in THIS process (the worker side of the runner).

    Raises papermill's ``PapermillExecutionError`` when a cell raises, and :class:`CellTimeout`
    (naming the cell; the partly executed copy marks it) when a cell runs longer than
    ``cell_timeout`` seconds (0 = no limit). papermill shuts the kernel down in both cases."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(path), str(out_path), cwd=str(path.parent),
                            parameters={"profile": profile, "overrides": overrides},
                            kernel_name="python3", progress_bar=False, log_output=False,
                            execution_timeout=cell_timeout or None)
    except CellTimeoutError as exc:
        raise _mark_timed_out_cell(out_path, cell_timeout) from exc


def run_task(task: str, profile: str, overrides: dict) -> None:
    """Run one of :data:`TASKS` in THIS process (the worker side), with the thread count the
    runner set (``OMP_NUM_THREADS``). Raises ``ValueError`` for an unknown task."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    import torch

    from ..course import pipeline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = get_profile(profile, **overrides)
    if task == "innocents":
        pipeline.get_innocent_models(cfg, verbose=False)
    else:
        from ..course import evidence

        evidence.run_evidence(cfg)


@dataclass
class Job:
    """One notebook of one seed, or one task (:data:`TASKS`) of one seed (``task`` set; ``book``
    is then the notebook that needs it)."""

    seed: int
    book: Path
    threads: int
    needs: set[tuple[int, str]] = field(default_factory=set)
    proc: subprocess.Popen | None = None
    log: typing.IO[str] | None = None
    start: float = 0.0
    seconds: float | None = None
    task: str | None = None

    @property
    def key(self) -> tuple[int, str]:
        return self.seed, self.task or self.book.name[:2]

    @property
    def label(self) -> str:
        """The notebook's file name, or ``<task> (task for <notebook>)``."""
        return f"{self.task} (task for {self.book.name[:2]})" if self.task else self.book.name

    @property
    def stem(self) -> str:
        """The key of this job in ``timings.json``: the notebook's stem or the task's name."""
        return self.task or self.book.stem


def _failed_cell(exc: Exception) -> str:
    cell = getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    return f"cell [{cell}]: {ename}: {evalue}"


def schedule(books: list[Path], seeds: list[int], jobs: int) -> list[Job]:
    """The jobs of a run with their prerequisites: notebook 11 waits for every seed, and the
    first seed's 11 (whose executed copy is committed) also waits for the other seeds' 11, so its
    across-seeds section reads every seed's fresh ``verification.json``."""
    present = {b.name[:2] for b in books}
    out = []
    for seed in seeds:
        for book in books:
            n = book.name[:2]
            needs = {(seed, p) for p in prerequisites(n, present)}
            if n == "11":
                needs |= {(s, p) for s in seeds for p in present - {"11"}}
                if seed == seeds[0]:
                    needs |= {(s, "11") for s in seeds[1:]}
            for task, users in TASKS.items():
                if n in users:
                    if n == min(u for u in users if u in present):  # scheduled once, with its first user
                        out.append(Job(seed, book, 1, {(seed, p) for p in TASK_NEEDS.get(task, ()) if p in present},
                                       task=task))
                    needs = needs | {(seed, task)}
            out.append(Job(seed, book, min(THREADS.get(n, 1), jobs), needs))
    return out


def run_jobs(job_list: list[Job], profile: str, overrides: dict, cfg_for: dict[int, Profile],
             jobs: int, cell_timeout: int) -> tuple[bool, str]:
    """Run ``job_list`` on ``jobs`` CPU slots; returns ``(ok, failure message)``. On a failure no new
    job starts, the running ones are stopped, and the message names notebook, seed and cell."""
    pending = sorted(job_list, key=lambda j: (PRIORITY.index(j.key[1]) if j.key[1] in PRIORITY
                                              else len(PRIORITY), j.seed))
    running: list[Job] = []
    try:
        return _run_loop(pending, running, profile, overrides, cfg_for, jobs, cell_timeout)
    finally:  # Ctrl-C, SIGTERM or an error in the runner: no worker or kernel is left behind
        _stop(running, grace=15.0)


def _stop(running: list[Job], grace: float) -> None:
    """SIGTERM every running worker's process group (a worker shuts its kernel down on SIGTERM),
    then wait for each, SIGKILLing a group still there after ``grace`` seconds."""
    for job in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.proc.pid, signal.SIGTERM)
    for job in running:
        _wait_or_kill(job.proc, grace)


def _run_loop(pending: list[Job], running: list[Job], profile: str, overrides: dict,
              cfg_for: dict[int, Profile], jobs: int, cell_timeout: int) -> tuple[bool, str]:
    done: set[tuple[int, str]] = set()
    total = len(pending)
    while pending or running:
        free = jobs - sum(j.threads for j in running)
        for job in list(pending):
            if job.needs <= done and job.threads <= free:
                env = {**os.environ, **worker_env(job.threads)}
                arg = job_arg(job, profile, overrides, cfg_for[job.seed], cell_timeout)
                job.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: never blocks
                # its own process group, so a stop reaches the worker and anything it forked; the
                # kernel (jupyter_client gives it a session of its own) is shut down by the worker
                # on SIGTERM (see _worker) and exits by itself when its parent dies (ipykernel)
                job.proc = subprocess.Popen([sys.executable, "-m", "cip_helpers.tools.run", "--worker", arg],
                                            env=env, stdout=subprocess.DEVNULL, stderr=job.log, text=True,
                                            start_new_session=True)
                job.start = time.perf_counter()
                running.append(job)
                pending.remove(job)
                free -= job.threads
                print(f"  start  seed {job.seed} {job.label} ({job.threads} thread"
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
                _stop(running, grace=30.0)
                running.clear()
                why = failure_reason(err, job.proc.returncode)
                out = cfg_for[job.seed].results_dir / "executed" / job.book.name
                if job.task:
                    return False, f"{job.label} (seed {job.seed}) failed: {why}"
                return False, (f"{job.book.name} (seed {job.seed}) failed in {why}\n"
                               f"the partly executed copy is {out}")
            done.add(job.key)
            print(f"  done   seed {job.seed} {job.label} in {job.seconds:.1f} s "
                  f"[{len(done)}/{total}]", flush=True)
    return True, ""


def worker_env(threads: int) -> dict[str, str]:
    """The environment a worker of ``threads`` torch threads runs with (on top of the runner's),
    the same for every executor: thread counts, one-line progress and default slider views
    (:data:`cip_helpers.course.progress.BATCH_ENV`), and the absolute results/data roots."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), BATCH_ENV: "1"}
    env.update({v: os.environ[v] for v in ("CIP_RESULTS_ROOT", "CIP_DATA_ROOT") if os.environ.get(v)})
    return env


def job_arg(job: Job, profile: str, overrides: dict, cfg: Profile, cell_timeout: int) -> str:
    """The worker's JSON job spec for ``job`` (``python -m cip_helpers.tools.run --worker SPEC``)."""
    out = cfg.results_dir / "executed" / job.book.name
    return json.dumps({"path": str(job.book), "profile": profile, "out": str(out),
                       "overrides": {**overrides, "seed": job.seed}, "cell_timeout": cell_timeout,
                       "task": job.task})


def failure_reason(stderr: str, returncode: int) -> str:
    """The one-line reason a worker failed: its last ``CIP-RUN-FAILED`` line (``cell [k]: ename:
    evalue``), else the signal or exit status with the end of its stderr."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("CIP-RUN-FAILED ")]
    if lines:
        return lines[-1][len("CIP-RUN-FAILED "):]
    if returncode < 0:
        return f"an unknown cell: the job was stopped by signal {-returncode}"
    return f"an unknown cell (exit status {returncode}): {stderr.strip()[-500:]}"


def _wait_or_kill(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Wait for a worker told to stop; SIGKILL its process group if it is still there after ``grace`` s."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set`` items -> overrides, each VALUE converted from its text by the declared type of
    FIELD (:func:`cip_helpers.course.config.coerce_field` with ``from_text=True``):
    ``["victim_epochs=4", "tag=2024", "knockoff_curve=[500,1000]"]`` ->
    ``{"victim_epochs": 4, "tag": "2024", "knockoff_curve": (500, 1000)}``. A str field takes the
    text as it is (``dawn_key=12345`` is the string ``"12345"``).

    Raises ``SystemExit`` (a command-line error) for an item without ``=``, an unknown field, or a
    value that does not convert to the field's type (the message names field, type and value)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:  # coerce_field names an unknown field with the valid ones
            overrides[key] = coerce_field(key, value, from_text=True)
        except ValueError as err:
            raise SystemExit(f"--set {item}: {err}") from None
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


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds papermill, which shuts the kernel down


def _worker(arg: str) -> int:
    """The worker process: execute one notebook; a failure is reported as ONE stderr line
    ``CIP-RUN-FAILED cell [k]: ename: evalue`` for the parent. SIGTERM stops it cleanly."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    spec = json.loads(arg)
    try:
        if spec.get("task"):
            run_task(spec["task"], spec["profile"], spec["overrides"])
        else:
            execute_one(Path(spec["path"]), spec["profile"], Path(spec["out"]), spec["overrides"],
                        spec["cell_timeout"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print("CIP-RUN-FAILED " + _failed_cell(exc).replace("\n", " "), file=sys.stderr, flush=True)
        return 1
    return 0


@contextlib.contextmanager
def _sigterm_unwinds() -> typing.Iterator[None]:
    """While inside: SIGTERM raises ``SystemExit`` (so :func:`run_jobs` stops its workers on the
    way out) instead of ending the runner at once; the previous handler is restored after. A no-op
    outside the main thread, where signal handlers cannot be set."""
    try:
        old = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: this machine's CPU slots (default); slurm: one SLURM job per notebook "
                             "and seed through submitit, ordered by afterok dependencies, resources from the "
                             "profile's job_* fields (cip_helpers.tools.cluster); the numbers are the same")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one profile field in every notebook; VALUE is converted by the "
                             "field's declared type (str fields take the text as it is, tuples a list "
                             "literal), e.g. --set dataset=cifar100 --set tag=full-cifar100 "
                             "--set knockoff_curve=[500,1000]")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    _absolute_roots()

    overrides = parse_overrides(args.set)
    if args.seeds is not None and "seed" in overrides:
        raise SystemExit("give the seed either with --seeds or with --set seed=..., not both")
    seeds = parse_seeds(args.seeds) if args.seeds else [int(overrides.pop("seed", PROFILES[args.profile].seed))]
    try:  # out-of-range values (e.g. --set p1=120) stop here, before any notebook starts
        cfg_for = {s: get_profile(args.profile, **{**overrides, "seed": s}) for s in seeds}
    except ValueError as err:
        raise SystemExit(f"--set: {err}") from None
    books = list_notebooks(args.only.split(",") if args.only else None, notebook_dir)
    if not books:
        raise SystemExit(f"no notebooks found in {notebook_dir}")
    first = cfg_for[seeds[0]]
    where = f"{args.jobs} CPU slot(s)" if args.executor == "local" else "SLURM, one job per notebook and seed"
    print(f"running {len(books)} notebook(s) x {len(seeds)} seed(s) on profile '{args.profile}' "
          f"-> {first.profile_dir}/seed-<k>/executed ({where})", flush=True)
    # threads per notebook: THREADS, capped by the local slots; a SLURM job gets its own CPUs
    job_list = schedule(books, seeds, args.jobs if args.executor == "local" else max(THREADS.values()))
    # a run that reuses trained checkpoints takes a fraction of the time: it is recorded apart
    from_scratch = not any(any(c.checkpoint_dir.rglob("*.pt")) for c in cfg_for.values())
    start = time.perf_counter()
    with _sigterm_unwinds():  # a CI cancel or `timeout` stops the workers like Ctrl-C does
        if args.executor == "slurm":
            from . import cluster

            problem = cluster.slurm_available()
            if problem:
                raise SystemExit(f"--executor slurm: {problem}")
            ok, why = cluster.run_jobs_slurm(job_list, args.profile, overrides, cfg_for, first.cell_timeout,
                                             first.profile_dir / "slurm-logs")
        else:
            ok, why = run_jobs(job_list, args.profile, overrides, cfg_for, args.jobs, first.cell_timeout)
    wall = round(time.perf_counter() - start, 1)
    if not ok:
        print(f"\n{why}", file=sys.stderr)
        return 1
    per_seed = {f"seed-{s}": {j.stem: j.seconds for j in job_list if j.seed == s} for s in seeds}
    print("\nwall time per notebook (seconds; parallel jobs overlap):")
    for s, times in per_seed.items():
        print(f"  {s}: " + ", ".join(f"{name[:2] if name[:2].isdigit() else name} {sec:.0f}"
                                     for name, sec in times.items()))
    print(f"  total wall time {wall:.1f} s")
    if not args.only:  # a partial run must not overwrite the record of a full one
        record_timings(first, seeds, args.jobs, wall, per_seed, from_scratch, overrides, args.executor)
        if len(seeds) >= 2:
            from . import report

            paths = report.write_seed_aggregate(first.profile_dir, seeds)
            print("aggregate over seeds " + ",".join(map(str, seeds)) + ": "
                  + ", ".join(str(p) for p in paths))
            if first.profile_dir in {REPO_ROOT / "results" / name for name in README_PROFILES}:
                changed = report.update_readme(REPO_ROOT / "README.md", first.profile_dir / "summary.json")
                print("README.md results block " + ("rewritten" if changed else "unchanged"))
    return 0


EXECUTORS = ("local", "slurm")
"""``--executor``: ``local`` (:func:`run_jobs`, CPU slots of this machine) or ``slurm``
(:func:`cip_helpers.tools.cluster.run_jobs_slurm`)."""

README_PROFILES = ("quick", "quick-fmnist")
"""Profiles whose multi-seed aggregate the README quotes (:func:`report.readme_markers`)."""


def record_timings(cfg: Profile, seeds: list[int], jobs: int, wall: float, per_seed: dict,
                   from_scratch: bool = True, overrides: dict | None = None, executor: str = "local") -> Path:
    """Add this run to ``<profile_dir>/timings.json`` under ``"seeds=<list>"`` (other runs kept).
    A run that started with trained checkpoints on disk (``from_scratch=False``) goes under
    ``"seeds=<list> (cached)"``: it never replaces the from-scratch time the README quotes. A run
    with ``--set`` overrides (e.g. the evidence run) adds them to the key, ``[evidence=True, ...]``,
    and to the entry (``overrides``); a run on another executor than ``local`` adds it to the key,
    ``{slurm}``, and to the entry (``executor``)."""
    path = cfg.profile_dir / "timings.json"
    old = read_json(path) if path.exists() else {}
    runs = old.get("runs", {}) if isinstance(old.get("runs"), dict) else {}
    changed = {k: v for k, v in (overrides or {}).items() if k != "seed"}
    key = ("seeds=" + ",".join(map(str, seeds)) + ("" if from_scratch else " (cached)")
           + (" [" + ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) + "]" if changed else "")
           + (f" {{{executor}}}" if executor != "local" else ""))
    runs[key] = {
        "seeds": seeds, "jobs": jobs, "wall_seconds": wall, "notebook_seconds": per_seed,
        "from_scratch": from_scratch, **({"overrides": changed} if changed else {}),
        **({"executor": executor} if executor != "local" else {}),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(terse=True)},
        "date": datetime.date.today().isoformat()}
    return write_json(path, {"profile": cfg.name, "runs": runs})

if __name__ == "__main__":
    sys.exit(main())
