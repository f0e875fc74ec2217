"""What bad input gets: one test per row of the README's table (the rows tested elsewhere name their test there)."""

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.io import DataError
from datamodules.labeled import LabeledDataModule
from datamodules.selection import AnswerEntropyFilter, EntropyThreshold, MajorityVote, PercentileFilter
from datamodules.self_generated import SelfGeneratedDataModule
from datamodules.tasks import Arithmetic
from lightning_modules.cli import CheckpointError, build_cli
from lightning_modules.guard import NonFiniteTrainingError
from lightning_modules.losses import LossOutput, SFTLoss, WeightedNLL
from lightning_modules.model_store import resolve_model
from lightning_modules.policy import LoraSettings, Policy
from lightning_modules.sampling import SamplingParams
from lightning_modules.sft import WeightedSFTModule

ROOT = Path(__file__).parents[1]
GOOD = {"prompt": "What is 2 + 2?", "response": "4"}


def _setup(tiny_model_dir, path, **kwargs) -> LabeledDataModule:
    dm = LabeledDataModule(path, tokenizer=tiny_model_dir, **kwargs)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------- data files
def test_a_weight_that_overflows_float32_is_refused_with_its_line(tiny_model_dir, sft_jsonl):
    with pytest.raises(DataError, match=r"data.jsonl:2: weight 1e\+39 is infinite in float32"):
        _setup(tiny_model_dir, sft_jsonl([GOOD, {**GOOD, "weight": 1e39}]))


def test_all_zero_weights_train_nothing_and_are_refused(tiny_model_dir, sft_jsonl):
    with pytest.raises(DataError, match="every weight is 0"):
        _setup(tiny_model_dir, sft_jsonl([{**GOOD, "weight": 0}, {**GOOD, "weight": 0.0}]))


def test_undecodable_bytes_name_file_and_line_and_can_be_skipped(tiny_model_dir, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n'
                     + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        _setup(tiny_model_dir, str(path))
    dm = _setup(tiny_model_dir, str(path), on_bad_row="skip")
    assert dm.stats["train_rows"] == 2 and dm.stats["train_skipped_rows"] == 1
    csv = tmp_path / "data.csv"
    csv.write_bytes(b"prompt,response\nq,r\nq\xff,r\n")
    with pytest.raises(DataError, match=r"data.csv:3: not UTF-8"):
        _setup(tiny_model_dir, str(csv))


def test_a_byte_order_mark_and_empty_weight_cells_are_read(tiny_model_dir, tmp_path):
    csv = tmp_path / "bom.csv"
    csv.write_text("\ufeffprompt,response,weight\nq1,r1,\nq2,r2,2\n", encoding="utf-8")
    dm = _setup(tiny_model_dir, str(csv), bucket_by_length=False)
    assert [e.weight for e in dm.train_set.examples] == [1.0, 2.0]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_text("\ufeff" + json.dumps(GOOD) + "\n", encoding="utf-8")
    assert _setup(tiny_model_dir, str(jsonl)).stats["train_rows"] == 1


def test_skipped_rows_reach_tensorboard(tiny_model_dir, sft_jsonl, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False,
                        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path), enable_checkpointing=False)
    trainer.fit(WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False),
                LabeledDataModule(sft_jsonl([GOOD, "{oops", GOOD]), tokenizer=tiny_model_dir, on_bad_row="skip"))
    events = EventAccumulator(trainer.log_dir).Reload()
    assert [e.value for e in events.Scalars("data/train_skipped_rows")] == [1.0]


