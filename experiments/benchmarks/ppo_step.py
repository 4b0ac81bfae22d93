"""One PPO iteration: ``rlhf_jax.ppo.make_ppo_iteration`` vs Hugging Face TRL 1.9.0's ``PPOTrainer``.

Both sides run the same randomly initialised tiny GPT-2 policy, reference, value and reward
models (written once by our ``save_pretrained``, read back by our ``load_pretrained`` and by
``transformers``), on the same 32 prompts of 32 tokens, sampling exactly 64 new tokens at
temperature 1 (no stop token), float32 on CPU, one minibatch of 32, KL coefficient 0.05 and no ptx
term, for 1 and for 4 PPO epochs.

- Ours: the compiled iteration (rollout → experience → updates → KL control, one program), timed
  with ``block_until_ready``; compile time reported separately.  The split runs the three phases
  (``rollout_phase``, ``experience_phase``, and ``finish_iteration``: the updates, metrics and KL
  control) as separately jitted programs, as the PPO stage's ``phase_timing`` does.
- TRL: ``trl_ppo_runner.py`` in TRL's own virtualenv (``--trl-python``) runs ``PPOTrainer.train()``
  in lockstep with us: one TRL iteration (between ``on_step_end`` callbacks), then one of ours,
  and so on, so that the (shared, noisy) machine's load hits both alike; the first round is
  warm-up.  Its split comes from timestamps around ``batch_generation`` and the first
  policy+value forward.  Both sides also report process CPU time per iteration.

``--data-parallel N`` runs our side on N simulated host devices (``jax_num_cpu_devices``): the
prompts split over a ``data`` mesh axis, the state replicated, gradients all-reduced; each device
works on its own thread, which is how XLA uses a second core for these small matmuls (PyTorch
uses its intra-op threads on every op). The output says which setting ran.

FLOPs (``iteration_flops``) give a floor time = FLOPs / (f32 matmul FLOP/s measured in this run)
and the fraction of that peak each side reaches.

``--shape llama-1b`` is issue 18's GPU peer: ``gpu_check``'s 1.1B TinyLlama-shaped Llama, 64
prompts × (128 + 128), 4 minibatches, bf16 on both sides (ours: bf16 compute on float32 master
weights, scanned layers, a bf16 rollout copy; TRL: bf16 weights and ``bf16=True``), the peak
from the GPU's data sheet.  ``--dry-run`` runs that path with micro shapes on any backend.

    python -m experiments.benchmarks.ppo_step --trl-python /work/trl-venv/bin/python [--quick]
        [--data-parallel N] [--shape tiny|llama-1b] [--dry-run] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tokenizers import Tokenizer, models, pre_tokenizers

from experiments.benchmarks.common import (
    device_spec,
    format_table,
    machine_info,
    measure_matmul_peak,
    median_time,
    write_json,
)
from experiments.benchmarks.flops import (attention_flops_per_key, block_matmul_params, forward_flops,
                                          head_matmul_params)
from rlhf_jax.generation import GenerateConfig
from rlhf_jax.hf import load_pretrained, save_pretrained
from rlhf_jax.kl_control import KLControllerConfig
from rlhf_jax.model import ModelConfig, Transformer, init_params
from rlhf_jax.ppo import (
    PPOConfig,
    PPOModels,
    PPOState,
    experience_phase,
    finish_iteration,
    init_ppo_state,
    make_ppo_iteration,
    rollout_phase,
)
from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch

RUNNER = Path(__file__).with_name("trl_ppo_runner.py")
PAD_TOKEN, EOS_TOKEN = "<pad>", "<eos>"  # ids 0 and 1; prompts use ids >= 2


@dataclasses.dataclass(frozen=True)
class Bench:
    """The benchmark's shapes and hyper-parameters (the issue's definition; ``SHAPES`` names them)."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    vocab: int = 1024
    context: int = 128  # >= prompt + new
    batch: int = 32
    prompt: int = 32
    new: int = 64
    kl_coef: float = 0.05  # TRL's default
    temperature: float = 1.0  # TRL's default is 0.7; InstructGPT samples at 1
    learning_rate: float = 3e-6  # TRL's default
    seed: int = 0
    arch: str = "gpt2"
    n_kv_heads: int | None = None
    d_ff: int | None = None
    tie_embeddings: bool = True
    minibatches: int = 1  # optimizer steps per epoch (TRL: num_mini_batches of its per-device batch = batch)
    dtype: str = "float32"  # ours: the compute dtype (float32 master weights); TRL: its weights' dtype and autocast
    scan_layers: bool = False  # ours only, applied after loading (not in the checkpoint)
    logits_chunk: int = 0  # ours only, likewise

    def model_config(self, head: str) -> ModelConfig:
        return ModelConfig(arch=self.arch, vocab_size=self.vocab, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_ff=self.d_ff, max_len=self.context,
                           tie_embeddings=self.tie_embeddings, head=head)

    def runtime(self, model: Transformer) -> Transformer:
        """``model`` (as ``load_pretrained`` built it) with our side's compute settings."""
        return Transformer(model.config.replace(dtype=self.dtype, scan_layers=self.scan_layers,
                                                logits_chunk=self.logits_chunk))

    def ppo_config(self, epochs: int) -> PPOConfig:
        return PPOConfig(
            generation=GenerateConfig(max_new_tokens=self.new, temperature=self.temperature, eos_id=None, pad_id=0),
            kl=KLControllerConfig(kind="fixed", init_kl_coef=self.kl_coef),
            ptx_coef=0.0, vf_coef=0.1, epochs=epochs, num_minibatches=self.minibatches, score_position="after_last")

    def describe(self) -> str:
        heads = f", {self.n_kv_heads} KV heads" if self.n_kv_heads else ""
        return (f"{self.arch} {self.n_layers}L d={self.d_model}{heads} V={self.vocab}, {self.dtype}; batch {self.batch} × "
                f"({self.prompt} prompt + {self.new} new), {self.minibatches} minibatch(es), T={self.temperature:g}, no stop")


