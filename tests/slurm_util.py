"""A real single-node SLURM cluster for the tests, started and stopped by the test itself.

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them as root) and root (slurmd
runs jobs as their user). Without them the tests that use :func:`local_cluster` skip with the
reason, and fail instead when ``CIP_REQUIRE_SLURM=1`` (set by ``.ci/run`` after installing), so CI
cannot pass by skipping. No systemd: every daemon is started here with its own files under a
temporary folder, on free ports, and stopped by its pid.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")


def why_no_slurm() -> str:
    """"" when a local cluster can be started here, else why not."""
    missing = [c for c in (*DAEMONS, *CLIENTS) if shutil.which(c) is None
               and not Path("/usr/sbin", c).exists()]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return ""


def slurm_or_skip() -> None:
    """Skip the calling test when no cluster can start, or fail under ``CIP_REQUIRE_SLURM=1``."""
    why = why_no_slurm()
    if why:
        if os.environ.get("CIP_REQUIRE_SLURM") == "1":
            pytest.fail(why + ", but CIP_REQUIRE_SLURM=1 says it must be")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _pid(path: Path, timeout: float = 20.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError, ValueError, IndexError):  # absent, or written but still empty
            return int(path.read_text().split()[0])
        time.sleep(0.1)
    raise RuntimeError(f"no pid file {path} after {timeout:.0f} s")


def _stop(pid: int, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def write_conf(folder: Path, node: str, cpus: int, mem_mb: int) -> Path:
    """``folder/slurm.conf`` for one node ``node`` (``cpus`` CPUs, ``mem_mb`` MB) on free ports,
    with linuxproc process tracking, no task plugin, cons_tres and no accounting."""
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=cipci",
        f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",  # slurmctld checks its own name
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={folder / 'run' / 'munge.socket'}",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "ReturnToService=2",
        "SchedulerParameters=sched_interval=2", "MinJobAge=600",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    return conf


@contextlib.contextmanager
def local_cluster(folder: Path, cpus: int | None = None, mem_mb: int = 16000,
                  start_timeout: float = 90.0) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under ``folder``; yield the environment a client needs
    (``SLURM_CONF``), then stop the three daemons by pid. Raises ``RuntimeError`` (with the end of
    the daemons' logs) when the node is not idle within ``start_timeout`` seconds."""
    folder = Path(folder)
    for sub in ("run", "state", "spool", "log", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub).chmod(0o700)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = "cipnode"
    conf = write_conf(folder, node, cpus or os.cpu_count() or 1, mem_mb)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pids: list[int] = []
    try:
        subprocess.run([_binary("munged"), "-f", f"--key-file={key}", f"--socket={folder / 'run' / 'munge.socket'}",
                        f"--pid-file={folder / 'run' / 'munged.pid'}", f"--log-file={folder / 'log' / 'munged.log'}",
                        f"--seed-file={folder / 'munge' / 'seed'}"], check=True, env=env)
        pids.append(_pid(folder / "run" / "munged.pid"))
        subprocess.run([_binary("slurmctld"), "-f", str(conf)], check=True, env=env)
        pids.append(_pid(folder / "run" / "slurmctld.pid"))
        subprocess.run([_binary("slurmd"), "-f", str(conf), "-N", node], check=True, env=env)
        pids.append(_pid(folder / "run" / "slurmd.pid"))
        end = time.monotonic() + start_timeout
        state = ""
        while time.monotonic() < end:
            proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
            state = proc.stdout.strip()
            if state == "idle":
                break
            time.sleep(1)
        else:
            logs = "\n".join(f"{p.name}: {p.read_text()[-800:]}" for p in sorted((folder / "log").glob("*.log")))
            raise RuntimeError(f"the local SLURM node is {state or 'absent'} after {start_timeout:.0f} s\n{logs}")
        yield {"SLURM_CONF": str(conf)}
    finally:
        # by pid; a daemon whose pid file could not be read (a failed start) is found by its files
        found = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout.split()
        for pid in [*reversed(pids), *(int(p) for p in found if int(p) not in pids and int(p) != os.getpid())]:
            _stop(pid)
