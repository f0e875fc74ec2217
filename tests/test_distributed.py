"""Every pipeline's recipe under Lightning's DDP (`--trainer.strategy=ddp --trainer.devices=2`, gloo on CPU), as a
user scales up; self-training's is in test_self_generated.py. Each rank's part of the run is read back from the
checkpoint, which holds every process's state."""

import os
from pathlib import Path

import pytest
import torch
from tiny import run_labelfree

from lightning_modules.cli import build_cli, recipe_args

pytestmark = pytest.mark.slow  # each run starts processes
ROOT = Path(__file__).parents[1]
DDP = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")


def _fit(config: str, tiny_model_dir: str, save_dir: Path, *extra: str) -> dict:
    """Fits in new processes and returns the last checkpoint."""
    run_labelfree("fit", *recipe_args(ROOT / config), f"--model.init_args.policy.init_args.model={tiny_model_dir}",
                  f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.enable_progress_bar=false",
                  *extra, cwd=ROOT)
    return torch.load(max(save_dir.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime), weights_only=True)


def test_sft_trains_and_resumes_under_ddp(tiny_model_dir, tmp_path):
    extra = (*DDP, f"--data.init_args.train_file={ROOT / 'configs' / 'data' / 'arithmetic_sft.jsonl'}",
             "--trainer.limit_val_batches=0", "--trainer.callbacks.every_n_train_steps=1")
    first = _fit("configs/sft.yaml", tiny_model_dir, tmp_path, *extra, "--trainer.max_steps=2")
    assert first["global_step"] == 2 and len(first["labelfree"]["ranks"]) == 2
    resumed = _fit("configs/sft.yaml", tiny_model_dir, tmp_path, *extra, "--trainer.max_steps=4", "--ckpt_path=last")
    assert resumed["global_step"] == 4
    assert resumed["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_done"] == 4  # per rank


def test_a_tta_stream_under_ddp_gives_each_rank_every_other_batch(tiny_model_dir, tmp_path):
    """Without adaptation, the two ranks' outcomes interleaved by batch are one process's; the accuracy logged
    counts both ranks' items."""
    args = ["--data.init_args.tasks=datamodules.tasks.Comparison", "--data.init_args.num_questions=16",
            "--data.init_args.batch_size=4", "--model.init_args.method=lightning_modules.tta.NoAdaptation"]
    one = build_cli(["fit", *recipe_args(ROOT / "configs/tta/tent.yaml"), *args,
                     f"--model.init_args.policy.init_args.model={tiny_model_dir}",
                     f"--trainer.logger.init_args.save_dir={tmp_path / 'one'}", "--trainer.enable_progress_bar=false"])
    two = _fit("configs/tta/tent.yaml", tiny_model_dir, tmp_path / "two", *args, *DDP)
    ranks = [state["outcomes"] for state in two["labelfree"]["ranks"]]
    interleaved = [x for b in range(2) for rank in ranks for x in rank[4 * b : 4 * b + 4]]
    assert len(one.model.outcomes) == 16 and interleaved == one.model.outcomes


