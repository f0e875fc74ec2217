"""Policy: scoring against the model's own logits, adaptation modes, the copy-free reference model."""

import pytest
import torch

from lightning_modules.losses.functional import predicting_labels
from lightning_modules.model_store import resolve_model
from lightning_modules.policy import LoraSettings, Policy


def _batch(policy, texts=("Ana has 7 boxes.", "The answer is 84. Yes")):
    enc = policy.tokenizer(list(texts), return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[:, :3] = -100  # a masked "prompt"
    return {**enc, "labels": labels}


def _naive_token_nll(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    out = torch.zeros(batch["labels"].shape)
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if batch["labels"][b, t] != -100:
                out[b, t] = -logits[b, t - 1].log_softmax(-1)[batch["labels"][b, t]]
    return out


@pytest.mark.parametrize("adapt", ["lora", "norm", "all", "none"])
def test_token_nll_matches_naive_reference(tiny_model_dir, adapt):
    policy = Policy(tiny_model_dir, adapt=adapt, nll_chunk_size=3).eval()
    batch = _batch(policy)
    got = policy.token_nll(batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(got, _naive_token_nll(policy.model, batch), atol=1e-5, rtol=1e-5)
    assert torch.all(got[batch["labels"] == -100] == 0)
    seq = policy.sequence_nll(batch)
    mask = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(seq, got[:, 1:].sum(-1) / mask.sum(-1))


def test_predicting_labels_by_hand():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, -100, 7]])
    assert predicting_labels(labels).tolist() == [[True, True, False, False], [False, False, True, False]]


@pytest.mark.parametrize("fused", [True, False])
def test_shared_prefix_gives_the_same_scores_and_gradients(tiny_model_dir, monkeypatch, fused):
    """Rows that continue a shared prefix, run once and its KV cache repeated, score as prefix + row run alone,
    the adapter's gradient included (it acts on the prefix too); both output-head paths."""
    policy = Policy(tiny_model_dir, adapt="lora", nll_chunk_size=3).eval()
    monkeypatch.setattr(Policy, "_fused_head_supported", lambda self: fused)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))  # a non-zero adapter
    prefix = [5, 17, 42, 9, 11]
    rows = torch.tensor([[7, 8, 9, 10, 0], [12, 13, 14, 0, 0]])  # right-padded continuations
    mask = (rows != 0).long()
    labels = torch.where(mask.bool(), rows, -100)
    labels[:, :1] = -100  # the first token plays the prompt
    full = torch.cat([torch.tensor([prefix] * 2), rows], 1)
    full_mask = torch.cat([torch.ones(2, len(prefix), dtype=torch.long), mask], 1)
    full_labels = torch.cat([torch.full((2, len(prefix)), -100), labels], 1)

    def scores(*args):
        policy.zero_grad()
        nll, ent = policy.token_nll(*args, with_entropy=True)
        nll.sum().backward()
        return nll.detach(), ent, [p.grad.clone() for p in policy.trainable_parameters()]

    nll, ent, grads = scores(rows, mask, labels, prefix)
    want_nll, want_ent, want_grads = scores(full, full_mask, full_labels)
    n = len(prefix)
    torch.testing.assert_close(nll, want_nll[:, n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent[:, n:], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    produced = torch.roll(labels != -100, -1, dims=1)  # the positions whose next token is labelled
    with torch.no_grad():
        torch.testing.assert_close(policy.token_entropy(rows, mask, produced, prefix), torch.roll(ent, -1, 1))
        got = policy.token_map(rows, mask, produced, lambda logits: logits.float().max(-1).values, prefix)
        logits = policy.model(input_ids=full, attention_mask=full_mask).logits[:, n:]
        torch.testing.assert_close(got, logits.max(-1).values * produced, atol=1e-5, rtol=1e-5)


def test_trainable_parameters_per_mode(tiny_model_dir):
    lora = Policy(tiny_model_dir, adapt="lora", lora=LoraSettings(r=2, target_modules=["q_proj", "v_proj"]))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in names)
    norm = Policy(tiny_model_dir, adapt="norm", norm_skip_top_blocks=1)
    names = [n for n, p in norm.named_parameters() if p.requires_grad]
    assert names and all("norm" in n for n in names)
    assert not any(".layers.1." in n for n in names) and any(".layers.0." in n for n in names)
    assert not Policy(tiny_model_dir, adapt="none").trainable_parameters()
    full = Policy(tiny_model_dir, adapt="all")
    assert len(full.trainable_parameters()) == len(list(full.parameters()))


@pytest.mark.parametrize("adapt", ["lora", "norm"])
def test_reference_is_the_initial_model_without_a_copy(tiny_model_dir, adapt):
    policy = Policy(tiny_model_dir, adapt=adapt).eval()
    batch = _batch(policy)
    initial = policy.sequence_nll(batch).detach()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))
    adapted = policy.sequence_nll(batch).detach()
    assert not torch.allclose(adapted, initial)
    with policy.reference():
        torch.testing.assert_close(policy.sequence_nll(batch).detach(), initial)
    torch.testing.assert_close(policy.sequence_nll(batch).detach(), adapted)  # adaptation is back


def test_reference_refused_for_full_finetuning(tiny_model_dir):
    with pytest.raises(ValueError, match="no reference"):
        with Policy(tiny_model_dir, adapt="all").reference():
            pass


def test_plain_template_without_chat_template(tiny_plain_model_dir):
    policy = Policy(tiny_plain_model_dir)
    assert policy.format_prompt("What is 2 + 2?") == "Question: What is 2 + 2?\nAnswer: "
    assert policy.format_prompt("Hi", system="Be brief.") == "Be brief.\nQuestion: Hi\nAnswer: "


def test_missing_default_model_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELFREE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make setup"):
        resolve_model("smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="no such model directory or .gguf file"):
        Policy(str(tmp_path / "missing.gguf"))


def test_inference_is_eval_without_gradient_and_restores_the_mode(tiny_model_dir):
    policy = Policy(tiny_model_dir)
    policy.train()
    with policy.inference():
        assert not policy.model.training and not torch.is_grad_enabled()
    assert policy.model.training and torch.is_grad_enabled()
    policy.eval()
    with pytest.raises(RuntimeError), policy.inference():
        raise RuntimeError("a failing pass")
    assert not policy.model.training  # the mode it found, also after an exception
