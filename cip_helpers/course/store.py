"""Artifacts on disk: atomic JSON, checkpoints with a config spec, and load-or-train.

A checkpoint stores the ``spec`` (a JSON-able dict of every setting that shaped the weights).
:func:`load_or_train` reuses a checkpoint only if its spec matches exactly, retrains (and says
why) if the spec differs, and raises :class:`CheckpointError` if the file is corrupt.

Content addressing: settings do not pin the bits (training is not bit-identical across machines
and thread counts), so every artifact derived from trained weights records the weights'
:func:`weights_sha256`; a loader compares it with the checkpoint it would be used with.

The method's objects meet the disk only here: :func:`load_victim` and :func:`load_cip` rebuild
a victim and its defended API from a finished run, :func:`save_triggers` / :func:`load_triggers`
keep a trigger set as a tensors-only file.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..method.defenses import CIP, TriggerSet
from ..method.digests import weights_sha256
from ..method.models import build_model
from . import progress

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used as it is."""


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename); returns the path."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    """Write a text artifact (e.g. a Markdown table) atomically; returns the path."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
    return Path(path)


def write_png(path: Path, fig: Any, dpi: int = 110, metadata: dict[str, str] | None = None) -> Path:
    """Save a matplotlib figure as PNG (tight bounding box, ``dpi``; ``metadata`` as PNG text
    chunks) atomically, like every other artifact here; returns the path."""
    _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight", dpi=dpi,
                                                      metadata=metadata))
    return Path(path)


def read_json(path: Path) -> Any:
    """Read a JSON artifact; a missing file raises an error naming the notebook that writes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the notebook that produces it first "
                                "(python -m cip_helpers.tools.run --profile <profile>)")
    return json.loads(path.read_text())


def _jsonable(spec: dict) -> dict:
    return json.loads(json.dumps(spec, sort_keys=True))


def save_checkpoint(path: Path, model: nn.Module, spec: dict, extra: dict | None = None) -> None:
    """Save weights with their spec (and JSON-able ``extra``, e.g. a learning curve) atomically."""
    payload = {"format": CHECKPOINT_FORMAT, "spec_json": json.dumps(_jsonable(spec), sort_keys=True),
               "extra_json": json.dumps(extra or {}), "state_dict": model.state_dict()}
    _atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """Return ``(spec, extra, state_dict)``; raises :class:`CheckpointError` on a corrupt file."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        spec, extra = json.loads(payload["spec_json"]), json.loads(payload["extra_json"])
        state = payload["state_dict"]
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {payload.get('format')} != {CHECKPOINT_FORMAT}")
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise CheckpointError(f"checkpoint {path} is corrupt or not a cip_helpers checkpoint "
                              f"({type(exc).__name__}: {exc}). Delete it to retrain: rm '{path}'") from exc
    return spec, extra, state


def load_or_train(path: Path, spec: dict, build: Callable[[], nn.Module],
                  train: Callable[[nn.Module], dict], verbose: bool = True,
                  name: str | None = None) -> tuple[nn.Module, dict]:
    """Load the model at ``path`` if it was trained with exactly ``spec``; otherwise build it,
    call ``train(model) -> extra`` and save. Returns ``(model, {"loaded": bool, **extra})``.

    With ``verbose`` the stage says what happened in ONE line starting with ``name`` (default: the
    file's stem): ``name: loaded checkpoint X.pt (same settings; delete it to retrain)``, printed
    once per checkpoint file per process (a kernel that loads it again stays quiet,
    :func:`progress.announce_once`), or, for a training, the progress bar's line in a batch run
    (``name: trained 6/6 epochs in 12.3 s (...) -> X.pt``, :class:`progress.BatchBar`; with a
    retraining, which settings changed); interactively the line comes before the live bar."""
    path, spec = Path(path), _jsonable(spec)
    name = name or path.stem
    model = build()
    changed: list[str] = []
    if path.exists():
        saved_spec, extra, state = load_checkpoint(path)
        if saved_spec == spec:
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise CheckpointError(f"checkpoint {path} does not fit the model built for its spec "
                                      f"({exc}). Delete it to retrain: rm '{path}'") from exc
            model.eval()
            if verbose:
                stat = path.stat()
                progress.announce_once((str(path.resolve()), stat.st_mtime_ns, stat.st_size),
                                       f"{name}: loaded checkpoint {path.name} (same settings; "
                                       "delete it to retrain)")
            return model, {"loaded": True, **extra, "weights_sha256": weights_sha256(state)}
        changed = sorted(k for k in set(spec) | set(saved_spec) if spec.get(k) != saved_spec.get(k))
    batch = progress.batch_mode()
    if verbose and not batch:  # interactively: say it before the live bar
        print(f"{name}: checkpoint {path.name} was trained with other settings ({', '.join(changed)}): "
              "retraining" if changed else f"{name}: no checkpoint {path.name} yet: training", flush=True)
    start = time.perf_counter()
    with progress.stage(name, path.name, changed) as current:
        extra = train(model) or {}
    model.eval()
    save_checkpoint(path, model, spec, extra)
    if verbose and batch and not current.reported:  # no bar said it: one line all the same
        print(f"{name}: {'retrained' if changed else 'trained'} in {time.perf_counter() - start:.1f} s "
              f"{current.destination()}", flush=True)
    return model, {"loaded": False, **extra, "weights_sha256": weights_sha256(model)}


