"""What the engine-vs-engine benchmarks share: the LoRA settings both engines get, and running each engine in its
own subprocess (so that its peak RSS and threads are its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA = dict(r=8, alpha=16, dropout=0.05, target_modules="all-linear")


def run_engines(script: str, args, engines: dict[str, Callable], meter) -> dict[str, dict] | None:
    """In a child (`args.engine` set): runs `engines[args.engine](args, meter)` seeded, prints `meter.result()` as
    JSON on the last line and returns None. In the parent: runs `script --engine NAME` with the same command line
    for every engine, one after the other, and returns {name: result}."""
    if args.engine:
        import torch

        torch.manual_seed(0)
        engines[args.engine](args, meter)
        print(json.dumps(meter.result()))
        return None
    results = {}
    for engine in engines:
        cmd = [sys.executable, script, "--engine", engine] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


# Realistic sizes with random weights, so that a GPU machine (which reaches no hub) measures at scale: Qwen2-shaped
# (the published 0.5B and 1.5B shapes), with the default model's tokenizer.
CONFIGS = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2),
}


def model_path(name: str) -> str:
    """`name` itself (an alias or a directory), or for a name of `CONFIGS` a directory holding that random-weight
    model (built once, seed 0, under the project cache)."""
    if name not in CONFIGS:
        return name
    from lightning_modules.model_store import DEFAULT_MODEL, cache_dir
    from lightning_modules.policy import load_tokenizer

    path = cache_dir() / "random" / name
    if not (path / "config.json").is_file():
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
                             **CONFIGS[name])
        Qwen2ForCausalLM(config).save_pretrained(path)
        load_tokenizer(DEFAULT_MODEL).save_pretrained(path)
    return str(path)


def model_arguments(parser) -> None:
    """`--model`, `--device`, `--dtype`: what every benchmark takes, so that the same script measures on a GPU."""
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help=f"an alias, a model directory, or a random-weight config: {', '.join(CONFIGS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated (cuda) or the process's peak RSS (cpu), GiB."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine(device: str) -> str:
    """The machine a benchmark ran on, for its last line."""
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
