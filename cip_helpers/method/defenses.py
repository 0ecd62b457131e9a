"""Defended prediction APIs: ``NoDefense``, ``DP``, ``DAWN`` and ``CIP``.

Every defense wraps a victim and is called like a black box: ``defense(x)`` takes raw images
(N, C, H, W) in [0, 1] and returns (N, K) probabilities; ``defense.model`` is the wrapped victim
(raw images -> logits) for comparing clean and defended answers. CIP computes energy, softmax and
reliability from ONE forward pass and applies all branches as batched tensor operations.

Measuring defenses (notebooks 04-06): :func:`branch_examples`, :func:`change_rate_by_pmax`,
:func:`compare_defenses` and :func:`r1_from_scores`; per-perturbation statistics live in
:mod:`cip_helpers.method.poisoning` (``top1_change_rate``, ``mean_l1``, ``mean_kl``).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import poisoning
from .digests import IMAGE_FORM, QUERY_FORM, QueryForm, keyed_randoms, weights_sha256
from .inputs import as_images
from .models import PREDICT_BATCH, predict_logits
from .scores import (HIGH_ES, ID, LOW_ES, ROUTE_NAMES, check_temperature, check_thresholds, energy_score,
                     finite_number, reliability_score, route)

PBD_MODES = ("online", "offline_top_T", None)
"""CIP's PBD modes: ``"online"`` (the API default; batch-invariant), ``"offline_top_T"`` (the
paper's evaluation device: one call = the attacker's whole transfer set) and ``None`` (no PBD)."""


SINGLE_THREAD_MIN = 1_024
"""Calls whose logits have at least this many entries (about 100 queries of 10 classes) run the
post-processing on one thread (:func:`single_thread`); smaller ones skip the switch, a fixed
per-call cost (benchmarks/api_latency.py, one run each: calls of 256 at 1.06x of plain with the
switch, 1.33x without; one-query calls 2.0-2.6x either way, within the run-to-run spread)."""


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread. The per-query post-processing works on
    (N, K) tensors that are far too small to gain from threads; on a busy CPU, waiting for a
    second thread made each such op ~30x slower (benchmarks/api_latency.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TriggerSet:
    """Queries whose answers the defender altered on purpose: (input, original answer, altered
    answer). A stolen model agrees with ``labels`` (the altered top-1) far more than chance.

    It is a set: :meth:`append` skips an image whose canonical form (``form``,
    :class:`digests.QueryForm`, the defense's own) or whose 8-bit image
    (:data:`digests.IMAGE_FORM`, what :func:`verification.distinct_index` counts) is already in
    it, keeping the first answer: a query asked twice, its -0.0 twin, or a copy nudged below the
    form's resolution is one trigger, not two pieces of evidence (:mod:`verification`), and two
    entries never share an 8-bit image (which the ownership test would refuse as a corrupt log)."""

    x: Tensor = field(default_factory=lambda: torch.empty(0))
    original: Tensor = field(default_factory=lambda: torch.empty(0))
    altered: Tensor = field(default_factory=lambda: torch.empty(0))
    form: QueryForm = QUERY_FORM
    # digests (canonical form, 8-bit image) of the images in the set, built on first append
    _digests: set[bytes] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labels(self) -> Tensor:
        """The altered top-1 class of every trigger (what a stolen surrogate learned)."""
        return self.altered.argmax(1) if len(self) else torch.empty(0, dtype=torch.long)

    def append(self, x: Tensor, original: Tensor, altered: Tensor) -> None:
        """Add triggers: inputs ``x`` (N, C, H, W) with their original and altered probability rows
        (N, K); images already in the set (same canonical form) are skipped. Raises ``ValueError`` on
        mismatched lengths."""
        if not len(x) == len(original) == len(altered):
            raise ValueError(f"x, original and altered need the same length, got {len(x)}, "
                             f"{len(original)}, {len(altered)}")
        if len(x) == 0:
            return
        # a set: a query asked again (the same canonical form) is already evidence, once
        if self._digests is None:
            self._digests = set()
            if len(self):
                self._digests.update(b"f" + d for d in self.form.digests(self.x))
                self._digests.update(b"i" + d for d in IMAGE_FORM.digests(self.x))
        new = []
        for i, (form, image) in enumerate(zip(self.form.digests(x), IMAGE_FORM.digests(x))):
            if b"f" + form not in self._digests and b"i" + image not in self._digests:
                self._digests.update((b"f" + form, b"i" + image))
                new.append(i)
        if not new:
            return
        keep = torch.tensor(new, dtype=torch.long)
        x, original, altered = x[keep], original[keep], altered[keep]
        if len(self) == 0:
            self.x, self.original, self.altered = x.clone(), original.clone(), altered.clone()
        else:
            self.x = torch.cat([self.x, x])
            self.original = torch.cat([self.original, original])
            self.altered = torch.cat([self.altered, altered])

def probe_logits(model: nn.Module, input_shape: tuple[int, ...], what: str) -> Tensor:
    """``model``'s output for one black image of ``input_shape`` (C, H, W), without gradients.
    Raises ``ValueError`` naming ``what`` when the model does not take images of that shape."""
    try:
        with torch.no_grad():
            return model(torch.zeros(1, *input_shape))
    except RuntimeError as exc:
        raise ValueError(f"{what} does not take images of input_shape {tuple(input_shape)} (C, H, W): "
                         f"{exc}") from exc


class Defense:
    """Base class of every defended API: input checks, one batched forward pass, output checks,
    running totals.

    ``defense(x)``: ``x`` is a batch of raw images (N, C, H, W) in [0, 1], a ``torch.Tensor`` or a
    ``numpy.ndarray`` (float32; float64/float16 are cast to float32, see
    :func:`inputs.as_images`); the answer is (N, K) float32 probability rows, as a tensor, or
    as a numpy array when ``x`` was one. Bad input raises ``ValueError``/``TypeError`` with the
    fix (wrong rank, layout or channel count, integer dtype, NaN, values outside [0, 1]).

    After each call ``last_clean`` holds the wrapped model's own (undefended) softmax answers to
    that call; ``totals`` counts over all calls since construction or :meth:`reset_totals`
    (``calls``, ``queries``, and per defense what it did: CIP's routes and flips, DAWN's
    watermarks). If the victim returns non-finite logits, the plain/DP/DAWN APIs refuse to answer
    (``RuntimeError``); CIP answers those rows with its strongest poisoning.

    ``forward_batch``: the victim sees the queries of a call in chunks of this many (default
    :data:`models.PREDICT_BATCH`); lower it for big models whose activations do not fit.
    Answers do not depend on it (eval mode)."""

    name = "base"
    forward_batch = PREDICT_BATCH

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name}: model must be a torch.nn.Module mapping raw images to "
                            f"logits, got {type(model).__name__}")
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in shape):
            raise ValueError(f"{self.name}: input_shape must be (C, H, W) of positive ints, got {input_shape!r}")
        self.model = model.eval()
        self.input_shape = tuple(int(v) for v in shape)
        probe = probe_logits(model, self.input_shape, f"{self.name}: the model")
        if probe.ndim != 2 or probe.shape[1] < 2:
            raise ValueError(f"{self.name}: the model must return logits (N, K >= 2) for images of "
                             f"shape {self.input_shape}, got shape {tuple(probe.shape)}")
        self.n_classes = int(probe.shape[1])
        self.last_clean = torch.zeros(0, self.n_classes)  # the wrapped model's softmax, last call
        self._nonfinite: Tensor | None = None  # rows of the current call with non-finite logits
        self._weights_sha256: str | None = None
        self.totals: dict[str, int] = {}
        self.reset_totals()

    @property
    def weights_sha256(self) -> str:
        """sha256 of the wrapped model's weights at first use (:func:`digests.weights_sha256`):
        what records and trigger sets cite as the model that answered."""
        if self._weights_sha256 is None:
            self._weights_sha256 = weights_sha256(self.model)
        return self._weights_sha256

    def reset_totals(self) -> None:
        """Zero the running totals (the trigger set, a log of evidence, is kept)."""
        self.totals = {"calls": 0, "queries": 0, **{k: 0 for k in self._total_keys()}}

    def _total_keys(self) -> tuple[str, ...]:
        return ()

    def __call__(self, x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """Answer a batch of raw images (N, C, H, W) in [0, 1] with (N, K) probability rows
        (numpy in, numpy out)."""
        as_numpy = isinstance(x, np.ndarray)
        x = as_images(x, self.input_shape)
        if len(x) == 0:  # still goes through answer() so per-call records (routes, marks) reset
            logits = torch.empty(0, self.n_classes)
        else:
            logits = predict_logits(self.model, x, batch_size=self.forward_batch)
        # switching the thread count costs more than a small call gains: big calls only
        threads = single_thread() if logits.numel() >= SINGLE_THREAD_MIN else contextlib.nullcontext()
        with torch.no_grad(), threads:
            # one reduction instead of a per-row scan: a non-finite logit makes the sum non-finite
            self._nonfinite = None if math.isfinite(float(logits.sum())) else ~torch.isfinite(logits).all(1)
            if self._nonfinite is not None and not self._nonfinite.any():
                self._nonfinite = None  # only the sum overflowed: every logit is finite
            if self._nonfinite is not None and not self.answers_nonfinite:
                bad = torch.nonzero(self._nonfinite).flatten()
                raise RuntimeError(f"{self.name}: the victim returned non-finite logits for {len(bad)} "
                                   f"of {len(x)} queries (rows {bad[:10].tolist()}); refusing to answer. "
                                   "Check the model's weights (a corrupt or diverged checkpoint?)")
            self.last_clean = softmax(logits)
            probs = self.answer(x, logits)
            if probs is self.last_clean:  # the caller owns its answer: never an alias of last_clean
                probs = probs.clone()
            # NaN fails both comparisons; inf makes a row sum non-finite
            if len(probs) and not (float(probs.min()) >= 0 and float((probs.sum(1) - 1).abs().max()) <= 1e-6):
                raise RuntimeError(f"{self.name} produced invalid probability rows (bug in the defense)")
            self.totals["calls"] += 1
            self.totals["queries"] += len(x)
            self._count(len(x))
        return probs.numpy() if as_numpy else probs

    answers_nonfinite = False  # True: answer() itself handles rows with non-finite logits (CIP)

    def _count(self, n: int) -> None:
        """Add the last call's defense-specific counts to :attr:`totals`."""

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The defended probability rows for queries ``x`` whose victim logits are ``logits``."""
        raise NotImplementedError

class NoDefense(Defense):
    """The undefended API: softmax of the victim's logits."""

    name = "none"

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:
        return self.last_clean


class OEOnly(NoDefense):
    """The OE-tuned victim M'_V answering with its own softmax, with no poisoning at all: CIP's
    detector without CIP's answers. An ablation the paper does not report; beside ``none`` and
    ``cip`` it separates what outlier exposure alone does to an attack (M'_V's answers to
    outliers are already nearly uniform) from what the poisoning adds. Wrap the OE-tuned
    checkpoint (``pipeline.get_defense(cfg, "oe")``)."""

    name = "oe"


class DP(Defense):
    """Deceptive perturbation (Lee et al. 2019): reverse sigmoid on every answer
    (:func:`poisoning.reverse_sigmoid`; ``beta`` > 0, ``gamma`` > 0, else ``ValueError``)."""

    name = "dp"

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], beta: float = 0.9,
                 gamma: float = 0.6) -> None:
        poisoning.check_reverse_sigmoid(beta, gamma)
        super().__init__(model, input_shape)
        self.beta, self.gamma = float(beta), float(gamma)

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:
        return poisoning.reverse_sigmoid(self.last_clean, self.beta, self.gamma)


