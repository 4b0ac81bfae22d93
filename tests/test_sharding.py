"""sharding.py: mesh construction, partition rules, batch placement, and sharded forward ==
single-device forward on 8 simulated CPU devices (run in child processes)."""

import logging
import types

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from _multidevice import run_on_devices
from rlhf_jax.model import ModelConfig, Transformer, fuse_projections, init_params
from rlhf_jax.sharding import (
    AXES,
    MeshConfig,
    batch_sharding,
    make_mesh,
    partition_specs,
    process_data_shard,
    shard_batch,
)

COL, ROW, REP = P("fsdp", "tensor"), P("tensor", "fsdp"), P()


def z(*shape):
    return np.zeros(shape, np.float32)


def hand_tree(arch: str) -> tuple[dict, dict]:
    """A parameter tree shaped like ``Transformer``'s (d=8, ff=16, V=12, one layer, with both the
    untied ``lm_head`` (llama) and the ``score_head``) and the specs Megatron-style sharding gives
    it, written out by hand."""
    if arch == "gpt2":
        layer = {
            "attn_norm": {"scale": z(8), "bias": z(8)},
            "attn": {n: {"kernel": z(8, 8), "bias": z(8)} for n in ("q", "k", "v", "o")},
            "mlp_norm": {"scale": z(8), "bias": z(8)},
            "mlp": {"fc": {"kernel": z(8, 16), "bias": z(16)},
                    "proj": {"kernel": z(16, 8), "bias": z(8)}},
        }
        layer_specs = {
            "attn_norm": {"scale": REP, "bias": REP},
            "attn": {"q": {"kernel": COL, "bias": P("tensor")},
                     "k": {"kernel": COL, "bias": P("tensor")},
                     "v": {"kernel": COL, "bias": P("tensor")},
                     "o": {"kernel": ROW, "bias": REP}},
            "mlp_norm": {"scale": REP, "bias": REP},
            "mlp": {"fc": {"kernel": COL, "bias": P("tensor")},
                    "proj": {"kernel": ROW, "bias": REP}},
        }
        tree = {"embed": {"embedding": z(12, 8)}, "pos_embed": {"embedding": z(16, 8)},
                "layer_0": layer, "final_norm": {"scale": z(8), "bias": z(8)},
                "score_head": {"kernel": z(8, 1), "bias": z(1)}}
        specs = {"embed": {"embedding": P("tensor", "fsdp")},
                 "pos_embed": {"embedding": P(None, "fsdp")},
                 "layer_0": layer_specs, "final_norm": {"scale": REP, "bias": REP},
                 "score_head": {"kernel": REP, "bias": REP}}
        return tree, specs
    layer = {
        "attn_norm": {"scale": z(8)},
        "attn": {"q": {"kernel": z(8, 8)}, "k": {"kernel": z(8, 4)}, "v": {"kernel": z(8, 4)},
                 "o": {"kernel": z(8, 8)}},
        "mlp_norm": {"scale": z(8)},
        "mlp": {"gate": {"kernel": z(8, 16)}, "up": {"kernel": z(8, 16)},
                "down": {"kernel": z(16, 8)}},
    }
    layer_specs = {
        "attn_norm": {"scale": REP},
        "attn": {"q": {"kernel": COL}, "k": {"kernel": COL}, "v": {"kernel": COL},
                 "o": {"kernel": ROW}},
        "mlp_norm": {"scale": REP},
        "mlp": {"gate": {"kernel": COL}, "up": {"kernel": COL}, "down": {"kernel": ROW}},
    }
    tree = {"embed": {"embedding": z(12, 8)}, "layer_0": layer, "final_norm": {"scale": z(8)},
            "lm_head": {"kernel": z(8, 12)}, "score_head": {"kernel": z(8, 1), "bias": z(1)}}
    specs = {"embed": {"embedding": P("tensor", "fsdp")}, "layer_0": layer_specs,
             "final_norm": {"scale": REP}, "lm_head": {"kernel": COL},
             "score_head": {"kernel": REP, "bias": REP}}
    return tree, specs


def assert_specs_equal(got, expected):
    assert jax.tree.structure(got, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        expected, is_leaf=lambda x: isinstance(x, P))
    flat_got = jax.tree_util.tree_leaves_with_path(got, is_leaf=lambda x: isinstance(x, P))
    for (path, g), e in zip(flat_got, jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, P))):
        assert g == e, f"{jax.tree_util.keystr(path)}: got {g}, expected {e}"


