"""Adaptive Misinformation (AM; Kariyappa & Qureshi, "Defending Against Model Stealing Attacks
With Adaptive Misinformation", CVPR 2020): a baseline defense beside CIP.

AM wraps an outlier-exposure-trained victim f and a second network fhat of the same architecture,
the *misinformation model*, trained to put LOW probability on f's predicted class
(:func:`misinformation_loss`). A query x is answered with

    y = (1 - a) * softmax(f(x)) + a * softmax(fhat(x)),   a = sigmoid(nu * (tau - s(x)))

where s(x) is an OOD score, higher = more in-distribution: AM's own is the maximum softmax
probability of f (``score="msp"``); ``score="energy"`` takes the negative energy
-E(x) = T * logsumexp(f(x) / T) instead (an ablation: CIP's score with AM's answer). With the
release's ``nu`` = 10,000 (``admis/utils/defense.py`` of GitHub sanjaykariyappa/adaptive_misinformation,
class ``selectiveMisinformation``) a is a step at ``tau``: confident queries get f's own answer,
the others fhat's misinformation. Unlike CIP, AM keeps no trigger set (no ownership evidence).

:meth:`AdaptiveMisinformation.calibrate` / :func:`tau_for_fidelity` choose ``tau`` from ID
TRAINING images so that AM changes the top-1 answer of a given share of them (the course matches
the share CIP changes, so both defenses cost benign users alike).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .defenses import Defense, probe_logits, softmax
from .digests import weights_sha256
from .inputs import as_images
from .models import predict_logits
from .scores import check_temperature, energy_score, finite_number, is_real

AM_SCORES = ("msp", "energy")
"""AM's OOD scores s(x) (higher = more in-distribution): ``"msp"`` (max softmax probability of the
victim, in [1/K, 1]; AM's own) or ``"energy"`` (negative energy T * logsumexp(f / T), unbounded;
the ablation with CIP's detector score)."""

AM_NU = 10_000.0
"""The release's sharpness of a = sigmoid(nu * (tau - s)) (``selectiveMisinformation``:
``1 / (1 + exp(-10000 * (delta - p_max)))``): a moves from 0.007 to 0.993 within +-0.0005 of tau
(in p_max), so AM is a step in practice."""

MARGIN = 20.0
"""How far (in units of the sigmoid's argument nu * (tau - s)) :func:`tau_for_fidelity` places tau
beyond the last training image it must leave alone (or reach) when there is no next one: a changes
by a factor of about e^20 there."""


def misinformation_loss(logits_hat: Tensor, victim_top1: Tensor) -> Tensor:
    """AM's training loss of the misinformation model (the release's ``train_step``):
    -mean log(1 - softmax(fhat(x))[y] + 1e-7) with y = argmax f(x), i.e. NLL on log(1 - q).
    ``logits_hat`` (N, K) float, ``victim_top1`` (N,) int64 in [0, K) -> scalar. Minimal when fhat
    puts no mass on the victim's class. Raises ``ValueError`` for mismatched shapes."""
    if logits_hat.ndim != 2 or victim_top1.shape != logits_hat.shape[:1]:
        raise ValueError(f"need logits (N, K) and labels (N,), got {tuple(logits_hat.shape)} and "
                         f"{tuple(victim_top1.shape)}")
    return F.nll_loss(torch.log(1 - logits_hat.softmax(1) + 1e-7), victim_top1)


def ood_score(logits: Tensor, score: str = "msp", temperature: float = 1.0) -> Tensor:
    """AM's score s(x) per row of ``logits`` (N, K), float64 (N,), higher = more in-distribution:
    ``"msp"`` the max softmax probability (in [1/K, 1]; ``temperature`` is not used), ``"energy"``
    -E(x) = T * logsumexp(f / T) (:func:`scores.energy_score`). Non-finite logits give NaN or +-inf (the defense treats those
    rows apart). Raises ``ValueError`` for another score or a bad temperature."""
    score = check_score(score)
    if score == "msp":
        return logits.double().softmax(1).amax(1)
    return -energy_score(logits.double(), temperature)


def check_score(score: str) -> str:
    """``score`` if it is one of :data:`AM_SCORES`, else ``ValueError``."""
    if score not in AM_SCORES:
        raise ValueError(f"AM score must be one of {AM_SCORES} ('msp': max softmax probability, AM's own; "
                         f"'energy': negative energy, the ablation), got {score!r}")
    return score


def check_nu(nu: float) -> float:
    """``nu`` as a float, or ``ValueError`` unless it is a finite number > 0."""
    v = float(nu) if is_real(nu) else math.nan
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"AM's nu (the sharpness of a = sigmoid(nu * (tau - s))) must be a finite number "
                         f"> 0, got {nu!r} (the release uses {AM_NU:g})")
    return v


