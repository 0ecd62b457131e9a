"""Data-free model extraction (DFME, Truong et al. 2021) through a black-box API.

A generator G(z) synthesises queries; a student S imitates the victim on them. Alternating:

Images are ``sigmoid(gain * a)`` of the generator's pre-activations ``a`` (DFME uses tanh, i.e.
gain 2; a larger gain gives the high-contrast images a digit classifier needs to answer anything
but its "blob" class).

* generator step: maximise the disagreement L(x) = mean_k |S(x)_k - V(x)_k| between the student's
  logits and the victim's logits V recovered from the answered probabilities
  (log p, mean-corrected). The API gives no gradients, so dL/dx is estimated by forward
  differences along ``m`` random unit directions u_j (in the generator's pre-sigmoid space a):
  g = d/m * sum_j (L(a + eps u_j) - L(a)) / eps * u_j, which costs B(m + 1) queries.
* student steps: minimise L on fresh generator samples (B queries each).

Every image sent to the API, including the perturbed ones, is counted by :class:`CountingAPI`.
One round is :func:`dfme_round` (:func:`generator_step`, then :func:`student_step` on fresh and on
replayed answers; notebook 08 shows them); :func:`dfme_train` repeats it until the budget is spent.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..method.defenses import NoDefense, TriggerSet
from . import data, pipeline
from .config import Profile
from .progress import progress as progress_bar
from .store import load_checkpoint, load_or_train, load_triggers, save_checkpoint, save_triggers
from .training import accuracy, set_seed


class QueryBudgetExceeded(RuntimeError):
    """A call would send more queries than the attacker's budget allows."""


