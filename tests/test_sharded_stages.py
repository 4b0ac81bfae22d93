"""Sharded == unsharded for every stage's step, and parameters stay sharded.

One child process per stage (8 simulated CPU devices; compile time dominates, so the models are
one-layer toys whose dims divide every mesh axis: no rule falls back to replicated).  Each child
runs the SFT step / RM step / PPO-ptx iteration on one device and on the meshes
data×fsdp×tensor = (8,1,1), (1,8,1), (2,2,2), (1,4,2), and compares the metrics and the updated
parameters with the one-device run.  The SFT and PPO children also compile their step on (1,4,2)
and (2,2,2) and check that it keeps the parameters sharded:

* the compiled program's output shardings of the new state are the input's (the
  ``state_shardings`` of the partition rules), leaf by leaf;
* the big kernels really are split: the shards of the returned arrays are
  ``1/(fsdp·tensor)`` of the full kernel;
* the per-device output bytes (``memory_analysis``) are those of the sharded state and the
  metrics, up to buffer alignment (3%; gathering one MLP kernel whole would add ~25%);
* no all-gather in the compiled HLO yields the full shape of an MLP kernel (the largest
  parameters): FSDP gathers a kernel over ``fsdp`` only, keeping its ``tensor`` split.
  (The embedding table *is* gathered whole, for the token lookup: XLA's SPMD partitioner cannot
  split a gather on a vocabulary-sharded table; see docs/scaling.md.)
"""

from __future__ import annotations

import textwrap

import pytest

from _multidevice import run_on_devices

PRELUDE = textwrap.dedent("""
    import re
    import jax, numpy as np
    from rlhf_jax.model import ModelConfig, Transformer, init_params
    from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch, state_shardings
    from rlhf_jax.stages.steps import init_train_state, jit_on_mesh
    from rlhf_jax.train import OptimizerConfig, make_optimizer

    MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
    INSPECT = [(1, 4, 2), (2, 2, 2)]
    rng = np.random.default_rng(0)

    def draw(model, scale=0.1):
        shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
        return jax.tree.map(lambda s: rng.normal(0, scale, s.shape).astype(np.float32), shapes)

    def meshes():
        yield (1, 1, 1), make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
        for shape in MESHES:
            yield shape, make_mesh(MeshConfig(*shape))

    def assert_same(shape, ref, got, rtol, atol):
        (ref_trees, ref_metrics), (trees, metrics) = ref, got
        for k in ref_metrics:
            np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=rtol, atol=1e-6, err_msg=f"{shape} {k}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=atol, err_msg=str(shape)), ref_trees, trees)

    def train_on_every_mesh(step_fn, params, tx, batch, inspect=None):
        '''Two updates of `step_fn` from the same state on one device and on every mesh; each
        mesh's parameters and metrics must equal one device's; on the meshes in INSPECT,
        `inspect(step, old_state, new_state, metrics, mesh)` runs too.  Returns the one-device
        `(params, metrics)`.'''
        ref = None
        for shape, mesh in meshes():
            state = init_train_state(params, tx, jax.random.PRNGKey(1), mesh)
            step = jit_on_mesh(step_fn, mesh, state)
            start, history = state, []
            for _ in range(2):
                state, metrics = step(state, batch)
                history.append({k: float(v) for k, v in metrics.items()})
            result = (jax.device_get(state.params), {f"{k}/{i}": v for i, h in enumerate(history) for k, v in h.items()})
            if ref is None:
                ref = result
                continue
            assert_same(shape, ref, result, rtol=1e-5, atol=1e-6)
            if inspect is not None and shape in INSPECT:
                inspect(step, start, state, metrics, mesh)
        return ref

    def leaf(tree, path):
        return next(x for p, x in jax.tree_util.tree_leaves_with_path(tree)
                    if jax.tree_util.keystr(p, simple=True, separator="/") == path)

    def check_stays_sharded(step, state, new_state, metrics, batch, mesh, split, full_shapes):
        '''The compiled step keeps `state` sharded (see the module docstring); `split`: paths of
        kernels that must be split over fsdp × tensor; `full_shapes`: kernel shapes no all-gather
        may produce.'''
        with jax.set_mesh(mesh):
            compiled = step.jitted.lower(state, shard_batch(batch, mesh)).compile()
        expected = state_shardings(state, mesh)
        leaves = jax.tree_util.tree_leaves_with_path(state)
        for (path, x), want, got in zip(leaves, jax.tree.leaves(expected), jax.tree.leaves(compiled.output_shardings[0])):
            assert got.is_equivalent_to(want, np.ndim(x)), (jax.tree_util.keystr(path), got, want)
        parts = mesh.shape["fsdp"] * mesh.shape["tensor"]
        for path in split:
            full, shard = leaf(new_state, path), leaf(new_state, path).addressable_shards[0].data
            assert shard.size * parts == full.size and shard.ndim == 2 and shard.shape != full.shape, (path, shard.shape)
        local = sum(int(np.prod(s.shard_shape(np.shape(x)))) * np.dtype(x.dtype).itemsize
                    for (_, x), s in zip(leaves, jax.tree.leaves(expected)))
        local += sum(np.asarray(v).nbytes for v in metrics.values())  # metrics come back replicated
        out_bytes = compiled.memory_analysis().output_size_in_bytes
        assert local <= out_bytes <= 1.03 * local, (out_bytes, local)  # + buffer alignment
        gathered = set()
        for result in re.findall(r"= (.*?) all-gather\\(", compiled.as_text()):
            gathered |= {tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\\[([\\d,]*)\\]", result)}
        assert not gathered & set(full_shapes), (sorted(gathered), full_shapes)
        assert gathered, "no all-gather at all: is the state sharded?"
""")