class DAWN(Defense):
    """Dynamic adversarial watermarking (Szyller et al. 2021): a keyed hash of the query's
    canonical form (``form``, :class:`digests.QueryForm`) selects a fraction ``rate`` of queries;
    their top-floor(sqrt(K)) entries are permuted (top-1 changes). The same query always gets the
    same answer, whatever the batching, order or repetition; watermarked queries are logged.
    ``key`` is the owner's secret: the default ``"dawn-key"`` is public (the course's, for
    reproducible numbers); a served API passes its own."""

    name = "dawn"

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], rate: float = 0.005,
                 key: str = "dawn-key", form: QueryForm = QUERY_FORM) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not 0 <= rate <= 1:
            raise ValueError(f"DAWN rate must be a number in [0, 1] (the fraction of queries "
                             f"watermarked; Szyller et al. use 0.005), got {rate!r}")
        if not isinstance(key, (str, bytes)) or len(key) == 0:
            raise ValueError(f"DAWN key must be a non-empty str (or bytes): the secret that selects "
                             f"the watermarked queries, got {key!r}")
        super().__init__(model, input_shape)
        if not isinstance(form, QueryForm):
            raise ValueError(f"DAWN form must be a digests.QueryForm, got {form!r}")
        self.rate, self.key = float(rate), key.encode() if isinstance(key, str) else bytes(key)
        self.form = form
        self.trigger_set = TriggerSet(form=form)
        self.last_watermarked = torch.zeros(0, dtype=torch.bool)

    def _hashes(self, x: Tensor) -> np.ndarray:
        """One 64-bit keyed hash per image's canonical form (:meth:`digests.QueryForm.digests`)."""
        return np.array([int.from_bytes(d, "big") for d in self.form.digests(x, self.key, 8)], dtype=np.uint64)

    def is_watermarked(self, x: Tensor) -> Tensor:
        """Which of the images ``x`` DAWN watermarks (a pure function of the canonical form and key)."""
        return torch.from_numpy(self._hashes(x) / 2.0**64 < self.rate).reshape(len(x))

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:
        p = self.last_clean
        h = self._hashes(x)
        marked = torch.from_numpy(h / 2.0**64 < self.rate).reshape(len(x))
        top_k = poisoning.dawn_top_k(self.n_classes)
        shift = torch.from_numpy((h % np.uint64(top_k - 1)).astype(np.int64) + 1).reshape(len(x))
        out = p.clone()
        if marked.any():
            out[marked] = poisoning.permute_top(p[marked], shift[marked])
            self.trigger_set.append(x[marked], p[marked], out[marked])
        self.last_watermarked = marked
        return out

    def _total_keys(self) -> tuple[str, ...]:
        return ("watermarked",)

    def _count(self, n: int) -> None:
        self.totals["watermarked"] += int(self.last_watermarked.sum())


