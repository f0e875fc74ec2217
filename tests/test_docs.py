"""The README and the reference pages: the README stays short, its "Extend" examples run as written, and every
relative link of the README and of docs/ points at a file that exists (and an anchor at a heading of it)."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)}
            if anchor not in headings:
                broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def _extend_examples() -> dict[str, dict]:
    """Each Python block of the README's "Extend" section, run in its own namespace."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Extend") :]
    section = section[: section.index("\n## ", 1)]
    out = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
        name = re.search(r"^class (\w+)", block, flags=re.M).group(1)
        out[name] = namespace
    return out


def test_the_readme_extension_examples_run_as_written(rollout):
    from datamodules.tasks.base import Task
    from lightning_modules.losses import SFTLoss, check_loss
    from lightning_modules.signals import score
    from lightning_modules.tta import TTAMethod

    examples = _extend_examples()
    assert set(examples) == {"FocalNLL", "ShortAnswer", "KeepShortest", "MeanEntropy", "YesNo"}
    policy, candidates = rollout
    # the loss: gamma 0 is the weighted NLL
    focal = examples["FocalNLL"]["FocalNLL"](gamma=0.0)
    check_loss(focal, SFTLoss, "README")
    nll, mask, weight = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.ones(2)
    assert focal(nll, mask, weight).loss.item() == pytest.approx(2.0)
    # the signal: each answer's length
    short = examples["ShortAnswer"]["ShortAnswer"]()
    assert score(short, candidates, policy).tolist() == [float(len(r)) for r in candidates.response_ids]
    # the selector: the `count` x questions shortest
    selector = examples["KeepShortest"]["KeepShortest"](short, count=1)
    values = {"value": torch.tensor([3.0, 1.0, 2.0, 5.0])}
    keep, _ = selector(values, group=torch.tensor([0, 0, 1, 1]))
    assert keep.tolist() == [False, True, True, False]
    # the TTA method: a label-level method
    method = examples["MeanEntropy"]["MeanEntropy"]()
    assert isinstance(method, TTAMethod) and method.levels == ("label",)
    # the task: reads yes/no answers
    task = examples["YesNo"]["YesNo"](few_shot=0)
    assert task.extract("It rains, so the answer is yes.") == "yes" and task.extract("I cannot tell.") is None
    assert isinstance(task, Task)