class CountingAPI:
    """The attacker's handle on the black box: forwards ``api(x)`` and counts every image sent.
    A call that would exceed ``budget`` raises :class:`QueryBudgetExceeded` (nothing is sent)."""

    def __init__(self, api: Callable[[Tensor], Tensor], budget: int) -> None:
        self.api, self.budget = api, int(budget)
        self.n_queries, self.n_calls = 0, 0

    @property
    def remaining(self) -> int:
        return self.budget - self.n_queries

    def __call__(self, x: Tensor) -> Tensor:
        return self.via(self.api)(x)

    def via(self, other: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """A handle that counts against THIS budget but is answered by ``other`` (the authors'
        DFME sends its gradient-estimation queries to the model behind the defense:
        :data:`attacks.GRAD_QUERIES`)."""
        def call(x: Tensor) -> Tensor:
            if len(x) > self.remaining:
                raise QueryBudgetExceeded(f"{len(x)} queries requested, {self.remaining} of "
                                          f"{self.budget} left")
            self.n_queries += len(x)
            self.n_calls += 1
            return other(x)
        return call


class Generator(nn.Module):
    """DFME-style generator: z -> linear -> (c0, s/4, s/4) -> [upsample, conv, BN, LeakyReLU] x 2
    -> conv to the image channels. ``forward`` returns pre-activations; images are their sigmoid."""

    def __init__(self, nz: int, channels: tuple[int, int], out_channels: int, image_size: int) -> None:
        super().__init__()
        c0, c1 = channels
        self.s0, self.c0 = image_size // 4, c0
        self.fc = nn.Linear(nz, c0 * self.s0 * self.s0)
        self.net = nn.Sequential(
            nn.BatchNorm2d(c0), nn.Upsample(scale_factor=2),
            nn.Conv2d(c0, c0, 3, padding=1), nn.BatchNorm2d(c0), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(c0, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.LeakyReLU(0.2),
            nn.Conv2d(c1, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(len(z), self.c0, self.s0, self.s0))


class ReplayBuffer:
    """The attacker's memory of past (query, recovered logits) pairs, at most ``size`` of them
    (oldest dropped first). Replaying them gives the student extra steps without new queries
    (experience replay, as in MAZE, Kariyappa et al. 2021)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.x: Tensor | None = None
        self.t: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.x is None else len(self.x)

    def add(self, x: Tensor, target: Tensor) -> None:
        """Remember queries ``x`` (B, C, H, W) and their recovered logits ``target`` (B, K)."""
        if self.size <= 0:
            return
        if self.x is None:
            self.x, self.t = x.detach().clone(), target.detach().clone()
        else:
            self.x = torch.cat([self.x, x.detach()])[-self.size:]
            self.t = torch.cat([self.t, target.detach()])[-self.size:]

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` remembered pairs drawn uniformly with replacement (the buffer must not be empty)."""
        idx = torch.randint(len(self), (n,), generator=generator)
        return self.x[idx], self.t[idx]


def recovered_logits(probs: Tensor, floor: float = 1e-6) -> Tensor:
    """The victim's logits as far as the answer reveals them: log p minus its row mean."""
    logp = probs.clamp_min(floor).log()
    return logp - logp.mean(1, keepdim=True)


def l1_disagreement(student_logits: Tensor, victim_logits: Tensor) -> Tensor:
    """Per-sample mean absolute difference of two logit rows (DFME's loss)."""
    return (student_logits - victim_logits).abs().mean(1)


def zo_gradient(f: Callable[[Tensor], Tensor], a: Tensor, m: int, eps: float,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Forward-difference estimate of the per-sample gradient of ``f`` at ``a`` (B, ...):
    ``d/m * sum_j (f(a + eps u_j) - f(a)) / eps * u_j`` with u_j uniform on the unit sphere of
    dimension d. ``f`` maps (N, ...) to (N,) and is called ONCE on all B(m + 1) points.
    Returns ``(gradient estimate, f(a))``."""
    b, d = len(a), a[0].numel()
    u = torch.randn(m, b, d, generator=generator)
    u = u / u.norm(dim=2, keepdim=True)
    points = torch.cat([a.reshape(1, b, d), a.reshape(1, b, d) + eps * u]).reshape(-1, *a.shape[1:])
    values = f(points).reshape(m + 1, b)
    diffs = (values[1:] - values[0]) / eps  # (m, b)
    grad = d / m * (diffs[..., None] * u).sum(0)
    return grad.reshape(a.shape), values[0]


def dfme_spec(cfg: Profile, defense_spec: dict) -> dict:
    """Every setting that shapes a DFME student (the defense's configuration included)."""
    d = data.id_data(cfg)
    return {"stage": "dfme", "arch": cfg.dfme_arch,
            "width": cfg.surrogate_width,
            "input_shape": list(d.shape), "n_classes": d.n_classes, "defense": defense_spec,
            "queries": cfg.dfme_queries, "batch": cfg.dfme_batch, "nz": cfg.dfme_nz,
            "gen_channels": list(cfg.dfme_gen_channels), "gain": cfg.dfme_gain, "grad_m": cfg.dfme_grad_m,
            "grad_eps": cfg.dfme_grad_eps, "lr_s": cfg.dfme_lr_s, "lr_s_schedule": cfg.dfme_lr_schedule,
            "lr_g": cfg.dfme_lr_g, "replay": cfg.dfme_replay, "replay_size": cfg.dfme_replay_size,
            "g_iter": cfg.dfme_g_iter, "s_iter": cfg.dfme_s_iter, "eval_every": cfg.dfme_eval_every,
            "seed": cfg.seed}


LR_SCHEDULES = ("constant", "cosine", "drop")


def student_schedule(opt: torch.optim.Optimizer, name: str, n_rounds: int):
    """The student's learning-rate schedule over ``n_rounds`` rounds (stepped once per round):
    ``constant``; ``cosine`` decay to 0; ``drop``: x0.1 for the last quarter of the rounds (the
    student settles instead of ending on one noisy step). Returns a scheduler or ``None``."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"dfme_lr_schedule must be one of {LR_SCHEDULES}, got {name!r}")
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(n_rounds, 1))
    if name == "drop":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, (3 * n_rounds) // 4)], gamma=0.1)
    return None


def new_generator(cfg: Profile) -> Generator:
    d = data.id_data(cfg)
    torch.manual_seed(cfg.seed + 1)
    return Generator(cfg.dfme_nz, tuple(cfg.dfme_gen_channels), d.shape[0], d.shape[1])


@dataclass(frozen=True)
class DFMERecipe:
    """The fixed settings of a DFME round (from the profile: :meth:`from_profile`)."""
    batch: int  # B, queries per generated batch
    nz: int  # the generator's noise dimension
    gain: float  # images are sigmoid(gain * G(z))
    grad_m: int  # m, random directions per gradient estimate
    grad_eps: float  # epsilon, the forward-difference step
    g_iter: int  # generator steps per round
    s_iter: int  # student steps on fresh queries per round
    replay: int  # student steps on remembered answers per round (no queries)
    lr_s: float
    lr_g: float

    @classmethod
    def from_profile(cls, cfg: Profile) -> DFMERecipe:
        return cls(cfg.dfme_batch, cfg.dfme_nz, cfg.dfme_gain, cfg.dfme_grad_m, cfg.dfme_grad_eps,
                   cfg.dfme_g_iter, cfg.dfme_s_iter, cfg.dfme_replay, cfg.dfme_lr_s, cfg.dfme_lr_g)

    @property
    def round_queries(self) -> int:
        """Queries one round spends: B (g_iter (m + 1) + s_iter)."""
        return self.batch * (self.g_iter * (self.grad_m + 1) + self.s_iter)

    def optimizers(self, student: nn.Module, gen: Generator) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """The student's SGD and the generator's Adam."""
        return (torch.optim.SGD(student.parameters(), lr=self.lr_s, momentum=0.9, weight_decay=5e-4),
                torch.optim.Adam(gen.parameters(), lr=self.lr_g))


def generator_step(student: nn.Module, gen: Generator, opt_g: torch.optim.Optimizer,
                   grad_api: Callable[[Tensor], Tensor], r: DFMERecipe, rng: torch.Generator) -> Tensor:
    """One generator step: ascend the disagreement L between the student and the victim's
    recovered logits at a = G(z); the API gives no gradients, so dL/da is estimated from its
    answers at B(m + 1) points (:func:`zo_gradient`) and back-propagated into G.
    Returns L at the B points before the step."""
    gen.train()
    student.eval()

    def disagreement(a: Tensor) -> Tensor:  # the black-box objective of the generator step
        x = torch.sigmoid(r.gain * a)
        with torch.no_grad():
            return l1_disagreement(student(x), recovered_logits(grad_api(x)))

    a = gen(torch.randn(r.batch, r.nz, generator=rng))
    grad, value = zo_gradient(disagreement, a.detach(), r.grad_m, r.grad_eps, rng)
    opt_g.zero_grad(set_to_none=True)
    a.backward(-grad / len(a))  # maximise L = minimise -L
    opt_g.step()
    return value


def student_step(student: nn.Module, opt_s: torch.optim.Optimizer, x: Tensor, target: Tensor) -> Tensor:
    """One student step: minimise L = mean |S(x) - target| (``target``: recovered logits)."""
    student.train()
    loss = l1_disagreement(student(x), target).mean()
    opt_s.zero_grad(set_to_none=True)
    loss.backward()
    opt_s.step()
    return loss


def dfme_round(student: nn.Module, gen: Generator, opt_s: torch.optim.Optimizer, opt_g: torch.optim.Optimizer,
               api: Callable[[Tensor], Tensor], replay: ReplayBuffer, rng: torch.Generator, r: DFMERecipe,
               grad_api: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """One DFME round, ``r.round_queries`` queries: ``r.g_iter`` generator steps (their gradient
    queries go to ``grad_api``, default ``api``), ``r.s_iter`` student steps on fresh queries
    (remembered in ``replay``), then ``r.replay`` student steps on remembered answers.
    Returns the loss of the last student step on fresh queries."""
    grad_api = api if grad_api is None else grad_api
    for _ in range(r.g_iter):  # generator: ascend the estimated disagreement gradient
        generator_step(student, gen, opt_g, grad_api, r, rng)
    for _ in range(r.s_iter):  # student: imitate the recovered logits
        with torch.no_grad():
            x = torch.sigmoid(r.gain * gen(torch.randn(r.batch, r.nz, generator=rng)))
            target = recovered_logits(api(x))
        replay.add(x, target)
        loss = student_step(student, opt_s, x, target)
    for _ in range(r.replay if len(replay) else 0):  # extra steps on past answers: no queries
        student_step(student, opt_s, *replay.sample(r.batch, rng))
    return loss


def dfme_train(cfg: Profile, api: CountingAPI, student: nn.Module, gen: Generator,
               desc: str = "DFME", progress: bool = True,
               grad_api: Callable[[Tensor], Tensor] | None = None) -> list[dict]:
    """Run :func:`dfme_round` until the budget of ``api`` is spent; returns the learning curve
    ``[{"queries": n, "test_acc": a}, ...]`` (a point every ``cfg.dfme_eval_every`` queries).
    ``grad_api`` answers the gradient-estimation queries (default ``api``; it must count against
    the same budget, e.g. ``api.via(model_behind_the_defense)``)."""
    set_seed(cfg.seed)
    test = data.id_data(cfg).split("test")
    r = DFMERecipe.from_profile(cfg)
    opt_s, opt_g = r.optimizers(student, gen)
    n_iters = api.remaining // r.round_queries
    sched_s = student_schedule(opt_s, cfg.dfme_lr_schedule, n_iters)
    replay = ReplayBuffer(cfg.dfme_replay_size)
    rng = torch.Generator().manual_seed(cfg.seed + 3)
    curve, next_eval = [], cfg.dfme_eval_every
    bar = progress_bar(range(n_iters), desc=desc, disable=not progress, unit="round")
    for _ in bar:
        loss = dfme_round(student, gen, opt_s, opt_g, api, replay, rng, r, grad_api)
        if sched_s is not None:
            sched_s.step()
        if api.n_queries >= next_eval or api.remaining < r.round_queries:
            curve.append({"queries": api.n_queries, "test_acc": accuracy(student, *test)})
            next_eval += cfg.dfme_eval_every
            bar.set_postfix(loss=round(float(loss.detach()), 3), acc=curve[-1]["test_acc"])
    student.eval()
    gen.eval()
    return curve


def run_dfme_attack(cfg: Profile, api_factory: Callable[[], object], defense_spec: dict,
                    build_student: Callable[[], nn.Module], desc: str = "DFME",
                    verbose: bool = True, bypass_gradient_queries: bool = False
                    ) -> tuple[nn.Module, Generator, TriggerSet | None, dict]:
    """Load-or-run DFME against a fresh API from ``api_factory``. The student checkpoint is keyed
    by :func:`dfme_spec`; the generator and the defender's trigger set are saved beside it.
    Returns ``(student, generator, triggers or None, info)``; ``info`` holds ``curve``,
    ``n_queries``, ``loaded``, ``path`` (the student checkpoint) and ``seconds``.
    ``bypass_gradient_queries``: the gradient-estimation queries are answered by the API's wrapped
    model without its defense (the authors' setting; they still count against the budget); the
    caller must record it in ``defense_spec``."""
    spec = dfme_spec(cfg, defense_spec)
    path = cfg.checkpoint_dir / "surrogates" / f"dfme_{pipeline.spec_hash(spec)}.pt"
    gen_path, trig_path = path.with_suffix(".generator.pt"), path.with_suffix(".triggers.pt")
    if path.exists() and not gen_path.exists():
        path.unlink()  # an incomplete run: train again
    gen = new_generator(cfg)
    state: dict = {}

    def train(student: nn.Module) -> dict:
        start = time.perf_counter()
        api = api_factory()
        counted = CountingAPI(api, cfg.dfme_queries)
        grad_api = counted.via(NoDefense(api.model, api.input_shape)) if bypass_gradient_queries else None
        curve = dfme_train(cfg, counted, student, gen, desc, progress=verbose, grad_api=grad_api)
        save_checkpoint(gen_path, gen, spec)
        triggers = getattr(api, "trigger_set", None)
        if triggers is not None:
            save_triggers(trig_path, triggers)
        state["triggers"] = triggers
        return {"curve": curve, "n_queries": counted.n_queries, "n_calls": counted.n_calls,
                "has_triggers": triggers is not None, "seconds": round(time.perf_counter() - start, 2)}

    student, info = load_or_train(path, spec, build_student, train, verbose, name=desc)
    if info["loaded"]:
        gen.load_state_dict(load_checkpoint(gen_path)[2])
        state["triggers"] = load_triggers(trig_path) if info["has_triggers"] else None
    gen.eval()
    return student, gen, state["triggers"], {**info, "path": path}


def sample_images(gen: Generator, n: int, nz: int, gain: float, seed: int = 0) -> Tensor:
    """``n`` images ``sigmoid(gain * G(z))`` from the (trained) generator, reproducibly."""
    gen.eval()
    with torch.no_grad():
        z = torch.randn(n, nz, generator=torch.Generator().manual_seed(seed))
        return torch.sigmoid(gain * gen(z))

