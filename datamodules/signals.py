"""Label-free signals per candidate (SPEC §1–4), as columns of a `Signals` table for the selectors.

- votes (`vote_signals`): the question's majority answer (SPEC §1: unparsable answers get no vote, answers equal
  under the task's comparison pool their votes, ties go to the first seen), `is_majority`, `vote_share`
  (majority votes / parsed answers), `n_parsed`, and `answer_entropy` = -sum_a p(a) log p(a) / log(n_parsed)
  over the parsed votes, `first_of_question` marking one row per question. A question with fewer than two
  parsed answers has no vote: its `is_majority`, `vote_share` and `answer_entropy` are NaN (uninformative, which
  no selector keeps), never the "unanimous" 1.0 / 0.0 of one answer;
- `token_entropy` (SemiEvol): mean NLL of the response tokens, from the log-probabilities stored at generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from datamodules.selection import Signals

VOTE_SIGNALS = frozenset({"is_majority", "vote_share", "n_parsed", "answer_entropy"})


def vote_signals(question_ids: Sequence[str], answers: Sequence[str | None], task) -> tuple[Signals, list]:
    """Vote columns for candidates listed question by question; also returns each row's majority answer."""
    rows_of: dict[str, list[int]] = {}
    for i, qid in enumerate(question_ids):
        rows_of.setdefault(qid, []).append(i)
    n = len(question_ids)
    is_majority, share, parsed_col, entropy_col, first = (torch.zeros(n) for _ in range(5))
    majority_col: list = [None] * n
    for rows in rows_of.values():
        votes = [answers[i] for i in rows]
        majority, count, parsed = task.majority(votes)
        counts = [c for _, c in task.answer_counts(votes)]
        ent = -sum(c / parsed * math.log(c / parsed) for c in counts) / math.log(parsed) if parsed > 1 else math.nan
        for i in rows:
            agrees = float(answers[i] is not None and task.same(answers[i], majority))
            is_majority[i] = agrees if parsed > 1 else math.nan
            share[i] = count / parsed if parsed > 1 else math.nan
            parsed_col[i], entropy_col[i], majority_col[i] = parsed, ent, majority
        first[rows[0]] = 1.0
    signals = {"is_majority": is_majority, "vote_share": share, "n_parsed": parsed_col,
               "answer_entropy": entropy_col, "first_of_question": first}
    return signals, majority_col


def token_entropy(token_logprobs: Sequence[Sequence[float]]) -> torch.Tensor:
    """Mean NLL of each candidate's response tokens (SemiEvol's response entropy); NaN for an empty response."""
    return torch.tensor([-sum(lp) / len(lp) if len(lp) else math.nan for lp in token_logprobs])
