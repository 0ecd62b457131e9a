"""The runner's job graph on a SLURM cluster, submitted through submitit.

    python -m cip_helpers.tools.run --profile smoke --executor slurm
    python -m cip_helpers.tools.run --profile paper-fmnist --seeds 0,1,2 --executor slurm

Every job of :func:`cip_helpers.tools.run.schedule` (one notebook, or one runner task, of one
seed) becomes one SLURM job; its prerequisites become ``--dependency=afterok:<ids>`` with
``--kill-on-invalid-dep=yes``, so SLURM itself orders the graph and cancels what can no longer
run when a prerequisite fails, while jobs that do not depend on the failure (other seeds) go on.
Inside its allocation a job runs the very worker command the local scheduler runs
(``python -m cip_helpers.tools.run --worker ...``) with the same thread environment, so the
numbers do not depend on the executor (``tests/test_notebooks.py`` compares the two on smoke).

Resources per job come from the profile (:class:`JobResources`). The driver stays in the
foreground: it waits for every job, prints each as it ends, and reports a failed, timed-out or
cancelled job with its notebook, seed, SLURM state and log path. A re-run resumes from what
finished: every expensive stage is load-or-train, so finished notebooks reload their checkpoints.
Ctrl-C (or SIGTERM) in the driver cancels the jobs it submitted (``scancel``).

SLURM accounting is optional: the driver reads job states from ``squeue`` / ``scontrol`` rather
than ``sacct``, so a cluster without ``slurmdbd`` (the single-node one of the tests) works.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

CPU_ONLY = ("00",)
"""Notebooks that never need a GPU (the orientation reads committed results only)."""

GONE_SECONDS = 30.0
"""How long a job must be out of the queue without a result file before it counts as ended
without a result (a shared filesystem may show the result file late; submitit waits 15 s)."""


@dataclass(frozen=True)
class JobResources:
    """What one job asks SLURM for: ``cpus`` (= the torch threads the runner fixes per notebook,
    so results do not depend on the executor), ``gpus``, ``mem_gb``, ``minutes`` (``--time``) and
    ``partition`` ("" = the cluster's default). :meth:`of` reads the profile's ``job_*`` fields."""

    cpus: int
    gpus: int = 0
    mem_gb: int = 8
    minutes: int = 60
    partition: str = ""

    @classmethod
    def of(cls, cfg: Any, stem: str, threads: int) -> JobResources:
        """The resources of job ``stem`` (a notebook stem like ``"01_victim_training"`` or a task
        name) with ``threads`` torch threads, from profile ``cfg`` (``job_gpus``, ``job_mem_gb``,
        ``job_minutes``, ``job_partition``); :data:`CPU_ONLY` notebooks get no GPU."""
        return cls(cpus=threads, gpus=0 if stem[:2] in CPU_ONLY else cfg.job_gpus, mem_gb=cfg.job_mem_gb,
                   minutes=cfg.job_minutes, partition=cfg.job_partition)

    def slurm_parameters(self) -> dict[str, Any]:
        """Keyword arguments for ``submitit.SlurmExecutor.update_parameters``."""
        out: dict[str, Any] = {"cpus_per_task": self.cpus, "mem": f"{self.mem_gb}G", "time": self.minutes}
        if self.gpus:
            out["gpus_per_node"] = self.gpus
        if self.partition:
            out["partition"] = self.partition
        return out


class JobFailed(RuntimeError):
    """The worker of a SLURM job failed; the message is the runner's one-line reason
    (``cell [k]: ename: evalue`` for a notebook)."""


def run_worker_job(arg: str, env: dict[str, str]) -> float:
    """Body of every SLURM job: run the runner's worker on ``arg`` (its JSON job spec) with ``env``
    added to the job's environment, exactly as the local scheduler does. Returns the wall seconds;
    raises :class:`JobFailed` with the worker's reason (submitit records it; the job ends FAILED)."""
    from .run import failure_reason

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cip_helpers.tools.run", "--worker", arg],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # into the job's log as it comes, so a job killed midway still shows it
        sys.stderr.write(line)
        sys.stderr.flush()
        lines.append(line)
    if proc.wait() != 0:
        why = failure_reason("".join(lines), proc.returncode)
        if proc.returncode == -9:
            why += " (SIGKILL: out of memory? raise --set job_mem_gb=GB)"
        raise JobFailed(why)
    return round(time.perf_counter() - start, 1)


def slurm_available() -> str:
    """"" when ``sbatch`` and ``squeue`` are on PATH and ``squeue`` answers (a controller is
    up), else why not, with the fix."""
    import shutil

    missing = [c for c in ("sbatch", "squeue", "scontrol", "scancel") if shutil.which(c) is None]
    if missing:
        return (f"{', '.join(missing)} not found: --executor slurm needs a SLURM client (Debian: "
                f"apt-get install slurm-client) and a cluster to submit to")
    proc = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"squeue cannot reach a SLURM controller ({proc.stderr.strip()[-300:]}); is SLURM_CONF right?"
    return ""


def _queued(job_ids: list[str]) -> set[str]:
    """Those of ``job_ids`` still in the queue (one ``squeue`` call for this user's jobs)."""
    import getpass

    proc = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i"], capture_output=True, text=True)
    if proc.returncode != 0:  # a busy controller: treat every job as still there, ask again later
        return set(job_ids)
    return set(proc.stdout.split()) & set(job_ids)


def _final_state(job_id: str) -> tuple[str, str]:
    """(state, reason) of an ended job from ``scontrol`` (held for MinJobAge after the end), or
    ("ENDED", "") when the controller has forgotten it."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    fields = dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f) if proc.returncode == 0 else {}
    return fields.get("JobState", "ENDED"), fields.get("Reason", "")


def run_jobs_slurm(job_list: list, profile: str, overrides: dict, cfg_for: dict, cell_timeout: int,
                   folder: Path, poll: float = 5.0,
                   say: Callable[[str], None] = lambda s: print(s, flush=True)) -> tuple[bool, str]:
    """Submit ``job_list`` (:class:`cip_helpers.tools.run.Job`, prerequisites in ``needs``) to
    SLURM with submitit, wait for all, and fill each job's ``seconds``. Returns ``(ok, message)``;
    the message lists every job that failed (notebook, seed, SLURM state, log) and those SLURM
    cancelled because a prerequisite failed. Logs go to ``folder/<job id>_*``."""
    import submitit

    from .run import job_arg, worker_env

    logging.getLogger("submitit").setLevel(logging.ERROR)  # its sacct fallback warning: we never call sacct
    folder.mkdir(parents=True, exist_ok=True)
    submitted: dict[tuple[int, str], Any] = {}
    by_key = {j.key: j for j in job_list}
    try:
        for job in _topological(job_list):
            res = JobResources.of(cfg_for[job.seed], job.stem, job.threads)
            deps = sorted(submitted[k].job_id for k in job.needs)
            # a fresh executor per job: submitit keeps parameters across update_parameters calls, so
            # one executor would carry a GPU request over to a CPU-only notebook
            executor = submitit.SlurmExecutor(folder=folder / "%j", python=sys.executable)
            executor.update_parameters(job_name=f"cip-{profile}-s{job.seed}-{job.key[1]}",
                                       dependency=("afterok:" + ":".join(deps)) if deps else None,
                                       additional_parameters={"kill_on_invalid_dep": "yes"} if deps else {},
                                       **res.slurm_parameters())
            submitted[job.key] = executor.submit(run_worker_job, job_arg(job, profile, overrides, cfg_for[job.seed],
                                                                         cell_timeout),
                                                 worker_env(job.threads))
            say(f"  submit seed {job.seed} {job.label}: SLURM job {submitted[job.key].job_id}"
                + (f" (after {', '.join(deps)})" if deps else ""))
        return _wait(submitted, by_key, cfg_for, poll, say)
    except BaseException:
        live = [s.job_id for s in submitted.values() if not s.paths.result_pickle.exists()]
        if live:
            subprocess.run(["scancel", *live], capture_output=True)
            say(f"  cancelled SLURM jobs {', '.join(live)}")
        raise


def _topological(job_list: list) -> list:
    """``job_list`` ordered so that every job comes after its prerequisites (stable otherwise)."""
    out, placed, pending = [], set(), list(job_list)
    while pending:
        ready = [j for j in pending if j.needs <= placed]
        if not ready:
            raise ValueError(f"the job graph has a cycle or a missing prerequisite among "
                             f"{sorted(j.key for j in pending)}")
        for j in ready:
            out.append(j)
            placed.add(j.key)
            pending.remove(j)
    return out


def _timeout(minutes: int) -> str:
    return (f"ran into its time limit of {minutes} min (the profile's job_minutes; raise it with "
            f"--set job_minutes=MINUTES)")


def _wait(submitted: dict, by_key: dict, cfg_for: dict, poll: float,
          say: Callable[[str], None]) -> tuple[bool, str]:
    open_keys = set(submitted)
    gone: dict = {}
    failures: list[str] = []
    cancelled: list[str] = []

    def fail(sj: Any, job: Any, what: str, tag: str) -> None:
        failures.append(f"{job.label} (seed {job.seed}) {what}; SLURM job {sj.job_id}, log {sj.paths.stderr}")
        say(f"  {tag} seed {job.seed} {job.label} (SLURM job {sj.job_id})")

    while open_keys:
        time.sleep(poll)
        queued = _queued([submitted[k].job_id for k in open_keys])
        for key in sorted(open_keys):
            sj, job = submitted[key], by_key[key]
            if sj.paths.result_pickle.exists():
                open_keys.discard(key)
                try:
                    job.seconds = sj.result()
                except Exception as exc:  # noqa: BLE001 - the job's own error, reported below
                    why = _job_error(_traceback(sj, exc))  # a job signalled at its limit ends "timed-out"
                    timed_out = "timed-out" in why
                    fail(sj, job, _timeout(cfg_for[job.seed].job_minutes) if timed_out else f"failed in {why}",
                         "TIMEOUT" if timed_out else "FAILED")
                    continue
                say(f"  done   seed {job.seed} {job.label} in {job.seconds:.1f} s (SLURM job {sj.job_id})")
            elif sj.job_id not in queued:
                if time.monotonic() - gone.setdefault(key, time.monotonic()) < GONE_SECONDS:
                    continue
                open_keys.discard(key)
                state, reason = _final_state(sj.job_id)
                if "Dependency" in reason:  # --kill-on-invalid-dep: DependencyNeverSatisfied
                    cancelled.append(f"seed {job.seed} {job.label}")
                    say(f"  cancelled seed {job.seed} {job.label}: a prerequisite failed")
                elif state == "TIMEOUT":
                    fail(sj, job, _timeout(cfg_for[job.seed].job_minutes), state)
                else:
                    fail(sj, job, f"ended {state}" + (f" ({reason})" if reason and reason != "None" else "")
                         + " without a result", state)
    if not failures and not cancelled:
        return True, ""
    lines = failures + ([f"not run, a prerequisite failed: {', '.join(cancelled)}"] if cancelled else [])
    return False, "\n".join(lines) + "\nfix the cause and run the same command again: finished stages reload"


def _traceback(sj: Any, exc: BaseException) -> str:
    """The traceback a failed submitit job stored in its result file (``("error", text)``), or
    the exception's text when the file holds none."""
    from submitit.core.utils import pickle_load

    try:
        outcome = pickle_load(sj.paths.result_pickle)
    except Exception:  # noqa: BLE001 - unreadable: fall back on the exception's own text
        return str(exc)
    return outcome[1] if isinstance(outcome, tuple) and outcome[:1] == ("error",) else str(exc)


def _job_error(text: str) -> str:
    """The runner's one-line reason from a failed job's traceback ``text``: its last
    :class:`JobFailed` line, else its last line."""
    for line in reversed(text.splitlines()):
        if "JobFailed:" in line:
            return line.split("JobFailed:", 1)[1].strip()
    tail = [ln for ln in text.strip().splitlines() if ln.strip()]
    return tail[-1][-500:] if tail else "no traceback (see the job's log)"

