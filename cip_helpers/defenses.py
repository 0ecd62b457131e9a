"""Defended prediction APIs: ``NoDefense``, ``DP``, ``DAWN`` and ``CIP``.

Every defense wraps a victim and is called like a black box: ``defense(x)`` takes raw images
(N, C, H, W) in [0, 1] and returns (N, K) probabilities; ``defense.model`` is the wrapped victim
(raw images -> logits) for comparing clean and defended answers. CIP computes energy, softmax and
reliability from ONE forward pass and applies all branches as batched tensor operations.

Measuring defenses (notebooks 04-06): :func:`branch_examples`, :func:`change_rate_by_pmax`,
:func:`compare_defenses` and :func:`r1_from_scores`; per-perturbation statistics live in
:mod:`cip_helpers.poisoning` (``top1_change_rate``, ``mean_l1``, ``mean_kl``).
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import poisoning
from .models import build_model
from .scores import HIGH_ES, ID, LOW_ES, ROUTE_NAMES, energy_score, reliability_score, route
from .store import load_checkpoint, read_json, weights_sha256
from .training import PREDICT_BATCH, check_images, predict_logits


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread. The per-query post-processing works on
    (N, K) tensors that are far too small to gain from threads; on a busy CPU, waiting for a
    second thread made each such op ~30x slower (benchmarks/cip_overhead.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TriggerSet:
    """Queries whose answers the defender altered on purpose: (input, original answer, altered
    answer). A stolen model agrees with ``labels`` (the altered top-1) far more than chance."""

    x: Tensor = field(default_factory=lambda: torch.empty(0))
    original: Tensor = field(default_factory=lambda: torch.empty(0))
    altered: Tensor = field(default_factory=lambda: torch.empty(0))

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labels(self) -> Tensor:
        """The altered top-1 class of every trigger (what a stolen surrogate learned)."""
        return self.altered.argmax(1) if len(self) else torch.empty(0, dtype=torch.long)

    def append(self, x: Tensor, original: Tensor, altered: Tensor) -> None:
        """Add triggers: inputs ``x`` with their original and altered probability rows."""
        if not len(x) == len(original) == len(altered):
            raise ValueError(f"x, original and altered need the same length, got {len(x)}, "
                             f"{len(original)}, {len(altered)}")
        if len(x) == 0:
            return
        if len(self) == 0:
            self.x, self.original, self.altered = x.clone(), original.clone(), altered.clone()
        else:
            self.x = torch.cat([self.x, x])
            self.original = torch.cat([self.original, original])
            self.altered = torch.cat([self.altered, altered])

    def save(self, path: Path) -> None:
        """Save as a tensors-only file (loadable with ``weights_only=True``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"x": self.x, "original": self.original, "altered": self.altered}, path)

    @classmethod
    def load(cls, path: Path) -> TriggerSet:
        """Load a trigger set written by :meth:`save` (tensors only, ``weights_only=True``)."""
        try:
            d = torch.load(Path(path), map_location="cpu", weights_only=True)
            return cls(d["x"], d["original"], d["altered"])
        except Exception as exc:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(f"{path} is not a readable trigger set ({exc}); re-create it by re-running "
                             "the attack notebook that saved it") from exc


