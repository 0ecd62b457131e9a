"""Issue 26: notebook 08 shows one DFME round (``dfme.generator_step``, ``dfme.student_step``,
``dfme.dfme_round``); ``dfme.dfme_train`` runs that round in its loop. Splitting the loop out moved
no number: every random draw, optimiser and scheduler step is where it was, so a DFME run gives
bit-identical students, generators and curves (compared with a frozen copy of the loop before)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cip_helpers.course import attacks, config, data, dfme
from cip_helpers.course.training import accuracy, set_seed


def _old_dfme_train(cfg, api, student, gen, grad_api=None) -> list[dict]:
    """``dfme.dfme_train`` before issue 26 (one 60-line loop), without its progress bar."""
    grad_api = api if grad_api is None else grad_api
    set_seed(cfg.seed)
    test = data.id_data(cfg).split("test")
    opt_s = torch.optim.SGD(student.parameters(), lr=cfg.dfme_lr_s, momentum=0.9, weight_decay=5e-4)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.dfme_lr_g)
    per_iter = cfg.dfme_batch * (cfg.dfme_g_iter * (cfg.dfme_grad_m + 1) + cfg.dfme_s_iter)
    n_iters = api.remaining // per_iter
    sched_s = dfme.student_schedule(opt_s, cfg.dfme_lr_schedule, n_iters)
    replay = dfme.ReplayBuffer(cfg.dfme_replay_size)
    rng = torch.Generator().manual_seed(cfg.seed + 3)
    curve, next_eval = [], cfg.dfme_eval_every

    def disagreement(a):
        x = torch.sigmoid(cfg.dfme_gain * a)
        with torch.no_grad():
            return dfme.l1_disagreement(student(x), dfme.recovered_logits(grad_api(x)))

    for _ in range(n_iters):
        for _ in range(cfg.dfme_g_iter):
            gen.train()
            student.eval()
            a = gen(torch.randn(cfg.dfme_batch, cfg.dfme_nz, generator=rng))
            grad, _ = dfme.zo_gradient(disagreement, a.detach(), cfg.dfme_grad_m, cfg.dfme_grad_eps, rng)
            opt_g.zero_grad(set_to_none=True)
            a.backward(-grad / len(a))
            opt_g.step()
        for _ in range(cfg.dfme_s_iter):
            with torch.no_grad():
                x = torch.sigmoid(cfg.dfme_gain * gen(torch.randn(cfg.dfme_batch, cfg.dfme_nz, generator=rng)))
                target = dfme.recovered_logits(api(x))
            replay.add(x, target)
            student.train()
            loss = dfme.l1_disagreement(student(x), target).mean()
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
        for _ in range(cfg.dfme_replay if len(replay) else 0):
            xr, tr = replay.sample(cfg.dfme_batch, rng)
            student.train()
            loss_r = dfme.l1_disagreement(student(xr), tr).mean()
            opt_s.zero_grad(set_to_none=True)
            loss_r.backward()
            opt_s.step()
        if sched_s is not None:
            sched_s.step()
        if api.n_queries >= next_eval or api.remaining < per_iter:
            curve.append({"queries": api.n_queries, "test_acc": accuracy(student, *test)})
            next_eval += cfg.dfme_eval_every
    student.eval()
    gen.eval()
    return curve


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _run(train, cfg, bypass: bool):
    """One DFME run against a fixed soft-max black box; returns the players, the curve, the
    counts and the next draw of torch's global RNG (so a moved draw shows)."""
    d = data.id_data(cfg)
    w = torch.randn(math.prod(d.shape), d.n_classes, generator=torch.Generator().manual_seed(7))
    api = dfme.CountingAPI(lambda x: torch.softmax(x.flatten(1) @ w, 1), cfg.dfme_queries)
    grad_api = api.via(lambda x: torch.softmax(3 * x.flatten(1)[:, :d.n_classes], 1)) if bypass else None
    student = attacks.build_surrogate("cnn", cfg.surrogate_width, d.shape, d.n_classes, cfg.seed)
    gen = dfme.new_generator(cfg)
    curve = train(cfg, api, student, gen, grad_api=grad_api)
    return student, gen, curve, (api.n_queries, api.n_calls), torch.rand(4)


SETTINGS = {
    "smoke": ({"dfme_queries": 480}, False),
    "replay-cosine-bypass": ({"dfme_queries": 520, "dfme_g_iter": 2, "dfme_grad_m": 2, "dfme_s_iter": 2,
                              "dfme_replay": 3, "dfme_replay_size": 40, "dfme_eval_every": 128,
                              "dfme_lr_schedule": "cosine"}, True),
    "no-replay-constant": ({"dfme_queries": 330, "dfme_replay": 0, "dfme_lr_schedule": "constant"}, False),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_dfme_train_is_bit_identical_to_the_loop_before_issue26(name, results_root):
    kwargs, bypass = SETTINGS[name]
    cfg = config.get_profile("smoke", dfme_batch=16, dfme_nz=8, dfme_gen_channels=(8, 4), surrogate_width=4,
                             **kwargs)
    old = _run(lambda *a, grad_api: _old_dfme_train(*a, grad_api=grad_api), cfg, bypass)
    new = _run(lambda *a, grad_api: dfme.dfme_train(*a, progress=False, grad_api=grad_api), cfg, bypass)
    d = data.id_data(cfg)
    assert not _same_weights(old[0], attacks.build_surrogate("cnn", 4, d.shape, d.n_classes, cfg.seed))
    assert not _same_weights(old[1], dfme.new_generator(cfg))  # both players moved
    assert _same_weights(old[0], new[0]) and _same_weights(old[1], new[1])
    assert old[2] == new[2] and len(new[2]) >= 1
    assert old[3] == new[3]  # queries and calls
    assert torch.equal(old[4], new[4])  # torch's global RNG ends in the same state


def test_one_round_spends_its_queries_and_moves_both_players(results_root):
    cfg = config.get_profile("smoke", dfme_batch=8, dfme_nz=8, dfme_gen_channels=(8, 4), surrogate_width=4,
                             dfme_grad_m=2, dfme_replay=2)
    r = dfme.DFMERecipe.from_profile(cfg)
    assert r.round_queries == 8 * (cfg.dfme_g_iter * 3 + cfg.dfme_s_iter)
    d = data.id_data(cfg)
    student = attacks.build_surrogate("cnn", 4, d.shape, d.n_classes, cfg.seed)
    gen = dfme.new_generator(cfg)
    s0, g0 = ({k: v.clone() for k, v in m.state_dict().items()} for m in (student, gen))
    api = dfme.CountingAPI(lambda x: torch.softmax(x.flatten(1)[:, :d.n_classes] * 3, 1), r.round_queries)
    opt_s, opt_g = r.optimizers(student, gen)
    replay = dfme.ReplayBuffer(100)
    loss = dfme.dfme_round(student, gen, opt_s, opt_g, api, replay, torch.Generator().manual_seed(0), r)
    assert api.remaining == 0 and api.n_calls == cfg.dfme_g_iter + cfg.dfme_s_iter
    assert len(replay) == 8 * cfg.dfme_s_iter and loss.ndim == 0 and torch.isfinite(loss)
    assert any(not torch.equal(s0[k], v) for k, v in student.state_dict().items())
    assert any(not torch.equal(g0[k], v) for k, v in gen.state_dict().items())
    with pytest.raises(dfme.QueryBudgetExceeded):  # a second round would overspend
        dfme.dfme_round(student, gen, opt_s, opt_g, api, replay, torch.Generator().manual_seed(0), r)
