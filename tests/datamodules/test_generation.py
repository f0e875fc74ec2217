"""The generation engine: equivalence with model.generate, log-probs, determinism, caching, resume, DDP gather."""

import math
import os

import pytest
import torch

from datamodules import generation
from datamodules.generation import HFGenerator, sample
from datamodules.tasks import Arithmetic
from lightning_modules import sampling
from lightning_modules.policy import Policy
from lightning_modules.sampling import SamplingParams, top_p_filter


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return Policy(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def task():
    return Arithmetic()


@pytest.mark.parametrize("few_shot, template", [(2, "chat"), (0, "chat"), (1, "plain")])
def test_greedy_is_token_identical_to_model_generate(policy, task, few_shot, template, tiny_model_dir):
    task = Arithmetic(few_shot=few_shot, template=template)
    questions = task.load("test", 7)
    cands = sample(policy, questions, task, n=1, temperature=0, max_new_tokens=10, batch_size=3,
                   progress=False).table_rows()
    assert [c["question_id"] for c in cands] == [q.id for q in questions]
    for q, c in zip(questions, cands):
        ids = torch.tensor([task.prompt_parts(policy.tokenizer, q).ids])
        ref = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=10, pad_token_id=policy.tokenizer.pad_token_id)[0, ids.shape[1]:]
        want = ref.tolist()
        if c["finish_reason"] != "stop":
            assert c["token_ids"] == want[: len(c["token_ids"])] and len(c["token_ids"]) == len(want)
        else:  # cut before the stop string; the text matches generate's up to it
            assert policy.tokenizer.decode(want).startswith(c["completion"])


def test_prefix_is_shared_and_prompt_parts_concatenate(policy, task):
    a, b = task.load("test", 2)
    pa, pb = task.prompt_parts(policy.tokenizer, a), task.prompt_parts(policy.tokenizer, b)
    assert pa.prefix_ids == pb.prefix_ids and len(pa.prefix_ids) > 20
    assert policy.tokenizer.decode(pa.ids).endswith(a.question + "<|im_end|>\n<|im_start|>assistant\n")


def test_logprobs_are_the_models_temperature_one_logprobs(policy, task):
    q = task.load("test", 1)[0]
    c = sample(policy, [q], task, n=2, temperature=1.3, max_new_tokens=8, progress=False).table_rows()[1]
    prompt = task.prompt_parts(policy.tokenizer, q).ids
    ids = torch.tensor([prompt + c["token_ids"]])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    nll = policy.token_nll(ids, torch.ones_like(ids), labels)[0, len(prompt):]
    torch.testing.assert_close(torch.tensor(c["token_logprobs"]), -nll, atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded(policy, task):
    qs = task.load("test", 3)
    kw = dict(n=4, temperature=1.0, max_new_tokens=8, progress=False)
    one, two = sample(policy, qs, task, seed=1, **kw), sample(policy, qs, task, seed=1, **kw)
    other = sample(policy, qs, task, seed=2, **kw)
    assert one.response_ids == two.response_ids and one.response_ids != other.response_ids
    assert len(one) == 12 and [r["sample_index"] for r in one.table_rows()] == [0, 1, 2, 3] * 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).sum() == 1  # the top token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_stop_string_cuts_the_completion(policy):
    task = Arithmetic(template="plain", few_shot=1)
    ids = policy.tokenizer("The answer is 84.\nQ: next", add_special_tokens=False)["input_ids"]
    c = sampling.Completion(tokens=ids, logprobs=[0.0] * len(ids), finish_reason="stop")
    text, trimmed = sampling.finish_text(policy.tokenizer, c, task.stop)
    assert text == "The answer is 84." and len(trimmed.tokens) == len(c.tokens) - 1