def test_online_rl_steps_under_ddp_with_one_sampling_stream_per_rank(tiny_model_dir, tmp_path):
    """Each rank samples its own prompts' groups (a group never straddles ranks) from its own generator; several
    PPO passes per rollout each backpropagate through Lightning's DDP reducer."""
    checkpoint = _fit("configs/rl/ttrl.yaml", tiny_model_dir, tmp_path, *DDP, "--trainer.max_steps=4",
                      "--model.init_args.max_new_tokens=6", "--data.init_args.num_questions=8",
                      "--data.init_args.batch_size=2", "--model.init_args.ppo_epochs=2")
    assert checkpoint["global_step"] == 4  # 2 rollouts x 2 PPO passes (optimizer steps)
    generators = [state["generator"] for state in checkpoint["labelfree"]["ranks"]]
    assert len(generators) == 2 and not torch.equal(*generators)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def _sar_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from lightning.pytorch.overrides.distributed import prepare_for_backward
    from torch.nn.parallel import DistributedDataParallel

    from lightning_modules.losses.functional import entropy
    from lightning_modules.optim.sam import SAM
    from lightning_modules.tta.sar import sar_adapt_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = DistributedDataParallel(torch.nn.Linear(4, 3))
    with torch.no_grad():
        net.module.weight.mul_(20)
        net.module.bias.zero_()
    # rank 0: every input 0, so every entropy is ln 3, above the margin (its reliable set is empty); rank 1: confident
    x = torch.zeros(8, 4) if rank == 0 else torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def backward(loss):  # what Lightning's manual_backward does under DDP
        prepare_for_backward(net, loss)
        loss.backward()

    opt = SAM(net.parameters(), lr=0.1, rho=0.05)
    first, ema = sar_adapt_step(lambda: entropy(net.module(x)), opt, 0.4 * torch.log(torch.tensor(3.0)).item(), None,
                                backward=backward)
    torch.save({"params": [p.detach() for p in net.parameters()], "ema": ema,
                "reliable": int((first < 0.4 * torch.log(torch.tensor(3.0))).sum())}, f"{out}/rank{rank}.pt")
    dist.barrier()
    # leave without tearing down: the gloo group's destructor, run from the DDP reducer's dealloc with the GIL held,
    # joins a worker thread that waits for the GIL to drop a Python object (seen hanging in CI once)
    os._exit(0)


def test_sar_steps_on_every_rank_when_one_ranks_reliable_set_is_empty(tmp_path, spawn_ranks):
    """A rank with no reliable sample backpropagates a zero loss instead of skipping, so the other rank's gradient
    all-reduce completes (it used to wait forever) and both ranks end with the same weights."""
    spawn_ranks(_sar_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["reliable"] == 0 < r1["reliable"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    torch.manual_seed(0)
    initial = torch.nn.Linear(4, 3).weight.detach() * 20
    assert not torch.equal(r0["params"][0], initial)  # the step happened
    assert r0["ema"] is None and r1["ema"] is not None  # each rank's EMA is its own loss's


def test_the_dynamics_probe_under_ddp_is_one_process_probe_of_the_same_weights(tiny_model_dir, tmp_path):
    """`QuestionDynamics` on two ranks (every rank probes the same questions with the same weights and draws; rank 0
    writes): the probes are in the checkpoint and `dynamics.jsonl`, and the last one's rows equal one process's probe
    of the checkpoint's weights."""
    import json

    from callbacks.dynamics import question_rows
    from datamodules.tasks import Arithmetic
    from lightning_modules.evaluation import evaluate
    from lightning_modules.sampling import SamplingParams

    probe = tmp_path / "probe.yaml"
    probe.write_text("""trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 1}
    - class_path: callbacks.dynamics.QuestionDynamics
      init_args: {num_questions: 3, k: 2, temperature: 1.0, max_new_tokens: 4, every_n_steps: 1}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: dynamics/sharpened_agreement, mode: max, every_n_train_steps: 1, save_top_k: 1}
""")
    recipe = ["-c", str(probe), "--model.init_args.max_new_tokens=4", "--data.init_args.num_questions=8",
              "--data.init_args.batch_size=2"]
    checkpoint = _fit("configs/rl/ttrl.yaml", tiny_model_dir, tmp_path, *DDP, *recipe, "--trainer.max_steps=2")
    written = [json.loads(line) for line in next(tmp_path.rglob("dynamics.jsonl")).read_text().splitlines()]
    assert [p["step"] for p in written] == [0, 1, 2]
    state = next(v for k, v in checkpoint["callbacks"].items() if "QuestionDynamics" in k)
    assert json.loads(json.dumps(state["probes"])) == written
    one = build_cli([*recipe_args(ROOT / "configs/rl/ttrl.yaml"), *recipe[2:],
                     f"--model.init_args.policy.init_args.model={tiny_model_dir}",
                     f"--trainer.logger.init_args.save_dir={tmp_path / 'one'}"], run=False)
    one.model.load_state_dict(checkpoint["state_dict"], strict=False)
    task = Arithmetic()
    evaluation = evaluate(one.model.policy, task, task.load("valid", 3), SamplingParams(1, 0.0, 1.0, 4),
                          SamplingParams(2, 1.0, 1.0, 4))
    assert json.loads(json.dumps(question_rows(evaluation, task))) == written[-1]["questions"]
