"""What does CIP cost per call, from one query per call to 10,000? (issue 14; issue 4's 1.1x target)

    python benchmarks/api_latency.py                          # quick profile, sizes 1,16,256,10000
    python benchmarks/api_latency.py --profile smoke --repeats 3
    python benchmarks/api_latency.py --out benchmarks/api_latency.txt   # also write the report

One mixed stream of queries (40 % ID digits, 40 % KnockoffNets-pool crops, 20 % uniform noise,
shuffled) is sent in calls of each size to

* plain: ``softmax(model(x))`` under ``torch.no_grad()``, the OE-tuned victim CIP wraps, no
  checks at all (the issue's reference), and
* CIP: ``defense(x)`` from ``pipeline.get_defense(cfg, "cip")`` (online PBD, ``shuffle_noise``):
  input checks, the forward pass (chunks of 256), routing, weak/strong PPD, PBD, trigger-set
  bookkeeping, output checks, running totals.

Both see the same calls of the same queries. Per size, ``--repeats`` rounds time both back to
back in alternating order (no order bias); the report gives the median time per query of each
and the median of the per-round ratios CIP / plain (robust on a busy, shared machine: both halves
of a round see the same load). Targets: <= 1.1x at >= 256 queries per call, <= 1.5x at 1.
The OE victim is load-or-train: the first run on a fresh results directory trains it.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cip_helpers.course import config, data, pipeline
from cip_helpers.method.defenses import CIP

TARGETS = {1: 1.5, 16: None, 256: 1.1, 10_000: 1.1}


def mixed_queries(cfg: config.Profile, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` queries: 40 % ID digits, 40 % KnockoffNets pool, 20 % uniform noise, shuffled."""
    d = data.id_data(cfg)
    g = torch.Generator().manual_seed(seed)
    digits = torch.cat([d.test_x, d.train_x])
    knockoff = data.query_pool(cfg, "knockoff")
    n_id, n_ko = int(0.4 * n), int(0.4 * n)
    parts = [digits[torch.randint(len(digits), (n_id,), generator=g)],
             knockoff[torch.randint(len(knockoff), (n_ko,), generator=g)],
             torch.rand(n - n_id - n_ko, *d.shape, generator=g)]
    x = torch.cat(parts)
    return x[torch.randperm(n, generator=g)].contiguous()


def stream_seconds(fn, x: torch.Tensor, size: int) -> float:
    """Seconds to answer ``x`` in consecutive calls of ``size`` queries."""
    start = time.perf_counter()
    for i in range(0, len(x), size):
        fn(x[i:i + size])
    return time.perf_counter() - start


def breakdown(cfg: config.Profile, cip: CIP, plain, n: int) -> list[str]:
    """Where one-query calls spend their time: CIP's fixed per-call cost (input checks, the
    non-finite and output checks, thread switch, totals) vs the victim's forward pass vs the
    defense's own computation (energy, routing, PPD, PBD). Median over 5 rounds of ``n`` calls."""
    from cip_helpers.method.defenses import single_thread, softmax
    from cip_helpers.method.inputs import as_images
    from cip_helpers.method.models import predict_logits

    x = mixed_queries(cfg, n, seed=99)
    rows = [x[i:i + 1] for i in range(n)]
    logits = [predict_logits(cip.model, r, cip.forward_batch) for r in rows]

    def checks() -> None:  # everything __call__ adds around forward + answer
        for r, lg in zip(rows, logits):
            as_images(r, cip.input_shape)
            with torch.no_grad(), single_thread():
                float(lg.sum())
                p = softmax(lg)
                float(p.min()) >= 0 and float((p.sum(1) - 1).abs().max()) <= 1e-6

    def forward() -> None:
        for r in rows:
            predict_logits(cip.model, r, cip.forward_batch)

    def answer() -> None:
        for r, lg in zip(rows, logits):
            with torch.no_grad(), single_thread():
                cip.last_clean = softmax(lg)
                cip._nonfinite = None
                cip.answer(r, lg)

    def plain_calls() -> None:
        for r in rows:
            plain(r)

    stages = {"plain softmax(model(x))": plain_calls, "CIP forward pass": forward,
              "CIP checks + softmax + bookkeeping": checks, "CIP energy + routing + PPD + PBD": answer}
    times = {k: [] for k in stages}
    for _ in range(5):
        for k, fn in stages.items():
            start = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - start) / n * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain softmax(model(x))"]
    return ["breakdown of one-query calls (median us per call, share of plain):"] + [
        f"  {k:<36} {v:8.1f} us  {v / base:6.2f}x" for k, v in med.items()]


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", choices=sorted(config.PROFILES))
    parser.add_argument("--sizes", default="1,16,256,10000")
    parser.add_argument("--queries", type=int, default=2048, help="queries per round for sizes < 10,000")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    cfg = config.get_profile(args.profile)
    cip: CIP = pipeline.get_defense(cfg, "cip")
    victim = cip.model

    @torch.no_grad()
    def plain(q: torch.Tensor) -> torch.Tensor:
        return victim(q).softmax(1)

    sizes = [int(s) for s in args.sizes.split(",")]
    lines = [f"# benchmarks/api_latency.py --profile {args.profile} --sizes {args.sizes} "
             f"--queries {args.queries} --repeats {args.repeats}",
             f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, shared machine",
             f"{'queries/call':>12} {'plain us/query':>15} {'CIP us/query':>13} {'CIP/plain':>10} "
             f"{'(min..max)':>14} {'target':>8}"]
    ratios: dict[int, float] = {}
    for size in tqdm(sizes, desc="call sizes"):
        x = mixed_queries(cfg, max(size, args.queries) if size < 10_000 else size, seed=size)
        x = x[: (len(x) // size) * size]
        for fn in (plain, cip):  # warm-up (allocator, kernels)
            stream_seconds(fn, x[: min(len(x), 4 * size)], size)
        t_plain, t_cip, per_round = [], [], []
        for r in range(args.repeats):
            order = (plain, cip) if r % 2 == 0 else (cip, plain)
            secs = {fn: stream_seconds(fn, x, size) for fn in order}
            t_plain.append(secs[plain] / len(x))
            t_cip.append(secs[cip] / len(x))
            per_round.append(secs[cip] / secs[plain])
        ratio = statistics.median(per_round)
        ratios[size] = ratio
        target = TARGETS.get(size)
        verdict = "" if target is None else f"<= {target}x {'met' if ratio <= target else 'MISSED'}"
        lines.append(f"{size:>12} {statistics.median(t_plain) * 1e6:>15.1f} {statistics.median(t_cip) * 1e6:>13.1f} "
                     f"{ratio:>9.3f}x {f'({min(per_round):.2f}..{max(per_round):.2f})':>14} {verdict}")
    lines += breakdown(cfg, cip, plain, args.queries)
    lines.append(f"running totals of the CIP instance: {cip.totals}")
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
    return ratios


if __name__ == "__main__":
    main()
