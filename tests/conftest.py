import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import build_tiny_model  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory) -> str:
    """A tiny model whose tokenizer has no chat template (the plain prompt template applies)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_plain") / "model", chat_template=False))


@pytest.fixture
def sft_jsonl(tmp_path):
    """Write rows as jsonl; returns the path."""
    import json

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return str(path)

    return write