def save_triggers(path: Path, triggers: TriggerSet) -> None:
    """Write a trigger set as a tensors-only file (readable with ``weights_only=True``), atomically."""
    payload = {"x": triggers.x, "original": triggers.original, "altered": triggers.altered}
    _atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load_triggers(path: Path) -> TriggerSet:
    """Read a trigger set written by :func:`save_triggers` (tensors only, ``weights_only=True``).
    Raises ``ValueError`` naming the fix if the file is missing or unreadable."""
    try:
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
        return TriggerSet(d["x"], d["original"], d["altered"])
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"{path} is not a readable trigger set ({exc}); re-create it by re-running "
                         "the attack notebook that saved it") from exc


def load_victim(path: Path) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build the model described by a victim/OE checkpoint's spec, load its weights and return
    ``(model in eval mode, input shape (C, H, W))``. Raises ``FileNotFoundError`` with the command
    that trains it, :class:`CheckpointError` for a corrupt file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: train the victims first (notebooks 01-02, "
                                "or python -m cip_helpers.tools.run --profile <profile> --only 01,02,03)")
    spec, _, state = load_checkpoint(path)
    victim = spec.get("victim", spec)
    c, h, w = victim["input_shape"]
    model = build_model(victim["arch"], c, victim["n_classes"], h)
    model.load_state_dict(state)
    return model.eval(), (c, h, w)


def load_cip(results_dir: Path, split: str = "all", **kwargs) -> CIP:
    """Rebuild CIP from a finished run's seed directory (e.g. ``results/quick/seed-0``):
    ``checkpoints/oe_victim_<split>.pt`` + ``thresholds.json``; ``kwargs`` go to :class:`CIP`.

    Raises ``ValueError`` if the thresholds entry was not computed from exactly these weights
    (its ``weights_sha256`` differs from the checkpoint's, or it has none): thresholds of other
    weights would route queries wrongly. The message names the fix (recompute them)."""
    ckpt = Path(results_dir) / "checkpoints" / f"oe_victim_{split}.pt"
    model, shape = load_victim(ckpt)
    path = Path(results_dir) / "thresholds.json"
    t = read_json(path)
    if split != "all":
        if "half" not in t:
            raise ValueError(f"{path} has no 'half' entry: compute the half victim's thresholds "
                             "first (pipeline.get_thresholds(cfg, 'half'))")
        t = t["half"]
    missing = [k for k in ("E1", "E2", "T") if k not in t]
    if missing or ("R1" not in t and kwargs.get("pbd", "online") == "online" and "r1" not in kwargs):
        raise ValueError(f"{path} lacks {missing or ['R1']}: recompute it with "
                         "pipeline.get_thresholds (notebook 02) or pass r1=... / pbd=None")
    have = weights_sha256(model)
    if t.get("weights_sha256") != have:
        raise ValueError(
            f"{path} ('{split}' entry) was computed for weights "
            f"{(t.get('weights_sha256') or 'of unknown hash')[:16]}..., but {ckpt} holds weights "
            f"{have[:12]}...: its E1/E2/R1 do not belong to this model. Recompute them from the "
            "checkpoint: pipeline.get_thresholds(config.get_profile(<profile>, seed=<seed>), "
            f"'{split}') (or re-run notebook 02), or use CIP.calibrate(model, id_train_x).")
    if "R1" in t:
        kwargs.setdefault("r1", t["R1"])
    return CIP(model, shape, t["E1"], t["E2"], temperature=t["T"], **kwargs)