class CIP(Defense):
    """Categorical inference poisoning (CIP Sec. III): energy routing (ID / low-ES / high-ES),
    weak and strong PPD, and PBD of the least reliable ID queries.

    PBD modes (``pbd``):

    * ``"online"`` (the default, and the only mode for a served API): an ID-routed query is
      flipped iff its reliability R < ``r1``. Each query is judged on its own, so the same stream
      of queries gets the same flips however it is split into calls (one at a time, in batches of
      10 or 256, or all at once). Calibrate ``r1`` to the flip rate you intend
      (:meth:`calibrate`: a low percentile of the ID training queries' R).
    * ``"offline_top_T"``: the paper's offline selection (Sec. III-C; the authors' release ranks
      the whole transfer set), an EVALUATION DEVICE for an attack harness that holds the
      attacker's whole transfer set: the ONE call it answers is that set, and its T lowest-R
      ID-routed queries are flipped, T = ``pbd_T`` if >= 1, else round(``pbd_T`` x the number of
      ID-routed queries) (capped at that number). Used as an API it would make the trigger set
      depend on the attacker's call sizes, so a second call raises ``RuntimeError`` (build a new
      instance per transfer set, or :meth:`reset_totals`, which re-arms it).
    * ``None``: no PBD.

    PBD's answer (``pbd_answer``): ``"authors"`` (default; :func:`poisoning.pbd_authors`, the
    release's near one-hot row on a random class other than the top, its randomness keyed per
    query by :meth:`pbd_randoms`) or ``"inverse"`` (plain 1/p renormalised: flat, on the original
    least likely class; the course's earlier answer, kept as an ablation).

    Every random choice (the strong shuffle and its noise, PBD's class) is keyed on the query's
    canonical form (``form``, :class:`digests.QueryForm`) and the owner's secret ``key``: the same
    image gets the same answer whatever the batching, order or repetition, so asking again or
    sending a nudged copy that is the same query in ``form`` buys no fresh randomness (notebook 04
    measures which nudges are). ``key=None`` derives the key from ``seed``: reproducible, hence NOT
    a secret (the course's setting, where every number must be re-computable). A served API must
    pass a secret ``key`` (str or bytes, e.g. ``os.urandom(32)``): whoever knows the key and the
    form can recompute the shuffle and undo strong PPD.

    Fails closed: rows whose logits are not all finite go to high-ES (strongest poisoning, applied
    to a uniform row), never to ID or PBD. Every parameter is checked at construction
    (``ValueError`` naming the valid range): E1 <= E2 finite, T > 0, beta > 0, gamma > 0,
    ``strong`` in :data:`poisoning.STRONG_PPD`, ``pbd`` in :data:`PBD_MODES`, finite ``r1`` for
    online PBD, ``pbd_T`` a fraction in [0, 1) or a whole count (> 0 for ``"offline_top_T"``),
    finite ``snr_db``, int ``seed``; a model that does not take ``input_shape`` is refused too.

    After each call, ``last_routes`` holds the branch per query (0 ID, 1 low-ES, 2 high-ES) and
    ``last_flipped`` which ones PBD flipped; ``totals`` accumulates both over calls."""

    name = "cip"
    answers_nonfinite = True

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], e1: float, e2: float,
                 temperature: float = 1.0, strong: str = "shuffle_noise", snr_db: float = 10.0,
                 beta: float = 0.9, gamma: float = 0.6, pbd: str | None = "online",
                 r1: float | None = None, pbd_T: float = 0.0, seed: int = 0,
                 pbd_answer: str = "authors", form: QueryForm = QUERY_FORM,
                 key: str | bytes | None = None) -> None:
        if pbd_answer not in poisoning.PBD_ANSWERS:
            raise ValueError(f"unknown PBD answer {pbd_answer!r}; choose one of {poisoning.PBD_ANSWERS} "
                             "('authors': the release's near one-hot answer on a random other class; "
                             "'inverse': plain 1/p)")
        if strong not in poisoning.STRONG_PPD:
            raise ValueError(f"unknown strong PPD {strong!r}; choose one of {sorted(poisoning.STRONG_PPD)}")
        if pbd not in PBD_MODES:
            hint = (" ('offline' is now 'offline_top_T', an evaluation device; the API default is "
                    "'online')" if pbd == "offline" else "")
            raise ValueError(f"pbd must be one of {PBD_MODES}, got {pbd!r}{hint}")
        if pbd == "online" and r1 is None:
            raise ValueError("online PBD needs a finite r1 (a low percentile of ID-training "
                             "reliability scores, e.g. CIP.calibrate), got r1=None")
        if r1 is not None:
            r1 = finite_number("r1 (online PBD needs a finite r1, e.g. from CIP.calibrate)", r1)
        e1, e2 = check_thresholds(e1, e2)
        temperature = check_temperature(temperature)
        poisoning.check_reverse_sigmoid(beta, gamma)
        snr_db = finite_number("snr_db (decibels)", snr_db)
        pbd_T = finite_number("pbd_T", pbd_T)
        if pbd_T < 0 or (pbd_T >= 1 and not pbd_T.is_integer()):
            raise ValueError(f"pbd_T must be a fraction in [0, 1) of the ID-routed queries or a whole "
                             f"count >= 1, got {pbd_T!r}")
        if pbd == "offline_top_T" and pbd_T == 0:
            raise ValueError("pbd='offline_top_T' with pbd_T = 0 would flip nothing: give pbd_T (a "
                             "fraction in (0, 1) of the ID-routed queries or a count >= 1), or use "
                             "pbd=None for no PBD")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(form, QueryForm):
            raise ValueError(f"CIP form must be a digests.QueryForm, got {form!r}")
        if key is not None and (not isinstance(key, (str, bytes)) or len(key) == 0):
            raise ValueError(f"CIP key must be a non-empty str or bytes (the owner's secret), got {key!r}")
        super().__init__(model, input_shape)
        self.e1, self.e2, self.temperature = e1, e2, temperature
        self.strong, self.snr_db, self.beta, self.gamma = strong, float(snr_db), float(beta), float(gamma)
        self.pbd, self.r1, self.pbd_T = pbd, None if r1 is None else float(r1), float(pbd_T)
        self.seed = int(seed)
        self.pbd_answer = pbd_answer
        self.form = form
        self.key = key
        secret = (key.encode() if isinstance(key, str) else key) if key is not None else str(self.seed).encode()
        self._strong_key, self._pbd_key = b"cip-strong/" + secret, b"cip-pbd/" + secret
        self.trigger_set = TriggerSet(form=form)
        self.last_routes = torch.zeros(0, dtype=torch.long)
        self.last_flipped = torch.zeros(0, dtype=torch.bool)
        self._last_counts = (0, 0, 0, 0)

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:
        if self.pbd == "offline_top_T" and self.totals["calls"] > 0:
            raise RuntimeError(
                "CIP with pbd='offline_top_T' answers ONE call: the attacker's whole transfer set (the "
                "paper's offline selection, an evaluation device). A second call would make the "
                "trigger set depend on how the queries are batched. Build a new CIP per transfer "
                "set, call reset_totals() to start a new one, or serve with pbd='online'.")
        p = self.last_clean
        energy = energy_score(logits, self.temperature)
        if self._nonfinite is not None:  # fail closed: no finite answer to poison -> strongest branch
            p = p.clone()
            p[self._nonfinite] = 1.0 / self.n_classes
            energy = energy.masked_fill(self._nonfinite, math.inf)
        routes = route(energy, self.e1, self.e2)
        n_id, n_low, n_high = torch.bincount(routes, minlength=3).tolist()
        # every branch below works on the rows of its mask only: one pass over each query
        out = p
        if n_low or n_high:
            out = p.clone()
        if n_low:
            low = routes == LOW_ES
            out[low] = poisoning.reverse_sigmoid(p[low], self.beta, self.gamma)
        if n_high:
            high = routes == HIGH_ES
            if self.strong == "shuffle_noise":
                u, z = keyed_randoms(x[high], self._strong_key, self.n_classes + 1, self.n_classes, self.form)
                out[high] = poisoning.shuffle_noise(p[high], self.snr_db, u=u, z=z)
            else:
                out[high] = poisoning.STRONG_PPD[self.strong](p[high])
        flipped = self._pbd_mask(p, routes == ID, n_id)
        n_flipped = int(flipped.sum()) if n_id else 0
        if n_flipped:
            out = out.clone() if out is p else out
            u = self.pbd_randoms(x[flipped]) if self.pbd_answer == "authors" else None
            out[flipped] = poisoning.flip(p[flipped], self.pbd_answer, u=u)
            self.trigger_set.append(x[flipped], p[flipped], out[flipped])
        self.last_routes, self.last_flipped = routes, flipped
        self._last_counts = (n_id, n_low, n_high, n_flipped)
        return out

    def pbd_randoms(self, x: Tensor) -> Tensor:
        """(N, K + 1) float64 uniforms in [0, 1) for :func:`poisoning.pbd_authors`, one row per
        image of ``x`` (:func:`digests.keyed_randoms` of its canonical form and the owner's key):
        the same query always gets the same flipped answer, whatever the call it arrives in."""
        return keyed_randoms(x, self._pbd_key, self.n_classes + 1, 0, self.form)[0]

    def _pbd_mask(self, p: Tensor, is_id: Tensor, n_id: int) -> Tensor:
        if self.pbd is None or n_id == 0:
            return torch.zeros(len(p), dtype=torch.bool)
        r = reliability_score(p)
        if self.pbd == "online":
            return is_id & (r < self.r1)
        # a fractional T counts ID-routed queries, so deceptive OOD queries (DQA) neither add nor
        # remove triggers: the paper's T is the same for IDA and DQA (Table IV: 87 on CIFAR-10)
        t = int(round(self.pbd_T * n_id)) if self.pbd_T < 1 else int(self.pbd_T)
        t = min(t, n_id)
        mask = torch.zeros(len(p), dtype=torch.bool)
        if t > 0:
            candidates = torch.nonzero(is_id).flatten()
            mask[candidates[r[candidates].argsort()[:t]]] = True
        return mask

    def fresh(self, **changes) -> CIP:
        """A new CIP around the same model with the same settings (``changes`` replace single
        constructor arguments, e.g. ``pbd="offline_top_T"``): empty trigger set, zero totals."""
        settings = dict(temperature=self.temperature, strong=self.strong, snr_db=self.snr_db,
                        beta=self.beta, gamma=self.gamma, pbd=self.pbd, r1=self.r1, pbd_T=self.pbd_T,
                        seed=self.seed, pbd_answer=self.pbd_answer, form=self.form, key=self.key)
        new = CIP(self.model, self.input_shape, self.e1, self.e2, **{**settings, **changes})
        new._weights_sha256 = self._weights_sha256
        return new

    COUNT_KEYS = (*ROUTE_NAMES, "PBD flipped")
    """What :meth:`route_counts` and :attr:`totals` count: queries per branch, and PBD flips."""

    def _total_keys(self) -> tuple[str, ...]:
        return self.COUNT_KEYS

    def _count(self, n: int) -> None:
        for name, count in zip(self.COUNT_KEYS, self._last_counts):
            self.totals[name] += count

    def route_counts(self) -> dict[str, int]:
        """How many queries of the LAST call took each branch, and how many PBD flipped
        (:attr:`totals` has the same counts summed over every call)."""
        return dict(zip(self.COUNT_KEYS, self._last_counts))

    @classmethod
    def calibrate(cls, model: nn.Module, id_train_x: Tensor, p1: float = 95.0, p2: float = 99.9,
                  r1_percentile: float = 0.75, temperature: float = 1.0, r1_among: str = "id_routed",
                  **kwargs) -> CIP:
        """Wrap your own (OE-tuned) model: E1/E2 (the ``p1``-th / ``p2``-th percentiles of its ID
        training energies, CIP Sec. III-B) and R1 for online PBD (:func:`r1_from_scores`: the
        ``r1_percentile``-th percentile of the reliability scores of the training images CIP routes
        ID, ``r1_among="id_routed"``, so about ``r1_percentile`` % of ID-routed queries are flipped;
        ``"all"``: of every training image) are computed from ``id_train_x`` (N, C, H, W) in
        [0, 1] (tensor or numpy; N >= 1). ``kwargs`` go to :class:`CIP` (PBD stays ``"online"``,
        batch-invariant, unless you pass another mode). Raises ``ValueError`` for bad images,
        percentiles (0 <= p1 < p2 <= 100, 0 <= r1_percentile <= 100) or ``r1_among``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"CIP.calibrate: model must be a torch.nn.Module mapping raw images to "
                            f"logits, got {type(model).__name__}")
        temperature = check_temperature(temperature)
        id_train_x = as_images(id_train_x)
        if len(id_train_x) == 0:
            raise ValueError("CIP.calibrate needs at least one ID training image (got an empty batch)")
        t = calibrate_thresholds(predict_logits(model, id_train_x), p1, p2, temperature, r1_percentile, r1_among)
        return cls(model, tuple(id_train_x.shape[1:]), t["E1"], t["E2"], temperature=temperature, r1=t["R1"],
                   **kwargs)

def triggers_by_call_size(cip: CIP, x: Tensor, sizes: Sequence[int | None] = (1, 10, 100, None)
                          ) -> dict[str, int]:
    """Trigger-set size when the queries ``x`` (N, C, H, W) are sent in consecutive calls of each
    size in ``sizes`` (``None`` = one call with all of them), in order, to fresh copies of ``cip``
    (:meth:`CIP.fresh`; ``cip`` itself is not called). Returns ``{"calls of 1": n, ...,
    "one call": n}``.

    With online PBD one copy answers the whole stream of calls. With ``"offline_top_T"`` every
    call goes to its own fresh copy: what per-call top-T selection would do if it were served as
    an API, the batch dependence that makes it an evaluation device only.
    Raises ``ValueError`` for a size < 1."""
    out: dict[str, int] = {}
    for size in sizes:
        if size is not None and (isinstance(size, bool) or int(size) < 1):
            raise ValueError(f"call sizes must be >= 1 (or None for one call), got {size!r}")
        step = max(len(x), 1) if size is None else int(size)
        api, count = cip.fresh(), 0
        for i in range(0, len(x), step):
            if api.pbd == "offline_top_T" and api.totals["calls"]:
                count += len(api.trigger_set)
                api = cip.fresh()
            api(x[i:i + step])
        count += len(api.trigger_set)
        out["one call" if size is None else f"calls of {size}"] = count
    return out


def softmax(logits: Tensor) -> Tensor:
    """Softmax rows computed in float64 and returned as float32 (row sums exact to ~1e-7)."""
    return logits.double().softmax(1).float()


R1_AMONG = ("id_routed", "all")
"""Which ID training images R1 is a percentile of (:func:`r1_population`): ``"id_routed"`` (the
course's default: those CIP routes ID, the only queries online PBD can flip, so the percentile IS
the share of ID-routed queries flipped) or ``"all"`` (every training image; low-R images are
mostly low-confidence, hence high-energy and routed OOD, so far fewer ID-routed queries fall
below R1: about 0.1 % of them at the 0.5th percentile on quick, notebook 05)."""


def r1_population(energy: Tensor, e1: float, among: str = "id_routed") -> Tensor | None:
    """(N,) bool mask of the training images R1 is calibrated on: energy < ``e1`` (routed ID) for
    ``among="id_routed"``, ``None`` (all of them) for ``"all"`` (:data:`R1_AMONG`). Raises
    ``ValueError`` for another ``among``."""
    if among not in R1_AMONG:
        raise ValueError(f"r1_among must be one of {R1_AMONG}, got {among!r}")
    return energy < e1 if among == "id_routed" else None


def calibrate_thresholds(train_logits: Tensor, p1: float, p2: float, temperature: float,
                         r1_percentile: float, r1_among: str = "id_routed") -> dict:
    """CIP's thresholds from the ID TRAINING images' logits (N, K): ``E1`` / ``E2``, the ``p1``-th /
    ``p2``-th percentiles of their energies (CIP Sec. III-B), and ``R1`` for online PBD
    (:func:`r1_from_scores` over :func:`r1_population`), with ``r1_population``, how many images R1
    is a percentile of. What :meth:`CIP.calibrate` and the course's thresholds compute. Raises
    ``ValueError`` as :func:`scores.select_thresholds`, :func:`r1_population` and
    :func:`r1_from_scores` do."""
    from .scores import select_thresholds

    energy = energy_score(train_logits, temperature)
    e1, e2 = select_thresholds(energy, p1, p2)
    population = r1_population(energy, e1, r1_among)
    r1 = r1_from_scores(reliability_score(softmax(train_logits)), r1_percentile, routed_id=population)
    return {"E1": e1, "E2": e2, "R1": r1,
            "r1_population": len(train_logits) if population is None else int(population.sum())}


def r1_from_scores(train_scores: Tensor, percentile: float, routed_id: Tensor | None = None) -> float:
    """R1 for online PBD: the ``percentile``-th percentile (0-100, linear interpolation) of the
    reliability scores (N,) of the ID TRAINING images (never of test data), among those with
    ``routed_id`` True when given (:func:`r1_population`). Raises ``ValueError`` for a percentile
    outside [0, 100], non-finite scores or an empty population."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    scores = train_scores.detach().double().flatten()
    if routed_id is not None:
        if routed_id.shape != scores.shape:
            raise ValueError(f"routed_id must be a mask of shape {tuple(scores.shape)}, got {tuple(routed_id.shape)}")
        scores = scores[routed_id]
    if len(scores) == 0 or not torch.isfinite(scores).all():
        raise ValueError("R1 needs a non-empty tensor of finite reliability scores (no training image "
                         "routes ID? then E1 is below every training energy: raise p1)")
    return float(torch.quantile(scores, percentile / 100))