class Defense:
    """Base class: input checks, one batched forward pass, and output checks. After each call,
    ``last_clean`` holds the wrapped model's own (undefended) softmax answers to that call.

    ``forward_batch``: the victim sees the queries of a call in chunks of this many (default
    :data:`training.PREDICT_BATCH`); lower it for big models whose activations do not fit.
    Answers do not depend on it (eval mode)."""

    name = "base"
    forward_batch = PREDICT_BATCH

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        self.model = model.eval()
        self.input_shape = tuple(input_shape)
        with torch.no_grad():
            self.n_classes = int(model(torch.zeros(1, *self.input_shape)).shape[1])
        self.last_clean = torch.zeros(0, self.n_classes)  # the wrapped model's softmax, last call
        self._weights_sha256: str | None = None

    @property
    def weights_sha256(self) -> str:
        """sha256 of the wrapped model's weights at first use (:func:`store.weights_sha256`):
        what records and trigger sets cite as the model that answered."""
        if self._weights_sha256 is None:
            self._weights_sha256 = weights_sha256(self.model)
        return self._weights_sha256

    def __call__(self, x: Tensor) -> Tensor:
        """Answer a batch of raw images (N, C, H, W) in [0, 1] with (N, K) probability rows."""
        self._check_queries(x)
        if len(x) == 0:  # still goes through answer() so per-call records (routes, marks) reset
            logits = torch.empty(0, self.n_classes)
        else:
            logits = predict_logits(self.model, x, batch_size=self.forward_batch)
        with torch.no_grad(), single_thread():
            self.last_clean = softmax(logits)
            probs = self.answer(x, logits)
            valid = bool(torch.isfinite(probs).all() and (probs >= 0).all()
                         and ((probs.sum(1) - 1).abs() <= 1e-6).all())
        if not valid:
            raise RuntimeError(f"{self.name} produced invalid probability rows (bug in the defense)")
        return probs

    def _check_queries(self, x: Tensor) -> None:
        """``check_images`` with a clearer message for a wrong channel count."""
        if (isinstance(x, Tensor) and x.ndim == 4 and x.shape[1] != self.input_shape[0]
                and tuple(x.shape[2:]) == tuple(self.input_shape[1:])):
            hint = ("convert RGB to grayscale, e.g. x.mean(1, keepdim=True)" if self.input_shape[0] == 1
                    else f"repeat the channel, e.g. x.expand(-1, {self.input_shape[0]}, -1, -1)")
            raise ValueError(f"{self.name}: the victim expects {self.input_shape[0]} channel(s), got "
                             f"{x.shape[1]} (images of shape {tuple(x.shape[1:])}); {hint}")
        check_images(x, self.input_shape)

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The defended probability rows for queries ``x`` whose victim logits are ``logits``."""
        raise NotImplementedError

    @classmethod
    def from_run(cls, results_dir: Path, split: str = "all", **kwargs) -> Defense:
        """Rebuild this defense around a finished run's plain victim
        (``<results_dir>/checkpoints/victim_<split>.pt``)."""
        model, shape = load_victim_checkpoint(Path(results_dir) / "checkpoints" / f"victim_{split}.pt")
        return cls(model, shape, **kwargs)


class NoDefense(Defense):
    """The undefended API: softmax of the victim's logits."""

    name = "none"

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:
        return softmax(logits)


class DP(Defense):
    """Deceptive perturbation (Lee et al. 2019): reverse sigmoid on every answer."""

    name = "dp"

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], beta: float = 0.9,
                 gamma: float = 0.6) -> None:
        super().__init__(model, input_shape)
        self.beta, self.gamma = beta, gamma

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:
        return poisoning.reverse_sigmoid(softmax(logits), self.beta, self.gamma)


class DAWN(Defense):
    """Dynamic adversarial watermarking (Szyller et al. 2021): a keyed hash of the input bytes
    selects a fraction ``rate`` of queries; their top-floor(sqrt(K)) entries are permuted (top-1
    changes). The same query always gets the same answer; watermarked queries are logged."""

    name = "dawn"

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], rate: float = 0.005,
                 key: str = "dawn-key") -> None:
        super().__init__(model, input_shape)
        if not 0 <= rate <= 1:
            raise ValueError(f"DAWN rate must be in [0, 1], got {rate}")
        self.rate, self.key = rate, key.encode()
        self.trigger_set = TriggerSet()
        self.last_watermarked = torch.zeros(0, dtype=torch.bool)

    def _hashes(self, x: Tensor) -> np.ndarray:
        """One 64-bit keyed hash per image (BLAKE2b over its float32 bytes)."""
        arr = x.detach().cpu().float().contiguous().numpy()
        return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), key=self.key,
                                                        digest_size=8).digest(), "big")
                         for row in arr], dtype=np.uint64)

    def is_watermarked(self, x: Tensor) -> Tensor:
        """Which of the images ``x`` DAWN watermarks (a pure function of the image bytes and key)."""
        return torch.from_numpy(self._hashes(x) / 2.0**64 < self.rate).reshape(len(x))

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:
        p = softmax(logits)
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