# --- MeshConfig / make_mesh -----------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"data": 0}, "data"), ({"fsdp": -2}, "fsdp"), ({"tensor": 1.5}, "tensor"),
    ({"data": True}, "data"), ({"data": -1, "fsdp": -1}, "at most one axis"),
])
def test_mesh_config_rejects_bad_sizes(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MeshConfig(**kwargs)


def test_mesh_config_resolves_minus_one():
    assert MeshConfig().shape(8) == (1, 8, 1)
    assert MeshConfig(data=2, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=2, fsdp=1, tensor=-1).shape(8) == (2, 1, 4)
    assert MeshConfig(data=1, fsdp=4, tensor=2).shape(8) == (1, 4, 2)


def test_mesh_config_shape_mismatch_errors():
    with pytest.raises(ValueError, match=r"2×2×1 = 4 does not match the 8 devices"):
        MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ValueError, match=r"data=3.*do not divide the 8 devices"):
        MeshConfig(data=3).shape(8)


def test_make_mesh_single_device():
    mesh = make_mesh(MeshConfig())
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match=r"1×1×2 = 2 does not match the 1 devices"):
        make_mesh(MeshConfig(fsdp=1, tensor=2))


# --- partition rules --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hand_tree_has_the_model_tree_structure(arch):
    """The hand-made trees below follow the real parameter tree (so the rules cover it)."""
    kw = {"tie_embeddings": False} if arch == "llama" else {}
    tree, _ = hand_tree(arch)
    for head, drop in (("lm", "score_head"), ("scalar", "lm_head")):
        cfg = ModelConfig(arch=arch, vocab_size=12, d_model=8, n_layers=1, n_heads=2,
                          n_kv_heads=1 if arch == "llama" else None, d_ff=16, max_len=16,
                          head=head, **kw)
        real = jax.eval_shape(lambda: init_params(Transformer(cfg), jax.random.key(0)))
        expected = {k: v for k, v in tree.items() if k != drop}
        assert jax.tree.structure(real) == jax.tree.structure(expected)
        assert [x.shape for x in jax.tree.leaves(real)] == [x.shape for x in
                                                            jax.tree.leaves(expected)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_default_rules_give_megatron_specs(arch):
    tree, expected = hand_tree(arch)
    assert_specs_equal(partition_specs(tree), expected)
    # A mesh whose axes divide every dimension changes nothing.
    mesh = AbstractMesh((2, 2, 2), AXES)
    assert_specs_equal(partition_specs(tree, mesh=mesh), expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_default_rules_split_the_fused_decode_kernels_by_head(arch):
    """``fuse_projections``' kernels: ``qkv`` [d, kv_heads, ·] on its key/value heads, its bias on
    the heads, ``gate_up`` [d, 2, d_ff] on ``d_ff``; the other leaves keep their specs."""
    tree, expected = hand_tree(arch)
    cfg = ModelConfig(arch=arch, vocab_size=12, d_model=8, n_layers=1, n_heads=2,
                      n_kv_heads=1 if arch == "llama" else None, d_ff=16, max_len=16)
    fused = fuse_projections(tree, cfg)
    layer = dict(expected["layer_0"])
    attn = {"o": layer["attn"]["o"], "qkv": {"kernel": COL, "bias": P("tensor")}}
    if arch == "gpt2":
        assert fused["layer_0"]["attn"]["qkv"]["kernel"].shape == (8, 2, 12)
    else:
        del attn["qkv"]["bias"]
        layer["mlp"] = {"gate_up": {"kernel": P("fsdp", None, "tensor")}, "down": {"kernel": ROW}}
    assert_specs_equal(partition_specs(fused), {**expected, "layer_0": {**layer, "attn": attn}})


def test_optax_state_mirrors_param_specs():
    tree, expected = hand_tree("llama")
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = opt.init(tree)
    specs = partition_specs(state)
    adam = specs[1][0]
    assert adam.count == REP
    assert_specs_equal(adam.mu, expected)
    assert_specs_equal(adam.nu, expected)


def test_non_divisible_dims_fall_back_to_replicated(caplog):
    mesh = AbstractMesh((1, 4, 2), AXES)
    tree = {
        "a": {"attn": {"q": {"kernel": z(6, 8)}}},  # 6 % fsdp=4 != 0
        "b": {"mlp": {"fc": {"kernel": z(8, 6), "bias": z(3)}}},  # 3 % tensor=2 != 0
        "embed": {"embedding": z(7, 5)},  # neither dim divides
    }
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.sharding"):
        specs = partition_specs(tree, mesh=mesh)
    assert specs["a"]["attn"]["q"]["kernel"] == P(None, "tensor")
    assert specs["b"]["mlp"]["fc"]["kernel"] == P("fsdp", "tensor")
    assert specs["b"]["mlp"]["fc"]["bias"] == P(None)
    assert specs["embed"]["embedding"] == P(None, None)
    logged = caplog.text
    assert "a/attn/q/kernel" in logged and "b/mlp/fc/bias" in logged
    assert "embed/embedding" in logged and "b/mlp/fc/kernel" not in logged


def test_rank_below_rule_is_replicated_and_scalars_always():
    rules = [(r"kernel$", P("fsdp", "tensor"))]
    specs = partition_specs({"w": {"kernel": z(4)}, "count": np.int32(0)}, rules)
    assert specs == {"w": {"kernel": REP}, "count": REP}


def test_unmatched_leaf_and_unknown_axis_raise():
    rules = [(r"attn/q/kernel$", P("fsdp", None))]
    with pytest.raises(ValueError, match=r"no partition rule matches 'b/kernel'"):
        partition_specs({"attn": {"q": {"kernel": z(4, 4)}}, "b": {"kernel": z(4, 4)}}, rules)
    with pytest.raises(ValueError, match=r"attn/q/kernel names mesh axes \['model'\]"):
        partition_specs({"attn": {"q": {"kernel": z(4, 4)}}}, [(r".*", P("model"))],
                        mesh=AbstractMesh((1, 1, 1), AXES))


def test_batch_sharding_and_batch_errors_single_device():
    mesh = make_mesh(MeshConfig())
    assert batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    with pytest.raises(ValueError, match="ndim"):
        batch_sharding(mesh, 0)
    with pytest.raises(ValueError, match=r"batch: step is a scalar"):
        shard_batch({"tokens": np.zeros((2, 3), np.int32), "step": np.int32(0)}, mesh)


# --- 8 simulated devices ---------------------------------------------------------------------


def test_sharded_forward_matches_single_device():
    """Tiny GPT-2 (tied) and Llama (GQA, untied lm_head), left-padded batch of 8: jitted forward
    with sharded params and batch == unsharded forward, on four mesh shapes; params really split."""
    out = run_on_devices("""
        import jax, numpy as np
        from jax.sharding import PartitionSpec as P
        from rlhf_jax.model import ModelConfig, Transformer, forward, init_params
        from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch, shard_params

        assert jax.device_count() == 8
        rng = np.random.default_rng(0)
        B, T, V = 8, 12, 128
        lengths = rng.integers(1, T + 1, B)
        mask = (np.arange(T)[None] >= T - lengths[:, None]).astype(np.int32)  # left padding
        tokens = np.where(mask, rng.integers(0, V, (B, T)), 0).astype(np.int32)
        configs = {
            "gpt2": ModelConfig(arch="gpt2", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                                max_len=32),
            "llama": ModelConfig(arch="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                                 n_kv_heads=2, tie_embeddings=False, max_len=32),
        }
        # Fraction of a [d, out] column-parallel kernel each device holds: 1 / (fsdp * tensor).
        meshes = {(8, 1, 1): 1, (1, 8, 1): 8, (2, 2, 2): 4, (1, 4, 2): 8}
        for arch, cfg in configs.items():
            model = Transformer(cfg)
            # Host (NumPy) parameters, as a checkpoint import gives them; random values in the
            # real tree's shapes (jitting the Flax initialiser costs ~10 s here).
            shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
            params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
            logits = lambda p, t, m: forward(model, p, t, m).logits
            ref = np.asarray(jax.jit(logits)(params, tokens, mask))
            big = "fc" if arch == "gpt2" else "up"
            for shape, split in meshes.items():
                mesh = make_mesh(MeshConfig(*shape))
                sp = shard_params(params, mesh)
                batch = shard_batch({"tokens": tokens, "mask": mask}, mesh)
                got = jax.jit(logits)(sp, batch["tokens"], batch["mask"])
                np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5,
                                           err_msg=f"{arch} mesh {shape}")
                kernel = sp["layer_0"]["mlp"][big]["kernel"]
                assert kernel.sharding.spec == P("fsdp", "tensor"), kernel.sharding
                assert sp["layer_1"]["attn"]["o"]["kernel"].sharding.spec == P("tensor", "fsdp")
                assert sp["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
                assert sp["final_norm"]["scale"].sharding.spec == P()
                shards = kernel.addressable_shards
                assert len(shards) == 8
                assert all(s.data.nbytes * split == kernel.nbytes for s in shards), (arch, shape)
                assert batch["tokens"].addressable_shards[0].data.shape == (B // (shape[0] * shape[1]), T)
            print(arch, "ok")
    """, timeout=180)
    assert out.split() == ["gpt2", "ok", "llama", "ok"]


def test_batches_states_and_errors_on_eight_devices():
    out = run_on_devices("""
        import jax, numpy as np, optax
        from jax.sharding import PartitionSpec as P
        from rlhf_jax.sharding import (MeshConfig, global_batch_from_local, make_mesh,
                                       shard_batch, shard_params, state_shardings)

        def raises(fn, text):
            try:
                fn()
            except ValueError as e:
                assert text in str(e), str(e)
            else:
                raise AssertionError(f"no ValueError containing {text!r}")

        raises(lambda: make_mesh(MeshConfig(data=3)), "do not divide the 8 devices")
        raises(lambda: make_mesh(MeshConfig(data=2, fsdp=2, tensor=1)),
               "2×2×1 = 4 does not match the 8 devices")
        raises(lambda: make_mesh(MeshConfig(data=2), devices=jax.devices()[:3]),
               "do not divide the 3 devices")
        small = make_mesh(MeshConfig(fsdp=2, tensor=2), devices=jax.devices()[:4])
        assert dict(small.shape) == {"data": 1, "fsdp": 2, "tensor": 2}

        mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        batch = {"tokens": np.arange(24, dtype=np.int32).reshape(6, 4)}
        raises(lambda: shard_batch(batch, mesh),
               "tokens has batch size 6, not divisible by the 4 batch shards (mesh data×fsdp = 2×2)")
        raises(lambda: global_batch_from_local(batch, mesh), "not divisible by the 4 batch shards")

        batch = {"tokens": np.arange(32, dtype=np.int32).reshape(8, 4),
                 "reward": np.linspace(0, 1, 8, dtype=np.float32)}
        placed = shard_batch(batch, mesh)
        assembled = global_batch_from_local(batch, mesh)
        for key in batch:
            for arr in (placed[key], assembled[key]):
                assert arr.shape == batch[key].shape
                assert arr.sharding.spec == P(("data", "fsdp"), *[None] * (batch[key].ndim - 1))
                np.testing.assert_array_equal(np.asarray(arr), batch[key])
                # device (d, f, t) holds rows [2 * (2d + f), 2 * (2d + f) + 2)
                for shard in arr.addressable_shards:
                    d, f, _ = [int(i) for i in np.argwhere(mesh.devices == shard.device)[0]]
                    row = 2 * (2 * d + f)
                    np.testing.assert_array_equal(np.asarray(shard.data), batch[key][row:row + 2])

        # An optax state placed like its params; a non-divisible dim is replicated, not an error.
        params = {"layer_0": {"mlp": {"fc": {"kernel": np.ones((8, 6), np.float32),
                                             "bias": np.ones((3,), np.float32)}}}}
        state = optax.adam(1e-3).init(params)
        placed = shard_params({"params": params, "opt_state": state}, mesh)
        mu = placed["opt_state"][0].mu["layer_0"]["mlp"]["fc"]
        assert placed["opt_state"][0].count.sharding.spec == P()
        assert mu["kernel"].sharding.spec == P("fsdp", "tensor")
        assert mu["bias"].sharding.spec == P(None)
        assert placed["params"]["layer_0"]["mlp"]["fc"]["kernel"].addressable_shards[0].data.shape == (4, 3)
        shardings = state_shardings(state, mesh)
        assert shardings[0].nu["layer_0"]["mlp"]["fc"]["kernel"].spec == P("fsdp", "tensor")
        print("ok")
    """)
    assert out.strip() == "ok"


def test_shard_params_keeps_one_host_buffer_per_distinct_shard():
    """On host CPU devices a replicated leaf is one buffer all devices read, a split leaf one
    buffer per distinct shard; values, donation and a train step are as with ``jax.device_put``."""
    out = run_on_devices("""
        import jax, jax.numpy as jnp, numpy as np
        from rlhf_jax.sharding import MeshConfig, make_mesh, shard_params, state_shardings

        def pointers(x):
            return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}

        rng = np.random.default_rng(0)
        params = {"layer_0": {"mlp": {"fc": {"kernel": rng.normal(size=(8, 6)).astype(np.float32),
                                             "bias": rng.normal(size=(6,)).astype(np.float32)}},
                              "ln_1": {"scale": rng.normal(size=(8,)).astype(jnp.bfloat16)}},
                  "step": np.int32(3), "key": jax.random.key(0), "lr": 0.5, "f64": np.ones(2)}
        mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        placed = shard_params(params, mesh)
        kernel, bias = placed["layer_0"]["mlp"]["fc"]["kernel"], placed["layer_0"]["mlp"]["fc"]["bias"]
        # fc/kernel is split 2 × 2 over fsdp × tensor and replicated over data: 4 buffers for 8
        # devices; its bias is split over tensor: 2; the rest is replicated: 1.
        assert len(kernel.addressable_shards) == 8 and len(pointers(kernel)) == 4
        assert len(pointers(bias)) == 2
        assert len(pointers(placed["layer_0"]["ln_1"]["scale"])) == 1
        assert len(pointers(placed["step"])) == 1
        copied = jax.device_put(params, state_shardings(params, mesh))
        assert len(pointers(copied["layer_0"]["mlp"]["fc"]["kernel"])) == 8
        for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(copied)):
            assert got.sharding == want.sharding
            assert got.dtype == want.dtype
            assert getattr(got, "weak_type", None) == getattr(want, "weak_type", None)
            if not jax.dtypes.issubdtype(got.dtype, jax.dtypes.extended):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
                for shard in got.addressable_shards:  # each device's shard is its slice
                    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index])

        # Donated to a step twice, the shared buffers give what the copies give, and a second
        # placement of the same tree does not see the first one's writes.
        def step(tree):
            w = tree["layer_0"]["mlp"]["fc"]
            grad = jnp.tanh(w["kernel"] @ w["kernel"].T) @ w["kernel"]
            return {**tree, "layer_0": {**tree["layer_0"], "mlp": {"fc": {
                "kernel": w["kernel"] - 0.1 * grad, "bias": w["bias"] * 0.5}}},
                "step": tree["step"] + 1}
        without_key = lambda tree: {k: v for k, v in tree.items() if k != "key"}  # placed and
        shardings = state_shardings(without_key(params), mesh)  # copied share its device-0 buffer
        jitted = jax.jit(step, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)
        with jax.set_mesh(mesh):
            a = jitted(jitted(without_key(placed)))
            b = jitted(jitted(without_key(copied)))
        assert placed["layer_0"]["mlp"]["fc"]["kernel"].is_deleted()
        for got, want in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            if not jax.dtypes.issubdtype(got.dtype, jax.dtypes.extended):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        again = shard_params(params, mesh)
        np.testing.assert_array_equal(np.asarray(again["layer_0"]["mlp"]["fc"]["kernel"]),
                                      params["layer_0"]["mlp"]["fc"]["kernel"])
        assert int(again["step"]) == 3
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.parametrize("owners, expected", [
    # data=2 × fsdp=2 × tensor=2 over 2 processes of 4 devices, process 0 holding data row 0.
    ([0, 0, 0, 0, 1, 1, 1, 1], {0: (0, 2), 1: (1, 2)}),
    # 4 processes of 2 devices: each holds one (data, fsdp) position's two tensor devices.
    ([0, 0, 1, 1, 2, 2, 3, 3], {0: (0, 4), 3: (3, 4)}),
    # tensor spans processes 0/1 and 2/3: each pair holds the same batch shards, so reads one part.
    ([0, 1, 0, 1, 2, 3, 2, 3], {0: (0, 2), 1: (0, 2), 2: (1, 2), 3: (1, 2)}),
])
def test_process_data_shard_groups_processes_by_batch_shards(monkeypatch, owners, expected):
    """Stand-in devices carrying only a process index, on a (data, fsdp, tensor) = (2, 2, 2) mesh."""
    devices = np.array([types.SimpleNamespace(process_index=p) for p in owners]).reshape(2, 2, 2)
    mesh = types.SimpleNamespace(devices=devices, shape={"data": 2, "fsdp": 2, "tensor": 2})
    for process, shard in expected.items():
        monkeypatch.setattr(jax, "process_index", lambda p=process: p)
        assert process_data_shard(mesh) == shard


def test_process_data_shard_rejects_processes_sharing_part_of_a_shard(monkeypatch):
    devices = np.array([types.SimpleNamespace(process_index=p) for p in [0, 0, 0, 1, 1, 1, 1, 1]]).reshape(2, 2, 2)
    mesh = types.SimpleNamespace(devices=devices, shape={"data": 2, "fsdp": 2, "tensor": 2})
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(ValueError, match="overlapping or unequal batch shards"):
        process_data_shard(mesh)