def branch_examples(cip: CIP, pools: Mapping[str, Tensor], per_branch: int = 3) -> dict[str, Tensor]:
    """The first (up to) ``per_branch`` queries of every pool that CIP routes to each branch (ID,
    low-ES, high-ES). Returns ``x``, ``energy``, ``route`` (0/1/2), ``source`` (index into the
    pool names), ``clean`` (the wrapped model's softmax) and ``answer`` (CIP's answer to just
    these queries), ordered by branch, then pool."""
    names = list(pools)
    x = torch.cat([pools[n] for n in names])
    source = torch.cat([torch.full((len(pools[n]),), i) for i, n in enumerate(names)])
    logits = predict_logits(cip.model, x)
    routes = route(energy_score(logits, cip.temperature), cip.e1, cip.e2)
    pick = torch.cat([torch.nonzero((routes == b) & (source == s)).flatten()[:per_branch]
                      for b in (ID, LOW_ES, HIGH_ES) for s in range(len(names))])
    answer = cip(x[pick])
    return {"x": x[pick], "energy": energy_score(logits[pick], cip.temperature), "route": routes[pick],
            "source": source[pick], "clean": softmax(logits[pick]), "answer": answer}


def change_rate_by_pmax(clean: Tensor, defended: Tensor, edges: tuple[float, ...] = (
        0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)):
    """Top-1 change rate of ``defended`` vs ``clean`` per bin of the clean p_max (bins [a, b),
    the last one closed). Returns a pandas DataFrame: ``bin``, ``n``, ``changed``, ``change_rate``."""
    import pandas as pd

    poisoning._pair(clean, defended)
    pmax = clean.max(1).values
    changed = clean.argmax(1) != defended.argmax(1)
    rows = []
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        inside = (pmax >= a) & ((pmax <= b) if last else (pmax < b))
        n = int(inside.sum())
        rows.append({"bin": f"[{a:.2f}, {b:.2f}{']' if last else ')'}", "n": n,
                     "changed": int(changed[inside].sum()),
                     "change_rate": float(changed[inside].double().mean()) if n else float("nan")})
    return pd.DataFrame(rows)


