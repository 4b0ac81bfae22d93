"""The stage skeleton (``stages.skeleton``): a new supervised stage is its loss, its batch builder
and its config; ``run_stage`` does the rest (tokenizer, mesh, fingerprint, setup, loop, resume,
export).  The example: a scalar-head model that learns the word count of a prompt."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.configs import load_config
from rlhf_jax.data import read_prompts, tokenize_prompts
from rlhf_jax.data.agreement import process_batches
from rlhf_jax.generation import score
from rlhf_jax.model import ModelConfig
from rlhf_jax.sharding import MeshConfig, make_mesh
from rlhf_jax.stages.config import StageConfig, StageLoopConfig, StageOptimizerConfig
from rlhf_jax.stages.reward import RMConfig
from rlhf_jax.stages.sft import SFTConfig
from rlhf_jax.stages.skeleton import StageData, StageRun, SupervisedStage, run_stage
from rlhf_jax.stages.sources import ModelSource, load_model
from rlhf_jax.tokenizer import Tokenizer

WORDS = ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree")


# ------------------------------------------------------------------ the whole new stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class LengthConfig(StageConfig):
    """``train_data``: JSONL prompts; the target is each prompt's word count."""

    max_len: int = 12


def length_arrays(cfg: LengthConfig, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """The batch builder's rows: ``tokens``/``mask`` ``[n, max_len]`` and ``target`` ``[n]``."""
    records = read_prompts(cfg.train_data)
    arrays = tokenize_prompts(records, tokenizer, cfg.max_len)
    return {**arrays, "target": np.array([len(r.prompt.split()) for r in records], np.float32)}


class LengthStage(SupervisedStage):
    name, head = "length", "scalar"
    inputs = ("train_data", "tokenizer")

    def loss(self, cfg, model, params, batch):
        err = score(model, params, batch["tokens"], batch["mask"]) - batch["target"]
        return jnp.mean(jnp.square(err)), {"abs_err": jnp.mean(jnp.abs(err))}

    def prepare(self, run: StageRun) -> StageData:
        arrays = length_arrays(run.cfg, run.tokenizer)
        batches = process_batches(arrays, run.cfg.batch_size, run.mesh, seed=run.cfg.seed)
        return StageData(batches, len(batches))


# ---------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("length")
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, rng.integers(1, 8))) for _ in range(64)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    tokenizer = Tokenizer.train(prompts, 300)
    return {"prompts": root / "prompts.jsonl", "tokenizer": tokenizer.save(root / "tokenizer"), "root": root}


def length_config(files: dict[str, Path], workdir: Path, steps: int) -> LengthConfig:
    vocab = Tokenizer.from_file(files["tokenizer"]).vocab_size
    model = ModelConfig(arch="llama", vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, max_len=16)
    return LengthConfig(workdir=str(workdir), model=ModelSource(init=model), train_data=str(files["prompts"]),
                        tokenizer=str(files["tokenizer"]), batch_size=16,
                        optimizer=StageOptimizerConfig(lr=3e-2), loop=StageLoopConfig(total_steps=steps, save_every=4))


def metrics(workdir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def straight(files) -> Path:
    workdir = files["root"] / "straight"
    run_stage(LengthStage(), length_config(files, workdir, 12))
    return workdir


def test_first_step_is_the_loss_of_the_seeded_model_on_the_seeded_batch(files, straight):
    """Step 1's loss = the mean squared error, computed here, of the model drawn from
    ``split(PRNGKey(seed))[0]`` on the first batch of ``process_batches(seed=seed)``."""
    cfg = length_config(files, straight, 12)
    tokenizer = Tokenizer.from_file(files["tokenizer"])
    model, params = load_model(cfg.model, "scalar", jax.random.split(jax.random.PRNGKey(cfg.seed))[0])
    mesh = make_mesh(MeshConfig())  # the config default, as run_stage builds it
    batch = next(iter(process_batches(length_arrays(cfg, tokenizer), cfg.batch_size, mesh, seed=cfg.seed)))
    pred = np.asarray(score(model, params, batch["tokens"], batch["mask"]), np.float64)
    first = metrics(straight)[0]
    np.testing.assert_allclose(first["loss"], np.mean((pred - batch["target"]) ** 2), rtol=1e-5)
    np.testing.assert_allclose(first["abs_err"], np.mean(np.abs(pred - batch["target"])), rtol=1e-5)
    assert set(first) == {"step", "loss", "abs_err", "grad_norm", "lr"}


def test_the_new_stage_learns_and_exports(straight):
    losses = [m["loss"] for m in metrics(straight)]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    record = json.loads((straight / "model" / "rlhf_jax_stage.json").read_text())
    assert record["stage"] == "length" and record["steps"] == 12


def test_resumed_run_equals_the_straight_one_and_a_finished_run_is_reused(files, straight, tmp_path):
    """4 steps, then the same stage lengthened to 12 resumes from the step-4 checkpoint and logs
    the straight run's numbers; a third call finds it complete and trains nothing."""
    run_stage(LengthStage(), length_config(files, tmp_path, 4))
    run_stage(LengthStage(), length_config(files, tmp_path, 12))
    assert metrics(tmp_path) == metrics(straight)
    before = (tmp_path / "metrics.jsonl").read_text()
    assert run_stage(LengthStage(), length_config(files, tmp_path, 12)) == tmp_path / "model"
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_stage_optimizer_defaults_survive_a_partial_table():
    """SFT and RM carry InstructGPT's optimiser defaults in their field defaults (App. C.1/C.2);
    ``--set optimizer.lr=...`` changes the rate only (configs' partial-table merge)."""
    required = ["workdir=w", "model.hf_dir=m", "train_data=t"]
    for cls, lr in ((SFTConfig, 9.65e-6), (RMConfig, 9e-6)):
        extra = ["normalize=none"] if cls is RMConfig else []
        default = load_config(cls, None, required + extra).optimizer
        assert (default.lr, default.schedule, default.final_lr_fraction, default.warmup_steps) == (lr, "cosine", 0.1, 0)
        changed = load_config(cls, None, required + extra + ["optimizer.lr=1e-3"]).optimizer
        assert changed == dataclasses.replace(default, lr=1e-3)
