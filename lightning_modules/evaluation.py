"""AnswerSamplingModule: greedy and k sampled answers for each prompt of a test/predict batch.

Task-free: a batch brings token ids (`prefix_ids` shared, `suffix_ids` per prompt) and stop strings, and the
step returns completion texts; the `TaskEvaluation` callback reads and scores them with the task.
`labelfree test -c configs/eval/<task>.yaml --ckpt_path CKPT` evaluates a trained adapter: the policy is then
the checkpoint's (base model and adapter settings, see `cli.py`) and its trained tensors are loaded into it.
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_modules.checkpointing import TrainableStateMixin
from lightning_modules.policy import Policy
from lightning_modules.sampling import SamplingParams, finish_text, generate_batch, prefix_cache


class AnswerSamplingModule(TrainableStateMixin, L.LightningModule):
    """Args:
        policy: the model under evaluation.
        k: sampled answers per prompt (for maj@k and pass@k); 0 = greedy only.
        temperature, top_p, max_new_tokens, seed: sampling settings of the k answers.
    """

    def __init__(self, policy: Policy, k: int = 8, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.policy, self.k = policy, k
        self.greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
        self.sampled = SamplingParams(n=max(k, 1), temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                      seed=seed)
        self._prefix: tuple[tuple[int, ...], object] | None = None

    def _prefix_cache(self, prefix_ids: list[int]):
        if self._prefix is None or self._prefix[0] != tuple(prefix_ids):
            self._prefix = (tuple(prefix_ids), prefix_cache(self.policy.model, prefix_ids))
        return self._prefix[1]

    def _completions(self, batch: dict, params: SamplingParams, generator: torch.Generator | None) -> list:
        prefix = self._prefix_cache(batch["prefix_ids"])
        completions = generate_batch(self.policy.model, self.policy.tokenizer, prefix, len(batch["prefix_ids"]),
                                     batch["suffix_ids"], params, batch["stop"], generator)
        return [finish_text(self.policy.tokenizer, c, batch["stop"]) for c in completions]

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        """Greedy texts (P,) and why each ended ("eos", "stop", "length"), sampled texts and their ends per prompt
        (P lists of k), the samples' tokens and log-probs (P x k, flat) for the signals that judge them, and the
        number of tokens generated."""
        generator = torch.Generator().manual_seed(self.sampled.seed * 1_000_003 + batch_idx)
        n, k = len(batch["suffix_ids"]), self.k
        with self.policy.inference():
            greedy = self._completions(batch, self.greedy, None)
            sampled = self._completions(batch, self.sampled, generator) if k else []
        texts, ends = [t for t, _ in sampled], [c.finish_reason for _, c in sampled]
        per_prompt = (lambda flat: [flat[i * k : (i + 1) * k] for i in range(n)]) if k else (lambda flat: [[]] * n)
        return {"greedy": [t for t, _ in greedy], "greedy_finish": [c.finish_reason for _, c in greedy],
                "samples": per_prompt(texts), "sample_finish": per_prompt(ends),
                "sample_tokens": [c.tokens for _, c in sampled], "sample_logprobs": [c.logprobs for _, c in sampled],
                "num_tokens": sum(len(c.tokens) for _, c in greedy + sampled)}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return self.test_step(batch, batch_idx)

    def on_test_start(self) -> None:
        self._prefix = None