def check_tau(tau: float, score: str) -> float:
    """``tau`` as a float, or ``ValueError``: a finite number, in [0, 1] for ``score="msp"`` (a max
    softmax probability: tau <= 1/K misinforms nearly nothing, tau = 1 nearly everything)."""
    t = finite_number(f"AM's tau (in units of the {score!r} score)", tau)
    if score == "msp" and not 0 <= t <= 1:
        raise ValueError(f"AM's tau for score='msp' is a max softmax probability: it must be in [0, 1], got {tau!r}")
    return t


def misinformation_weight(s: Tensor, tau: float, nu: float) -> Tensor:
    """a = sigmoid(nu * (tau - s)) per score of ``s`` (N,), float64 in [0, 1]; exactly 0 where
    nu * (s - tau) > ~745 (float64 underflow). Fails closed: a NaN score gives a = 1."""
    return torch.sigmoid(nu * (tau - s.double())).nan_to_num(nan=1.0)


def mix(p: Tensor, q: Tensor, alpha: Tensor) -> Tensor:
    """(1 - a) * p + a * q per row, computed in float64 and returned as float32: ``p``, ``q``
    (N, K) probability rows, ``alpha`` (N,) in [0, 1]. A row with a = 0 is ``p`` bit for bit, a row
    with a = 1 is ``q`` (given finite ``p``)."""
    a = alpha.double()[:, None]
    return ((1 - a) * p.double() + a * q.double()).float()


