"""Output perturbations: batched functions from probability rows (N, K) to probability rows.

Strong PPD (high-ES OOD queries): ``shuffle_noise``, ``reverse_rank``, ``inverse``, ``flatten``.
Weak PPD (low-ES OOD) and the DP baseline: ``reverse_sigmoid``. PBD (hard ID queries): ``flip``
(the authors' near one-hot answer :func:`pbd_authors`, or ``inverse``).
DAWN's watermark: ``permute_top``. Every function returns finite, non-negative float32 rows that
sum to 1 (within 1e-6).

Top-1 guarantees hold on the returned float32 rows, ties included: ``shuffle_noise``,
``reverse_rank``, ``inverse``, ``flip`` and ``permute_top`` always move the argmax away from the
input's argmax (``p.argmax(1)``, first index on ties); ``flatten`` always keeps it, and
``reverse_sigmoid`` keeps it whenever p_max >= 0.5.

Measuring a perturbation: :func:`top1_change_rate`, :func:`mean_l1`, :func:`mean_kl` and
:func:`perturbation_stats` (all three at once).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .scores import is_real

EPS = 1e-12


def normalize(p: Tensor) -> Tensor:
    """Clip at 0 and rescale rows to sum to 1 (computed in float64 for an exact sum); float32 out."""
    p = p.double().clamp_min(0)
    return (p / p.sum(1, keepdim=True).clamp_min(EPS)).float()


def _rows(n: int) -> Tensor:
    return torch.arange(n)


def _best_other(q: Tensor, top: Tensor) -> tuple[Tensor, Tensor]:
    """Value and index of the largest entry of each row of ``q`` other than column ``top``."""
    others = q.clone()
    others[_rows(len(q)), top] = float("-inf")
    return others.max(1)


def ensure_top_changed(q: Tensor, original_top: Tensor) -> Tensor:
    """Make sure no row of ``q`` has ``original_top`` as (one of) its largest entries.

    ``q`` (N, K >= 2) float rows, ``original_top`` (N,) int64 column per row. Where
    ``q[original_top]`` is >= every other entry, swap it with the largest other entry; if the two
    were tied (any number of entries may share the maximum), lower the original entry by one
    float ulp (the row sum moves by < 1e-7). Afterwards every row's maximum is held ONLY by
    columns other than ``original_top``, so ``q.argmax(1) != original_top`` whatever the
    tie-breaking of argmax."""
    q = q.clone()
    if len(q) == 0:
        return q
    best_other_val, best_other = _best_other(q, original_top)
    stuck = q[_rows(len(q)), original_top] >= best_other_val
    if stuck.any():
        rows = torch.nonzero(stuck).flatten()
        top, other = original_top[rows], best_other[rows]
        top_val, other_val = q[rows, top].clone(), q[rows, other].clone()
        q[rows, top], q[rows, other] = other_val, top_val
        tied = q[rows, top] >= q[rows, other]  # other now holds the row maximum
        if tied.any():
            r, t = rows[tied], top[tied]
            q[r, t] = torch.nextafter(q[r, t], torch.zeros_like(q[r, t]))
    return q


def ensure_top_kept(q: Tensor, original_top: Tensor) -> Tensor:
    """Make sure ``original_top`` is the UNIQUE largest entry of every row of ``q``.

    ``q`` (N, K >= 2) float rows, ``original_top`` (N,) int64. Where another entry is >= the
    original top's entry (float32 rounding of near-ties, or values clipped to the same level),
    swap the two; if the row maximum is then still shared (two or more entries tied with it),
    raise the original top to one float ulp above the largest other entry (the row sum moves by
    < 1e-7). Afterwards ``q.argmax(1) == original_top`` for every row, ties of any size included."""
    q = q.clone()
    if len(q) == 0:
        return q
    best_other_val, best_other = _best_other(q, original_top)
    lost = best_other_val >= q[_rows(len(q)), original_top]
    if lost.any():
        rows = torch.nonzero(lost).flatten()
        top, other = original_top[rows], best_other[rows]
        top_val, other_val = q[rows, top].clone(), q[rows, other].clone()
        q[rows, top], q[rows, other] = torch.maximum(top_val, other_val), torch.minimum(top_val, other_val)
        rest_val, _ = _best_other(q[rows], top)  # after the swap: is the maximum still shared?
        tied = rest_val >= q[rows, top]
        if tied.any():
            r, t = rows[tied], top[tied]
            q[r, t] = torch.nextafter(rest_val[tied], torch.full_like(rest_val[tied], math.inf))
    return q


def _check_probs(p: Tensor, name: str) -> None:
    if not isinstance(p, Tensor) or p.ndim != 2 or p.shape[1] < 2:
        shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
        raise ValueError(f"{name} expects probability rows (N, K >= 2), got {shape}; "
                         "pass model(x).softmax(1)")
    if not p.is_floating_point():
        raise ValueError(f"{name} expects float probabilities, got dtype {p.dtype}")


def shuffle_noise(p: Tensor, snr_db: float = 10.0, generator: torch.Generator | None = None,
                  u: Tensor | None = None, z: Tensor | None = None) -> Tensor:
    """Strong PPD against KnockoffNets/DFME: permute each row at random so that its top class moves,
    add |white Gaussian noise| at ``snr_db`` (noise power = mean(q^2) / 10^(snr/10)), renormalise.

    The randomness: ``u`` (N, K + 1) uniforms in [0, 1) (row i's permutation is
    ``argsort(u[i, :K])``; ``u[i, K]`` picks where the top value goes if it stayed) and ``z``
    (N, K) standard normals, so the answer is a pure function of (p, u, z) (what
    :class:`~cip_helpers.method.defenses.CIP` passes, keyed on each query); without them both
    are drawn from ``generator``. Raises ``ValueError`` for wrong shapes."""
    _check_probs(p, "shuffle_noise")
    n, k = p.shape
    if (u is None) != (z is None):
        raise ValueError("shuffle_noise takes u and z together (or neither, to draw from generator)")
    if u is None:
        u = torch.rand(n, k + 1, generator=generator, dtype=torch.float64)
        z = torch.randn(n, k, generator=generator, dtype=torch.float64)
    if tuple(u.shape) != (n, k + 1) or tuple(z.shape) != (n, k):
        raise ValueError(f"shuffle_noise needs u of shape {(n, k + 1)} and z of shape {(n, k)}, got "
                         f"{tuple(u.shape)} and {tuple(z.shape)}")
    perm = u[:, :k].argsort(1)
    top = p.argmax(1)
    # q[j] = p[perm[j]]: the top value stays in place exactly where perm[top] == top. There, swap
    # perm[top] with a random other slot so the top value always lands on another class.
    stuck = perm.gather(1, top[:, None])[:, 0] == top
    if stuck.any():
        rows = torch.nonzero(stuck).flatten()
        step = 1 + (u[rows, k] * (k - 1)).long().clamp_max(k - 2)
        other = (top[rows] + step) % k
        a, b = perm[rows, top[rows]].clone(), perm[rows, other].clone()
        perm[rows, top[rows]], perm[rows, other] = b, a
    q = p.double().gather(1, perm)
    noise_std = torch.sqrt(q.pow(2).mean(1, keepdim=True) / 10 ** (snr_db / 10))
    q = q + (z.double() * noise_std).abs()
    return ensure_top_changed(normalize(q), top)


def reverse_rank(p: Tensor) -> Tensor:
    """Strong PPD against IDA/DQA: the k-th largest probability goes to the class with the k-th
    smallest probability (the argmax becomes the argmin). Ties in ``p`` are broken so that the
    top-1 class still changes."""
    _check_probs(p, "reverse_rank")
    ascending = torch.argsort(p, dim=1, stable=True)
    descending_values = p.gather(1, ascending.flip(1))
    q = torch.zeros_like(p).scatter(1, ascending, descending_values)
    return ensure_top_changed(normalize(q), p.argmax(1))


def inverse(p: Tensor) -> Tensor:
    """p -> (1/p) renormalised (p clipped at 1e-8): the least likely class becomes the most likely."""
    _check_probs(p, "inverse")
    return ensure_top_changed(normalize(1.0 / p.double().clamp_min(1e-8)), p.argmax(1))


def flatten(p: Tensor, power: float = 1 / 30) -> Tensor:
    """p -> p^(1/30) renormalised: nearly uniform, but the argmax is KEPT (a weak poison)."""
    _check_probs(p, "flatten")
    return ensure_top_kept(normalize(p.double().clamp_min(0).pow(power)), p.argmax(1))


def check_reverse_sigmoid(beta: float, gamma: float) -> None:
    """``ValueError`` unless beta > 0 and gamma > 0 are finite: beta = 0 or gamma = 0 moves answers
    by ~1e-7, i.e. no defense at all (Lee et al. use beta in (0, 1], gamma in (0, 1])."""
    for name, v in (("beta", beta), ("gamma", gamma)):
        if not (is_real(v) and math.isfinite(v) and v > 0):
            raise ValueError(f"reverse sigmoid {name} must be a finite number > 0, got {v!r} "
                             "(the paper and ART default to beta = 0.9, gamma = 0.6)")


def reverse_sigmoid(p: Tensor, beta: float = 0.9, gamma: float = 0.6) -> Tensor:
    """Reverse sigmoid (Lee et al. 2019): y' = y - beta * (sigmoid(gamma * logit(y)) - 1/2), clipped
    at 0 and renormalised (y clipped to [1e-7, 1 - 1e-7] first). Keeps the top-1 class when
    p_max >= 0.5; below that it may change (the map is not monotonic near 0)."""
    _check_probs(p, "reverse_sigmoid")
    check_reverse_sigmoid(beta, gamma)
    y = p.double().clamp(1e-7, 1 - 1e-7)
    q = normalize(y - beta * (torch.sigmoid(gamma * torch.logit(y)) - 0.5))
    confident = p.max(1).values >= 0.5
    if confident.any():
        q[confident] = ensure_top_kept(q[confident], p[confident].argmax(1))
    return q


def sharpened_inverse(p: Tensor) -> Tensor:
    """The authors' PBD answer before its shuffle (``close_set_probability_poisoned`` in
    ``categorical_inference_poisoning/function.py`` of Hatins/CIP_master): with t = p_min / 100,
    the (first) smallest entry becomes t, every other entry p_j + 11 t; then 1/x, renormalised.
    The former argmin gets mass >= 100 / (100 + (K - 1) / 1.11) (0.925 for K = 10): a near one-hot
    row on the originally LEAST likely class. ``p`` (N, K >= 2) float; float32 rows out."""
    _check_probs(p, "sharpened_inverse")
    q = p.double().clamp_min(0) + 1e-29  # the authors add 1e-29 so that 1/x stays finite
    low = q.argmin(1)
    t = q.gather(1, low[:, None]) / 100
    q = (q + 11 * t).scatter(1, low[:, None], t)
    return normalize(1.0 / q)


def pbd_authors(p: Tensor, u: Tensor) -> Tensor:
    """PBD's flipped answer as in the authors' release: :func:`sharpened_inverse`, then its entries
    permuted at random until the top class differs from ``p``'s, so the answer is a near one-hot
    row (top mass >= 0.925 for K = 10) on a class drawn uniformly from the K - 1 classes other
    than the original top.

    ``u`` (N, K + 1) uniform numbers in [0, 1) drive the randomness (row i's permutation is
    ``argsort(u[i, :K])``; ``u[i, K]`` picks the class if the big entry lands on the original
    top), so the answer is a pure function of (p, u): :class:`~cip_helpers.method.defenses.CIP` derives
    ``u`` from a keyed hash of each query, the same query always gets the same answer and the
    answers do not depend on how queries are batched (the authors draw from Python's global
    ``random``, seeded once, so theirs depend on query order). Raises ``ValueError`` for a wrong
    shape of ``u`` or values outside [0, 1)."""
    _check_probs(p, "pbd_authors")
    n, k = p.shape
    if not isinstance(u, Tensor) or tuple(u.shape) != (n, k + 1):
        shape = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"pbd_authors needs u of shape (N, K + 1) = ({n}, {k + 1}), got {shape}")
    if n and not (float(u.min()) >= 0 and float(u.max()) < 1):
        raise ValueError("pbd_authors needs u in [0, 1) (uniform random numbers)")
    sharp = sharpened_inverse(p)
    top = p.argmax(1)
    big = sharp.argmax(1)  # where the near one-hot mass sits before the shuffle (p's argmin)
    perm = u[:, :k].argsort(1)  # answer[j] = sharp[perm[j]]
    rows = _rows(n)
    slot = perm.argsort(1)[rows, big]  # where the big entry lands
    stuck = slot == top
    if stuck.any():  # move it to a uniformly drawn other class: swap the two slots' sources
        r = torch.nonzero(stuck).flatten()
        other = (top[r] + 1 + (u[r, k] * (k - 1)).long().clamp_max(k - 2)) % k
        a, b = perm[r, top[r]].clone(), perm[r, other].clone()
        perm[r, top[r]], perm[r, other] = b, a
    return ensure_top_changed(sharp.gather(1, perm), top)


PBD_ANSWERS = ("authors", "inverse")
"""PBD's flipped answer: ``"authors"`` (:func:`pbd_authors`, the default) or ``"inverse"``
(:func:`inverse`: plain 1/p, top mass ~0.3 on ambiguous rows, on the original least likely
class (the first of them when several are below the 1e-8 clip); the course's earlier answer,
kept as a named variant)."""


def flip(p: Tensor, answer: str = "authors", u: Tensor | None = None,
         generator: torch.Generator | None = None) -> Tensor:
    """PBD's flipped answer, whose top class always differs from ``p``'s: ``answer="authors"``
    (:func:`pbd_authors`; its randomness from ``u`` (N, K + 1) in [0, 1), or drawn from
    ``generator`` when ``u`` is None) or ``"inverse"`` (:func:`inverse`, deterministic).
    Raises ``ValueError`` for another ``answer``."""
    if answer == "inverse":
        return inverse(p)
    if answer != "authors":
        raise ValueError(f"unknown PBD answer {answer!r}; choose one of {PBD_ANSWERS}")
    if u is None:
        u = torch.rand(p.shape[0], p.shape[1] + 1, generator=generator, dtype=torch.float64)
    return pbd_authors(p, u)


def dawn_top_k(n_classes: int) -> int:
    """How many top entries DAWN permutes: floor(sqrt(K)), at least 2 (so something can move)."""
    return max(2, math.isqrt(n_classes))


def permute_top(p: Tensor, shift: Tensor | None = None) -> Tensor:
    """DAWN's watermark: cyclically shift the top-floor(sqrt(K)) entries of each row by ``shift``
    (1..k-1, default 1) so every one of them moves, hence the top-1 class changes (ties included)."""
    _check_probs(p, "permute_top")
    n, k = p.shape
    top_k = dawn_top_k(k)
    idx = p.topk(top_k, dim=1).indices  # (n, top_k), descending
    shift = torch.ones(n, dtype=torch.long) if shift is None else shift.long()
    if shift.shape != (n,):
        raise ValueError(f"shift must have one entry per row ({n}), got shape {tuple(shift.shape)}")
    if len(shift) and ((shift < 1) | (shift >= top_k)).any():
        raise ValueError(f"shift must be in 1..{top_k - 1} (K={k} classes permute the top {top_k})")
    src = (torch.arange(top_k)[None] + shift[:, None]) % top_k  # slot j takes the value of slot j+s
    q = p.clone()
    q.scatter_(1, idx, p.gather(1, idx.gather(1, src)))
    return ensure_top_changed(normalize(q), p.argmax(1))


def compare_pbd_answers(p: Tensor, generator: torch.Generator | None = None):
    """Both PBD answers (:data:`PBD_ANSWERS`) to the probability rows ``p`` (N, K), as a pandas
    DataFrame with one row per answer: ``mean_top_mass`` and ``min_top_mass`` (the answered top
    probability), ``label_is_original_top`` (share whose answered top-1 is ``p``'s: 0 by
    construction), ``label_is_original_argmin`` (share on ``p``'s least likely class: 1 for
    ``inverse``, about 1/(K-1) for the authors' random class) and ``mean_l1`` to ``p``."""
    import pandas as pd

    _check_probs(p, "compare_pbd_answers")
    rows = {}
    for name in PBD_ANSWERS:
        q = flip(p, name, generator=generator)
        top = q.max(1).values
        rows[name] = {"mean_top_mass": float(top.mean()), "min_top_mass": float(top.min()),
                      "label_is_original_top": float((q.argmax(1) == p.argmax(1)).double().mean()),
                      "label_is_original_argmin": float((q.argmax(1) == p.argmin(1)).double().mean()),
                      "mean_l1": mean_l1(p, q)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("PBD answer")


STRONG_PPD = {"shuffle_noise": shuffle_noise, "reverse_rank": reverse_rank, "inverse": inverse,
              "flatten": flatten}


def all_variants(p: Tensor, snr_db: float = 10.0, beta: float = 0.9, gamma: float = 0.6,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Every CIP perturbation of ``p``: the four strong PPDs, weak PPD (reverse sigmoid) and the
    PBD flips, keyed by name (the names of :data:`STRONG_PPD`, ``"weak (reverse_sigmoid)"``, ``"flip"``
    (the authors' answer) and ``"flip (inverse)"``)."""
    out = {name: (fn(p, snr_db=snr_db, generator=generator) if name == "shuffle_noise" else fn(p))
           for name, fn in STRONG_PPD.items()}
    out["weak (reverse_sigmoid)"] = reverse_sigmoid(p, beta, gamma)
    out["flip"] = flip(p, "authors", generator=generator)
    out["flip (inverse)"] = flip(p, "inverse")
    return out


# --- measuring a perturbation --------------------------------------------------------------

def _pair(clean: Tensor, poisoned: Tensor) -> None:
    if clean.shape != poisoned.shape or clean.ndim != 2:
        raise ValueError(f"need two (N, K) tensors of the same shape, got {tuple(clean.shape)} "
                         f"and {tuple(poisoned.shape)}")


def top1_change_rate(clean: Tensor, poisoned: Tensor) -> float:
    """Fraction of rows whose argmax differs between ``clean`` and ``poisoned`` (NaN if empty)."""
    _pair(clean, poisoned)
    if len(clean) == 0:
        return float("nan")
    return float((clean.argmax(1) != poisoned.argmax(1)).double().mean())


def mean_l1(clean: Tensor, poisoned: Tensor) -> float:
    """Mean over rows of sum_k |clean_k - poisoned_k| (0 = identical, 2 = disjoint supports)."""
    _pair(clean, poisoned)
    if len(clean) == 0:
        return float("nan")
    return float((clean.double() - poisoned.double()).abs().sum(1).mean())


def mean_kl(clean: Tensor, poisoned: Tensor, eps: float = 1e-8) -> float:
    """Mean over rows of KL(clean || poisoned) = sum_k c_k log(c_k / q_k), in nats; both rows are
    clipped at ``eps`` and renormalised so that zeros give large but finite values."""
    _pair(clean, poisoned)
    if len(clean) == 0:
        return float("nan")
    c = clean.double().clamp_min(eps)
    q = poisoned.double().clamp_min(eps)
    c, q = c / c.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    return float((c * (c.log() - q.log())).sum(1).mean())


def perturbation_stats(clean: Tensor, poisoned: Tensor) -> dict[str, float]:
    """``top1_change_rate``, ``mean_l1`` and ``mean_kl`` of one perturbation, as a dict."""
    return {"top1_change_rate": top1_change_rate(clean, poisoned), "mean_l1": mean_l1(clean, poisoned),
            "mean_kl": mean_kl(clean, poisoned)}


def perturbation_table(clean: Tensor, variants: dict[str, Tensor]):
    """A pandas DataFrame, one row per named perturbation of ``clean`` (e.g. the output of
    :func:`all_variants`), columns ``top1_change_rate``, ``mean_l1``, ``mean_kl``."""
    import pandas as pd

    rows = {name: perturbation_stats(clean, q) for name, q in variants.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("perturbation")
