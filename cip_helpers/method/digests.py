"""Content digests of tensors and weights: the hashes that content addressing and the keyed
per-query choices of the defenses are built on (:class:`QueryForm`, :func:`keyed_randoms`).
Pure functions of tensors (no files)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def row_digests(t: torch.Tensor) -> list[bytes]:
    """sha256 digest (32 bytes) of every row t[i] of a tensor (N, ...): two rows share a digest
    exactly when their values are bitwise identical (same dtype assumed). (A trigger set's "same
    query" test uses :meth:`QueryForm.digests` instead: -0.0 and 0.0 are the same query.)"""
    arr = t.detach().cpu().contiguous().numpy()
    return [hashlib.sha256(row.tobytes()).digest() for row in arr]


@dataclass(frozen=True)
class QueryForm:
    """The canonical form of a query: what the defenses' keyed random choices (DAWN's watermark,
    CIP's strong-PPD shuffle and PBD class) and a trigger set's "same query" test look at.

    The image is clipped to [0, 1], averaged over ``pool`` x ``pool`` blocks (``pool`` = 1: every
    pixel; the last partial block is averaged too) and rounded to ``levels`` + 1 grey levels.
    Everything below that resolution is the same query: -0.0 and 0.0, one ulp, noise below half a
    grey level; with ``pool`` > 1 also +-1/255 noise spread over a block, in most blocks.
    ``levels=255, pool=1`` is the 8-bit image a deployed API decodes; the course's default
    (:data:`QUERY_FORM`) is coarser, measured in notebook 04. Raises ``ValueError`` for
    ``levels`` outside 1..65535 or ``pool`` < 1."""

    levels: int = 255
    pool: int = 1

    def __post_init__(self) -> None:
        for name, v, top in (("levels", self.levels, 65_535), ("pool", self.pool, 1 << 16)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= top:
                raise ValueError(f"QueryForm.{name} must be an int in 1..{top}, got {v!r}")

    def canonical(self, x: torch.Tensor) -> np.ndarray:
        """(N, ...) uint16 array: the canonical form of every image of ``x`` (N, C, H, W) float.
        Raises ``ValueError`` for NaN (the defenses refuse it before they get this far)."""
        x = x.detach().cpu().float()
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool, ceil_mode=True)
        a = x.numpy()
        if np.isnan(a).any():
            raise ValueError("QueryForm.canonical: the images contain NaN; a query must be numbers in [0, 1]")
        return np.rint(np.minimum(np.maximum(a, 0), 1) * np.float32(self.levels)).astype(np.uint16)

    def digests(self, x: torch.Tensor, key: bytes = b"", digest_size: int = 32) -> list[bytes]:
        """One BLAKE2b digest (``digest_size`` bytes, 1..64) of every image's canonical form,
        keyed with ``key`` (a secret: nobody without it can predict the digest) or unkeyed (b"")."""
        if len(x) == 0:
            return []
        arr = np.ascontiguousarray(self.canonical(x).reshape(len(x), -1))
        return [hashlib.blake2b(row.tobytes(), key=key, digest_size=digest_size).digest() for row in arr]


QUERY_FORM = QueryForm(levels=31, pool=7)
"""The course's canonical form: 7 x 7-pixel blocks (4 x 4 of them on a 28 x 28 digit), 32 grey
levels. Measured on quick, seeds 0-2 (notebook 04, 50 high-ES photo crops, 100 copies each): the
averaging attack names the hidden top-1 of 13 % of the crops from one answer and 16 % after copies
with +-1/255 noise or one pixel changed (81 % and 73 % under the 8-bit form); a thief who knows
the form and moves one block by one level reaches 33 %. It merges 9 of 5,000 distinct digits."""


IMAGE_FORM = QueryForm(levels=255, pool=1)
"""The 8-bit image: what :func:`verification.distinct_index` counts distinct triggers by (-0.0 and
0.0, or one ulp, are the same image; two different digits never are)."""


def keyed_randoms(x: torch.Tensor, key: bytes, n_uniform: int, n_normal: int = 0,
                  form: QueryForm = QUERY_FORM) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query randomness that is a function of the query: for every image of ``x`` (N, C, H, W)
    a Philox generator seeded with the keyed digest of its canonical form draws ``n_uniform``
    uniforms in [0, 1) and ``n_normal`` standard normals. Returns (N, n_uniform) and
    (N, n_normal) float64 tensors. The same image (in ``form``) always gets the same numbers,
    whatever call, batch or position it arrives in; without ``key`` they cannot be predicted."""
    u = np.empty((len(x), n_uniform))
    z = np.empty((len(x), n_normal))
    for i, d in enumerate(form.digests(x, key, 16)):
        rng = np.random.Generator(np.random.Philox(int.from_bytes(d, "big")))
        rng.random(out=u[i])
        rng.standard_normal(out=z[i])
    return torch.from_numpy(u), torch.from_numpy(z)


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