def test_cache_resumes_after_an_interruption_without_loss_or_duplication(policy, task, tmp_path, monkeypatch):
    qs = task.load("test", 10)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3)
    straight = HFGenerator(chunk_size=3, progress=False).sample(policy, qs, task, params)

    calls = []
    original = generation.sample_candidates  # the engine samples each chunk with it

    def dies_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "sample_candidates", dies_after_two)
    engine = HFGenerator(chunk_size=3, cache_dir=str(tmp_path), progress=False)
    with pytest.raises(KeyboardInterrupt):
        engine.sample(policy, qs, task, params)
    assert len(list(tmp_path.rglob("chunk-*"))) == 2 and not list(tmp_path.rglob(".tmp-*"))
    calls.clear()
    monkeypatch.setattr(generation, "sample_candidates", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = engine.sample(policy, qs, task, params)
    assert len(calls) == 2  # only the 2 missing chunks of 4
    assert resumed.table_rows() == straight.table_rows()  # 0 lost, 0 duplicated, same samples
    calls.clear()
    engine.sample(policy, qs, task, params)
    assert not calls  # a finished run is reused


def test_cache_key_changes_with_what_changes_the_samples(policy, task):
    qs = task.load("test", 3)
    base = generation.cache_key(policy, task, qs, SamplingParams(), 32)
    assert base == generation.cache_key(policy, task, qs, SamplingParams(), 32)
    assert base != generation.cache_key(policy, task, qs, SamplingParams(temperature=1.0), 32)
    assert base != generation.cache_key(policy, Arithmetic(few_shot=0), qs, SamplingParams(), 32)
    assert base != generation.cache_key(policy, task, qs[:2], SamplingParams(), 32)
    with torch.no_grad():
        lora_b = next(p for n, p in policy.named_parameters() if "lora_B" in n)
        lora_b.add_(0.1)
        changed = generation.cache_key(policy, task, qs, SamplingParams(), 32)
        lora_b.sub_(0.1)
    assert base != changed  # the adapter's weights are part of the key
    assert base != generation.cache_key(policy, Arithmetic(comparison="truncate"), qs, SamplingParams(), 32)


def test_cache_key_holds_the_content_of_questions_files_and_weights(tmp_path, tiny_model_dir):
    from tiny import build_tiny_model

    from datamodules.tasks import GSM8K

    (tmp_path / "a.jsonl").write_text('{"question": "How many apples?"}\n{"question": "How many bags?"}\n')
    (tmp_path / "b.jsonl").write_text('{"question": "How fast is the train?"}\n{"question": "How long?"}\n')
    policy = Policy(tiny_model_dir)
    key = {}
    for name in ("a", "b"):  # the same ids 0, 1 in two files
        task = GSM8K(data_path=str(tmp_path / f"{name}.jsonl"), few_shot=0)
        key[name] = generation.cache_key(policy, task, task.load("train"), SamplingParams(), 32)
    assert key["a"] != key["b"]
    (tmp_path / "b.jsonl").write_text('{"question": "How fast is the train?"}\n{"question": "How long, really?"}\n')
    task = GSM8K(data_path=str(tmp_path / "b.jsonl"), few_shot=0)
    assert generation.cache_key(policy, task, task.load("train"), SamplingParams(), 32) != key["b"]  # edited in place
    # new weights under the same path
    model_dir = tmp_path / "model"
    keys = []
    for seed in (0, 1):
        build_tiny_model(model_dir, seed=seed)
        keys.append(generation.cache_key(Policy(str(model_dir)), task, task.load("train"), SamplingParams(), 32))
    assert keys[0] != keys[1]


def test_a_changed_task_setting_cannot_be_forgotten_by_the_key():
    """Every constructor argument of every task is in its fingerprint (read back by name)."""
    from datamodules import tasks

    for cls in (tasks.Arithmetic, tasks.Comparison, tasks.Sentiment, tasks.GSM8K, tasks.SVAMP, tasks.AQuA,
                tasks.OpenBookQA, tasks.ANLI, tasks.StrategyQA, tasks.MATH):
        settings = cls(few_shot=0).fingerprint()["settings"]
        assert {"few_shot", "template", "system_prompt", "data_path", "exemplar_split"} <= set(settings)
    assert set(Arithmetic().fingerprint()["settings"]) >= {"a_range", "b_range", "seed", "comparison"}
    assert Arithmetic(b_range=(3, 20)).fingerprint() != Arithmetic().fingerprint()


def _ddp_worker(rank, world, port, model_dir, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    policy = Policy(model_dir).eval()
    task = Arithmetic()
    cands = HFGenerator(chunk_size=2, progress=False).sample(policy, task.load("test", 7), task,
                                                            SamplingParams(n=2, temperature=1.0, max_new_tokens=5))
    torch.save(cands.table_rows(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_gather_in_question_order(policy, task, tiny_model_dir, tmp_path, spawn_ranks):
    spawn_ranks(_ddp_worker, tiny_model_dir, str(tmp_path))
    single = HFGenerator(chunk_size=2, progress=False).sample(policy, task.load("test", 7), task,
                                                             SamplingParams(n=2, temperature=1.0, max_new_tokens=5))
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == single.table_rows()


def test_empty_question_list_is_an_error(policy, task):
    with pytest.raises(ValueError, match="no questions"):
        sample(policy, [], task, progress=False)


def test_every_candidate_is_finite(policy, task):
    cands = sample(policy, task.load("test", 2), task, n=3, temperature=1.0, max_new_tokens=6, progress=False)
    assert all(math.isfinite(x) and x <= 0 for lp in cands.logprobs for x in lp)
    assert all(len(ids) == len(lp) for ids, lp in zip(cands.response_ids, cands.logprobs))


def test_sampler_draws_from_the_tempered_top_p_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(40000, 1)
    g = torch.Generator().manual_seed(0)

    def freq(temperature, top_p):
        return torch.bincount(sampling.choose_tokens(logits, temperature, top_p, g), minlength=4) / len(logits)

    torch.testing.assert_close(freq(1.0, 1.0), probs, atol=0.01, rtol=0)
    torch.testing.assert_close(freq(0.5, 1.0), probs**2 / (probs**2).sum(), atol=0.01, rtol=0)
    torch.testing.assert_close(freq(1.0, 0.7), torch.tensor([0.625, 0.375, 0, 0]), atol=0.01, rtol=0)
    assert torch.equal(sampling.choose_tokens(logits[:3], 0.0, 1.0, g), torch.zeros(3, dtype=torch.long))


def _arrow_file(chunk):
    return next(chunk.glob("*.arrow"))


@pytest.mark.parametrize("damage", ["changed", "garbled", "cut short", "hash missing"])
def test_a_damaged_cached_chunk_is_named_moved_aside_and_generated_again(policy, task, tmp_path, caplog, damage):
    """Five bytes of a cached completion changed, 400 bytes garbled, a chunk cut short, its hash gone: never read
    as data, a warning names the chunk, it is moved aside, and the rerun's candidates equal the first run's."""
    qs = task.load("test", 6)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=1)
    engine = HFGenerator(chunk_size=3, cache_dir=str(tmp_path), progress=False)
    first = engine.sample(policy, qs, task, params)
    chunk = next(tmp_path.glob("*/chunk-00001"))
    arrow = _arrow_file(chunk)
    data = bytearray(arrow.read_bytes())
    if damage == "changed":
        text = first.texts[3].encode()
        at = data.find(text[:5]) if len(text) >= 5 else -1
        data[at if at >= 0 else len(data) // 2 : (at if at >= 0 else len(data) // 2) + 5] = b"HACKD"
    elif damage == "garbled":
        data[len(data) // 3 : len(data) // 3 + 400] = b"\x11" * 400
    elif damage == "cut short":
        data = data[: len(data) // 2]
    else:
        (chunk / generation.CHECKSUM).unlink()
    arrow.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        again = engine.sample(policy, qs, task, params)
    assert "chunk-00001 failed its check" in caplog.text and list(tmp_path.glob("*/chunk-00001.bad-*"))
    assert again.texts == first.texts and again.response_ids == first.response_ids
    assert all("HACKD" not in c for c in again.texts)
    caplog.clear()
    with caplog.at_level("WARNING"):
        engine.sample(policy, qs, task, params)  # the regenerated chunk passes its check
    assert "failed its check" not in caplog.text


def test_leftover_temporary_chunks_of_dead_processes_are_cleaned(policy, task, tmp_path):
    import subprocess

    qs = task.load("test", 3)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=4)
    engine = HFGenerator(chunk_size=3, cache_dir=str(tmp_path), progress=False)
    engine.sample(policy, qs, task, params)
    directory = next(tmp_path.iterdir())
    dead = subprocess.Popen(["true"])
    dead.wait()
    (directory / f".tmp-chunk-00007-{dead.pid}").mkdir()
    (directory / f".tmp-chunk-00008-{os.getpid()}").mkdir()  # a live process's: left alone
    engine.sample(policy, qs, task, params)
    assert not (directory / f".tmp-chunk-00007-{dead.pid}").exists()
    assert (directory / f".tmp-chunk-00008-{os.getpid()}").exists()
