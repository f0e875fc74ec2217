"""A tiny random Llama and a tiny byte-level BPE tokenizer, built offline in a second."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parents[1]  # the repository

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Ana has 7 boxes. Each box holds 12 apples. How many apples does Ana have in total?",
    "Ana has 7 boxes with 12 apples each, so the total is 7 x 12 = 84. The answer is 84.",
    "Question: Answer: Is the answer to this question correct? Yes No yes no Score: 0 1 2 3 4 5 6 7 8 9 10",
    "user assistant system The quick brown fox jumps over the lazy dog (A) (B) (C) (D) + - = , .",
]


def build_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(directory: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """Save a tiny random LlamaForCausalLM (tied embeddings, like the default model) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_labelfree(*args: str, cwd: Path) -> None:
    """`labelfree <args>` in a new process (several-process strategies start their own processes), offline and on
    one thread per process; its output is shown when it fails."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lightning_modules.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise AssertionError(f"labelfree {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


def tiny_args(config: str | Path, tiny_model_dir: str, save_dir, *overrides: str) -> list[str]:
    """The arguments of a shipped recipe (composed as its first line says) on the tiny model, logging under
    `save_dir`, no progress bar, then `overrides`."""
    from lightning_modules.cli import recipe_args

    return [*recipe_args(ROOT / config), f"--model.init_args.policy.init_args.model={tiny_model_dir}",
            f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.enable_progress_bar=false", *overrides]


def answers_only(groups: list[list[str | None]]):
    """`Candidates` that carry answers only (enough for the vote signals), zero-shot demo task."""
    import torch

    from datamodules.tasks import Arithmetic
    from lightning_modules.candidates import Candidates

    answers = [a for g in groups for a in g]
    return Candidates(questions=[None] * len(groups), tasks=[Arithmetic(few_shot=0)] * len(groups),
                      group=torch.tensor([i for i, g in enumerate(groups) for _ in g]), texts=[""] * len(answers),
                      answers=answers, prompt_ids=[[1]] * len(groups), response_ids=[[1]] * len(answers))