SHAPES: dict[str, Bench] = {
    # the CPU benchmark: a tiny GPT-2, float32, one minibatch
    "tiny": Bench(),
    # issue 18's GPU peer: gpu_check's 1.1B TinyLlama shape, bf16, 64 prompts × (128 + 128), 4 minibatches
    "llama-1b": Bench(arch="llama", n_layers=22, d_model=2048, n_heads=32, n_kv_heads=4, d_ff=5632, vocab=32000,
                      context=256, batch=64, prompt=128, new=128, tie_embeddings=False, minibatches=4,
                      dtype="bfloat16", scan_layers=True, logits_chunk=512),
    # the dry run of llama-1b's path: micro shapes, same settings otherwise
    "micro-llama": Bench(arch="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab=256,
                         context=32, batch=8, prompt=8, new=8, tie_embeddings=False, minibatches=2,
                         dtype="bfloat16", scan_layers=True, logits_chunk=8),
}


# ------------------------------------------------------------------------------------------ FLOPs


def iteration_flops(b: Bench, epochs: int) -> dict[str, float]:
    """Matmul FLOPs of one iteration, by phase (multiply-add = 2 FLOPs; ``flops.py``'s counts:
    every block matmul per token, the head where it is needed, attention over the causal context
    only, the useful work).

    - generation: prefill of ``P − 1`` prompt tokens, then ``N`` one-token steps with the head;
    - scoring: forwards of the reference, value and reward models over all ``P + N`` tokens (the
      rollout's own log-probs come from sampling on both sides);
    - update: per epoch, forward + backward (≈ 3 forwards) of the policy and the value model.
    """
    lm_config, scalar_config = b.model_config("lm"), b.model_config("scalar")
    p, n, t = b.prompt, b.new, b.prompt + b.new
    lm, scalar = forward_flops(lm_config, b.batch, t), forward_flops(scalar_config, b.batch, t)
    prefill_keys = (p - 1) * p / 2
    decode_keys = sum(p + i for i in range(n))
    gen = b.batch * (2 * block_matmul_params(lm_config) * (p - 1 + n) + 2 * head_matmul_params(lm_config) * n
                     + attention_flops_per_key(lm_config) * (prefill_keys + decode_keys))
    score = lm + 2 * scalar
    update = epochs * 3 * (lm + scalar)
    return {"gen": gen, "score": score, "update": update, "total": gen + score + update}