def compare_defenses(defenses: Mapping[str, Defense], test: tuple[Tensor, Tensor],
                     queries: Mapping[str, Tensor]) -> list[dict]:
    """One row per defense: ``fidelity`` (top-1 accuracy of its answers on the test images),
    ``victim_accuracy`` (its wrapped model's accuracy), and per query set (``test`` plus every
    entry of ``queries``) its size ``<set>_n``, the top-1 change rate vs the wrapped model's clean
    answers, the mean L1 distance, and for CIP the fraction routed to each branch. A metric of an
    empty set is undefined and reported as ``None`` (JSON null), never NaN. JSON-able (pass to
    ``write_json``)."""
    test_x, test_y = test

    def defined(v: float) -> float | None:
        return None if math.isnan(v) else v

    rows = []
    for name, defense in defenses.items():
        row: dict = {"defense": name}
        for set_name, x in {"test": test_x, **queries}.items():
            answer = defense(x)
            clean = defense.last_clean
            n = len(x)
            if set_name == "test":
                row["fidelity"] = float((answer.argmax(1) == test_y).double().mean()) if n else None
                row["victim_accuracy"] = float((clean.argmax(1) == test_y).double().mean()) if n else None
            row[f"{set_name}_n"] = n
            row[f"{set_name}_top1_change"] = defined(poisoning.top1_change_rate(clean, answer))
            row[f"{set_name}_mean_l1"] = defined(poisoning.mean_l1(clean, answer))
            if isinstance(defense, CIP):
                counts = defense.route_counts()
                row[f"{set_name}_routes"] = {k: v / n for k, v in counts.items()} if n else None
        rows.append(row)
    return rows
