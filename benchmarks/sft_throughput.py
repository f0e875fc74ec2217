"""LoRA SFT throughput: WeightedSFTModule vs TRL's SFTTrainer, side by side, same everything.

Same model (default: the embedded SmolLM2-135M-Instruct), same prompt/response data (chat template, loss on the
response only), same LoRA config, batch size, max length, optimizer and learning rate. Each engine runs in its
own subprocess so that peak RSS is its own. Tokens are counted identically for both: a forward pre-hook on the
decoder sums the attention mask (non-pad tokens). The first `--warmup` steps are not timed.

    python benchmarks/sft_throughput.py                 # needs `pip install -e '.[bench]'` (trl)
    python benchmarks/sft_throughput.py --gradient-checkpointing off --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from side_by_side import (  # benchmarks/side_by_side.py, beside this script
    LORA,
    ROOT,
    machine,
    model_arguments,
    model_path,
    peak_memory_gib,
    run_engines,
)

DATA = ROOT / "configs" / "data" / "arithmetic_sft.jsonl"


class Meter:
    """Counts non-pad tokens entering the decoder and times steps after warm-up."""

    def __init__(self, warmup: int, device: str = "cpu") -> None:
        self.warmup, self.steps, self.tokens, self.start, self.device = warmup, 0, 0, None, device

    def hook(self, module, args, kwargs) -> None:
        if module.training and self.start is not None:
            mask = kwargs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()

    def step_end(self) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()

    def result(self) -> dict:
        elapsed = self.end - self.start
        return {"tokens_per_s": self.tokens / elapsed, "timed_steps": self.steps - self.warmup,
                "tokens": self.tokens, "peak_rss_gib": peak_memory_gib(self.device)}


def run_labelfree(args, meter: Meter) -> None:
    import lightning as L
    import torch

    from datamodules.labeled import LabeledDataModule
    from lightning_modules.policy import LoraSettings, Policy
    from lightning_modules.sft import WeightedSFTModule

    class Timer(L.Callback):
        def on_train_batch_end(self, *a, **k):
            meter.step_end()

    policy = Policy(model_path(args.model), dtype=args.dtype, lora=LoraSettings(**LORA),
                    gradient_checkpointing=args.gradient_checkpointing == "on")
    policy.causal_lm.get_decoder().register_forward_pre_hook(meter.hook, with_kwargs=True)
    module = WeightedSFTModule(
        policy, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-4), log_samples_every_n_steps=10**9,
        export_adapter=False,
    )
    data = LabeledDataModule(str(DATA), tokenizer=model_path(args.model), batch_size=args.batch_size,
                             max_length=args.max_length, bucket_by_length=not args.no_bucketing)
    trainer = L.Trainer(max_steps=args.steps, accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Timer()], limit_val_batches=0)
    trainer.fit(module, data)


def run_trl(args, meter: Meter) -> None:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lightning_modules.model_store import resolve_model
    from lightning_modules.policy import load_tokenizer

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            meter.step_end()

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["question"]}],
         "completion": [{"role": "assistant", "content": r["rationale"]}]}
        for r in rows
    ])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_path(args.model)), dtype=dtype,
                                                 trust_remote_code=False)
    model.get_decoder().register_forward_pre_hook(meter.hook, with_kwargs=True)
    config = SFTConfig(
        output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="constant", logging_steps=10**9,
        save_strategy="no", report_to=[], use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16",
        dataloader_num_workers=0,
        gradient_checkpointing=args.gradient_checkpointing == "on",
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, peft_config=peft_config,
                         processing_class=load_tokenizer(model_path(args.model)), callbacks=[Timer()])
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"],
                        help="for both engines; TRL's SFTConfig default is on")
    parser.add_argument("--no-bucketing", action="store_true", help="labelfree without length bucketing")
    parser.add_argument("--engine", choices=["labelfree", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp/labelfree-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()

    results = run_engines(__file__, args, {"labelfree": run_labelfree, "trl": run_trl}, Meter(args.warmup, args.device))
    if results is None:  # a child process: it printed its result
        return
    ours, trl = results["labelfree"], results["trl"]
    print(f"model={args.model} dtype={args.dtype} device={args.device} batch={args.batch_size} "
          f"max_length={args.max_length} "
          f"gradient_checkpointing={args.gradient_checkpointing} bucketing={not args.no_bucketing} "
          f"timed_steps={ours['timed_steps']} lora=r{LORA['r']}/{LORA['target_modules']} threads={_threads()}")
    memory = "GPU memory" if args.device.startswith("cuda") else "RSS"
    print(f"| engine | tokens/s | peak {memory} (GiB) |\n|---|---|---|")
    for name, r in (("labelfree WeightedSFTModule", ours), ("TRL SFTTrainer", trl)):
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} |")
    print(f"on {machine(args.device)}: throughput ratio labelfree/TRL: "
          f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x; "
          f"peak {memory} ratio: {ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
