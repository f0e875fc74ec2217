"""The teacher-forced signals on the demo's candidates: every candidate scored (each signal's own pass over all of
them, as before `score` deduplicated) against `score` (each distinct answer of a question scored once, the value
copied to its repeats), side by side in one process, values compared.

Candidates: the demo's workload, `--questions` demo questions (family 2..12 x 3..20) x 8 samples at T 0.5 with the
default model, cached under `--cache` (generated once, about 2 min on 2 cores). Signals: token NLL (teacher-forced),
self-certainty, negative entropy, DeepConf and IWSI's DS weight (3 labeled valid questions). Printed: per signal the
seconds and candidates/s of both, the largest difference of their values; the last line the ratio of candidates/s.

    python benchmarks/signals.py
    python benchmarks/signals.py --temperature 1.0   # fewer repeats among the samples
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from side_by_side import machine  # benchmarks/side_by_side.py, beside this script

from datamodules.generation import HFGenerator
from datamodules.tasks import Arithmetic
from lightning_modules.policy import Policy
from lightning_modules.sampling import SamplingParams
from lightning_modules.signals import DeepConf, DSWeight, NegativeEntropy, SelfCertainty, TokenNLL, score
from lightning_modules.signals.base import distinct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--cache", default="runs/benchmarks/candidates")
    args = parser.parse_args()

    policy = Policy(args.model, adapt="none")
    task = Arithmetic(b_range=(3, 20))
    params = SamplingParams(8, args.temperature, 1.0, 128, 0)
    candidates = HFGenerator(cache_dir=args.cache, progress=False).sample(
        policy, task.load("train", args.questions), task, params)
    candidates = replace(candidates, logprobs=None)  # the teacher-forced pass, not the stored log-probs
    ds = DSWeight(valid_questions=3)
    ds.use_labeled(task.load("valid", 3), task)
    signals = [TokenNLL(), SelfCertainty(), NegativeEntropy(), DeepConf(window=8), ds]
    unique = len(distinct(candidates)[0])
    print(f"model={args.model} questions={args.questions} samples={len(candidates)} distinct={unique} "
          f"T={args.temperature} threads={torch.get_num_threads()}")
    print("| signal | every candidate (s) | distinct answers once (s) | speed-up | largest difference |")
    print("|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for signal in signals:
        start = time.perf_counter()
        with policy.inference():
            every = signal(candidates, policy).float()
        middle = time.perf_counter()
        once = score(signal, candidates, policy)
        end = time.perf_counter()
        both = torch.isfinite(every) & torch.isfinite(once)
        if not torch.equal(torch.isfinite(every), torch.isfinite(once)):
            raise AssertionError(f"{signal.name}: the two give values to different candidates")
        diff = (every[both] - once[both]).abs().max().item()
        totals[0] += middle - start
        totals[1] += end - middle
        print(f"| {signal.name} | {middle - start:.1f} | {end - middle:.1f} | {(middle - start) / (end - middle):.2f}x "
              f"| {diff:.1e} |", flush=True)
    n = len(candidates)
    print(f"on {machine('cpu')}: {n / totals[0]:.1f} -> {n / totals[1]:.1f} candidates/s; teacher-forced signals "
          f"speed-up (candidates/s): {totals[0] / totals[1]:.2f}x")


if __name__ == "__main__":
    main()