# --------------------------------------------------------------------------------- shared inputs


def write_shared(b: Bench, directory: Path) -> None:
    """Random policy / value / reward models in Hugging Face format, a word-level tokenizer over
    the vocabulary, and ``spec.json`` (prompts and settings) for ``trl_ppo_runner.py``."""
    key = jax.random.key(b.seed)
    for i, (name, head) in enumerate((("policy", "lm"), ("value", "scalar"), ("reward", "scalar"))):
        model = Transformer(b.model_config(head))
        params = init_params(model, jax.random.fold_in(key, i))
        if head == "scalar":  # transformers' score head has no bias: keep both sides identical
            params["score_head"]["bias"] = jnp.zeros_like(params["score_head"]["bias"])
        # No bos/eos in the configs: nothing may stop generation early on either side.
        save_pretrained(model, params, directory / name,
                        extra_config={"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0})

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, **{f"t{i}": i for i in range(2, b.vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))

    prompts = np.random.default_rng(b.seed).integers(2, b.vocab, size=(b.batch, b.prompt))
    spec = {"prompts": prompts.tolist(), "pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN,
            "response_length": b.new, "kl_coef": b.kl_coef, "temperature": b.temperature,
            "learning_rate": b.learning_rate, "seed": b.seed, "minibatches": b.minibatches, "dtype": b.dtype}
    (directory / "spec.json").write_text(json.dumps(spec))


def load_shared(b: Bench, directory: Path) -> tuple[PPOModels, dict[str, Any], np.ndarray]:
    """Our models and parameters read back from the directory TRL reads, and the prompts."""
    policy, policy_params = load_pretrained(directory / "policy")
    value, value_params = load_pretrained(directory / "value", head="scalar")
    reward, reward_params = load_pretrained(directory / "reward", head="scalar")
    prompts = np.asarray(json.loads((directory / "spec.json").read_text())["prompts"], np.int32)
    params = {"policy": policy_params, "value": value_params, "reward": reward_params}
    return PPOModels(policy=b.runtime(policy), value=b.runtime(value), reward=b.runtime(reward)), params, prompts


# ------------------------------------------------------------------------------------------ ours


def _fresh_state(b: Bench, cfg: PPOConfig, params: dict[str, Any], mesh: Mesh | None) -> PPOState:
    tx = optax.adam(b.learning_rate)  # TRL: torch AdamW with weight decay 0, no clipping
    state = init_ppo_state(cfg, params["policy"], params["value"], params["reward"], tx, tx,
                           jax.random.key(b.seed))
    return state if mesh is None else jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


def _place_prompts(prompts: np.ndarray, mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
    """``(ids, mask)``: on the default device, or split over the mesh's data axis."""
    mask = np.ones(prompts.shape, np.int32)
    if mesh is None:
        return jnp.asarray(prompts), jnp.asarray(mask)
    return shard_batch((prompts, mask), mesh)


def _on(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """Trace and compile under ``jax.set_mesh(mesh)`` (the model pins activations to it)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


class OursIteration:
    """Our compiled iteration for one epochs setting; ``step()`` runs one iteration and returns its
    ``(wall seconds, process CPU seconds)``."""

    def __init__(self, b: Bench, models: PPOModels, params: dict[str, Any], prompts: np.ndarray, epochs: int,
                 mesh: Mesh | None = None):
        cfg = b.ppo_config(epochs)
        self.ids, self.mask = _place_prompts(prompts, mesh)
        self.state = _fresh_state(b, cfg, params, mesh)
        start = time.perf_counter()
        with _on(mesh):
            self.compiled = make_ppo_iteration(models, cfg).lower(self.state, self.ids, self.mask).compile()
        self.compile_s = time.perf_counter() - start

    def step(self) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        self.state, metrics = self.compiled(self.state, self.ids, self.mask)  # the state is donated
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start, time.process_time() - cpu


class PhaseTimer:
    """Our split: the three phases as separately jitted programs on a fixed (undonated) state.

    Generation and scoring do not depend on the number of epochs, so they are timed once.
    """

    def __init__(self, b: Bench, models: PPOModels, params: dict[str, Any], prompts: np.ndarray, repeats: int,
                 mesh: Mesh | None = None):
        self.b, self.models, self.params, self.repeats, self.mesh = b, models, params, repeats, mesh
        self.ids, self.mask = _place_prompts(prompts, mesh)
        self.key = jax.random.key(b.seed + 1)
        self.common: dict[str, float] | None = None

    def split(self, epochs: int) -> dict[str, float]:
        with _on(self.mesh):
            return self._split(epochs)

    def _split(self, epochs: int) -> dict[str, float]:
        cfg = self.b.ppo_config(epochs)
        models, ids, mask, key = self.models, self.ids, self.mask, self.key
        state = _fresh_state(self.b, cfg, self.params, self.mesh)
        rollout_fn = jax.jit(lambda s, i, m, k: rollout_phase(models, cfg, s, i, m, k))
        experience_fn = jax.jit(lambda s, r: experience_phase(models, cfg, s, r))
        rollout = jax.block_until_ready(rollout_fn(state, ids, mask, key))
        if int(rollout.response_mask.sum()) != self.b.batch * self.b.new:
            raise RuntimeError("ppo_step: our rollout did not sample exactly batch × new tokens")
        exp = jax.block_until_ready(experience_fn(state, rollout))
        if self.common is None:
            self.common = {
                "gen": median_time(lambda: jax.block_until_ready(rollout_fn(state, ids, mask, key)), self.repeats)[0],
                "score": median_time(lambda: jax.block_until_ready(experience_fn(state, rollout)), self.repeats)[0],
            }
        update_fn = jax.jit(lambda s, e, k: finish_iteration(models, cfg, s, e, None, None, k, k, self.b.batch))
        update = median_time(lambda: jax.block_until_ready(update_fn(state, exp, key)), self.repeats)[0]
        return {**self.common, "update": update}


# ------------------------------------------------------------------------------------------- TRL


def run_alternating(python: str | None, directory: Path, epochs: int, repeats: int,
                    ours: OursIteration) -> tuple[dict[str, Any] | None, list[tuple[float, float]]]:
    """``1 + repeats`` rounds of one TRL iteration then one of ours (the first round is warm-up), so
    that the machine's load hits both alike; TRL runs ``trl_ppo_runner.py --lockstep`` with its own
    interpreter. Without ``python``, only ours. Returns TRL's JSON (or ``None``) and our
    ``(wall, cpu)`` seconds of the timed rounds."""
    if python is None:
        return None, [ours.step() for _ in range(1 + repeats)][1:]
    out = directory / f"trl_{epochs}.json"
    cmd = [python, str(RUNNER), str(directory), "--epochs", str(epochs), "--updates", str(repeats),
           "--warmup", "1", "--lockstep", "--out", str(out)]
    ours_times = []
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

        def expect(prefix: str) -> None:
            for line in proc.stdout:
                if line.startswith(prefix):
                    return
            proc.wait()
            log.seek(0)
            raise RuntimeError(f"TRL runner exited ({proc.returncode}) before {prefix!r}: {' '.join(cmd)}\n"
                               f"{log.read()[-5000:]}")

        try:
            expect("@@READY")
            for _ in range(1 + repeats):
                proc.stdin.write("go\n")
                proc.stdin.flush()
                expect("@@STEP")
                ours_times.append(ours.step())
            proc.stdin.write("go\n")
            proc.stdin.close()
            for _ in proc.stdout:  # drain whatever it prints while finishing
                pass
            if proc.wait() != 0:
                log.seek(0)
                raise RuntimeError(f"TRL runner failed ({proc.returncode}): {' '.join(cmd)}\n{log.read()[-5000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
    result = json.loads(out.read_text())
    expected = json.loads((directory / "spec.json").read_text())["response_length"]
    if any(n != expected for n in result["new_tokens_per_iteration"]):
        raise RuntimeError(f"TRL sampled {result['new_tokens_per_iteration']} new tokens, expected {expected} each")
    return result, ours_times[1:]


# ------------------------------------------------------------------------------------------ main


def _split_str(split: dict[str, float]) -> str:
    return "/".join(f"{split[k]:.2f}" for k in ("gen", "score", "update"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON"),
                        help="python of a virtualenv with trl==1.9.0 (default: $TRL_PYTHON; unset = skip TRL)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (ours 2, TRL 2 timed iterations)")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations per side (default 5, quick 2)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4], help="PPO epochs settings (default 1 4)")
    parser.add_argument("--data-parallel", type=int, default=1, metavar="N",
                        help="our side on N simulated host devices, batch split over them (default 1)")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny",
                        help="tiny: GPT-2 4L float32 (the CPU benchmark); llama-1b: issue 18's GPU peer (bf16)")
    parser.add_argument("--dry-run", action="store_true", help="micro-llama shapes, 1 repeat, 1 epoch: checks the "
                        "wiring of the llama-1b path on any backend (its numbers mean nothing)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.dry_run:
        args.shape, args.repeats, args.epochs = "micro-llama", 1, [1]
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1 or any(e < 1 for e in args.epochs):
        parser.error("--repeats and --epochs must be >= 1")
    if args.trl_python and not Path(args.trl_python).exists():
        parser.error(f"--trl-python {args.trl_python}: no such file")
    if not args.trl_python:
        print("TRL skipped: pass --trl-python /path/to/trl-venv/bin/python or set TRL_PYTHON "
              "(see experiments/benchmarks/README.md)", file=sys.stderr)

    b = SHAPES[args.shape]
    # Both sides share one accelerator: JAX takes 60% of its memory (not its default 75%), TRL the rest.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    if args.data_parallel < 1 or b.batch % args.data_parallel:
        parser.error(f"--data-parallel must be >= 1 and divide the batch {b.batch} (got {args.data_parallel})")
    if args.data_parallel > 1:  # before anything starts the CPU backend
        jax.config.update("jax_num_cpu_devices", args.data_parallel)
    mesh = make_mesh(MeshConfig(data=args.data_parallel, fsdp=1)) if args.data_parallel > 1 else None
    info = machine_info()
    spec = device_spec(info["device_kind"]) if info["backend"] != "cpu" else None

    def peak_now() -> dict[str, Any]:
        """The matmul peak: a known accelerator's data sheet, else measured (again after each
        setting: the CPU's load drifts)."""
        if spec:
            return {"median": spec["bf16_flops"], "best": spec["bf16_flops"], "torch": None, "n": 0,
                    "source": "data sheet (bf16)"}
        return measure_matmul_peak(repeats=max(5, repeats), dtype=b.dtype)

    peaks = [peak_now()]
    results = []
    with tempfile.TemporaryDirectory(prefix="ppo_step_") as tmp:
        directory = Path(tmp)
        write_shared(b, directory)
        models, params, prompts = load_shared(b, directory)
        phases = PhaseTimer(b, models, params, prompts, repeats, mesh)
        for epochs in args.epochs:
            iteration = OursIteration(b, models, params, prompts, epochs, mesh)
            trl, times = run_alternating(args.trl_python, directory, epochs, repeats, iteration)
            compile_s = iteration.compile_s
            del iteration  # its state, before the split makes another (the 1.1B's fill a GPU's share)
            ours = {"seconds_per_iter": statistics.median(t for t, _ in times),
                    "cpu_seconds_per_iter": statistics.median(c for _, c in times),
                    "times": [t for t, _ in times], "cpu_times": [c for _, c in times],
                    "compile_s": compile_s, "split": phases.split(epochs)}
            results.append({"epochs": epochs, "ours": ours, "trl": trl, "flops": iteration_flops(b, epochs)})
            peaks.append(peak_now())
    info["load_avg_end"] = list(os.getloadavg())

    peak = statistics.median(p["median"] for p in peaks)
    rows = []
    for r in results:
        ours, trl = r["ours"], r["trl"]
        r["floor_s"] = floor = r["flops"]["total"] / peak
        r["ours_peak_frac"] = floor / ours["seconds_per_iter"]
        if trl:
            r["speedup"] = trl["seconds_per_iter"] / ours["seconds_per_iter"]
            r["cpu_speedup"] = trl["cpu_seconds_per_iter"] / ours["cpu_seconds_per_iter"]
            r["trl_peak_frac"] = floor / trl["seconds_per_iter"]
            r["gen_speedup"] = trl["split"]["gen"] / ours["split"]["gen"]  # transformers.generate vs our rollout
        rows.append([
            f"epochs={r['epochs']}", f"{ours['seconds_per_iter']:.2f}",
            f"{trl['seconds_per_iter']:.2f}" if trl else "-",
            f"{r['speedup']:.2f}×" if trl else "-", f"{r['gen_speedup']:.2f}×" if trl else "-",
            _split_str(ours["split"]), _split_str(trl["split"]) if trl else "-",
            f"{ours['compile_s']:.1f}", f"{r['flops']['total'] / 1e9:.0f}", f"{floor:.2f}",
            f"{100 * r['ours_peak_frac']:.0f}%", f"{100 * r['trl_peak_frac']:.0f}%" if trl else "-",
            f"{ours['cpu_seconds_per_iter']:.1f}/{trl['cpu_seconds_per_iter']:.1f}" if trl
            else f"{ours['cpu_seconds_per_iter']:.1f}/-",
            f"{r['cpu_speedup']:.2f}×" if trl else "-",
        ])

    load = lambda xs: "/".join(f"{x:.1f}" for x in xs)  # noqa: E731
    print(f"jax {info['jax']} ({info['backend']}), {info['cpu_count']} CPUs; load average (1/5/15 min) "
          f"{load(info['load_avg'])} at start, {load(info['load_avg_end'])} at end")
    if results and results[0]["trl"]:
        t = results[0]["trl"]
        print(f"TRL {t['versions']['trl']}, torch {t['versions']['torch']} ({t['torch_threads']} threads), "
              f"transformers {t['versions']['transformers']}")
    each = ", ".join(f"{p['median'] / 1e9:.0f}" for p in peaks)
    libs = "jax" + ("/torch" if peaks[0]["torch"] else "")
    if spec:
        print(f"matmul peak: {peak / 1e12:.0f} TFLOP/s, {info['device_kind']}'s data sheet (bf16)")
    else:
        print(f"{b.dtype} matmul peak ({peaks[0]['n']}², better of {libs}): {peak / 1e9:.0f} GFLOP/s (median of the "
              f"{len(peaks)} measurements {each}; best single matmul {max(p['best'] for p in peaks) / 1e9:.0f})")
    print(f"{b.describe()}; median of {repeats} iterations per side; split in seconds;\n"
          f"ours: {'one device' if mesh is None else f'data-parallel over {args.data_parallel} host devices'}\n"
          f"CPU s = process CPU time per iteration (all threads), a load-robust second view of the ratio\n")
    print(format_table(["", "ours s/it", "TRL s/it", "speedup", "gen speedup", "ours gen/score/upd", "TRL gen/score/upd",
                        "compile s", "GFLOP", "floor s", "ours %pk", "TRL %pk", "CPU s ours/TRL", "CPU ratio"],
                       rows))
    if args.json:
        write_json(args.json, {"shape": b.describe(), "shape_name": args.shape, "dry_run": args.dry_run,
                               "bench": dataclasses.asdict(b), "machine": info, "peaks": peaks,
                               "peak_flops": peak, "repeats": repeats, "data_parallel": args.data_parallel,
                               "results": results})


if __name__ == "__main__":
    main()
