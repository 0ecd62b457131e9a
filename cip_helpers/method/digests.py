"""Content digests of tensors and weights: the hashes that content addressing and the keyed
per-query choices of the defenses are built on. Pure functions of tensors (no files)."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def row_digests(t: torch.Tensor) -> list[bytes]:
    """sha256 digest (32 bytes) of every row t[i] of a tensor (N, ...): two rows share a digest
    exactly when their values are bitwise identical (same dtype assumed). Used to keep a trigger
    set a set (:meth:`~cip_helpers.method.defenses.TriggerSet.append`, :func:`verification.distinct_triggers`)."""
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
