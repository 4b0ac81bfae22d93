"""Stage 2 (reward model): the K-way step against an explicit loop over pairs, its gradient against
finite differences, normalisation, resume (sharded: test_sharded_stages.py) and learning a ranked preference.

Comparisons for these tests are graded: each response holds one grade word ("one" < "two" < ...
< "nine") among world words, and the response with the higher grade wins, so the K-way ranking
(K = 2..5, ragged) is a simple function of the text.  World helpers come from test_stage_sft.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import rlhf_jax.model_config as model_config_module
import rlhf_jax.data.agreement as agreement
import rlhf_jax.stages.reward as reward_stage
from rlhf_jax.configs import ConfigError
from rlhf_jax.data import BatchIterator, DataError, read_demonstrations
from rlhf_jax.generation import score
from rlhf_jax.hf import load_pretrained
from rlhf_jax.model import ModelConfig, Transformer, init_params
from rlhf_jax.stages.config import StageLoopConfig, StageOptimizerConfig
from rlhf_jax.stages.sources import ModelSource, load_reward_model
from rlhf_jax.stages.reward import (
    RMConfig,
    normalization,
    rm_batch_loss,
    train_rm,
)
from rlhf_jax.tasks import NUMBER_WORDS, WORDS, sample_prompts, write_jsonl
from rlhf_jax.tokenizer import Tokenizer
from test_stage_sft import jsonl, make_world, random_model_dir

GRADES = NUMBER_WORDS[1:10]  # better grade = later in this tuple
BUCKETS = (64,)


def graded_comparisons(rng: np.random.Generator, n: int) -> list[dict]:
    """`n` K-way records (K uniform in 2..5): `{"prompt", "responses", "ranking"}`."""
    records = []
    for prompt in sample_prompts(rng, n):
        grades = rng.choice(len(GRADES), size=int(rng.integers(2, 6)), replace=False)
        responses = []
        for g in grades:
            words = [str(w) for w in rng.choice(WORDS[:24], size=int(rng.integers(2, 5)), replace=False)]
            words.insert(int(rng.integers(len(words) + 1)), GRADES[g])
            responses.append(" " + " ".join(words))
        records.append({"prompt": prompt, "responses": responses, "ranking": np.argsort(-grades).tolist()})
    return records


def make_rm_world(root: Path, n_train: int, n_eval: int, seed: int = 0) -> dict[str, Path]:
    """`make_world` plus comparisons.jsonl, comparisons_eval.jsonl and `rm_base`: a random model
    with a scalar head (so the starting rewards do not depend on a fresh head's key)."""
    rng = np.random.default_rng([seed, 7])
    train, held_out = graded_comparisons(rng, n_train), graded_comparisons(rng, n_eval)
    texts = [r["prompt"] + s for r in train for s in r["responses"]]
    world = make_world(root, n_demos=64, n_eval=32, seed=seed, extra_texts=texts)
    tokenizer = Tokenizer.from_file(world["tokenizer"])
    return {
        **world,
        "comparisons": write_jsonl(root / "comparisons.jsonl", train),
        "comparisons_eval": write_jsonl(root / "comparisons_eval.jsonl", held_out),
        "rm_base": random_model_dir(root / "rm_base", tokenizer, seed=1, head="scalar"),
    }


def rm_config(world: dict[str, Path], workdir: Path, **overrides) -> RMConfig:
    """A tiny RM run: 8 prompts a batch, length 64, Adam 3e-3 with a cosine over 8 steps, 8 steps."""
    fields = dict(
        workdir=str(workdir),
        model=ModelSource(hf_dir=str(world["rm_base"])),
        train_data=str(world["comparisons"]),
        eval_data=str(world["comparisons_eval"]),
        demos=str(world["demos_eval"]),
        batch_size=8,
        buckets=BUCKETS,
        optimizer=StageOptimizerConfig(schedule="cosine", lr=3e-3, total_steps=8),
        loop=StageLoopConfig(total_steps=8, eval_every=4, save_every=4),
    )
    return RMConfig(**{**fields, **overrides})


def encode_rows(tokenizer: Tokenizer, texts: list[str], length: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`[BOS] text [EOS]` right padded to `length`: tokens, mask `[n, length]`."""
    tokens = np.full((len(texts), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
    return tokens, mask


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_rm_world(tmp_path_factory.mktemp("rm_world"), n_train=128, n_eval=24)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory) -> Path:
    """8 RM steps in one go (eval and checkpoint at 4 and 8), demos-mean normalisation."""
    workdir = tmp_path_factory.mktemp("rm_straight")
    train_rm(rm_config(world, workdir))
    return workdir


@pytest.fixture
def float64(monkeypatch):
    """x64 on and a "float64" compute dtype for ModelConfig, both restored afterwards."""
    monkeypatch.setitem(model_config_module._DTYPES, "float64", jnp.float64)
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# ------------------------------------------------------------------------------------- tests


def first_step_reference(world: dict[str, Path], pooling: str = "last",
                         rows: np.ndarray | None = None) -> tuple[float, float, float]:
    """Step 1's loss, accuracy and mean reward: eq. 1 computed by looping over the pairs of each
    prompt (``rows`` of the file; default: the first batch of ``BatchIterator`` with seed 0), on
    scores read at each sequence's EOS (``pooling="last"``) or averaged over its tokens
    (``"mean"``) from a flat [ΣK, L] forward pass."""
    tokenizer = Tokenizer.from_file(world["tokenizer"])
    raw = jsonl(world["comparisons"])
    if rows is None:
        rows = np.random.default_rng([0, 0]).permutation(len(raw))[:8]
    texts, groups = [], []
    for i in rows:
        best_first = [raw[i]["responses"][j] for j in raw[i]["ranking"]]
        groups.append(range(len(texts), len(texts) + len(best_first)))
        texts += [raw[i]["prompt"] + r for r in best_first]
    tokens, mask = encode_rows(tokenizer, texts)
    model, params = load_pretrained(world["rm_base"], head="scalar")
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    values = jax.jit(lambda p: model.apply({"params": p}, tokens, positions, mask).values)(params)
    values = np.asarray(values, np.float64)
    if pooling == "mean":
        r = np.array([np.mean([values[i, t] for t in range(mask.shape[1]) if mask[i, t]]) for i in range(len(texts))])
    else:
        r = values[np.arange(len(texts)), mask.sum(1) - 1]

    losses, correct, pairs = [], 0, 0
    for group in groups:
        terms = [np.log1p(np.exp(-(r[a] - r[b]))) for a, b in itertools.combinations(group, 2)]
        losses.append(np.mean(terms))
        correct += sum(r[a] > r[b] for a, b in itertools.combinations(group, 2))
        pairs += len(terms)
    return float(np.mean(losses)), correct / pairs, float(r.mean())


def check_first_step(workdir: Path, reference: tuple[float, float, float]) -> None:
    first = jsonl(workdir / "metrics.jsonl")[0]
    assert first["step"] == 1
    np.testing.assert_allclose(first["loss"], reference[0], rtol=1e-5)
    np.testing.assert_allclose(first["accuracy"], reference[1], rtol=1e-6)
    np.testing.assert_allclose(first["reward_mean"], reference[2], rtol=1e-4, atol=1e-6)


def test_first_step_loss_matches_loop_over_pairs(world, straight):
    check_first_step(straight, first_step_reference(world))


def test_mean_pooling_trains_exports_and_normalises(world, tmp_path):
    """``score_pooling="mean"``: step 1 matches the loop over pairs on averaged values; the
    exported model carries the pooling, so ``load_reward_model`` + ``score`` average too and the
    demos-mean bias centres the averaged scores."""
    workdir = tmp_path / "mean"
    path = train_rm(rm_config(world, workdir, score_pooling="mean", loop=StageLoopConfig(total_steps=2)))
    reference = first_step_reference(world, "mean")
    check_first_step(workdir, reference)
    assert reference[0] != pytest.approx(first_step_reference(world)[0], rel=1e-3)
    model, params, gain, bias = load_reward_model(path)
    assert model.config.score_pooling == "mean"
    tokenizer = Tokenizer.from_file(world["tokenizer"])
    demos = read_demonstrations(world["demos_eval"])
    tokens, mask = encode_rows(tokenizer, [d.prompt + d.response for d in demos])
    rewards = np.asarray(score(model, params, tokens, mask, gain=gain, bias=bias), np.float64)
    assert abs(rewards.mean()) < 1e-5
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    values = np.asarray(model.apply({"params": params}, tokens, positions, mask).values, np.float64)
    np.testing.assert_allclose(rewards, (values * mask).sum(1) / mask.sum(1) * gain + bias, rtol=1e-4, atol=1e-5)


def test_k_buckets_group_comparisons_by_k(world, tmp_path, monkeypatch):
    """``k_buckets``: step 1 is the first size-grouped batch (``BatchIterator(group_by="valid")``),
    cut to its K bucket, and matches the loop over pairs; the batches' K axis is the bucket."""
    shapes = []
    real_step = reward_stage.rm_step_fn

    def recording(*args, **kwargs):
        step = real_step(*args, **kwargs)
        def wrapped(state, batch):
            shapes.append(batch["tokens"].shape)
            return step(state, batch)
        return wrapped

    monkeypatch.setattr(reward_stage, "rm_step_fn", recording)
    workdir = tmp_path / "grouped"
    train_rm(rm_config(world, workdir, k_buckets=(2, 3, 5), loop=StageLoopConfig(total_steps=2)))
    ks = np.array([len(r["responses"]) for r in jsonl(world["comparisons"])])
    valid = (np.arange(ks.max()) < ks[:, None]).astype(np.int32)
    grouped = BatchIterator({"idx": np.arange(len(ks)), "valid": valid}, 8, seed=0, group_by="valid")
    rows = next(grouped)["idx"]
    assert ks[rows].max() - ks[rows].min() <= 1  # 128 comparisons in one window: K nearly uniform per batch
    check_first_step(workdir, first_step_reference(world, rows=rows))
    assert rows.tolist() != np.random.default_rng([0, 0]).permutation(len(ks))[:8].tolist()
    assert shapes[0][:2] == (8, 2 if ks[rows].max() <= 2 else 3 if ks[rows].max() <= 3 else 5)
    with pytest.raises(ConfigError, match="RMConfig.k_buckets"):
        rm_config(world, tmp_path, k_buckets=(1, 4))


def test_agreed_cut_pads_items_and_time_to_the_widest_process(monkeypatch):
    """Several processes: each cuts its own batch, then pads the K axis and the time axis to the
    widest cut of any process (here another process's 5 responses and 8 tokens)."""
    arrays = {"valid": np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]], np.int32)}
    arrays["mask"] = np.zeros((2, 5, 16), np.int32)
    arrays["mask"][:, :2, :3] = 1
    arrays["tokens"] = np.where(arrays["mask"] != 0, 4, 9)
    other = iter([5, 8])  # the other process's K cut, then its width
    monkeypatch.setattr(agreement, "across_processes", lambda value, reduce=max: reduce(value, next(other)))
    it = agreement._AgreedWidth(BatchIterator(arrays, 2, seed=0, shuffle=False, buckets=(4, 8, 16), group_by="valid",
                                           group_buckets=(2, 5)), {"tokens": 9})
    batch = next(it)
    assert batch["valid"].shape == (2, 5) and batch["mask"].shape == batch["tokens"].shape == (2, 5, 8)
    np.testing.assert_array_equal(batch["valid"], arrays["valid"])
    np.testing.assert_array_equal(batch["mask"], arrays["mask"][:, :, :8])
    np.testing.assert_array_equal(batch["tokens"], arrays["tokens"][:, :, :8])


