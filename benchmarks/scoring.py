"""Teacher-forced scoring throughput: the signals' passes against the raw forward pass of the same model on the
same tokens, side by side in one process.

Raw forward: `model(input_ids, attention_mask).logits` under `torch.no_grad()` (every position's logits, what a plain
HF loop computes before taking its log-softmax). Ours, each under `policy.inference()`: the per-token NLL that the DS
loss and token NLL use (`Policy.token_nll`), the self-certainty map (`Policy.token_map(kl_from_uniform)`) and the
token entropy (`Policy.token_entropy`), each scoring the response tokens of the same rows. Rows: `--rows` of
`--prompt` prompt tokens and `--response` response tokens (random ids, the same for every pass); tokens/s counts
every token of the rows. Best of `--repeats` after one warm-up pass each.

    python benchmarks/scoring.py                                  # default model, float32, CPU
    python benchmarks/scoring.py --model qwen2-0.5b --device cuda --dtype bfloat16 --rows 64
"""

from __future__ import annotations

import argparse
import time

import torch
from side_by_side import machine, model_arguments, model_path  # benchmarks/side_by_side.py, beside this script

from lightning_modules.losses.functional import IGNORE_INDEX, predicting_labels
from lightning_modules.policy import Policy
from lightning_modules.signals.confidence import kl_from_uniform


def best_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    policy = Policy(model_path(args.model), dtype=args.dtype, adapt="none").to(args.device).eval()
    model = policy.causal_lm
    g = torch.Generator().manual_seed(0)
    width = args.prompt + args.response
    ids = torch.randint(100, min(len(policy.tokenizer), model.config.vocab_size), (args.rows, width), generator=g)
    ids, mask = ids.to(args.device), torch.ones_like(ids, device=args.device)
    labels = ids.clone()
    labels[:, : args.prompt] = IGNORE_INDEX
    predicting = predicting_labels(labels)  # the positions whose next token is a response token
    tokens = args.rows * width

    def raw():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    passes = {
        "token NLL (DS loss, token NLL)": lambda: policy.token_nll(ids, mask, labels),
        "self-certainty": lambda: policy.token_map(ids, mask, predicting, kl_from_uniform),
        "token entropy": lambda: policy.token_entropy(ids, mask, predicting),
    }
    raw_s = best_time(raw, args.repeats, args.device)
    print(f"model={args.model} dtype={args.dtype} device={args.device} rows={args.rows} tokens/row={width} "
          f"(response {args.response})")
    print("| pass | seconds | tokens/s | vs raw forward |\n|---|---|---|---|")
    print(f"| raw forward (all logits) | {raw_s:.3f} | {tokens / raw_s:.0f} | 1.00x |")
    ratios = []
    for name, fn in passes.items():

        def scored(fn=fn):
            with policy.inference():
                return fn()

        s = best_time(scored, args.repeats, args.device)
        ratios.append(raw_s / s)
        print(f"| {name} | {s:.3f} | {tokens / s:.0f} | {raw_s / s:.2f}x |")
    print(f"on {machine(args.device)}: scoring throughput / raw forward throughput, lowest of the three: "
          f"{min(ratios):.2f}x")


if __name__ == "__main__":
    main()
