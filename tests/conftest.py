import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import build_tiny_model, tiny_args  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory) -> str:
    """A tiny model whose tokenizer has no chat template (the plain prompt template applies)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_plain") / "model", chat_template=False))


ROOT = Path(__file__).parents[1]


@pytest.fixture
def tiny_cli(tiny_model_dir, tmp_path, monkeypatch):
    """`tiny_cli(config, *overrides, subcommand=None, run=False)`: the recipe built on the tiny model (from the
    repository root, logs under the test's tmp_path), run when `run` (then `subcommand`, e.g. "fit", comes first)."""
    from lightning_modules.cli import build_cli

    def build(config, *overrides, subcommand: str | None = None, run: bool = False):
        monkeypatch.chdir(ROOT)
        args = tiny_args(config, tiny_model_dir, tmp_path, *overrides)
        return build_cli(([subcommand] if subcommand else []) + args, run=run)

    return build


def _spawn_ranks(worker, *args, n: int = 2) -> None:
    """`worker(rank, n, port, *args)` in `n` processes (torch.multiprocessing), `port` a free local port for their
    gloo process group (`init_method=f"tcp://127.0.0.1:{port}"`); a worker's exception fails the caller."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(n, port, *args), nprocs=n)


@pytest.fixture
def spawn_ranks():
    """Runs a worker in several processes: `spawn_ranks(worker, *args, n=2)` (see `_spawn_ranks`)."""
    return _spawn_ranks


@pytest.fixture
def sft_jsonl(tmp_path):
    """Write rows as jsonl; returns the path."""
    import json

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return str(path)

    return write


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    """The tiny policy and a hand-made `Candidates` batch: two questions of 4 answers each (gold, 3, gold written
    as "= gold", unparsable; 7, 7, 8, gold)."""
    from datamodules.tasks import Arithmetic
    from lightning_modules.candidates import Candidates
    from lightning_modules.policy import Policy

    policy = Policy(tiny_model_dir)
    task = Arithmetic(few_shot=0)
    q = task.load("train", 2)
    tok = policy.tokenizer
    texts = [f"The answer is {q[0].answer}.", "The answer is 3.", f"= {q[0].answer}", "no idea",
             "The answer is 7.", "The answer is 7.", "The answer is 8.", f"The answer is {q[1].answer}."]
    return policy, Candidates(
        questions=q, tasks=[task, task], group=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), texts=texts,
        answers=[task.extract(t) for t in texts],
        prompt_ids=[task.prompt_parts(tok, x).ids for x in q],
        response_ids=[tok(t, add_special_tokens=False)["input_ids"] for t in texts],
    )
