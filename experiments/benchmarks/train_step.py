"""SFT and reward-model train steps: ours vs a ``transformers`` + ``torch`` step of the same model.

Both sides start from the same random GPT-2 weights (written by our ``save_pretrained``, read by
our ``load_pretrained`` and by ``GPT2LMHeadModel`` / ``GPT2ForSequenceClassification``), take the
same batch, the same loss and the same AdamW (β = (0.9, 0.95), ε = 1e-5, no weight decay, a
constant learning rate), in float32:

- SFT (InstructGPT §3.5): next-token cross entropy on the response only, ``batch × seq`` tokens
  of which the first ``prompt`` are the prompt; ours is ``stages.sft.sft_step_fn``.
- RM (InstructGPT eq. 1): ``batch / K`` prompts with ``K = 4`` responses each, the scalar head at
  each sequence's last token, ``−log σ(r_i − r_j)`` averaged over the ``C(4, 2) = 6`` pairs of a
  prompt, then over prompts; ours is ``stages.reward.rm_step_fn``.

Ours runs as the stages run it: ``init_train_state`` + ``jit_on_mesh`` (old state donated) on a
one-device mesh, and, when the process has several host devices (``--host-devices``, default the
CPU count), also data-parallel over all of them (XLA's CPU runtime runs each matmul on one core;
PyTorch's uses all of them).  PyTorch runs with all cores and with one thread (under load its
OpenMP threads wait on each other); the ratio is against the faster.  Before timing, the first two
losses of every side must agree (the second one checks the optimiser update too).  Runs alternate
between the sides; medians.

MFU = ``train_step_flops`` (6·matmul params·tokens + causal attention, ``flops.py``) / step time /
the peak of a matmul timed in the same alternating rounds (CPU: float32 2048², the better of JAX
and PyTorch; accelerator: 8192² in the compute dtype), and on a known accelerator also / the data
sheet's dense bf16 peak.

    python -m experiments.benchmarks.train_step [--quick] [--models tiny small] [--json out.json]
    python -m experiments.benchmarks.train_step --models gpt2-medium gpt2-large llama-1b --dtype bfloat16 --no-peer
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.benchmarks.common import (
    device_spec,
    format_table,
    machine_info,
    matmul_probes,
    timed,
    write_json,
)
from experiments.benchmarks.flops import train_step_flops
from experiments.benchmarks.shapes import CASES, K, Case
from rlhf_jax.hf import load_pretrained, save_pretrained
from rlhf_jax.model import Transformer, init_params
from rlhf_jax.sharding import MeshConfig, make_mesh
from rlhf_jax.stages.steps import init_train_state, jit_on_mesh
from rlhf_jax.stages.reward import rm_batch_loss, rm_step_fn
from rlhf_jax.stages.sft import sft_batch_loss, sft_step_fn
from rlhf_jax.train import OptimizerConfig, make_optimizer

KINDS = ("sft", "rm")
OPTIMIZER = OptimizerConfig(lr=1e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0)


def make_batch(case: Case, kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """SFT: ``tokens``, ``mask``, ``loss_mask`` ``[batch, seq]``; RM: ``tokens``, ``mask``
    ``[batch/K, K, seq]`` and ``valid`` ``[batch/K, K]`` (best-first).  Token ids are ``≥ 1``
    (0 is the pad id ``transformers``' sequence classifier looks for) and there is no padding."""
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.seq) if kind == "sft" else (case.batch // K, K, case.seq)
    tokens = rng.integers(1, case.vocab, size=shape).astype(np.int32)
    mask = np.ones_like(tokens)
    if kind == "sft":
        return {"tokens": tokens, "mask": mask, "loss_mask": (np.arange(case.seq) >= case.prompt).astype(np.int32)
                * mask}
    return {"tokens": tokens, "mask": mask, "valid": np.ones(shape[:2], np.int32)}


def write_model(case: Case, kind: str, directory: Path, dtype: str) -> Path:
    """Random weights of the SFT (LM head) or RM (scalar head, bias 0: ``transformers`` has none)
    model, in Hugging Face format."""
    model = Transformer(case.model_config("lm" if kind == "sft" else "scalar", dtype))
    params = jax.device_get(jax.jit(lambda k: init_params(model, k))(jax.random.key(0)))
    if kind == "rm":
        params["score_head"]["bias"] = np.zeros_like(params["score_head"]["bias"])
    return save_pretrained(model, params, directory / f"{case.key}-{kind}", extra_config={"pad_token_id": 0, "bos_token_id": None, "eos_token_id": None})


# ------------------------------------------------------------------------------------------ sides


class Ours:
    """Our stage step on a mesh of ``n_devices`` (data-parallel); ``step()`` -> the loss."""

    def __init__(self, path: Path, kind: str, batch: dict[str, np.ndarray], n_devices: int, dtype: str):
        model, params = load_pretrained(path, dtype=dtype, head="lm" if kind == "sft" else "scalar")
        mesh = make_mesh(MeshConfig(data=n_devices, fsdp=1), devices=jax.devices()[:n_devices])
        self.state = init_train_state(params, make_optimizer(OPTIMIZER), jax.random.key(1), mesh)
        step_fn = sft_step_fn(model, OPTIMIZER) if kind == "sft" else rm_step_fn(model, OPTIMIZER, 0.0, 0.0)
        self.jitted = jit_on_mesh(step_fn, mesh, self.state, donate=True)
        self.batch, self.label = batch, f"ours ×{n_devices}dev" if n_devices > 1 else "ours"
        self.last_loss = float("nan")

        def loss(p: Any, b: dict[str, jax.Array]) -> jax.Array:
            return sft_batch_loss(model, p, b) if kind == "sft" else rm_batch_loss(model, p, b)[0]

        self.split_fns = {  # for the time split: the loss alone, and with its gradient
            "forward": jit_on_mesh(loss, mesh, params, returns_tree=False),
            "forward_backward": jit_on_mesh(jax.value_and_grad(loss), mesh, params, returns_tree=False),
        }

    def split_step(self, part: str) -> None:
        """Runs the loss alone (``"forward"``) or with its gradient (``"forward_backward"``)."""
        jax.block_until_ready(self.split_fns[part](self.state.params, self.batch))

    def step(self) -> float:
        self.state, metrics = self.jitted(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.last_loss = float(metrics["loss"])
        return self.last_loss


class Torch:
    """The same step in PyTorch: ``transformers`` model, ``torch.optim.AdamW``; ``step()`` -> the loss.

    SFT loss: ``Σ −log p(tokens[t+1]) · loss_mask[t+1] / Σ loss_mask[t+1]``; RM loss: the
    ``transformers`` classifier's pooled score (last non-pad token) ``[b·K]`` -> ``[b, K]``, the mean
    over prompts of the mean over pairs ``i < j`` of ``−log σ(r_i − r_j)``.
    """

    def __init__(self, path: Path, kind: str, batch: dict[str, np.ndarray], threads: int):
        import torch
        import transformers

        self.torch = torch
        transformers.utils.logging.disable_progress_bar()
        cls = transformers.GPT2LMHeadModel if kind == "sft" else transformers.GPT2ForSequenceClassification
        self.model = cls.from_pretrained(path, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
        o = OPTIMIZER
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=0.0)
        self.kind, self.threads, self.label = kind, threads, f"torch ×{threads}thr"
        tokens = torch.from_numpy(batch["tokens"]).long()
        self.tokens = tokens.reshape(-1, tokens.shape[-1])
        self.mask = torch.from_numpy(batch["mask"]).long().reshape(self.tokens.shape)
        self.loss_mask = torch.from_numpy(batch["loss_mask"]).float() if kind == "sft" else None
        self.prompts = tokens.shape[0]
        i, j = np.triu_indices(K, 1)
        self.pairs = torch.from_numpy(i), torch.from_numpy(j)
        self.last_loss = float("nan")

    def loss(self) -> Any:
        torch = self.torch
        if self.kind == "sft":
            logits = self.model(input_ids=self.tokens, attention_mask=self.mask).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, self.tokens[:, 1:, None])[..., 0]
            m = self.loss_mask[:, 1:]
            return (nll * m).sum() / m.sum()
        rewards = self.model(input_ids=self.tokens, attention_mask=self.mask).logits.float().reshape(self.prompts, K)
        i, j = self.pairs
        return -torch.nn.functional.logsigmoid(rewards[:, i] - rewards[:, j]).mean()

    def split_step(self, part: str) -> None:
        """Runs the loss alone (``"forward"``, autograd graph built) or with ``backward()``."""
        self.torch.set_num_threads(self.threads)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        if part == "forward_backward":
            loss.backward()

    def step(self) -> float:
        self.torch.set_num_threads(self.threads)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.last_loss = float(loss.detach())
        return self.last_loss


def check_same_losses(sides: list[Any], first: list[list[float]], rtol: float) -> None:
    """The first two losses of every side must match the first side's (same model, batch, loss
    and optimiser): ``RuntimeError`` naming both otherwise."""
    for side, losses in zip(sides[1:], first[1:]):
        if not np.allclose(losses, first[0], rtol=rtol, atol=rtol):
            raise RuntimeError(f"train_step: {side.label} losses {losses} != {sides[0].label} {first[0]} "
                               f"(rtol {rtol}): the two sides do not compute the same step")


def alternate(fns: list[Callable[[], Any]], rounds: int) -> list[list[float]]:
    """``rounds`` rounds of one call of each ``fn`` (the load hits all alike); seconds per fn."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            ts.append(timed(fn))
    return times


def time_split(sides: list[Any], repeats: int) -> list[dict[str, float]]:
    """Per side, median seconds of the loss alone and of loss + gradient (alternating rounds, the
    first a warm-up); with the whole step's time these split it into forward, backward and the
    rest (optimiser update, host transfers)."""
    parts = ("forward", "forward_backward")
    runners = [lambda s=s, p=p: s.split_step(p) for s in sides for p in parts]
    times = [ts[1:] for ts in alternate(runners, 1 + repeats)]
    medians = [statistics.median(ts) for ts in times]
    return [dict(zip(parts, medians[i * 2:i * 2 + 2])) for i in range(len(sides))]


def run_case(case: Case, kind: str, directory: Path, *, repeats: int, dtype: str, torch_threads: list[int],
             device_counts: list[int], split: bool = False) -> dict[str, Any]:
    """Builds every side, checks their first two losses agree, then times ``repeats`` alternating
    rounds (and, with ``split``, the forward and backward on their own).  Per side: median
    seconds, tokens/s, first-call seconds, the first two losses."""
    batch = make_batch(case, kind)
    path = write_model(case, kind, directory, dtype)
    sides: list[Any] = [Ours(path, kind, batch, n, dtype) for n in device_counts]
    sides += [Torch(path, kind, batch, n) for n in torch_threads]
    first_s = [timed(side.step) for side in sides]  # ours: compiles
    first = [[side.last_loss, side.step()] for side in sides]
    check_same_losses(sides, first, rtol=1e-4 if dtype == "float32" else 5e-2)
    # The matmul probes take turns with the sides, so the peak each MFU divides by saw the same load.
    # CPU: float32 2048² (JAX and PyTorch); accelerator: the compute dtype at 8192² (JAX).
    n, probe_dtype = (2048, "float32") if jax.default_backend() == "cpu" else (8192, dtype)
    probes = matmul_probes(n, probe_dtype)
    timings = alternate([side.step for side in sides] + list(probes.values()), 1 + repeats)
    times = [ts[1:] for ts in timings[:len(sides)]]  # round 0 warms up
    peak = {name: 2.0 * n**3 / statistics.median(ts[1:]) for name, ts in zip(probes, timings[len(sides):])}
    splits = time_split(sides, repeats) if split else [None] * len(sides)
    tokens = case.batch * case.seq
    flops = train_step_flops(case.model_config("lm" if kind == "sft" else "scalar", dtype), case.batch, case.seq)
    return {
        "case": case.name, "key": case.key, "kind": kind, **{f: getattr(case, f) for f in ("batch", "seq", "prompt")},
        "tokens": tokens, "flops": flops, "dtype": dtype, "repeats": repeats, "peak_by_library": peak,
        "peak_flops": max(peak.values()),
        "sides": [{"label": side.label, "seconds": statistics.median(ts), "times": ts, "first_call_s": f,
                   "tokens_per_s": tokens / statistics.median(ts), "first_losses": losses, "split": sp}
                  for side, ts, f, losses, sp in zip(sides, times, first_s, first, splits)],
    }


def best_peer(sides: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest torch side (its best thread count under this run's load), or None."""
    return min((s for s in sides if s["label"].startswith("torch")), key=lambda s: s["seconds"], default=None)


def _split_cell(side: dict[str, Any]) -> str:
    """``forward / backward / rest`` seconds (rest: the optimiser update and host transfers)."""
    sp = side.get("split")
    if not sp:
        return "-"
    parts = (sp["forward"], sp["forward_backward"] - sp["forward"], side["seconds"] - sp["forward_backward"])
    return " / ".join(f"{x:.3f}" for x in parts)


def summarise(results: list[dict[str, Any]], spec: float | None) -> list[list[str]]:
    """Adds ``ratio_vs_peer`` (peer seconds / side seconds), ``mfu`` and ``mfu_spec`` to every side
    and returns the table rows."""
    rows = []
    for r in results:
        peer = best_peer(r["sides"])
        for side in r["sides"]:
            side["mfu"] = r["flops"] / side["seconds"] / r["peak_flops"]
            side["mfu_spec"] = r["flops"] / side["seconds"] / spec if spec else None
            side["ratio_vs_peer"] = peer["seconds"] / side["seconds"] if peer else None
            rows.append([
                r["case"], r["kind"], f"{r['batch']}×{r['seq']}", side["label"], f"{side['seconds']:.3f}",
                f"{side['tokens_per_s']:.0f}", "-" if peer is None else f"{side['ratio_vs_peer']:.2f}×",
                f"{r['peak_flops'] / 1e9:.0f}", f"{100 * side['mfu']:.1f}%", "-" if spec is None else f"{100 * side['mfu_spec']:.1f}%",
                f"{side['first_call_s']:.1f}", f"{side['first_losses'][0]:.4f}", _split_cell(side),
            ])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=["tiny", "small"])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--quick", action="store_true", help="2 timed rounds instead of 5")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 2)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument("--no-peer", action="store_true", help="ours only (no torch)")
    parser.add_argument("--host-devices", type=int, default=os.cpu_count(),
                        help="CPU only: also run ours data-parallel over this many host devices (1 = off)")
    parser.add_argument("--split", action="store_true",
                        help="also time the forward and forward+backward alone (where the step's time goes)")
    parser.add_argument("--dry-run", action="store_true", help="the micro model, 1 round: checks the wiring")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.host_devices < 1:
        parser.error("--host-devices must be >= 1")
    if args.dry_run:
        args.models, args.repeats = ["micro"], 1
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.host_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.host_devices)  # before the backend starts
    on_cpu = jax.default_backend() == "cpu"
    device_counts = [1] + ([jax.device_count()] if on_cpu and jax.device_count() > 1 else [])
    peer = not args.no_peer and on_cpu and args.dtype == "float32"
    # PyTorch with all cores, and with one: under load its OpenMP threads wait on each other
    torch_threads = sorted({os.cpu_count() or 1, 1}, reverse=True) if peer else []

    info = machine_info()
    spec = device_spec(info["device_kind"]) if not on_cpu else None
    spec_flops = spec["bf16_flops"] if spec else None
    results = []
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        for key in args.models:
            for kind in args.kinds:
                results.append(run_case(CASES[key], kind, Path(tmp), repeats=repeats, dtype=args.dtype,
                                        torch_threads=torch_threads,
                                        device_counts=device_counts, split=args.split))
    info["load_avg_end"] = list(os.getloadavg())
    rows = summarise(results, spec_flops)

    load = lambda xs: "/".join(f"{x:.1f}" for x in xs)  # noqa: E731
    print(f"jax {info['jax']} on {info['device_kind']} ×{jax.device_count()}; load average (1/5/15 min) "
          f"{load(info['load_avg'])} at start, {load(info['load_avg_end'])} at end")
    print("MFU divides by the peak of a matmul timed in the same alternating rounds (CPU: float32 2048², the "
          "better of JAX and PyTorch; accelerator: 8192² in the compute dtype)"
          + (f"; data sheet {spec_flops / 1e12:.0f} TFLOP/s" if spec_flops else ""))
    print(f"compute {args.dtype} (float32 master weights); AdamW; median of {repeats} alternating rounds; "
          f"first two losses of every side checked equal\n")
    print(format_table(["model", "step", "batch", "side", "s/step", "tokens/s", "vs torch", "peak GFLOP/s",
                        "MFU (measured)", "MFU (sheet)", "first s", "loss₀", "fwd / bwd / rest s"], rows))
    if args.json:
        write_json(args.json, {"machine": info, "spec": spec, "repeats": repeats, "results": results})


if __name__ == "__main__":
    main()
