"""Policy: scoring against the model's own logits, adaptation modes, the copy-free reference model."""

import pytest
import torch

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
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        Policy(str(tmp_path / "missing.gguf"))
