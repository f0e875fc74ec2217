"""LabeledDataModule: formats, masking, truncation, bucketing, and every kind of bad input."""

import json

import pytest
import torch

from datamodules.collate import LengthBucketSampler
from datamodules.io import DataError
from datamodules.labeled import LabeledDataModule

GOOD = {"question": "Ana has 7 boxes. Each box holds 12 apples. How many?",
        "rationale": "7 x 12 = 84. The answer is 84."}


def _setup(tiny_model_dir, path, **kwargs):
    dm = LabeledDataModule(path, tokenizer=tiny_model_dir, batch_size=2, **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        (json.dumps({"rationale": "x"}), "missing field 'prompt' or 'question'"),
        (json.dumps({"question": "q"}), "missing field 'response' or 'rationale'"),
        (json.dumps({**GOOD, "weight": -1}), "weight must be finite and >= 0"),
        (json.dumps({**GOOD, "weight": float("nan")}), "weight must be finite"),
        (json.dumps({**GOOD, "weight": "heavy"}), "is not a number"),
        (json.dumps({**GOOD, "rationale": "   "}), "field 'rationale' is empty"),
        (json.dumps({**GOOD, "question": 3}), "must be a string"),
    ],
)
def test_bad_row_errors_name_file_and_line(tiny_model_dir, sft_jsonl, bad_line, message):
    path = sft_jsonl([GOOD, GOOD, bad_line])
    with pytest.raises(DataError, match=message) as err:
        _setup(tiny_model_dir, path)
    assert f"{path}:3" in str(err.value)


def test_skip_mode_counts_and_keeps_good_rows(tiny_model_dir, sft_jsonl, caplog):
    path = sft_jsonl([GOOD, "{oops", json.dumps({"question": "q"}), {**GOOD, "weight": 2.0}])
    dm = _setup(tiny_model_dir, path, on_bad_row="skip")
    assert dm.stats["train_rows"] == 2 and dm.stats["train_skipped_rows"] == 2
    assert "skipped 2 bad rows" in caplog.text
    with pytest.raises(DataError, match="no usable rows"):
        _setup(tiny_model_dir, sft_jsonl(["{oops"], "all_bad.jsonl"), on_bad_row="skip")


def test_missing_file_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _setup(tiny_model_dir, str(tmp_path / "nope.jsonl"))


def test_prompt_masked_response_and_eos_are_targets(tiny_model_dir, sft_jsonl):
    dm = _setup(tiny_model_dir, sft_jsonl([{**GOOD, "weight": 0.5}]), bucket_by_length=False)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    labels = batch["labels"][0]
    targets = labels[labels != -100]
    assert tok.decode(targets) == GOOD["rationale"] + tok.eos_token
    prompt_ids = batch["input_ids"][0][: (labels == -100).sum()]
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n") and GOOD["question"] in tok.decode(prompt_ids)
    assert batch["weight"].tolist() == [0.5]


def test_truncation_is_counted_and_keeps_the_prompt(tiny_model_dir, sft_jsonl, caplog):
    long = {**GOOD, "rationale": " ".join(["The answer is 84."] * 50)}
    dm = _setup(tiny_model_dir, sft_jsonl([GOOD, long]), max_length=48, bucket_by_length=False)
    assert dm.stats["train_truncated"] == 1 and "truncated 1 of 2" in caplog.text
    lengths = [len(e.input_ids) for e in dm.train_set.examples]
    assert max(lengths) == 48
    assert all(e.n_prompt < len(e.input_ids) for e in dm.train_set.examples)  # every sample keeps targets


def test_csv_json_parquet_and_val_fraction(tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "response": f"r{i}", "weight": 1.0} for i in range(10)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,response,weight\n" + "".join(f"q{i},r{i},1\n" for i in range(10)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        dm = _setup(tiny_model_dir, str(tmp_path / name), val_fraction=0.2)
        assert (len(dm.train_set), len(dm.val_set)) == (8, 2)
    (tmp_path / "bad.csv").write_text("prompt,response,weight\nq,r,1\nq,r,-2\n")
    with pytest.raises(DataError, match="bad.csv:3"):
        _setup(tiny_model_dir, str(tmp_path / "bad.csv"))


def test_length_bucket_sampler_covers_everything_once_and_groups_lengths():
    lengths = torch.randint(1, 100, (103,)).tolist()
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=1, pool_batches=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 13
    assert sorted(i for b in batches for i in b) == list(range(103))
    pool_sorted = LengthBucketSampler(lengths, batch_size=8, seed=1, pool_batches=100)
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    assert padding(list(pool_sorted)) < padding([list(range(i, min(i + 8, 103))) for i in range(0, 103, 8)])
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order each epoch, reproducible for (seed, epoch)
    sampler.set_epoch(0)
    assert list(sampler) == batches
    ranks = [list(LengthBucketSampler(lengths, 8, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6 and not set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))
