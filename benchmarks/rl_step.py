"""Online RL step time: SelfRewardRLModule vs TRL's GRPOTrainer, side by side, same everything.

Same model (default: the embedded SmolLM2-135M-Instruct), same demo-task prompts (2-shot chat prompts, the same
text), same group of G samples per prompt and prompts per step, same max_new_tokens and temperature, same LoRA
config, learning rate, PPO clip and KL beta to the adapter-disabled model, one optimisation pass per rollout, the
same loss (TRL set to `loss_type="bnpo"`, the k3 KL without its `use_bias_correction_kl`, advantage eps 1e-4 in
both, dropout off in both: `disable_dropout=True` and labelfree's mode rule), and the same reward (the TTRL
majority vote of each group, a cheap reward so that the step is generation + training).
Each engine runs in its own subprocess. The first `--warmup` steps are not timed. Completion lengths differ by
sampling, so the table reports seconds per step and per completion token (each engine's own count: TRL's
`completions/mean_length`, labelfree's `rl/response_length`).

    python benchmarks/rl_step.py                        # needs `pip install -e '.[bench]'` (trl)
    python benchmarks/rl_step.py --steps 6 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import time

from side_by_side import LORA, machine, model_arguments, model_path, run_engines  # beside this script


class Meter:
    """Times steps after warm-up and sums the completion tokens of the timed steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.tokens, self.completions, self.start = warmup, 0, 0.0, 0, None

    def step_end(self, mean_length: float, completions: int) -> None:
        self.steps += 1
        if self.steps > self.warmup:
            self.tokens += mean_length * completions
            self.completions += completions
        if self.steps == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()

    def result(self) -> dict:
        timed = self.steps - self.warmup
        elapsed = self.end - self.start
        return {"s_per_step": elapsed / timed, "ms_per_token": 1000 * elapsed / self.tokens, "timed_steps": timed,
                "mean_length": self.tokens / self.completions}


def _task_and_prompts(args):
    from datamodules.tasks import Arithmetic
    from lightning_modules.policy import load_tokenizer

    task = Arithmetic(seed=0)
    tok = load_tokenizer(model_path(args.model))
    questions = task.load("train", args.prompts * args.steps)
    return task, questions, [tok.decode(task.prompt_parts(tok, q).ids) for q in questions]


def run_labelfree(args, meter: Meter) -> None:
    import lightning as L
    import torch

    from datamodules.questions import QuestionDataModule
    from lightning_modules.losses.policy_gradient import PPOClipLoss
    from lightning_modules.policy import LoraSettings, Policy
    from lightning_modules.rl import SelfRewardRLModule
    from lightning_modules.signals import MajorityAnswer

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a, **k):
            meter.step_end(pl_module.step_metrics["rl/response_length"], args.prompts * args.group)

    task, _, _ = _task_and_prompts(args)
    module = SelfRewardRLModule(
        Policy(model_path(args.model), dtype=args.dtype, lora=LoraSettings(**LORA)), [MajorityAnswer()],
        group_size=args.group,
        temperature=1.0, max_new_tokens=args.max_new_tokens,
        loss=PPOClipLoss(clip_eps=0.2, kl_beta=args.beta, loss_type="bnpo"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
    )
    data = QuestionDataModule(task, num_questions=args.prompts * args.steps, batch_size=args.prompts,
                              tokenizer=model_path(args.model))
    trainer = L.Trainer(max_steps=args.steps, accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Timer()])
    trainer.fit(module, data)


def run_trl(args, meter: Meter) -> None:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightning_modules.model_store import resolve_model
    from lightning_modules.policy import load_tokenizer

    task, _, prompts = _task_and_prompts(args)

    class Timer(TrainerCallback):
        def on_log(self, *a, logs=None, **k):  # after the step's on_step_end
            if logs and "completions/mean_length" in logs:
                meter.step_end(logs["completions/mean_length"], args.prompts * args.group)

    def majority_vote(completions, **kwargs) -> list[float]:
        answers = [task.extract(c) for c in completions]
        rewards = []
        for s in range(0, len(answers), args.group):
            group = answers[s : s + args.group]
            majority = task.majority(group)[0]
            rewards += [float(task.same(a, majority)) for a in group]
        return rewards

    config = GRPOConfig(
        output_dir="/tmp/labelfree-bench/grpo", per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        beta=args.beta, epsilon=0.2, num_iterations=1, learning_rate=1e-4, lr_scheduler_type="constant",
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16",
        dataloader_num_workers=0, shuffle_dataset=False,
        loss_type="bnpo", use_bias_correction_kl=False, disable_dropout=True,  # labelfree's default loss and mode
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(resolve_model(model_path(args.model)), dtype=args.dtype,
                                                   trust_remote_code=False),
        reward_funcs=[majority_vote],
        args=config, train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=load_tokenizer(model_path(args.model)), peft_config=peft_config, callbacks=[Timer()],
    )
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (both engines)")
    parser.add_argument("--engine", choices=["labelfree", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    results = run_engines(__file__, args, {"labelfree": run_labelfree, "trl": run_trl}, Meter(args.warmup))
    if results is None:  # a child process: it printed its result
        return
    ours, trl = results["labelfree"], results["trl"]
    print(f"model={args.model} dtype={args.dtype} device={args.device} prompts/step={args.prompts} group={args.group} "
          f"max_new_tokens={args.max_new_tokens} beta={args.beta} timed_steps={ours['timed_steps']}")
    print("| engine | s / step | mean completion length | ms / completion token |\n|---|---|---|---|")
    for name, r in (("labelfree SelfRewardRLModule", ours), ("TRL GRPOTrainer", trl)):
        print(f"| {name} | {r['s_per_step']:.1f} | {r['mean_length']:.1f} | {r['ms_per_token']:.0f} |")
    print(f"on {machine(args.device)}: step time ratio TRL/labelfree: {trl['s_per_step'] / ours['s_per_step']:.2f}x; "
          "per completion token: "
          f"{trl['ms_per_token'] / ours['ms_per_token']:.2f}x")


if __name__ == "__main__":
    main()