def test_a_special_token_inside_a_response_is_not_an_early_end(tiny_model_dir):
    from datamodules.collate import SFTExample, tokenize_example
    from lightning_modules.policy import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    example = tokenize_example(tokenizer, SFTExample("q", "a <|im_end|> b", 1.0), 64)
    assert example.input_ids.count(tokenizer.eos_token_id) == 1 and example.input_ids[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("build, message", [
    (lambda: SamplingParams(n=0), "n .* must be at least 1"),
    (lambda: SamplingParams(temperature=-1), "temperature must be finite and >= 0"),
    (lambda: SamplingParams(n=4, temperature=0), "temperature 0 is greedy decoding, so n=4 samples"),
    (lambda: SamplingParams(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (lambda: SamplingParams(top_p=0), "top_p must be in"),
    (lambda: AnswerEntropyFilter(keep=1.5), "keep must be in"),
    (lambda: EntropyThreshold(percentile=120), r"percentile must be in \[0, 100\]"),
    (lambda: PercentileFilter("x", keep=0), "keep must be in"),
    (lambda: LabeledDataModule("x.jsonl", batch_size=0), "batch_size must be at least 1"),
    (lambda: LabeledDataModule("x.jsonl", max_length=0), "max_length must be at least 1"),
    (lambda: LabeledDataModule("x.jsonl", val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
    (lambda: SelfGeneratedDataModule(Arithmetic(), batch_size=0), "batch_size must be at least 1"),
    (lambda: SelfGeneratedDataModule(Arithmetic(), [MajorityVote()], n=1), "MajorityVote reads a vote .* n must be"),
])
def test_settings_that_train_on_nothing_are_refused_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_rl_needs_a_group_to_normalise_within(tiny_model_dir):
    from lightning_modules.rl import SelfRewardRLModule
    from lightning_modules.signals import MajorityAnswer

    with pytest.raises(ValueError, match="group_size must be at least 2"):
        SelfRewardRLModule(Policy(tiny_model_dir), [MajorityAnswer()], group_size=1)


def test_a_question_with_fewer_than_two_parsed_answers_has_no_vote(rollout):
    from dataclasses import replace

    from lightning_modules.signals import AnswerEntropy, MajorityAnswer, VoteShare, score

    policy, r = rollout
    r = replace(r, answers=["84", None, None, None, "5", "5", "6", None])
    share, entropy, majority = (score(s, r, policy) for s in (VoteShare(), AnswerEntropy(), MajorityAnswer()))
    assert share[:4].isnan().all() and entropy[:4].isnan().all() and majority[:4].isnan().all()
    assert share[4].item() == pytest.approx(2 / 3)
    keep, _ = MajorityVote()({"value": majority})
    assert keep.tolist() == [False] * 4 + [True, True, False, False]
    assert score(MajorityAnswer(min_parsed=1), r, policy)[:4].tolist() == [1, 0, 0, 0]  # TTRL's official reading


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", ["smollm2-135m-instruc", "{tmp}/no-such-model", "./no-such-model", "/no/such/model",
                                  "models/smollm2/135m", "{tmp}/x.gguf"])
def test_a_missing_model_or_mistyped_alias_names_the_known_aliases(name, tmp_path, monkeypatch):
    import lightning_modules.model_store as store

    monkeypatch.setattr(store, "_hub_reachable", lambda: pytest.fail("a path-like name was sent to the hub"))
    with pytest.raises(FileNotFoundError, match="known aliases: smollm2-135m-instruct"):
        resolve_model(name.format(tmp=tmp_path))


def test_a_hub_id_passes_online_and_fails_at_once_offline(monkeypatch):
    import time

    import lightning_modules.model_store as store

    monkeypatch.setattr(store, "_hub_reachable", lambda: True)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # for users online
    monkeypatch.undo()  # the real probe, which reads HF_HUB_OFFLINE first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE is set.*--local-dir DIR"):
        resolve_model("no-org/no-such-model")
    assert time.perf_counter() - start < 2


def test_a_model_directory_names_what_it_lacks(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks weight files .*, tokenizer files"):
        resolve_model(str(tmp_path))


# ---------------------------------------------------------------------------------------------- training
class NaNLoss(SFTLoss):
    def forward(self, token_nll, mask, weight):
        return LossOutput((token_nll * mask).sum() * float("nan"), {})


def test_non_finite_updates_are_skipped_then_stop_the_run_and_nothing_non_finite_is_written(
        tiny_model_dir, tmp_path):
    module = WeightedSFTModule(Policy(tiny_model_dir), loss=NaNLoss(), max_nonfinite_steps=3)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    trainer = L.Trainer(max_steps=10, default_root_dir=tmp_path, callbacks=[checkpoint], enable_progress_bar=False,
                        logger=False, limit_val_batches=0)
    with pytest.raises(NonFiniteTrainingError, match="step 2: 3 non-finite gradient values in a row"):
        trainer.fit(module, LabeledDataModule(str(ROOT / "configs/data/arithmetic_sft.jsonl"),
                                              tokenizer=tiny_model_dir, batch_size=2))
    assert module.guard.skipped == 3
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters() if p.requires_grad)  # no update
    for path in (tmp_path / "ckpt").glob("*.ckpt"):  # checkpoints of skipped steps hold the finite weights
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())


def test_an_update_that_makes_weights_non_finite_stops_at_once_and_writes_nothing(tiny_model_dir, tmp_path):
    from lightning_modules.guard import check_finite

    class HugeLoss(SFTLoss):  # finite loss and gradients (about 1e30), an update beyond float32
        def forward(self, token_nll, mask, weight):
            return LossOutput((token_nll * mask).sum() * 1e30, {})

    module = WeightedSFTModule(Policy(tiny_model_dir), loss=HugeLoss(), export_adapter=True,
                               optimizer=lambda p: torch.optim.SGD(p, lr=1e20))
    trainer = L.Trainer(max_steps=5, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                        limit_val_batches=0, enable_checkpointing=False)
    with pytest.raises(NonFiniteTrainingError, match="step 1: the update made .* non-finite"):
        trainer.fit(module, LabeledDataModule(str(ROOT / "configs/data/arithmetic_sft.jsonl"),
                                              tokenizer=tiny_model_dir, batch_size=2))
    assert not list(tmp_path.rglob("adapter"))
    with pytest.raises(NonFiniteTrainingError, match="refusing to write the adapter"):
        module.export_trainable(tmp_path / "adapter")
    with pytest.raises(NonFiniteTrainingError, match="refusing to write a checkpoint"):
        check_finite(module.state_dict().items(), "a checkpoint")


def test_rl_skips_non_finite_updates_and_refuses_non_finite_rewards(tiny_model_dir):
    from datamodules.questions import QuestionDataModule
    from lightning_modules.losses.policy_gradient import PPOClipLoss
    from lightning_modules.rl import SelfRewardRLModule
    from lightning_modules.signals import MajorityAnswer, Signal

    class NaNPPOLoss(PPOClipLoss):
        def forward(self, *args):
            out = super().forward(*args)
            return LossOutput(out.loss * float("nan"), out.metrics)

    def fit(module):
        trainer = L.Trainer(max_steps=4, enable_progress_bar=False, logger=False, enable_checkpointing=False)
        trainer.fit(module, QuestionDataModule(Arithmetic(), num_questions=4, batch_size=2, tokenizer=tiny_model_dir))

    module = SelfRewardRLModule(Policy(tiny_model_dir), [MajorityAnswer()], loss=NaNPPOLoss(), max_new_tokens=4,
                                max_nonfinite_steps=2)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with pytest.raises(NonFiniteTrainingError, match="step 1: 2 non-finite loss values in a row"):
        fit(module)
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters() if p.requires_grad)

    class BrokenReward(Signal):
        def forward(self, candidates, policy):
            return torch.full((len(candidates),), float("nan"))

    with pytest.raises(ValueError, match="signal broken_reward returned 8 non-finite values"):
        fit(SelfRewardRLModule(Policy(tiny_model_dir), [BrokenReward()], max_new_tokens=4))


# ---------------------------------------------------------------------------------------------- checkpoints
def _sft_cli(tiny_model_dir, tmp_path, *extra, subcommand="fit"):
    return build_cli([
        subcommand, "-c", str(ROOT / "configs/sft.yaml"), f"--model.init_args.policy.init_args.model={tiny_model_dir}",
        f"--data.init_args.train_file={ROOT / 'configs/data/arithmetic_sft.jsonl'}", "--trainer.max_steps=2",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        "--trainer.val_check_interval=1", "--model.init_args.export_adapter=false", *extra,
    ])


@pytest.mark.parametrize("content", [b"", b"\x00random bytes\xff" * 10, "truncate"])
def test_a_bad_checkpoint_file_is_named(content, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "bad.ckpt"
    if content == "truncate":
        good = torch.save({"state_dict": {"w": torch.ones(1000)}}, tmp_path / "good.ckpt")
        assert good is None
        path.write_bytes((tmp_path / "good.ckpt").read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"--ckpt_path {path}: not a readable checkpoint"):
        _sft_cli(tiny_model_dir, tmp_path, f"--ckpt_path={path}")


def test_a_resume_refuses_settings_that_differ_from_the_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    _sft_cli(tiny_model_dir, tmp_path)
    last = next(tmp_path.rglob("last.ckpt"))
    other = str(Path(tiny_model_dir).parent / "other")
    from tiny import build_tiny_model

    build_tiny_model(Path(other), seed=1)
    with pytest.raises(CheckpointError, match=r"model.init_args.policy.init_args.model: the checkpoint has .* the "
                                              r"command asks '.*other'"):
        _sft_cli(other, tmp_path, f"--ckpt_path={last}", "--trainer.max_steps=3")
    with pytest.raises(CheckpointError, match="init_args.lr: the checkpoint has 0.0003, the command asks 0.1"):
        _sft_cli(tiny_model_dir, tmp_path, f"--ckpt_path={last}", "--model.init_args.optimizer.init_args.lr=0.1")
    cli = _sft_cli(tiny_model_dir, tmp_path, "--ckpt_path=last", "--trainer.max_steps=3")  # same settings: resumes
    assert cli.trainer.global_step == 3


def test_an_adapter_never_loads_onto_another_base_model(tiny_model_dir, tmp_path):
    from tiny import build_tiny_model

    module = WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    other = WeightedSFTModule(Policy(str(build_tiny_model(tmp_path / "other", seed=1))), export_adapter=False)
    with pytest.raises(ValueError, match="trained on base model .* this run's base model .*other"):
        other.on_load_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)  # its own base model: fine


@pytest.mark.parametrize("lora, says", [
    (LoraSettings(r=4), r"lora is \{'r': 8, .*\} in the checkpoint, \{'r': 4, .*\} here; .* tensors of another shape"),
    (LoraSettings(target_modules=["q_proj", "v_proj"]), r"target_modules.*trained tensors only in the checkpoint"),
])
def test_an_adapter_of_another_shape_is_named_as_such_not_as_another_base_model(tiny_model_dir, lora, says):
    """Other LoRA targets or rank on the same base model: the message names what differs in the adapter (it once
    blamed the base model, or printed raw size-mismatch lines)."""
    module = WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    other = WeightedSFTModule(Policy(tiny_model_dir, lora=lora), export_adapter=False)
    with pytest.raises(ValueError, match="adapter has another shape") as raised:
        other.on_load_checkpoint(checkpoint)
    assert re.search(says, str(raised.value)) and "base model" not in str(raised.value).split("(")[0]


def test_labelfree_test_evaluates_a_trained_adapter(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(ROOT)
    _sft_cli(tiny_model_dir, tmp_path)
    last = next(tmp_path.rglob("last.ckpt"))
    cli = build_cli([
        "test", "-c", "configs/eval/arithmetic.yaml", f"--model.init_args.policy.init_args.model={tiny_model_dir}",
        f"--ckpt_path={last}", "--data.init_args.num_questions=2", "--model.init_args.k=0",
        "--model.init_args.max_new_tokens=4", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ])
    trained = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    state = cli.model.state_dict()
    assert set(trained) == set(state) and all(torch.equal(trained[k], state[k]) for k in trained)
    assert "test/arithmetic-2shot/greedy_accuracy" in cli.trainer.callback_metrics
    assert "policy.init_args.adapt is the checkpoint's 'lora', not 'none'" in caplog.text  # the eval recipe's


def test_ckpt_path_last_finds_a_model_checkpoint_dirpath(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    callbacks = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 f"--trainer.callbacks.dirpath={tmp_path / 'mine'}", "--trainer.callbacks.save_last=true"]
    _sft_cli(tiny_model_dir, tmp_path, "--trainer.callbacks=[]", *callbacks)
    assert (tmp_path / "mine" / "last.ckpt").is_file()
    cli = _sft_cli(tiny_model_dir, tmp_path, "--trainer.callbacks=[]", *callbacks, "--ckpt_path=last",
                   "--trainer.max_steps=3")
    assert cli.trainer.global_step == 3


def test_a_model_directory_that_needs_its_own_code_is_refused_without_a_prompt(tiny_model_dir, tmp_path):
    """config.json with auto_map and a model type transformers does not know: refused at once, its code never run
    (transformers would otherwise ask "Do you wish to run the custom code?" on a terminal)."""
    import json
    import shutil

    from lightning_modules.policy import Policy

    model = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "my_custom_lm", "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                                                           "AutoModelForCausalLM": "modeling_my.MyModel"}}
    (model / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "ran"
    for name in ("configuration_my.py", "modeling_my.py"):
        (model / name).write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match="never runs a model directory's code"):
        Policy(str(model))
    assert not ran.exists()


def test_a_directory_as_data_path_says_so(tmp_path):
    from datamodules.io import DataError, read_rows

    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(DataError, match=r"data.jsonl is a directory; data_path names a file"):
        read_rows(str(tmp_path / "data.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        read_rows(str(tmp_path))


def test_a_prompt_over_the_context_is_refused_before_generation_naming_its_line(tiny_model_dir, tmp_path):
    """One 100k-character question: a DataError with file and line (no allocator failure mid-generation), or left
    out and counted with on_bad_row: skip; max_prompt_tokens sets a lower limit."""
    from datamodules.io import DataError
    from datamodules.questions import QuestionDataModule
    from datamodules.tasks import GSM8K

    rows = ['{"question": "What is 2 + 2?", "answer": "4"}', '{"question": "' + "long " * 20000 + '", "answer": "1"}']
    (tmp_path / "q.jsonl").write_text("\n".join(rows) + "\n")
    data = QuestionDataModule(GSM8K(data_path=str(tmp_path / "q.jsonl"), few_shot=0), tokenizer=tiny_model_dir)
    with pytest.raises(DataError, match=r"q.jsonl:2: the prompt of question '1' is \d+ tokens, over the limit of 512 "
                                        r"\(the model context\)"):
        data.setup("test")
    task = GSM8K(data_path=str(tmp_path / "q.jsonl"), few_shot=0, on_bad_row="skip")
    data = QuestionDataModule(task, tokenizer=tiny_model_dir)
    data.setup("test")
    assert [q.id for q in data.questions] == ["0"] and task.skipped_prompts == 1
    short = GSM8K(data_path=str(tmp_path / "q.jsonl"), few_shot=0, max_prompt_tokens=5)
    with pytest.raises(DataError, match=r"q.jsonl:1: .* over the limit of 5 \(max_prompt_tokens\)"):
        QuestionDataModule(short, tokenizer=tiny_model_dir).setup("test")


def test_a_checkpoint_must_hold_exactly_the_trainable_tensors(tiny_model_dir):
    module = WeightedSFTModule(Policy(tiny_model_dir))
    saved = module.state_dict()
    assert saved and all(module.get_parameter(k).requires_grad for k in saved)  # the frozen base is never saved
    module.load_state_dict(saved)
    first = next(iter(saved))
    with pytest.raises(ValueError, match=r"1 missing from the checkpoint \(e.g. " + re.escape(first)):
        module.load_state_dict({k: v for k, v in saved.items() if k != first})
    with pytest.raises(ValueError, match=r"1 in the checkpoint but not trained here \(e.g. policy.model.extra"):
        module.load_state_dict({**saved, "policy.model.extra": torch.zeros(1)})


def test_a_loss_of_the_wrong_kind_is_refused_when_the_module_is_built(tiny_model_dir):
    from lightning_modules.losses.policy_gradient import PPOClipLoss
    from lightning_modules.rl import SelfRewardRLModule
    from lightning_modules.signals import MajorityAnswer

    with pytest.raises(TypeError, match="WeightedSFTModule's loss must subclass lightning_modules.losses.SFTLoss"):
        WeightedSFTModule(Policy(tiny_model_dir), loss=PPOClipLoss())
    with pytest.raises(TypeError, match="SelfRewardRLModule.s loss must subclass .*PolicyGradientLoss .*WeightedNLL"):
        SelfRewardRLModule(Policy(tiny_model_dir), [MajorityAnswer()], loss=WeightedNLL())
