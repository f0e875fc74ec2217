"""Sampling throughput: the engine vs plain `model.generate(num_return_sequences=m)` and vs CTranslate2 (a
dedicated CPU/GPU inference engine: the anchor), side by side.

Same model, same few-shot prompts of the demo task (as token ids), same questions, same batch of questions,
same m, temperature and max_new_tokens. Generated tokens are counted the same way for all: tokens up to and
including the end-of-sequence token of each sample. Every engine runs untimed once on a few questions first
(warm-up). CTranslate2 (optional: `pip install ctranslate2`, in the `bench` extra; skipped, said so, when absent)
runs the same model converted once to its format at the benchmark's dtype (cached under the project cache), each
prompt repeated m times in the batch as its users batch samples, twice: the whole prompt in every row, and with the
task's few-shot prefix as its `static_prompt` (its own prefix cache, what our engine's shared prefix does).

    python benchmarks/generation.py                               # 32 questions, m=8, batch 8, float32
    python benchmarks/generation.py --dtype bfloat16 --questions 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from side_by_side import machine, model_arguments, model_path  # benchmarks/side_by_side.py, beside this script

from datamodules.generation import HFGenerator
from datamodules.tasks import Arithmetic
from lightning_modules.policy import Policy
from lightning_modules.sampling import SamplingParams, eos_ids


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


def ct2_generator(model: str, dtype: str, device: str):
    """The model converted to CTranslate2 (once, under the project cache) and loaded, or None when the package is
    not installed."""
    try:
        import ctranslate2
    except ImportError:
        return None
    from lightning_modules.model_store import cache_dir, resolve_model

    source = resolve_model(model)
    out = cache_dir() / "ctranslate2" / f"{Path(source).name}-{dtype}"
    if not (out / "model.bin").is_file():
        ctranslate2.converters.TransformersConverter(source).convert(str(out), quantization=dtype, force=True)
    return ctranslate2.Generator(str(out), device=device, compute_type=dtype, intra_threads=torch.get_num_threads())


def ct2_generate(generator, tok, task, questions, params: SamplingParams, batch_size: int, end_ids,
                 static_prefix: bool) -> int:
    """CTranslate2: each prompt repeated m times, sampled; returns generated tokens (to EOS, as the others)."""
    end = tok.convert_ids_to_tokens(sorted(end_ids))
    tokens = 0
    for start in range(0, len(questions), batch_size):
        parts = [task.prompt_parts(tok, q) for q in questions[start : start + batch_size]]
        rows = [tok.convert_ids_to_tokens(p.suffix_ids if static_prefix else p.ids) for p in parts
                for _ in range(params.n)]
        prefix = tok.convert_ids_to_tokens(parts[0].prefix_ids) if static_prefix and parts[0].prefix_ids else None
        results = generator.generate_batch(
            rows, static_prompt=prefix, include_prompt_in_result=False, max_length=params.max_new_tokens,
            sampling_topk=0, sampling_topp=params.top_p, sampling_temperature=params.temperature, end_token=end,
            return_end_token=True)
        tokens += sum(len(r.sequences_ids[0]) for r in results)
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
    ct2 = ct2_generator(model_path(args.model), args.dtype, args.device)
    stop_ids = eos_ids(policy.model, policy.tokenizer)

    with torch.no_grad():
        hf_generate(policy, task, questions[:2], params, 2)  # warm-up
        engine.sample(policy, questions[:2], task, params)
        t0 = time.perf_counter()
        hf_tokens = hf_generate(policy, task, questions, params, args.batch_size)
        hf_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = engine.sample(policy, questions, task, params)
        ours_s = time.perf_counter() - t0
    anchors = {}
    for static in (False, True) if ct2 is not None else ():
        ct2_generate(ct2, policy.tokenizer, task, questions[:2], params, 2, stop_ids, static)  # warm-up
        t0 = time.perf_counter()
        n = ct2_generate(ct2, policy.tokenizer, task, questions, params, args.batch_size, stop_ids, static)
        name = f"CTranslate2 {ctranslate2_version()}" + (" (few-shot prefix as static_prompt)" if static else "")
        anchors[name] = (n, time.perf_counter() - t0)
    ours_tokens = sum(len(r) for r in ours.response_ids)
    prompt_len = sum(len(task.prompt_parts(policy.tokenizer, q).ids) for q in questions) / len(questions)
    print(f"model={args.model} dtype={args.dtype} device={args.device} questions={args.questions} m={args.m} "
          f"batch={args.batch_size} "
          f"T={args.temperature} max_new_tokens={args.max_new_tokens} prompt_tokens={prompt_len:.0f} "
          f"threads={torch.get_num_threads()}")
    print("| engine | generated tokens | seconds | tokens/s |\n|---|---|---|---|")
    print(f"| HF generate(num_return_sequences={args.m}) | {hf_tokens} | {hf_s:.1f} | {hf_tokens / hf_s:.0f} |")
    for name, (n, seconds) in anchors.items():
        print(f"| {name} | {n} | {seconds:.1f} | {n / seconds:.0f} |")
    print(f"| labelfree HFGenerator | {ours_tokens} | {ours_s:.1f} | {ours_tokens / ours_s:.0f} |")
    if ct2 is None:
        print("CTranslate2 is not installed (pip install ctranslate2): its side is skipped")
    speed = ours_tokens / ours_s
    ratios = [f"{speed / (hf_tokens / hf_s):.2f}x HF generate"]
    ratios += [f"{speed / (n / seconds):.2f}x {name}" for name, (n, seconds) in anchors.items()]
    print(f"on {machine(args.device)}: speed-up (tokens/s): {', '.join(ratios)}")


def ctranslate2_version() -> str:
    import ctranslate2

    return ctranslate2.__version__


if __name__ == "__main__":
    main()
