"""A task: how a question becomes a prompt, where generation stops, how an answer is read and compared.

The prompt is built in two parts so that generation can share work across questions:
`prefix` (system message + few-shot exemplars, identical for every question of the task) and `suffix`
(the question turn and the start of the answer). Their token ids are concatenated, never re-tokenised
together, so the prefix's KV cache is exactly reusable.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from datamodules.io import DataError, read_rows
from datamodules.tasks.extract import Comparison, extract_math, is_number, parse_gold, same_math
from lightning_modules.batching import encode

log = logging.getLogger(__name__)
MIN_MAJORITY_VOTES = 2  # a lone vote is no majority (SPEC §10)


@dataclass
class Question:
    id: str
    question: str
    answer: str | None = None  # gold, for evaluation (and labeled sets) only
    rationale: str | None = None  # gold chain of thought ending in the answer sentence
    options: list[str] | None = None  # multiple choice, shown as (A) ... (B) ...
    meta: dict = field(default_factory=dict)


@dataclass
class PromptParts:
    prefix_ids: list[int]  # shared by every question of the task
    suffix_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prefix_ids + self.suffix_ids


class Task:
    """Base class: subclasses define `extract`, `same` and where their rows come from (`_load`, `source`).

    Splits and exemplars: the few-shot exemplars are the first `few_shot` rows of `exemplar_split`. Splits that
    read the same source (one file without `{split}`, or `exemplar_split` = the split evaluated) are carved into
    disjoint consecutive slices, exemplars first (`load_splits`), so exemplars never sit among the questions
    evaluated or trained on; the same question text in two different sources is refused.
    Gold answers are normalised at load (`gold_answer`); a gold that cannot be read is an error naming its file
    and line (or, with `on_bad_row: skip`, a counted and logged skip).

    Args:
        few_shot: number of exemplars with gold rationales placed before the question (0 = zero-shot).
        template: `chat` uses the tokenizer's chat template (exemplars as earlier turns) when it has one;
            `plain` uses "Q: ...\\nA: ..." blocks and stops at the next "\\nQ:".
        system_prompt: optional system message (chat) or first line (plain).
        data_path: local jsonl/json/csv/parquet with fields question, answer, rationale, options, id;
            `{split}` in the path is replaced by the split name.
        exemplar_split: the split whose first rows are the few-shot exemplars (default: the task's own,
            `train` for dataset tasks, `exemplars` for procedural ones).
        on_bad_row: a gold answer that cannot be read stops the load naming the file, line and value (`error`),
            or the question is left out, counted (`skipped_gold`) and logged (`skip`).
        unfinished: a completion that hit the token limit has an answer only where it states one (`\\boxed{}`
            or an answer marker; `unparsed`, the default), or is read like a finished one (`read`: a trailing
            "= x" counts too).
        max_prompt_tokens: the longest prompt (exemplars included) in tokens; default the model's context. A longer
            one is refused before any generation naming its file and line, or left out and counted (`skip`).
    """

    name = "task"
    answer_sentence = "The answer is {answer}."
    verbalizers: tuple[str, ...] | None = None  # classification: the label words, in label order
    answer_prefix = "The answer is "  # label level: the answer slot comes right after this
    default_exemplar_split = "train"
    duplicates: Literal["refuse", "skip"] = "refuse"  # a question in two uses: refused (a file's) or replaced

    def __init__(
        self,
        few_shot: int = 2,
        template: Literal["chat", "plain"] = "chat",
        system_prompt: str | None = None,
        data_path: str | None = None,
        exemplar_split: str | None = None,
        on_bad_row: Literal["error", "skip"] = "error",
        unfinished: Literal["unparsed", "read"] = "unparsed",
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.few_shot, self.template, self.system_prompt, self.data_path = few_shot, template, system_prompt, data_path
        self.exemplar_split = exemplar_split or self.default_exemplar_split
        self.on_bad_row, self.unfinished, self.max_prompt_tokens = on_bad_row, unfinished, max_prompt_tokens
        self.skipped_gold = 0  # questions left out for a gold that cannot be read (`on_bad_row: skip`)
        self.skipped_prompts = 0  # and for a prompt over the length limit
        self._exemplar_cache: dict[tuple, list[Question]] = {}

    # ----------------------------------------------------------------- what subclasses define
    def extract(self, completion: str, finished: bool = True) -> str | None:
        """The answer in a completion, normalised; None when there is none. Never raises. An unfinished completion
        (it hit the token limit) is read only from an explicit answer (a box, an answer marker)."""
        raise NotImplementedError

    def answer(self, completion: str, finish_reason: str = "stop") -> str | None:
        """The answer of a sampled completion given why it ended ("eos", "stop" or "length"): with
        `unfinished="unparsed"` one that hit the token limit is read only from an explicit answer."""
        return self.extract(completion, finished=finish_reason != "length" or self.unfinished == "read")

    def same(self, a: str | None, b: str | None) -> bool:
        return a is not None and b is not None and a == b

    def gold_answer(self, raw: str) -> str | None:
        """A gold answer as `extract` would give it; None when it cannot be read (counted at load)."""
        return raw.strip() or None

    def _load(self, split: str, limit: int | None) -> list[Question]:
        """The first `limit` rows of a split's source, in order (no carving, no gold normalisation)."""
        if self.data_path is None:
            raise ValueError(f"task {self.name!r} needs data_path (a local file; `{{split}}` is replaced by the split)")
        return load_questions(self.data_path.replace("{split}", split), limit)

    def source(self, split: str) -> str:
        """What a split reads: two splits with the same source share rows (and are carved apart)."""
        if self.data_path is not None:
            return str(Path(self.data_path.replace("{split}", split)).resolve())
        return f"{self.name}:{split}"

    def answer_clusters(self, answers: Sequence[str | None]) -> tuple[list[int], list[str]]:
        """Each answer's cluster, numbered in first-seen order: an answer joins the first cluster whose first answer
        it equals under `same`; -1 for None. Returns (cluster per answer, each cluster's first answer)."""
        ids: list[int] = []
        representatives: list[str] = []
        for a in answers:
            k = -1 if a is None else next((k for k, r in enumerate(representatives) if self.same(r, a)), None)
            if k is None:
                k = len(representatives)
                representatives.append(a)
            ids.append(k)
        return ids, representatives

    def answer_counts(self, answers: Sequence[str | None]) -> list[tuple[str, int]]:
        """Distinct answers (`answer_clusters`) with their votes, in first-seen order; None gets no vote."""
        ids, representatives = self.answer_clusters(answers)
        return [(r, ids.count(k)) for k, r in enumerate(representatives)]

    def majority(self, answers: Sequence[str | None], min_votes: int = MIN_MAJORITY_VOTES
                 ) -> tuple[str | None, int, int]:
        """(majority answer, its votes, parsed answers). A majority needs `min_votes` votes (two: when every parsed
        answer is different there is none, (None, 1, parsed)). Ties between answers with the most votes go to the
        answer seen first (SPEC §1)."""
        counts = self.answer_counts(answers)
        if not counts:
            return None, 0, 0
        best = max(counts, key=lambda c: c[1])  # max keeps the first of equals
        parsed = sum(n for _, n in counts)
        return (best[0] if best[1] >= min_votes else None), best[1], parsed

    def exemplars(self) -> list[Question]:
        """The first `few_shot` rows of `exemplar_split` (loaded once per setting)."""
        key = (self.exemplar_split, self.few_shot, self.data_path)
        if key not in self._exemplar_cache:
            rows = self._load(self.exemplar_split, self.few_shot) if self.few_shot else []
            self._exemplar_cache[key] = self._normalise_gold(rows, skip=False)
        return self._exemplar_cache[key]

    def load(self, split: str, limit: int | None = None) -> list[Question]:
        """The questions of one split, exemplars carved out (see `load_splits`)."""
        return self.load_splits([(split, limit)])[0]

    def load_splits(self, requests: Sequence[tuple[str, int | None]]) -> list[list[Question]]:
        """Disjoint question sets for (split, limit) requests, in request order after the exemplars.

        Requests that read the same source get consecutive slices of it (the exemplars' rows first). A question
        whose text is already held by another use (the exemplars, an earlier request) from a different source is
        refused with a `DataError` (`duplicates = "refuse"`: someone's data holds it twice), or, for generated
        questions (`duplicates = "skip"`), left out, counted and replaced by the next one. Gold comes normalised.
        """
        owner = {self._text_key(q): "few-shot exemplars" for q in self.exemplars()}
        handed = {self.source(self.exemplar_split): len(self.exemplars())}  # source -> rows already given out
        out = []
        for split, limit in requests:
            source = self.source(split)
            offset = handed.get(source, 0)
            extra = len(owner) if self.duplicates == "skip" else 0
            rows = self._load(split, None if limit is None else offset + limit + extra)[offset:]
            questions, skipped = [], 0
            for q in rows:
                held_by = owner.get(self._text_key(q))
                if held_by is None:
                    questions.append(q)
                elif self.duplicates == "skip":
                    skipped += 1
                else:
                    raise DataError(
                        f"task {self.name!r}: question {q.id!r} of split {split!r} ({source}) is also among the "
                        f"{held_by}: two uses must not share a question. Remove the duplicate from one file, or give "
                        "each use its own split (`{split}` in data_path, exemplar_split, valid_split, "
                        "labeled_split), or set few_shot: 0.")
                if limit is not None and len(questions) == limit:
                    break
            if offset:
                log.info("task %s: split %r reads %s like an earlier use: it gets the rows from %d on",
                         self.name, split, source, offset)
            if skipped:
                log.info("task %s: %d generated questions of split %r equal an earlier use's and were replaced",
                         self.name, skipped, split)
            handed[source] = offset + len(questions) + skipped
            owner |= {self._text_key(q): f"questions of split {split!r}" for q in questions}
            out.append(self._normalise_gold(questions, skip=self.on_bad_row == "skip"))
        return out

    def fit_prompts(self, tokenizer, questions: list[Question], context: int | None) -> list[Question]:
        """The questions whose prompt fits `max_prompt_tokens` (default `context`, the model's). A longer one is a
        `DataError` naming its row and length, before any generation, or with `on_bad_row: skip` it is left out,
        counted (`skipped_prompts`) and logged."""
        limit = self.max_prompt_tokens or context
        if limit is None:
            return questions
        kept, long = [], []
        for q in questions:
            n = len(self.prompt_parts(tokenizer, q).ids)
            if n <= limit:
                kept.append(q)
                continue
            where = q.meta.get("where", f"question {q.id!r}")
            if self.on_bad_row != "skip":
                raise DataError(f"{where}: the prompt of question {q.id!r} is {n} tokens, over the limit of {limit} "
                                f"({'max_prompt_tokens' if self.max_prompt_tokens else 'the model context'}); shorten "
                                "it, or set on_bad_row: skip to leave such questions out")
            long.append(where)
        if long:
            self.skipped_prompts += len(long)
            log.warning("task %s: left out %d of %d questions whose prompt is over %d tokens (first: %s)", self.name,
                        len(long), len(questions), limit, long[0])
        return kept

    def _text_key(self, q: Question) -> str:
        return " ".join(self.format_question(q).split())

    def _normalise_gold(self, questions: list[Question], skip: bool) -> list[Question]:
        """Gold answers as `gold_answer` reads them. One it cannot read is a `DataError` naming the row and the
        value, or with `skip` the question is left out, counted (`skipped_gold`) and logged."""
        kept, bad = [], []
        for q in questions:
            gold = None if q.answer is None else self.gold_answer(q.answer)
            if q.answer is not None and gold is None:
                where = q.meta.get("where", f"question {q.id!r}")
                if not skip:
                    raise DataError(f"{where}: task {self.name!r} cannot read the gold answer {q.answer!r} (question "
                                    f"{q.id!r}); fix the row, or set on_bad_row: skip to leave such questions out")
                bad.append(where)
                continue
            q.answer = gold
            kept.append(q)
        if bad:
            self.skipped_gold += len(bad)
            log.warning("task %s: left out %d of %d questions whose gold answer cannot be read (first: %s)",
                        self.name, len(bad), len(questions), bad[0])
        return kept

    # ----------------------------------------------------------------- shared behaviour
    def format_question(self, q: Question) -> str:
        if not q.options:
            return q.question
        letters = "ABCDEFGHIJ"
        return q.question + "\nAnswer choices: " + " ".join(f"({letters[i]}) {o}" for i, o in enumerate(q.options))

    def format_rationale(self, q: Question) -> str:
        """The gold completion: the rationale, ending with the answer sentence."""
        if q.rationale is None:
            return self.answer_sentence.format(answer=q.answer)
        if self.extract(q.rationale) is not None:
            return q.rationale
        return f"{q.rationale.rstrip()} {self.answer_sentence.format(answer=q.answer)}"

    @property
    def stop(self) -> tuple[str, ...]:
        return ("\nQ:",) if self.template == "plain" else ()

    def prompt_parts(self, tokenizer, q: Question) -> PromptParts:
        shots = self.exemplars()[: self.few_shot]
        shot_texts = [t for ex in shots for t in (self.format_question(ex), self.format_rationale(ex))]
        if self.template == "chat" and tokenizer.chat_template:
            prefix_msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            for ex in shots:
                prefix_msgs += [
                    {"role": "user", "content": self.format_question(ex)},
                    {"role": "assistant", "content": self.format_rationale(ex)},
                ]
            full_msgs = prefix_msgs + [{"role": "user", "content": self.format_question(q)}]
            full = tokenizer.apply_chat_template(full_msgs, add_generation_prompt=True, tokenize=False)
            prefix = tokenizer.apply_chat_template(prefix_msgs, tokenize=False) if prefix_msgs else ""
            if not full.startswith(prefix):  # a template that renders earlier turns differently: no sharing
                prefix = ""
            special = False
        else:
            head = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            blocks = (f"Q: {self.format_question(ex)}\nA: {self.format_rationale(ex)}\n\n" for ex in shots)
            prefix = head + "".join(blocks)
            full = prefix + f"Q: {self.format_question(q)}\nA:"
            special = True
        # the questions and exemplars are text: a special token's string in them stays plain characters
        prefix_ids = encode(tokenizer, prefix, shot_texts, add_special_tokens=special) if prefix else []
        add_bos = special and not prefix
        suffix_ids = encode(tokenizer, full[len(prefix) :], [self.format_question(q)], add_special_tokens=add_bos)
        return PromptParts(prefix_ids, suffix_ids)

    def _answer_start(self, tokenizer) -> str:
        """`answer_prefix` as it continues the prompt: after the plain format's "A:" it follows a space."""
        return self.answer_prefix if self.template == "chat" and tokenizer.chat_template else " " + self.answer_prefix

    def label_prompt_ids(self, tokenizer, q: Question) -> list[int]:
        """The prompt followed by the start of the answer (`answer_prefix`): the next token is the label."""
        answer_start = tokenizer(self._answer_start(tokenizer), add_special_tokens=False)["input_ids"]
        return self.prompt_parts(tokenizer, q).ids + answer_start

    def verbalizer_ids(self, tokenizer) -> list[int]:
        """The token of each verbalizer right after `answer_prefix`; an error unless each is one distinct token."""
        if not self.verbalizers:
            raise ValueError(f"task {self.name!r} has no verbalizers (label-level methods need a classification task)")
        start = self._answer_start(tokenizer)
        base = tokenizer(start, add_special_tokens=False)["input_ids"]
        ids = []
        for word in self.verbalizers:
            full = tokenizer(start + word, add_special_tokens=False)["input_ids"]
            if full[: len(base)] != base or len(full) != len(base) + 1:
                raise ValueError(f"verbalizer {word!r} is not a single token after {self.answer_prefix!r}")
            ids.append(full[-1])
        if len(set(ids)) != len(ids):
            raise ValueError(f"verbalizers {self.verbalizers} share a token")
        return ids

    def label_index(self, q: Question) -> int:
        """The gold label's position in `verbalizers` (evaluation only; surrounding spaces ignored)."""
        return [v.strip() for v in self.verbalizers].index(q.answer.strip())

    def prompt_text(self, tokenizer, q: Question) -> str:
        return tokenizer.decode(self.prompt_parts(tokenizer, q).ids)

    def settings(self) -> dict:
        """Every constructor argument of the task's classes, read back from the attribute of the same name."""
        names = []
        for cls in type(self).__mro__:
            if "__init__" in cls.__dict__ and cls is not object:
                names += [p.name for p in inspect.signature(cls.__dict__["__init__"]).parameters.values()
                          if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        missing = [n for n in dict.fromkeys(names) if not hasattr(self, n)]
        if missing:
            raise TypeError(f"{type(self).__name__} must keep its constructor arguments {missing} as attributes "
                            "of the same name (the generation cache key reads them)")
        return {n: getattr(self, n) for n in dict.fromkeys(names)}

    def fingerprint(self) -> dict:
        """What changes the prompts and answers: the class, every setting, the exemplars' text (cache key)."""
        exemplars = [(e.question, e.options, e.rationale, e.answer) for e in self.exemplars()]
        return {"task": f"{type(self).__module__}.{type(self).__qualname__}", "settings": self.settings(),
                "exemplars": exemplars}


class ProceduralTask(Task):
    """A task that generates its questions: `make(split, n)` is seeded per split, so any split of any size
    exists offline; exemplars come from their own split. A `data_path` still takes precedence."""

    default_exemplar_split = "exemplars"

    @property
    def duplicates(self) -> str:
        """Generated questions may repeat by chance across splits: skipped and replaced; a file's are refused."""
        return "skip" if self.data_path is None else "refuse"

    def make(self, split: str, n: int) -> list[Question]:
        raise NotImplementedError

    def _load(self, split: str, limit: int | None) -> list[Question]:
        if self.data_path is not None:
            return super()._load(split, limit)
        return self.make(split, limit if limit is not None else 100)


class MathAnswers:
    """Answers read and compared with math-verify (`extract.py`): numbers by value, LaTeX symbolically; gold
    normalised the same way. `comparison="truncate"` is the IWSI paper's int(float(x)) comparison.
    `numeric_gold`: a gold answer must read as a number (integer, fraction, decimal), else it counts as
    unparsable (MATH turns it off: its answers are any LaTeX)."""

    comparison: Comparison = "value"
    numeric_gold = True

    def extract(self, completion: str, finished: bool = True) -> str | None:
        return extract_math(completion, finished)

    def same(self, a: str | None, b: str | None) -> bool:
        return same_math(a, b, self.comparison)

    def gold_answer(self, raw: str) -> str | None:
        gold = parse_gold(raw)
        return gold if gold is None or not self.numeric_gold or is_number(gold) else None


def common_question(d: dict, i: int) -> Question:
    """Row `i` in the common schema (question, answer, rationale, options, id) as a `Question`; a `ValueError`
    naming the field that is wrong."""
    if not isinstance(d.get("question"), str) or not d["question"].strip():
        raise ValueError("missing or empty field 'question'")
    options = d.get("options")
    if options is not None and not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
        raise ValueError("'options' must be a list of strings")
    answer = d.get("answer")
    return Question(id=str(d.get("id", i)), question=d["question"], answer=None if answer is None else str(answer),
                    rationale=d.get("rationale"), options=options)


def load_questions(source: str, limit: int | None = None) -> list[Question]:
    """Questions from a file or `datasets` name in the common schema (question, answer, rationale, options, id)."""
    questions = []
    for i, row in enumerate(read_rows(source)):
        try:
            q = common_question(row.data, i)
        except ValueError as e:
            raise DataError(f"{row.where}: {e}") from None
        q.meta["where"] = row.where
        questions.append(q)
        if limit is not None and len(questions) >= limit:
            break
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise DataError(f"{source}: question ids are not unique")
    return questions


def split_rng(seed: int, split: str) -> random.Random:
    """A generator per (seed, split): splits never share a stream, and the same split is the same every run."""
    return random.Random(f"{seed}-{split}")
