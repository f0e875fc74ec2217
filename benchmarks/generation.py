"""Sampling throughput: the engine vs plain `model.generate(num_return_sequences=m)`, side by side.

Same model, same few-shot prompts of the demo task (as token ids), same questions, same batch of questions,
same m, temperature and max_new_tokens. Generated tokens are counted the same way for both: tokens up to and
including the end-of-sequence token of each sample. Both runs are untimed once on a few questions first (warm-up).

    python benchmarks/generation.py                               # 32 questions, m=8, batch 8, float32
    python benchmarks/generation.py --dtype bfloat16 --questions 64
"""

from __future__ import annotations

import argparse
import time

import torch
from side_by_side import machine, model_arguments, model_path  # benchmarks/side_by_side.py, beside this script

from datamodules.generation import HFGenerator
from datamodules.tasks import Arithmetic
from lightning_modules.policy import Policy
from lightning_modules.sampling import SamplingParams


def hf_generate(policy, task, questions, params: SamplingParams, batch_size: int) -> int:
    """Plain HF: left-padded full prompts, num_return_sequences=m; returns generated tokens (to EOS)."""
    tok, model = policy.tokenizer, policy.model
    eos = tok.eos_token_id
    tokens = 0
    for start in range(0, len(questions), batch_size):
        prompts = [task.prompt_parts(tok, q).ids for q in questions[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        ids, mask = ids.to(model.device), mask.to(model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=params.temperature,
                             top_p=params.top_p, top_k=0, max_new_tokens=params.max_new_tokens,
                             num_return_sequences=params.n, pad_token_id=tok.pad_token_id)
        for row in out[:, width:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="questions per batch (x m rows)")
    parser.add_argument("-m", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    policy = Policy(model_path(args.model), dtype=args.dtype, adapt="none").to(args.device).eval()
    task = Arithmetic()
    questions = task.load("test", args.questions)
    params = SamplingParams(n=args.m, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    engine = HFGenerator(batch_size=args.batch_size, chunk_size=args.batch_size, progress=False)

    with torch.no_grad():
        hf_generate(policy, task, questions[:2], params, 2)  # warm-up
        engine.sample(policy, questions[:2], task, params)
        t0 = time.perf_counter()
        hf_tokens = hf_generate(policy, task, questions, params, args.batch_size)
        hf_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = engine.sample(policy, questions, task, params)
        ours_s = time.perf_counter() - t0
    ours_tokens = sum(len(r) for r in ours.response_ids)
    prompt_len = sum(len(task.prompt_parts(policy.tokenizer, q).ids) for q in questions) / len(questions)
    print(f"model={args.model} dtype={args.dtype} device={args.device} questions={args.questions} m={args.m} "
          f"batch={args.batch_size} "
          f"T={args.temperature} max_new_tokens={args.max_new_tokens} prompt_tokens={prompt_len:.0f} "
          f"threads={torch.get_num_threads()}")
    print("| engine | generated tokens | seconds | tokens/s |\n|---|---|---|---|")
    print(f"| HF generate(num_return_sequences={args.m}) | {hf_tokens} | {hf_s:.1f} | {hf_tokens / hf_s:.0f} |")
    print(f"| labelfree HFGenerator | {ours_tokens} | {ours_s:.1f} | {ours_tokens / ours_s:.0f} |")
    print(f"on {machine(args.device)}: speed-up (tokens/s): {(ours_tokens / ours_s) / (hf_tokens / hf_s):.2f}x")


if __name__ == "__main__":
    main()
