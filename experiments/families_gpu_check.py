"""GPU check of the family switches through cuDNN attention (docs/families.md).

For bf16 models with sliding windows (every layer; a per-layer pattern with Gemma 3's local RoPE
base, q/k norms and query scale), ``attention_impl="cudnn"`` (the window in the mask,
``query_pre_attn_scalar`` as the scale) against the XLA einsum path; for Gemma 2's soft-capped
attention, that a cuDNN request runs the XLA path and gives identical logits.  Random weights,
left-padded rows longer than the window; ``window_effect`` (the XLA logits with and without the
windows) and ``cudnn_to_global`` show how far a cuDNN path that dropped the window would land,
``bf16_noise`` (XLA in bfloat16 against float32) how far rounding alone moves the logits.  Prints one JSON line per model; writes
``$OUT/families_gpu.json`` when ``$OUT`` is set.

    python experiments/families_gpu_check.py
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.model import ModelConfig, Transformer, forward, init_params

BASE = dict(arch="llama", vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512,
            max_len=512, dtype="bfloat16")
MODELS = {
    "mistral": dict(sliding_window=64),
    "qwen2": dict(qkv_bias=True, sliding_window=64,
                  layer_types=("full_attention", "full_attention", "sliding_attention", "sliding_attention")),
    "gemma3": dict(d_head=64, qk_norm=True, activation="gelu_tanh", norm_plus_one=True, embed_scale=True,
                   post_norms=True, query_pre_attn_scalar=48.0, rope_local_theta=10.0, rope_theta=1e6,
                   sliding_window=64, layer_types=("sliding_attention",) * 3 + ("full_attention",)),
    "gemma2": dict(d_head=64, activation="gelu_tanh", norm_plus_one=True, embed_scale=True, post_norms=True,
                   query_pre_attn_scalar=48.0, attn_softcap=2.0, final_softcap=10.0, sliding_window=64,
                   layer_types=("sliding_attention", "full_attention") * 2),
}


def main() -> None:
    b, t = 4, 256
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, BASE["vocab_size"], (b, t)))
    mask = jnp.asarray((np.arange(t)[None] >= np.array([[0], [17], [100], [200]])).astype(np.int32))
    live = np.asarray(mask, bool)
    fwd = jax.jit(forward, static_argnums=0)
    results = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
    for name, switches in MODELS.items():
        config = ModelConfig(**BASE, **switches)
        params = jax.tree.map(lambda p: 4 * p, init_params(Transformer(config), jax.random.PRNGKey(0)))
        out = {}
        global_only = config.replace(sliding_window=None, layer_types=None)
        for impl, cfg in (("xla", config), ("cudnn", config.replace(attention_impl="cudnn")), ("global", global_only),
                         ("f32", config.replace(dtype="float32"))):
            model = Transformer(cfg)
            logits = fwd(model, params, tokens, mask).logits.block_until_ready()
            start = time.perf_counter()
            logits = fwd(model, params, tokens, mask).logits.block_until_ready()
            out[impl] = (np.asarray(logits, np.float32)[live], time.perf_counter() - start)
        diff = np.abs(out["cudnn"][0] - out["xla"][0])
        row = {"model": name, "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
               "window_effect": float(np.abs(out["global"][0] - out["xla"][0]).mean()),
               "cudnn_to_global": float(np.abs(out["global"][0] - out["cudnn"][0]).mean()),
               "bf16_noise": float(np.abs(out["f32"][0] - out["xla"][0]).mean()),
               "logit_scale": float(np.abs(out["xla"][0]).mean()),
               "argmax_agree": float((out["cudnn"][0].argmax(-1) == out["xla"][0].argmax(-1)).mean()),
               "xla_ms": 1e3 * out["xla"][1], "cudnn_ms": 1e3 * out["cudnn"][1]}
        print(json.dumps(row), flush=True)
        results[name] = row
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "families_gpu.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