def test_gradient_matches_finite_differences(float64):
    """d(eq. 1 loss)/d(params) == central differences along the gradient's own direction and along
    random directions inside the score head, a query kernel and the embedding (ragged K: one
    prompt has a padded response).  Parameters and activations are float64, but the model computes
    its scalar head (so the rewards and the loss) and attention logits in float32, whose rounding
    (~1e-7 on the loss) sets eps = 1e-2 and the 0.5% tolerance."""
    model = Transformer(ModelConfig(arch="gpt2", vocab_size=32, d_model=16, n_layers=1, n_heads=2,
                                    max_len=8, head="scalar", dtype="float64"))
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape), shapes)  # NumPy float64
    lengths = np.array([[8, 5, 3], [6, 7, 0]])
    mask = (np.arange(8) < lengths[..., None]).astype(np.int32)
    batch = {"tokens": rng.integers(0, 32, (2, 3, 8)) * mask, "mask": mask, "valid": (lengths > 0).astype(np.int32)}
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p: rm_batch_loss(model, p, batch, 0.1, 0.01)[0]))
    _, grads = jax.device_get(loss_and_grad(params))
    assert all(leaf.dtype == np.float64 for leaf in jax.tree.leaves(grads))

    def dot(a, b) -> float:
        return float(sum(np.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))

    def only(path: tuple[str, ...]):
        return jax.tree_util.tree_map_with_path(
            lambda kp, leaf: rng.normal(size=leaf.shape) if tuple(k.key for k in kp) == path else 0 * leaf, params)

    assert np.isfinite(dot(grads, grads)) and dot(grads, grads) > 1e-6
    directions = [grads, only(("score_head", "kernel")), only(("layer_0", "attn", "q", "kernel")),
                  only(("embed", "embedding"))]
    eps = 1e-2
    for direction in directions:
        d = jax.tree.map(lambda x: x / np.sqrt(dot(direction, direction)), direction)
        plus = loss_and_grad(jax.tree.map(lambda p, s: p + eps * s, params, d))[0]
        minus = loss_and_grad(jax.tree.map(lambda p, s: p - eps * s, params, d))[0]
        want = dot(grads, d)
        np.testing.assert_allclose(float(plus - minus) / (2 * eps), want, rtol=5e-3, atol=1e-5)
        assert abs(want) > 1e-3  # the direction matters