def _run(body: str) -> str:
    return run_on_devices(PRELUDE + textwrap.dedent(body), timeout=600)


def test_sft_step_sharded_equals_single_device():
    """Two SFT updates (GPT-2: learned positions, tied embeddings) on every mesh == one device;
    on (1,4,2) and (2,2,2) the step keeps the parameters and Adam moments sharded."""
    out = _run("""
        from rlhf_jax.stages.sft import sft_step_fn

        model = Transformer(ModelConfig(arch="gpt2", vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_len=16))
        params = draw(model, 0.05)
        mask = (np.arange(16)[None] < rng.integers(4, 17, 8)[:, None]).astype(np.int32)
        batch = {"tokens": np.where(mask, rng.integers(0, 64, (8, 16)), 0).astype(np.int32), "mask": mask,
                 "loss_mask": mask * (np.arange(16)[None] >= 3)}
        opt = OptimizerConfig(lr=1e-3, schedule="cosine", total_steps=4)
        tx = make_optimizer(opt)
        split = ["params/layer_0/attn/q/kernel", "params/layer_0/mlp/fc/kernel", "params/layer_0/mlp/proj/kernel",
                 "opt_state/0/mu/layer_0/mlp/fc/kernel"]
        ref = train_on_every_mesh(sft_step_fn(model, opt), params, tx, batch, inspect=lambda step, old, new, metrics, mesh:
                                  check_stays_sharded(step, old, new, metrics, batch, mesh, split, [(32, 128), (128, 32)]))
        print("ok", ref[1]["loss/0"] != ref[1]["loss/1"])
    """)
    assert out.split() == ["ok", "True"]


def test_rm_step_sharded_equals_single_device():
    """Two K-way RM updates (Llama with GQA, ragged K) on every mesh == one device."""
    out = _run("""
        from rlhf_jax.stages.reward import rm_step_fn

        model = Transformer(ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4,
                                        n_kv_heads=2, d_ff=96, max_len=16, head="scalar"))
        params = draw(model)
        lengths = rng.integers(3, 17, (8, 3)) * (rng.random((8, 3)) < 0.8)
        lengths[:, :2] = np.maximum(lengths[:, :2], 3)
        mask = (np.arange(16) < lengths[..., None]).astype(np.int32)
        batch = {"tokens": (rng.integers(0, 64, (8, 3, 16)) * mask).astype(np.int32), "mask": mask,
                 "valid": (lengths > 0).astype(np.int32)}
        opt = OptimizerConfig(lr=1e-3, schedule="cosine", total_steps=4)
        tx = make_optimizer(opt)
        ref = train_on_every_mesh(rm_step_fn(model, opt, 0.0, 0.0), params, tx, batch)
        print("ok", ref[1]["loss/0"] != ref[1]["loss/1"])
    """)
    assert out.split() == ["ok", "True"]


@pytest.mark.slow  # five compilations of a whole PPO iteration: ~1-3 min of CPU
def test_ppo_iteration_sharded_equals_single_device():
    """One PPO-ptx iteration (sampling, scoring, 2 epochs × 2 minibatches of policy and value
    updates) on every mesh == one device; on (1,4,2) and (2,2,2) it keeps every state sharded."""
    out = _run("""
        from rlhf_jax.generation import GenerateConfig
        from rlhf_jax.ppo import PPOConfig, PPOModels, init_ppo_state
        from rlhf_jax.stages.ppo import ppo_step_fn

        cfg = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=96,
                          max_len=16)
        policy, value = Transformer(cfg), Transformer(cfg.replace(head="scalar"))
        pp, vp, rp = draw(policy), draw(value), draw(value)
        ppo = PPOConfig(generation=GenerateConfig(max_new_tokens=6, eos_id=5, pad_id=0), num_minibatches=2,
                        epochs=2, ptx_coef=0.5)
        tx = make_optimizer(OptimizerConfig(lr=1e-2))
        mask = (np.arange(8)[None] >= 8 - rng.integers(3, 9, 8)[:, None]).astype(np.int32)
        batch = {"prompt_tokens": np.where(mask, rng.integers(6, 64, (8, 8)), 0).astype(np.int32), "prompt_mask": mask,
                 "ptx_tokens": rng.integers(1, 64, (16, 12)).astype(np.int32), "ptx_mask": np.ones((16, 12), np.int32)}
        step_fn = ppo_step_fn(PPOModels(policy, value, value), ppo)
        ref = None
        for shape, mesh in meshes():
            state = init_ppo_state(ppo, pp, vp, rp, tx, tx, jax.random.PRNGKey(1))
            state = jax.device_put(state, state_shardings(state, mesh))
            run = jit_on_mesh(step_fn, mesh, state)
            new_state, metrics = run(state, batch)
            result = (jax.device_get((new_state.policy.params, new_state.value.params)),
                      {k: float(v) for k, v in metrics.items()})
            if ref is None:
                ref = result
                continue
            assert_same(shape, ref, result, rtol=1e-5, atol=1e-6)
            if shape in INSPECT:
                check_stays_sharded(run, state, new_state, metrics, batch, mesh,
                                    ["policy/params/layer_0/attn/q/kernel", "policy/params/layer_0/mlp/gate/kernel",
                                     "value/params/layer_0/mlp/down/kernel", "ref_params/layer_0/mlp/up/kernel",
                                     "policy/opt_state/0/nu/layer_0/mlp/up/kernel"],
                                    [(32, 96), (96, 32)])
        print("ok", ref[1]["response_length"] > 0)
    """)
    assert out.split() == ["ok", "True"]