class AdaptiveMisinformation(Defense):
    """Adaptive Misinformation (Kariyappa & Qureshi 2020) around ``model`` (an OE-trained victim,
    raw images -> K logits) and ``misinformation_model`` (same input shape, K logits; trained with
    :func:`misinformation_loss`): ``y = (1 - a) f + a fhat`` (softmaxes), a = sigmoid(nu (tau - s)),
    s = :func:`ood_score` of the victim's logits (``score``: :data:`AM_SCORES`; ``temperature``
    only for ``"energy"``). Answers are (N, K) float32 probability rows.

    Deterministic and per query: no randomness, and a row depends only on its own image, so the
    same image gets the same answer whatever the batching (up to the float rounding of batched
    kernels, :data:`models.PREDICT_BATCH`). The misinformation model runs (in chunks of
    ``forward_batch``) only on the rows with a > 0; rows with a = 0 are the victim's softmax bit for
    bit.

    Fails closed: a row whose victim logits are not all finite gets a = 1, the misinformation
    answer; non-finite logits of the misinformation model raise ``RuntimeError`` (no answer is
    better than a garbage one). Every parameter is checked at construction: ``ValueError`` for
    ``tau`` not finite (not in [0, 1] for ``"msp"``), ``nu`` not finite > 0, an unknown ``score``,
    a temperature not finite > 0 (or not 1 with ``"msp"``, which has none), a misinformation model
    that does not take ``input_shape`` or returns other than K logits, or that is the victim itself;
    ``TypeError`` for a model that is not a ``torch.nn.Module``.

    After each call ``last_alpha`` holds a per query, (N,) float64; ``totals["misinformed"]``
    counts the queries with a > 0.5 over all calls."""

    name = "am"
    answers_nonfinite = True

    def __init__(self, model: nn.Module, misinformation_model: nn.Module, input_shape: tuple[int, int, int],
                 tau: float, nu: float = AM_NU, score: str = "msp", temperature: float = 1.0) -> None:
        score = check_score(score)
        tau = check_tau(tau, score)
        nu = check_nu(nu)
        temperature = check_temperature(temperature)
        if score == "msp" and temperature != 1.0:
            raise ValueError(f"temperature applies to score='energy' only (AM's max softmax probability uses "
                             f"the API's own softmax, T = 1), got temperature={temperature!r}")
        if not isinstance(misinformation_model, nn.Module):
            raise TypeError(f"am: misinformation_model must be a torch.nn.Module mapping raw images to "
                            f"logits, got {type(misinformation_model).__name__}")
        if misinformation_model is model:
            raise ValueError("am: misinformation_model is the victim itself; AM needs a second network "
                             "trained with misinformation_loss (it would answer the truth)")
        super().__init__(model, input_shape)
        self.misinformation_model = misinformation_model.eval()
        probe = probe_logits(misinformation_model, self.input_shape, "am: the misinformation model")
        if probe.ndim != 2 or probe.shape[1] != self.n_classes:
            raise ValueError(f"am: the misinformation model must return logits (N, K = {self.n_classes}) like "
                             f"the victim, got shape {tuple(probe.shape)}")
        self.tau, self.nu, self.score, self.temperature = tau, nu, score, temperature
        self.last_alpha = torch.zeros(0, dtype=torch.float64)
        self._last_misinformed = 0
        self._misinformation_sha256: str | None = None

    @property
    def misinformation_sha256(self) -> str:
        """sha256 of the misinformation model's weights at first use (:func:`digests.weights_sha256`):
        records cite it beside :attr:`weights_sha256` (the victim's)."""
        if self._misinformation_sha256 is None:
            self._misinformation_sha256 = weights_sha256(self.misinformation_model)
        return self._misinformation_sha256

    def ood_score(self, logits: Tensor) -> Tensor:
        """s(x) of victim ``logits`` (N, K) with this defense's score and temperature (:func:`ood_score`)."""
        return ood_score(logits, self.score, self.temperature)

    def misinformation_probs(self, x: Tensor) -> Tensor:
        """softmax(fhat(x)) (N, K) float32 for raw images ``x`` (N, C, H, W), in chunks of
        ``forward_batch``. Raises ``RuntimeError`` if fhat returns a non-finite logit."""
        logits = predict_logits(self.misinformation_model, x, batch_size=self.forward_batch)
        if not torch.isfinite(logits).all():
            bad = torch.nonzero(~torch.isfinite(logits).all(1)).flatten()
            raise RuntimeError(f"am: the misinformation model returned non-finite logits for {len(bad)} of "
                               f"{len(x)} queries (rows {bad[:10].tolist()}); refusing to answer. Check its "
                               "weights (a corrupt or diverged checkpoint?)")
        return softmax(logits)

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:
        p = self.last_clean
        a = misinformation_weight(self.ood_score(logits), self.tau, self.nu)
        if self._nonfinite is not None:  # fail closed: no trustworthy victim answer -> misinformation
            a = a.masked_fill(self._nonfinite, 1.0)
            p = p.clone()
            p[self._nonfinite] = 1.0 / self.n_classes  # a = 1 takes none of it; keeps NaN out of the mix
        need = a > 0
        out = p
        if bool(need.any()):
            out = p.clone()
            out[need] = mix(p[need], self.misinformation_probs(x[need]), a[need])
        self.last_alpha = a
        self._last_misinformed = int((a > 0.5).sum())
        return out

    def _total_keys(self) -> tuple[str, ...]:
        return ("misinformed",)

    def _count(self, n: int) -> None:
        self.totals["misinformed"] += self._last_misinformed

    @classmethod
    def calibrate(cls, model: nn.Module, misinformation_model: nn.Module, x_train: Tensor,
                  target_top1_change: float, score: str = "msp", nu: float = AM_NU,
                  temperature: float = 1.0) -> AdaptiveMisinformation:
        """AM with tau from :func:`tau_for_fidelity` on the ID TRAINING images ``x_train``
        (N, C, H, W) in [0, 1] (tensor or numpy, N >= 1): the share of them whose top-1 answer AM
        changes (vs ``model``'s top-1) is as close to ``target_top1_change`` (in [0, 1]) as it can
        be without exceeding it. Raises ``ValueError``/``TypeError`` as the constructor and
        :func:`tau_for_fidelity` do, and for an empty batch."""
        for m in (model, misinformation_model):
            if not isinstance(m, nn.Module):
                raise TypeError(f"AdaptiveMisinformation.calibrate: models must be torch.nn.Modules, got "
                                f"{type(m).__name__}")
        x = as_images(x_train)
        if len(x) == 0:
            raise ValueError("AdaptiveMisinformation.calibrate needs at least one ID training image")
        tau = tau_for_fidelity(predict_logits(model, x), predict_logits(misinformation_model, x),
                               target_top1_change, score, nu, temperature)
        return cls(model, misinformation_model, tuple(x.shape[1:]), tau, nu=nu, score=score, temperature=temperature)


def changed_top1(victim_logits: Tensor, misinformation_logits: Tensor, tau: float, nu: float = AM_NU,
                 score: str = "msp", temperature: float = 1.0) -> Tensor:
    """(N,) bool: which rows AM's answer (same arithmetic as :meth:`AdaptiveMisinformation.answer`)
    gives another top-1 than the victim's softmax, for victim and misinformation logits (N, K)."""
    p, q = softmax(victim_logits), softmax(misinformation_logits)
    a = misinformation_weight(ood_score(victim_logits, score, temperature), tau, nu)
    out = p.clone()
    need = a > 0
    out[need] = mix(p[need], q[need], a[need])
    return out.argmax(1) != p.argmax(1)


