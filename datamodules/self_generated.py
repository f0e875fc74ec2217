"""SelfGeneratedDataModule: the model writes its own training data (SPEC §1–4).

Each round: sample `n` candidates per unlabeled question with the current policy (cached and resumable),
compute the label-free signals the selectors need, apply the selectors, and serve the kept candidates as
weighted SFT batches to `WeightedSFTModule`. Rounds follow the trainer's epochs: round r covers epochs
[r * epochs_per_round, (r + 1) * epochs_per_round) and needs `trainer.reload_dataloaders_every_n_epochs =
epochs_per_round` (checked), so round r + 1 samples from the model trained in round r.

Training samples use the zero-shot format (the question as the user turn, the candidate's completion as the
answer), whatever the few-shot prompt used for sampling. Gold answers never reach training; where the task
has them they feed the pseudo-label audit only: the precision (kept candidates whose answer is right) and
recall (right candidates that were kept) after each selector, logged as `select/...`.

Options: a labeled set mixed into training (`labeled_questions`, SemiEvol), optionally alone in a warm-up round
(`labeled_warmup`); IWSI's valid set (`valid_questions`, gold rationales) for the DS weight; a reward model
directory for the RM-filter. Under DDP each rank scores its share of the questions, percentiles are global,
and every rank gets all kept samples (its batches are then sharded).
Per round, `<log_dir>/round-<r>/selected.jsonl` (prompt, completion, weight, every signal) and `report.json`.
Candidates are cached under `<experiment dir>/candidates/` (shared by the experiment's versions), so a run
interrupted during generation continues where it stopped when started again.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.collate import LengthBucketSampler, SFTExample, collate, tokenize_example
from datamodules.generation import HFGenerator, dist_info, gather_objects
from datamodules.io import check_at_least
from datamodules.labeled import TokenizedDataset
from datamodules.scoring import check_reward_model, reward_model_scores, sample_losses, self_ratings
from datamodules.selection import Selector, Signals, ds_signals
from datamodules.signals import VOTE_SIGNALS, token_entropy, vote_signals
from datamodules.tasks.base import Question, Task
from lightning_modules.model_store import DEFAULT_MODEL
from lightning_modules.policy import format_prompt, load_tokenizer
from lightning_modules.sampling import SamplingParams


class SelfGeneratedDataModule(L.LightningDataModule):
    """Args:
        task: the task (its `train` split supplies the unlabeled questions; gold is read for the audit only).
        selectors: applied in order (e.g. `[MajorityVote, DSWeightFilter]` for IWSI); none keeps every candidate.
        num_questions, split: the unlabeled questions.
        n, temperature, top_p, max_new_tokens, seed: sampling (SPEC defaults for IWSI: 15, 1.1).
        generation_batch_size: questions per generation batch.
        valid_questions, valid_split: IWSI's small labeled valid set (gold rationales) for the DS weight.
        ds_tokens, clip_like_reference, ds_first_token_from_pad: DS weight options (SPEC §2; the last scores the
            first token from a pad position, as IWSI's official loss code does).
        labeled_questions, labeled_split, labeled_warmup: SemiEvol's labeled set, mixed into training; with
            `labeled_warmup` round 0 trains on it alone and generation starts in round 1.
        reward_model: a sequence-classification model directory (RM-filter).
        epochs_per_round: epochs trained on each round's data.
        batch_size, max_length: SFT batches.
        cache_dir: where candidates are cached (default `<experiment dir>/candidates`, shared by its versions).
        tokenizer: linked to the policy's model.
    """

    def __init__(
        self, task: Task, selectors: list[Selector] | None = None, num_questions: int = 200, split: str = "train",
        n: int = 8, temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
        generation_batch_size: int = 8, valid_questions: int = 0, valid_split: str = "valid",
        ds_tokens: str = "all", clip_like_reference: bool = False, ds_first_token_from_pad: bool = False,
        labeled_questions: int = 0,
        labeled_split: str = "labeled", labeled_warmup: bool = False, reward_model: str | None = None,
        epochs_per_round: int = 1, batch_size: int = 8, max_length: int = 512, cache_dir: str | None = None,
        tokenizer: str = DEFAULT_MODEL,
    ) -> None:
        super().__init__()
        check_at_least("SelfGeneratedDataModule", 1, num_questions=num_questions, batch_size=batch_size,
                       max_length=max_length, generation_batch_size=generation_batch_size,
                       epochs_per_round=epochs_per_round)
        check_at_least("SelfGeneratedDataModule", 0, valid_questions=valid_questions,
                       labeled_questions=labeled_questions)
        self.save_hyperparameters(ignore=["task", "selectors"])
        self.task, self.selectors = task, list(selectors or [])
        self.params = SamplingParams(n, temperature, top_p, max_new_tokens, seed)
        voting = [type(s).__name__ for s in self.selectors if s.needs & VOTE_SIGNALS]
        if voting and n < 2:
            raise ValueError(f"{', '.join(voting)} reads a vote over each question's samples: n must be at least 2, "
                             f"got {n}")
        self.round = -1
        self.reports: list[dict] = []
        self.signals: Signals = {}
        self.train_set: TokenizedDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        self.questions, self.valid, self.labeled = self._load_questions()
        self._check_selectors_have_what_they_need()

    def _check_selectors_have_what_they_need(self) -> None:
        """Before any generation: the labeled data or model a selector's signal needs."""
        needs = set().union(*(s.needs for s in self.selectors))
        if needs & {"ds_weight", "ds_ratio", "sample_loss"} and not self.valid:
            raise ValueError("the DS weight needs a labeled valid set: set valid_questions > 0 (and valid_split)")
        if "labeled_token_entropy" in needs and not self.labeled:
            raise ValueError("EntropyThreshold on the labeled population needs labeled_questions > 0")
        if "reward_model_score" in needs:
            if self.hparams.reward_model is None:
                raise ValueError("RewardModelFilter needs reward_model (a sequence-classification model directory)")
            check_reward_model(self.hparams.reward_model)

    def _load_questions(self) -> tuple[list[Question], list[Question], list[Question]]:
        """The unlabeled questions, IWSI's valid set and SemiEvol's labeled set, disjoint: splits that read the
        same source are carved into consecutive slices (valid, then labeled, then unlabeled; see
        `Task.load_splits`), and a question in two of them is refused."""
        hp = self.hparams
        requests = {"valid": (hp.valid_split, hp.valid_questions), "labeled": (hp.labeled_split, hp.labeled_questions),
                    "unlabeled": (hp.split, hp.num_questions)}
        requests = {use: r for use, r in requests.items() if r[1]}
        loaded = dict(zip(requests, self.task.load_splits(list(requests.values()))))
        return loaded.get("unlabeled", []), loaded.get("valid", []), loaded.get("labeled", [])

    # ------------------------------------------------------------------ data of a round
    def _example(self, question: Question, completion: str, weight: float = 1.0, where: str = "") -> SFTExample:
        prompt = format_prompt(self.tokenizer, self.task.format_question(question))
        return SFTExample(prompt, completion, weight, where)

    def _labeled(self) -> list[SFTExample]:
        return [self._example(q, self.task.format_rationale(q), where=f"labeled:{q.id}") for q in self.labeled]

    def _cheap_signals(self, rows: list[dict]) -> tuple[Signals, list]:
        """The signals every round has: votes (SPEC §1, §3) and token entropy from the stored log-probs (§4)."""
        signals, majority = vote_signals([r["question_id"] for r in rows], [r["answer"] for r in rows], self.task)
        signals["token_entropy"] = token_entropy([r["token_logprobs"] for r in rows])
        return signals, majority

    def _add_signals(self, policy, names: set[str], rows: list[dict], by_id: dict[str, Question], keep, signals):
        """The costly signals in `names` that `signals` lacks, computed for the candidates still in play only
        (NaN elsewhere: a selector never keeps a NaN)."""
        hp, names = self.hparams, names - signals.keys()
        if not names:
            return
        idx = torch.nonzero(keep).flatten().tolist()
        questions = [by_id[rows[i]["question_id"]] for i in idx]
        answers = [rows[i]["completion"] for i in idx]
        texts = [self.task.format_question(q) for q in questions]  # raw question text, no chat template

        def scatter(compute) -> torch.Tensor:
            out = torch.full((len(rows),), float("nan"))
            return out.index_put_((torch.tensor(idx, dtype=torch.long),), compute()) if idx else out

        if names & {"ds_weight", "ds_ratio", "sample_loss"}:
            valid_examples = [self._example(q, self.task.format_rationale(q)) for q in self.valid]
            options = {"tokens": hp.ds_tokens, "first_token_from_pad": hp.ds_first_token_from_pad}
            valid_mean = sample_losses(policy, valid_examples, **options).mean().item()
            examples = [self._example(q, a) for q, a in zip(questions, answers)]
            losses = scatter(lambda: sample_losses(policy, examples, **options))
            signals |= ds_signals(losses, valid_mean, hp.clip_like_reference) | {"sample_loss": losses}
        if "self_rating" in names:
            signals["self_rating"] = scatter(lambda: self_ratings(policy, texts, answers))
        if "reward_model_score" in names:
            signals["reward_model_score"] = scatter(lambda: reward_model_scores(hp.reward_model, texts, answers))
        if "labeled_token_entropy" in names:  # SemiEvol: the same quantity on the labeled responses
            signals["labeled_token_entropy"] = sample_losses(policy, self._labeled(), "completion", reference=False)

    def _generate_and_select(self, policy, run_dir: Path) -> list[SFTExample]:
        hp = self.hparams
        rank, world = dist_info()
        questions = self.questions
        # shared by every version of the experiment: a re-run after an interruption finds what was generated
        # (the key hashes model, adapter, prompts, sampling and questions, so sharing is safe)
        cache = hp.cache_dir or str(run_dir.parent / "candidates")
        engine = HFGenerator(batch_size=hp.generation_batch_size, cache_dir=cache)
        candidates = engine.sample(policy, questions, self.task, self.params)
        mine = {q.id for q in questions[rank::world]}
        rows = [r for r in candidates if r["question_id"] in mine]
        signals, majority = self._cheap_signals(rows)
        by_id = {q.id: q for q in questions}
        keep, weight = torch.ones(len(rows), dtype=torch.bool), torch.ones(len(rows))
        correct = torch.tensor([self.task.same(r["answer"], by_id[r["question_id"]].answer) for r in rows])
        report = {"round": self.round, "questions": len(questions), "candidates": len(candidates),
                  "parsed_fraction": _global_sum(sum(r["answer"] is not None for r in rows)) / len(candidates),
                  "selectors": []}
        report["selectors"].append({"name": "all candidates", **_audit(keep, correct)})
        for selector in self.selectors:
            self._add_signals(policy, selector.needs, rows, by_id, keep, signals)
            keep, weight = selector(signals, keep, weight)
            if not torch.isfinite(weight[keep]).all():
                raise ValueError(f"{type(selector).__name__} gave non-finite weights to "
                                 f"{int((~torch.isfinite(weight[keep])).sum())} kept candidates")
            report["selectors"].append({"name": type(selector).__name__, **_audit(keep, correct)})
        kept = _global_sum(int(keep.sum()))
        report |= {"kept": kept, "kept_fraction": kept / len(candidates)}
        kept_rows = []
        for i in torch.nonzero(keep).flatten().tolist():
            r = rows[i]
            kept_rows.append({
                "question_id": r["question_id"], "prompt": self.task.format_question(by_id[r["question_id"]]),
                "completion": r["completion"], "answer": r["answer"], "majority": majority[i],
                "weight": float(weight[i]), **{k: float(v[i]) for k, v in signals.items() if len(v) == len(rows)},
            })
        position = {q.id: i for i, q in enumerate(questions)}  # back into question order, as one process has them
        kept_rows = sorted((r for part in gather_objects(kept_rows) for r in part),
                           key=lambda r: position[r["question_id"]])
        self.signals, self.reports = signals, self.reports + [report]
        if rank == 0:
            out = run_dir / f"round-{self.round}"
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "selected.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept_rows)
            (out / "report.json").write_text(json.dumps(report, indent=2))
        if rank == 0:
            audit = "; ".join(f"{s['name']} keeps {s['kept']} (precision {s['precision']:.2f}, recall "
                              f"{s['recall']:.2f})" for s in report["selectors"])
            print(f"[round {self.round}] {len(questions)} questions, {len(candidates)} candidates, "
                  f"{report['parsed_fraction']:.0%} parsed; kept {len(kept_rows)} "
                  f"({len(kept_rows) / len(candidates):.0%}). Audit against gold: {audit}")
        return [self._example(by_id[r["question_id"]], r["completion"], r["weight"], f"round-{self.round}")
                for r in kept_rows]

    # ------------------------------------------------------------------ Lightning
    def train_dataloader(self) -> DataLoader:
        trainer, hp = self.trainer, self.hparams
        round_ = trainer.current_epoch // hp.epochs_per_round
        more_rounds = trainer.max_epochs is not None and trainer.max_epochs > hp.epochs_per_round
        if more_rounds and trainer.reload_dataloaders_every_n_epochs != hp.epochs_per_round:
            raise ValueError(f"several rounds need trainer.reload_dataloaders_every_n_epochs={hp.epochs_per_round}")
        if round_ != self.round or self.train_set is None:
            self.round = round_
            run_dir = Path(trainer.log_dir or trainer.default_root_dir)
            warmup = hp.labeled_warmup and round_ == 0
            examples = self._labeled()
            if not warmup:
                examples += self._generate_and_select(trainer.lightning_module.policy, run_dir)
            tokenized = [tokenize_example(self.tokenizer, e, hp.max_length) for e in examples]
            self.train_set = TokenizedDataset(tokenized)
        sampler = LengthBucketSampler([len(e.input_ids) for e in self.train_set.examples], hp.batch_size,
                                      seed=hp.seed + self.round, rank=trainer.global_rank,
                                      world_size=trainer.world_size)
        collate_fn = functools.partial(collate, pad_token_id=self.tokenizer.pad_token_id)
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate_fn)


def _audit(keep: torch.Tensor, correct: torch.Tensor) -> dict:
    """Kept count, precision and recall over every rank's candidates."""
    kept, kept_correct, right = (_global_sum(int(x.sum())) for x in (keep, keep & correct, correct))
    return {"kept": kept, "precision": kept_correct / max(kept, 1), "recall": kept_correct / max(right, 1)}


def _global_sum(count: int) -> int:
    """A count summed over ranks (itself when not distributed); every rank must call it alike."""
    return sum(gather_objects(count))
