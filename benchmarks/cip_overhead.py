"""How much slower is CIP than the undefended API? (issue #4 target: at most 1.1x)

    python benchmarks/cip_overhead.py                     # quick profile, 10,000 queries, 7 repeats
    python benchmarks/cip_overhead.py --profile smoke --repeats 3

Builds a batch of queries that mixes ID digits (victim-train and test), KnockoffNets-pool crops
and uniform noise, then times, on the same batch and in alternating order,

* baseline: ``softmax(victim(x))`` in one call under ``torch.no_grad()`` (the OE-tuned victim
  CIP wraps, no input checks): the issue's reference,
* batched baseline: ``softmax(predict_logits(victim, x, cip.forward_batch))``, the exact forward
  call every defense makes (chunks of ``forward_batch`` = 256 queries): isolates CIP's
  own overhead (checks, routing, PPD, PBD), and
* CIP: ``defense(x)`` from ``pipeline.get_defense(cfg, "cip")`` (input checks, the chunked forward pass,
  routing, weak/strong PPD, online PBD, trigger-set bookkeeping, output checks).

Each repeat times all three back to back, in a rotating order. Prints the median time of each over
``--repeats`` repeats (after one warm-up run each), the ratios of the medians (the headline: CIP /
baseline), the median of the per-repeat ratios (robust on a shared, busy machine), and a
breakdown of one CIP call. The OE victim is load-or-train, so the
first run on a fresh results directory trains it (minutes on the quick profile).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

from cip_helpers import config, data, pipeline
from cip_helpers.defenses import single_thread
from cip_helpers.training import check_images, predict_logits


def mixed_queries(cfg: config.Profile, n: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, int]]:
    """``n`` queries: 40 % ID digits, 40 % KnockoffNets pool, 20 % uniform noise, shuffled."""
    d = data.id_data(cfg)
    g = torch.Generator().manual_seed(seed)
    digits = torch.cat([d.test_x, d.train_x])
    knockoff = data.query_pool(cfg, "knockoff")
    n_id, n_ko = int(0.4 * n), int(0.4 * n)
    n_noise = n - n_id - n_ko
    parts = {"ID digits": digits[torch.randint(len(digits), (n_id,), generator=g)],
             "knockoff pool": knockoff[torch.randint(len(knockoff), (n_ko,), generator=g)],
             "uniform noise": torch.rand(n_noise, *d.shape, generator=g)}
    x = torch.cat(list(parts.values()))
    return x[torch.randperm(n, generator=g)].contiguous(), {k: len(v) for k, v in parts.items()}


def time_once(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", choices=sorted(config.PROFILES))
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    cfg = config.get_profile(args.profile)
    cip = pipeline.get_defense(cfg, "cip")  # online PBD, shuffle_noise: the default CIP
    victim = cip.model.eval()
    x, parts = mixed_queries(cfg, args.queries, cfg.seed)

    @torch.no_grad()
    def baseline(q: torch.Tensor) -> torch.Tensor:
        return victim(q).softmax(1)

    def batched(q: torch.Tensor) -> torch.Tensor:
        return predict_logits(victim, q, batch_size=cip.forward_batch).softmax(1)

    print(f"profile {args.profile}: {len(x)} queries ({', '.join(f'{v} {k}' for k, v in parts.items())}), "
          f"torch threads {torch.get_num_threads()}")
    fns = {"baseline softmax(victim(x))": baseline, "batched baseline": batched, "CIP defense(x)": cip}
    for fn in fns.values():  # warm-up (allocator, kernels)
        time_once(fn, x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in tqdm(range(args.repeats), desc="timing"):
        for name in names[i % 3:] + names[:i % 3]:  # rotate the order: no order bias
            times[name].append(time_once(fns[name], x))
    med = {name: statistics.median(t) for name, t in times.items()}
    base, bat, cipn = names
    ratio = med[cipn] / med[base]
    pair_ratio = statistics.median(c / b for c, b in zip(times[cipn], times[base]))
    batched_ratio = med[cipn] / med[bat]

    # Breakdown of one CIP call: input checks, the (batched) forward pass, the answer step.
    steps = {}
    start = time.perf_counter()
    check_images(x, cip.input_shape)
    steps["input checks"] = time.perf_counter() - start
    start = time.perf_counter()
    logits = predict_logits(cip.model, x, batch_size=cip.forward_batch)
    steps["forward pass (predict_logits)"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad(), single_thread():
        cip.answer(x, logits)
    steps["routing + PPD + PBD"] = time.perf_counter() - start

    print(f"routes of the last call: {cip.route_counts()}")
    for name, t in times.items():
        print(f"{name:<28} median {med[name] * 1e3:8.1f} ms over {args.repeats} repeats "
              f"(min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f})")
    print("one CIP call, step by step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in steps.items()))
    print(f"CIP / batched baseline (ratio of medians): {batched_ratio:.3f}x")
    print(f"CIP / baseline, median of per-repeat ratios: {pair_ratio:.3f}x")
    print(f"overhead ratio (median CIP / median baseline, {args.repeats} repeats): {ratio:.3f}x "
          f"(target <= 1.1x: {'met' if ratio <= 1.1 else 'NOT met'})")
    return ratio


if __name__ == "__main__":
    main()