def test_normalization_centres_and_scales_demos(world, straight, tmp_path):
    """The exported gain/bias put the demonstrations' scores at mean 0 (and std 1 with
    "demos_mean_std"), scored here from scratch in one batch."""
    tokenizer = Tokenizer.from_file(world["tokenizer"])
    demos = read_demonstrations(world["demos_eval"])
    tokens, mask = encode_rows(tokenizer, [d.prompt + d.response for d in demos])
    scaled = train_rm(rm_config(world, tmp_path / "std", normalize="demos_mean_std",
                                loop=StageLoopConfig(total_steps=2)))
    for path, want_std in ((straight / "model", None), (scaled, 1.0)):
        model, params, gain, bias = load_reward_model(path)
        rewards = np.asarray(score(model, params, tokens, mask, gain=gain, bias=bias), np.float64)
        assert abs(rewards.mean()) < 1e-5, path
        info = json.loads((path / "reward_normalization.json").read_text())
        assert info["n"] == len(demos) and info["demos"] == str(world["demos_eval"])
        if want_std is None:
            assert gain == 1.0 and info["method"] == "demos_mean"
            assert rewards.std() > 0.01  # a shift only
        else:
            np.testing.assert_allclose(rewards.std(), want_std, rtol=1e-4)
    with pytest.raises(ValueError, match="all score"):
        normalization(np.ones(3), "demos_mean_std")


