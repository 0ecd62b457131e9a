"""Run the numbered notebooks in order with papermill.

    python -m cip_helpers.run --profile quick            # the whole course
    python -m cip_helpers.run --profile smoke --only 01,03
    python -m cip_helpers.run --profile full --set dataset=cifar100 --set tag=full-cifar100

Executed copies go to ``results/<profile>/executed/``; per-notebook wall times to
``results/<profile>/timings.json``. Stops at the first failing notebook and exits non-zero,
naming the notebook and the failing cell.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import PROFILES, REPO_ROOT, get_profile
from .store import write_json

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


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


def run_notebook(path: Path, profile: str, out_dir: Path, overrides: dict | None = None) -> float:
    """Execute one notebook with papermill; returns its wall time in seconds."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pm.execute_notebook(str(path), str(out_dir / path.name), cwd=str(path.parent),
                        parameters={"profile": profile, "overrides": overrides or {}},
                        kernel_name="python3", progress_bar=False, log_output=False)
    return time.perf_counter() - start


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


def _failed_cell(exc: Exception) -> str:
    cell = getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    return f"cell [{cell}]: {ename}: {evalue}"


def main(argv: list[str] | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 01,03")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one profile field in every notebook (value parsed as JSON "
                             "when possible), e.g. --set dataset=cifar100 --set tag=full-cifar100")
    args = parser.parse_args(argv)

    overrides = parse_overrides(args.set)
    cfg = get_profile(args.profile, **overrides)
    books = list_notebooks(args.only.split(",") if args.only else None, notebook_dir)
    if not books:
        raise SystemExit(f"no notebooks found in {notebook_dir}")
    out_dir = cfg.results_dir / "executed"
    timings: dict[str, float] = {}
    print(f"running {len(books)} notebook(s) on profile '{args.profile}' -> {out_dir}", flush=True)
    for i, book in enumerate(books, 1):
        print(f"[{i}/{len(books)}] {book.name} ...", end=" ", flush=True)
        try:
            timings[book.stem] = round(run_notebook(book, args.profile, out_dir, overrides), 1)
        except Exception as exc:  # noqa: BLE001 - reported with the notebook and cell, then exit 1
            print("FAILED", flush=True)
            print(f"\n{book.name} failed in {_failed_cell(exc)}\n"
                  f"the partly executed copy is {out_dir / book.name}", file=sys.stderr)
            return 1
        print(f"done in {timings[book.stem]:.1f} s", flush=True)
    total = round(sum(timings.values()), 1)
    print("\nwall time per notebook:")
    for name, seconds in timings.items():
        print(f"  {name:<45} {seconds:>7.1f} s")
    print(f"  {'total':<45} {total:>7.1f} s")
    if not args.only:  # a partial run must not overwrite the full run's record
        write_json(cfg.results_dir / "timings.json", {"profile": args.profile, "notebooks": timings,
                                                        "total_seconds": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