class CIP(Defense):
    """Categorical inference poisoning: energy routing (ID / low-ES / high-ES), weak and strong PPD,
    and PBD of the least reliable ID queries.

    PBD modes: ``"online"`` flips ID queries with R < ``r1``; ``"offline"`` treats each call as the
    whole transfer set and flips its T lowest-R ID-routed queries, T = ``pbd_T`` if >= 1, else
    round(``pbd_T`` x the number of ID-routed queries in the call) (capped at the number of ID-routed
    queries); ``None`` disables PBD. After each call, ``last_routes`` holds the branch
    per query (0 ID, 1 low-ES, 2 high-ES) and ``last_flipped`` which ones PBD flipped."""

    name = "cip"

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], e1: float, e2: float,
                 temperature: float = 1.0, strong: str = "shuffle_noise", snr_db: float = 10.0,
                 beta: float = 0.9, gamma: float = 0.6, pbd: str | None = "online",
                 r1: float | None = None, pbd_T: float = 0.0, seed: int = 0) -> None:
        super().__init__(model, input_shape)
        if strong not in poisoning.STRONG_PPD:
            raise ValueError(f"unknown strong PPD {strong!r}; choose one of {sorted(poisoning.STRONG_PPD)}")
        if pbd not in ("online", "offline", None):
            raise ValueError(f"pbd must be 'online', 'offline' or None, got {pbd!r}")
        if pbd == "online" and r1 is None:
            raise ValueError("online PBD needs r1 (a low percentile of ID-training reliability scores)")
        if not e1 <= e2:
            raise ValueError(f"thresholds must satisfy E1 <= E2, got E1={e1}, E2={e2}")
        if pbd_T < 0:
            raise ValueError(f"pbd_T must be a fraction in [0, 1) or a count >= 1, got {pbd_T}")
        self.e1, self.e2, self.temperature = float(e1), float(e2), float(temperature)
        self.strong, self.snr_db, self.beta, self.gamma = strong, snr_db, beta, gamma
        self.pbd, self.r1, self.pbd_T = pbd, r1, pbd_T
        self.generator = torch.Generator().manual_seed(seed)
        self.trigger_set = TriggerSet()
        self.last_routes = torch.zeros(0, dtype=torch.long)
        self.last_flipped = torch.zeros(0, dtype=torch.bool)

    def answer(self, x: Tensor, logits: Tensor) -> Tensor:
        p = softmax(logits)
        routes = route(energy_score(logits, self.temperature), self.e1, self.e2)
        # every branch below works on the rows of its mask only: one pass over each query
        out = p.clone()
        low, high = routes == LOW_ES, routes == HIGH_ES
        if low.any():
            out[low] = poisoning.reverse_sigmoid(p[low], self.beta, self.gamma)
        if high.any():
            strong = poisoning.STRONG_PPD[self.strong]
            kwargs = {"snr_db": self.snr_db, "generator": self.generator} if self.strong == "shuffle_noise" else {}
            out[high] = strong(p[high], **kwargs)
        flipped = self._pbd_mask(p, routes == ID)
        if flipped.any():
            out[flipped] = poisoning.flip(p[flipped])
            self.trigger_set.append(x[flipped], p[flipped], out[flipped])
        self.last_routes, self.last_flipped = routes, flipped
        return out

    def _pbd_mask(self, p: Tensor, is_id: Tensor) -> Tensor:
        if self.pbd is None or not is_id.any():
            return torch.zeros(len(p), dtype=torch.bool)
        r = reliability_score(p)
        if self.pbd == "online":
            return is_id & (r < self.r1)
        n_id = int(is_id.sum())
        # a fractional T counts ID-routed queries, so deceptive OOD queries (DQA) neither add nor
        # remove triggers: the paper's T is the same for IDA and DQA (Table IV: 87 on CIFAR-10)
        t = int(round(self.pbd_T * n_id)) if self.pbd_T < 1 else int(self.pbd_T)
        t = min(t, n_id)
        mask = torch.zeros(len(p), dtype=torch.bool)
        if t > 0:
            candidates = torch.nonzero(is_id).flatten()
            mask[candidates[r[candidates].argsort()[:t]]] = True
        return mask

    def route_counts(self) -> dict[str, int]:
        """How many queries of the last call took each branch, and how many PBD flipped."""
        counts = torch.bincount(self.last_routes, minlength=3).tolist()
        return {**dict(zip(ROUTE_NAMES, counts)), "PBD flipped": int(self.last_flipped.sum())}

    @classmethod
    def calibrate(cls, model: nn.Module, id_train_x: Tensor, p1: float = 95.0, p2: float = 99.9,
                  r1_percentile: float = 0.5, temperature: float = 1.0, **kwargs) -> CIP:
        """Wrap your own (OE-tuned) model: E1/E2 and R1 are computed from its ID training images."""
        from .scores import select_thresholds

        logits = predict_logits(model, id_train_x)
        e1, e2 = select_thresholds(energy_score(logits, temperature), p1, p2)
        r1 = r1_from_scores(reliability_score(softmax(logits)), r1_percentile)
        return cls(model, tuple(id_train_x.shape[1:]), e1, e2, temperature=temperature, r1=r1, **kwargs)

    @classmethod
    def from_run(cls, results_dir: Path, split: str = "all", **kwargs) -> CIP:  # type: ignore[override]
        """Rebuild CIP from a finished run's seed directory (e.g. ``results/quick/seed-0``):
        ``checkpoints/oe_victim_<split>.pt`` + ``thresholds.json``.

        Raises ``ValueError`` if the thresholds entry was not computed from exactly these weights
        (its ``weights_sha256`` differs from the checkpoint's, or it has none): thresholds of other
        weights would route queries wrongly. The message names the fix (recompute them)."""
        ckpt = Path(results_dir) / "checkpoints" / f"oe_victim_{split}.pt"
        model, shape = load_victim_checkpoint(ckpt)
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
        return cls(model, shape, t["E1"], t["E2"], temperature=t["T"], **kwargs)