def test_resume_gives_identical_run(world, straight, tmp_path):
    workdir = tmp_path / "resumed"
    cfg = rm_config(world, workdir)
    train_rm(dataclasses.replace(cfg, loop=StageLoopConfig(total_steps=4, eval_every=4, save_every=4)))
    train_rm(cfg)
    assert jsonl(workdir / "metrics.jsonl") == jsonl(straight / "metrics.jsonl")
    assert [r["step"] for r in jsonl(workdir / "metrics.jsonl") if "eval/accuracy" in r] == [4, 8]
    got, want = load_file(workdir / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    def normalization_of(run: Path) -> dict:
        return json.loads((run / "model" / "reward_normalization.json").read_text())

    assert normalization_of(workdir) == normalization_of(straight)


def test_config_and_data_errors(world, tmp_path):
    with pytest.raises(ConfigError, match="RMConfig.demos must be a demonstrations file"):
        rm_config(world, tmp_path, demos=None)
    with pytest.raises(ConfigError, match="RMConfig.centering_coef"):
        rm_config(world, tmp_path, centering_coef=-1.0)
    with pytest.raises(ConfigError, match="RMConfig.score_pooling must be one of"):
        rm_config(world, tmp_path, score_pooling="sum")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "responses": [" a", " b"], "ranking": [1, 0]}\n'
                   '{"prompt": "p", "responses": [" a", " b"], "ranking": [0, 0]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, field 'ranking'"):
        train_rm(rm_config(world, tmp_path / "a", train_data=str(bad)))
    with pytest.raises(ValueError, match="no 'score.weight'"):
        load_reward_model(world["base"])


@pytest.mark.slow
def test_rm_learns_graded_preferences(tmp_path):
    """From an LM checkpoint (fresh scalar head), one short run reaches >= 90% held-out pairwise
    accuracy over all pairs, and the exported bias centres the demonstrations."""
    world = make_rm_world(tmp_path / "world", n_train=512, n_eval=128, seed=1)
    cfg = rm_config(world, tmp_path / "rm", model=ModelSource(hf_dir=str(world["base"])), batch_size=16,
                    buckets=(32, 64), optimizer=StageOptimizerConfig(schedule="cosine", lr=3e-3, warmup_steps=10),
                    loop=StageLoopConfig(total_steps=80, eval_every=40))
    path = train_rm(cfg)
    evals = [r for r in jsonl(tmp_path / "rm" / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [40, 80]
    assert evals[-1]["eval/accuracy"] >= 0.9, evals
    model, params, gain, bias = load_reward_model(path)
    tokenizer = Tokenizer.from_file(path)
    demos = read_demonstrations(world["demos_eval"])
    tokens, mask = encode_rows(tokenizer, [d.prompt + d.response for d in demos])
    assert abs(float(np.mean(score(model, params, tokens, mask, gain=gain, bias=bias)))) < 1e-4
