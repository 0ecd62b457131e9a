"""Progress bars and stage lines that read well both live and in executed notebooks.

Interactively (JupyterLab, a terminal) :func:`progress` is ``tqdm.auto.tqdm``: a live bar. In a
batch run (the runner sets ``$CIP_BATCH`` in every kernel, :data:`BATCH_ENV`) a bar draws nothing
while it runs (a notebook widget saved by papermill keeps its first state, ``0%|...``, and a text
bar leaves carriage-return debris) and prints ONE plain line when it ends::

    innocent pool: 8/8 models in 0.4 s

A bar inside a stage (:func:`stage`: one model that ``store.load_or_train`` trains) names the
stage's checkpoint, so a trained stage is one line, the bar's postfix (the last epoch's numbers)
included::

    knockoff_none_hard: trained 6/6 epochs in 12.3 s (at the end: loss=1.06, train_acc=0.62, test_acc=0.55) -> surrogate_5005ef520fc96be6.pt

A reused stage is one line too, printed by ``store.load_or_train`` through :func:`announce_once`
(at most once per checkpoint file per process, i.e. per kernel).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass

from tqdm.std import tqdm as std_tqdm

BATCH_ENV = "CIP_BATCH"
"""Set (to anything non-empty) by the batch runner (``cip_helpers.tools.run``) for every kernel it
starts: progress bars then print one line at the end (:func:`progress`) and slider cells render
their default view without creating widgets (``plots.slider_view``). Plain papermill or nbconvert
need no variable: :func:`batch_mode` recognises their kernels too."""


def batch_mode() -> bool:
    """True when nobody watches a live bar or moves a slider: in a batch run of the runner
    (``$CIP_BATCH`` set and non-empty), or in a Jupyter kernel whose current cell was sent without
    stdin: papermill, ``jupyter nbconvert --execute`` and nbclient all execute with
    ``allow_stdin=False``, while a front end with a user at it sends True (JupyterLab does:
    ``tests/test_browser.py`` moves its live sliders). False in a terminal or plain Python (no
    kernel), where a text bar is live."""
    return bool(os.environ.get(BATCH_ENV)) or _kernel_without_stdin()


def _kernel_without_stdin() -> bool:
    """True in an IPython kernel executing a request that allows no stdin (headless execution),
    and when the request cannot be read (fail towards the batch view, which never waits)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return False
    try:
        content = kernel.get_parent().get("content") or {}
    except Exception:  # noqa: BLE001 - an unknown kernel: draw the default view, never wait
        return True
    return not content.get("allow_stdin", False)


@dataclass
class Stage:
    """One model being trained by ``store.load_or_train``: its display ``name``, its checkpoint
    file name, why it is retrained (``changed``: the settings that differ from the checkpoint on
    disk; empty for a fresh training) and whether a batch bar has already reported it."""

    name: str
    checkpoint: str
    changed: tuple[str, ...] = ()
    reported: bool = False

    def destination(self) -> str:
        """``-> file.pt`` plus, for a retraining, which settings changed."""
        why = (f", replacing one trained with other settings ({', '.join(self.changed)})"
               if self.changed else "")
        return f"-> {self.checkpoint}{why}"


_STAGE: contextvars.ContextVar[Stage | None] = contextvars.ContextVar("cip_stage", default=None)


@contextlib.contextmanager
def stage(name: str, checkpoint: str, changed: Iterable[str] = ()) -> Iterator[Stage]:
    """Mark the code inside as the training of one stage (nested stages allowed: a bar belongs to
    the innermost). A batch bar that ends inside reports the stage (``Stage.reported``);
    ``store.load_or_train`` prints the line itself when no bar did."""
    current = Stage(name, checkpoint, tuple(changed))
    token = _STAGE.set(current)
    try:
        yield current
    finally:
        _STAGE.reset(token)


class _Sink:
    """A file that swallows what tqdm writes (the batch bar prints its own line at the end)."""

    encoding = "utf-8"

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class BatchBar(std_tqdm):
    """tqdm that counts, times and keeps its postfix like any bar but draws nothing while it runs,
    then prints one line to stdout when it ends (the loop finishes, breaks or raises). A disabled
    bar prints nothing."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["file"] = _Sink()
        self._stage = _STAGE.get()
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        return True  # nothing to draw while running

    def summary(self) -> str:
        """The line printed at the end, e.g. ``victim (all): trained 8/8 epochs in 5.1 s (at the
        end: loss=0.1, ...) -> victim_all.pt``."""
        total = self.total if self.total is not None else self.n
        unit = self.unit if total == 1 else f"{self.unit}s"
        elapsed = self._time() - self.start_t
        line = f"{self.n}/{total} {unit} in {elapsed:.1f} s"
        if self.postfix:
            line += f" (at the end: {self.postfix})"
        stage_ = self._stage
        if stage_ is not None and not stage_.reported:
            stage_.reported = True
            line = f"{'retrained' if stage_.changed else 'trained'} {line} {stage_.destination()}"
        return f"{self.desc}: {line}" if self.desc else line

    def close(self) -> None:
        if getattr(self, "disable", True):  # disabled, or closed already
            return
        line = self.summary()
        super().close()
        print(line, file=sys.stdout, flush=True)


def progress(iterable: Iterable | int | None = None, desc: str = "", total: int | None = None,
             disable: bool = False, unit: str = "epoch") -> std_tqdm:
    """A progress bar over ``iterable`` (an int ``n`` means ``range(n)``): ``tqdm.auto.tqdm``
    interactively (a live widget in JupyterLab, a text bar in a terminal), a :class:`BatchBar`
    (one line at the end) in :func:`batch_mode`. ``disable=True`` shows nothing in
    either mode. Use it like tqdm: iterate, ``set_postfix``, ``update``."""
    if isinstance(iterable, int):
        iterable = range(iterable)
    if batch_mode():
        return BatchBar(iterable, desc=desc, total=total, disable=disable, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=disable, unit=unit)


_announced: set[Hashable] = set()


def announce_once(key: Hashable, line: str) -> bool:
    """Print ``line`` unless a line with this ``key`` was printed before in this process (a kernel);
    returns whether it printed. ``store.load_or_train`` keys a reused checkpoint by its path and
    modification time, so loading the same file again says nothing, but a retrained one is new."""
    if key in _announced:
        return False
    _announced.add(key)
    print(line, flush=True)
    return True