def load_victim_checkpoint(path: Path) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build the model described by a victim/OE checkpoint's spec and load its weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: train the victims first (notebooks 01-02, "
                                "or python -m cip_helpers.run --profile <profile> --only 01,02,03)")
    spec, _, state = load_checkpoint(path)
    victim = spec.get("victim", spec)
    c, h, w = victim["input_shape"]
    model = build_model(victim["arch"], c, victim["n_classes"], h)
    model.load_state_dict(state)
    return model.eval(), (c, h, w)


def softmax(logits: Tensor) -> Tensor:
    """Softmax rows computed in float64 and returned as float32 (row sums exact to ~1e-7)."""
    return logits.double().softmax(1).float()


def r1_from_scores(train_scores: Tensor, percentile: float) -> float:
    """R1 for online PBD: the ``percentile``-th percentile (0-100, linear interpolation) of the
    reliability scores of the ID TRAINING queries (never of test data)."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    scores = train_scores.detach().double().flatten()
    if len(scores) == 0 or not torch.isfinite(scores).all():
        raise ValueError("R1 needs a non-empty tensor of finite reliability scores")
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
    entry of ``queries``) the top-1 change rate vs the wrapped model's clean answers, the mean L1
    distance, and for CIP the fraction routed to each branch. JSON-able (pass to ``write_json``)."""
    test_x, test_y = test
    rows = []
    for name, defense in defenses.items():
        row: dict = {"defense": name}
        for set_name, x in {"test": test_x, **queries}.items():
            answer = defense(x)
            clean = defense.last_clean
            if set_name == "test":
                row["fidelity"] = float((answer.argmax(1) == test_y).double().mean())
                row["victim_accuracy"] = float((clean.argmax(1) == test_y).double().mean())
            row[f"{set_name}_top1_change"] = poisoning.top1_change_rate(clean, answer)
            row[f"{set_name}_mean_l1"] = poisoning.mean_l1(clean, answer)
            if isinstance(defense, CIP):
                counts = defense.route_counts()
                row[f"{set_name}_routes"] = {k: v / max(len(x), 1) for k, v in counts.items()}
        rows.append(row)
    return rows