def tau_for_fidelity(victim_logits: Tensor, misinformation_logits: Tensor, target_top1_change: float,
                     score: str = "msp", nu: float = AM_NU, temperature: float = 1.0) -> float:
    """The tau at which AM changes the top-1 answer of the largest share of these (ID TRAINING)
    images that does not exceed ``target_top1_change`` (a fraction in [0, 1]). ``victim_logits`` and
    ``misinformation_logits`` are the (N, K) logits of f and fhat on the same N >= 1 images.

    How: along a = 0 -> 1 the answer moves on a straight line from p = softmax(f) to
    q = softmax(fhat), so an image's top-1 changes exactly when a exceeds its critical
    a* = min over classes j with (q_j - q_c) - (p_j - p_c) > 0 of (p_c - p_j) / that difference
    (c = the victim's class; none: never), i.e. when tau > t* = s + logit(a*) / nu. The share is
    therefore a step function of tau, and with the critical values sorted, t*_(1) <= t*_(2) <= ...,
    every tau in (t*_(k), t*_(k+1)] changes exactly k images, k = floor(target x N): the midpoint of
    that interval is returned (the widest margin on both sides; :data:`MARGIN` / nu past the
    last one when the interval is open), clipped to [0, 1] for ``"msp"``. The share at the chosen
    tau is then counted with the defense's own arithmetic (:func:`changed_top1`) and tau moved
    down one critical value at a time while it exceeds the target (float ties).

    Raises ``ValueError`` for a target outside [0, 1], logits that are not two finite (N >= 1, K)
    tensors of one shape, a bad score, nu or temperature, or when no tau can keep the share at or
    below the target (a small ``nu`` mixes some misinformation into every answer)."""
    target = finite_number("target_top1_change", target_top1_change)
    if not 0 <= target <= 1:
        raise ValueError(f"target_top1_change is a share of training images: it must be in [0, 1], got {target!r}")
    score, nu = check_score(score), check_nu(nu)
    if (victim_logits.ndim != 2 or victim_logits.shape != misinformation_logits.shape
            or len(victim_logits) == 0):
        raise ValueError(f"need victim and misinformation logits of one shape (N >= 1, K), got "
                         f"{tuple(victim_logits.shape)} and {tuple(misinformation_logits.shape)}")
    if not (torch.isfinite(victim_logits).all() and torch.isfinite(misinformation_logits).all()):
        raise ValueError("tau_for_fidelity needs finite logits (a corrupt model?)")
    s = ood_score(victim_logits, score, temperature)
    p, q = softmax(victim_logits).double(), softmax(misinformation_logits).double()
    c = p.argmax(1, keepdim=True)
    gap = p.gather(1, c) - p  # p_c - p_j >= 0
    slope = (q - q.gather(1, c)) + gap  # (q_j - q_c) - (p_j - p_c)
    crossing = torch.where(slope > 0, gap / slope.clamp_min(1e-300), torch.full_like(gap, math.inf))
    crossing.scatter_(1, c, math.inf)
    a_star = crossing.amin(1)
    logit = torch.where(a_star < 1, torch.log(a_star) - torch.log1p(-a_star.clamp(max=1 - 1e-16)),
                        torch.full_like(a_star, math.inf))
    t_star = torch.sort(s + logit / nu).values
    t_star = t_star[t_star < math.inf]  # images fhat never changes
    n = len(s)
    k = min(int(math.floor(target * n + 1e-9)), len(t_star))

    def candidate(k: int) -> float:
        if len(t_star) == 0:  # fhat changes no training image: the largest tau costs nothing here
            tau = float(s.max()) + MARGIN / nu
        elif k == 0:
            tau = float(t_star[0]) - MARGIN / nu
        elif k == len(t_star):
            tau = float(t_star[-1]) + MARGIN / nu
        else:
            lo, hi = float(t_star[k - 1]), float(t_star[k])
            tau = hi - MARGIN / nu if lo == -math.inf else (lo + hi) / 2
        if not math.isfinite(tau):
            tau = float(s.min()) - MARGIN / nu  # every critical value is -inf (ties in p): change as few as possible
        return min(max(tau, 0.0), 1.0) if score == "msp" else tau

    def share(tau: float) -> float:
        return float(changed_top1(victim_logits, misinformation_logits, tau, nu, score, temperature).double().mean())

    for kk in range(k, -1, -1):
        tau = candidate(kk)
        if share(tau) <= target:
            return tau
    # float ties at the bottom: the lowest tau allowed (a underflows to 0 where nu (s - tau) > 745)
    tau = 0.0 if score == "msp" else float(s.min()) - 800 / nu
    if share(tau) <= target:
        return tau
    raise ValueError(f"no tau keeps AM's top-1 changes at or below {target:g} of these images: even at "
                     f"tau = {tau:g} the misinformation answer reaches some of them (nu = {nu:g} is too "
                     "small for a step; the release uses 10,000)")
