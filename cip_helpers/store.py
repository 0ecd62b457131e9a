"""Artifacts on disk: atomic JSON, checkpoints with a config spec, and load-or-train.

A checkpoint stores the ``spec`` (a JSON-able dict of every setting that shaped the weights).
:func:`load_or_train` reuses a checkpoint only if its spec matches exactly, retrains (and says
why) if the spec differs, and raises :class:`CheckpointError` if the file is corrupt.

Content addressing: settings do not pin the bits (training is not bit-identical across machines
and thread counts), so every artifact derived from trained weights records the weights'
:func:`weights_sha256`; a loader compares it with the checkpoint it would be used with.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
                                "(python -m cip_helpers.run --profile <profile>)")
    return json.loads(path.read_text())


def row_digests(t: torch.Tensor) -> list[bytes]:
    """sha256 digest (32 bytes) of every row t[i] of a tensor (N, ...): two rows share a digest
    exactly when their values are bitwise identical (same dtype assumed). Used to keep a trigger
    set a set (:meth:`defenses.TriggerSet.append`, :func:`verification.distinct_triggers`)."""
    arr = t.detach().cpu().contiguous().numpy()
    return [hashlib.sha256(row.tobytes()).digest() for row in arr]


def keyed_row_digests(t: torch.Tensor, key: bytes, digest_size: int) -> list[bytes]:
    """Keyed BLAKE2b digest (``digest_size`` bytes, 1..64) of every row t[i] of a tensor (N, ...)
    read as float32 bytes: a secret-keyed pseudo-random function of the image, so a defense can
    make per-query random choices that repeat for a repeated query and that nobody without
    ``key`` can predict (DAWN's watermark selection, CIP's PBD answer)."""
    arr = t.detach().cpu().float().contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), key=key, digest_size=digest_size).digest() for row in arr]


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex, 64 characters) of a tensor's dtype, shape and values in row-major order:
    identical tensors give identical hashes whatever their memory layout (channels-last too)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def weights_sha256(model_or_state: nn.Module | dict) -> str:
    """sha256 (hex) of a model's weights: every state-dict entry's name, dtype, shape and values,
    in key order (64 hex characters). Equal hashes mean bit-identical weights; artifacts computed
    from a model record it (content addressing), and one ulp of difference changes it."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(tensor_sha256(state[key]).encode())
    return h.hexdigest()


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
