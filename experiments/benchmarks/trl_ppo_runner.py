"""The TRL side of ``ppo_step.py``: times Hugging Face TRL 1.9.0's ``PPOTrainer.train()``.

Runs inside TRL's own virtualenv (torch, transformers, trl; see README.md) as a subprocess of
``ppo_step.py`` and imports nothing from ``rlhf_jax``. It reads the directory ``ppo_step.py``
wrote::

    policy/  value/  reward/     Hugging Face checkpoints (GPT2LMHeadModel,
                                 GPT2ForSequenceClassification with num_labels=1)
    tokenizer.json               a word-level tokenizer over the model's vocabulary
    spec.json                    {"prompts": [[int]], "pad_token": str, "eos_token": str,
                                  "response_length": int, "kl_coef": float, "temperature": float,
                                  "learning_rate": float, "seed": int}

builds a ``PPOTrainer`` with separate policy / reference / value / reward models, no stop token,
and runs ``warmup + updates`` PPO iterations. ``spec.json`` may also give ``"minibatches"``
(default 1: ``num_mini_batches``, which splits the batch of ``per_device_train_batch_size`` = all
the prompts into that many optimizer steps per epoch)
and ``"dtype"`` (default ``"float32"``; ``"bfloat16"`` loads the models in bf16 and sets
``bf16=True``). It runs on the GPU when torch sees one, else on the CPU (``use_cpu``); on a GPU
every timestamp waits for the queued CUDA work first. It writes JSON with the
per-iteration wall time (between consecutive ``on_step_end`` callbacks), its process CPU time
(``cpu``, all threads) and its split:

- ``gen``: ``batch_generation`` (sampling with the KV cache, ``transformers.generate``);
- ``score``: from the end of generation to the first forward of the policy+value wrapper, i.e.
  reference log-probs, value and reward forwards, rewards, GAE and whitening;
- ``update``: from that forward to ``on_step_end`` (all PPO epochs: forward, backward, AdamW);
- ``other``: the rest of the iteration (data loading, ``gc.collect``, logging).

With ``--lockstep`` it pauses before the first and after every iteration (see ``_Clock``) so that
``ppo_step.py`` can alternate its own iterations with TRL's.

    <trl-venv>/bin/python trl_ppo_runner.py DIR --epochs 1 --updates 5 --warmup 1 --out out.json [--lockstep]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo import ppo_trainer as trl_ppo  # noqa: E402


class _Clock(TrainerCallback):
    """Per-iteration timestamps of ``train()``, and the lockstep handshake.

    An iteration runs from the previous ``on_step_end`` (the first from ``on_train_begin``) to its
    own ``on_step_end``. With ``lockstep``, both callbacks print a ``@@READY`` / ``@@STEP {json}``
    line and block until a line arrives on stdin, so the parent can run its own iteration in
    between (the two sides then alternate and see the same machine load), and the paused time is
    not counted.
    """

    def __init__(self, lockstep: bool) -> None:
        self.lockstep = lockstep
        self.events: list[dict[str, float]] = []
        self.iterations: list[dict[str, float]] = []
        self.generated: list[int] = []

    @staticmethod
    def _now() -> float:
        """``perf_counter`` once the GPU's queued work is done (CUDA runs asynchronously)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self, name: str) -> None:
        if name not in self.events[-1]:
            self.events[-1][name] = self._now()

    def _start(self) -> None:
        self.events.append({"start": time.perf_counter(), "cpu_start": time.process_time()})

    def _handshake(self, line: str) -> None:
        if self.lockstep:
            print(line, flush=True)
            if not sys.stdin.readline():
                raise SystemExit("trl_ppo_runner: stdin closed by the parent")

    def on_train_begin(self, args, state, control, **kwargs):
        self._handshake("@@READY")
        self._start()

    def on_step_end(self, args, state, control, **kwargs):
        ev = self.events[-1]
        ev["step_end"], ev["cpu_end"] = self._now(), time.process_time()
        total = ev["step_end"] - ev["start"]
        gen = ev["gen_end"] - ev["gen_start"]
        score = ev["update_start"] - ev["gen_end"]
        update = ev["step_end"] - ev["update_start"]
        self.iterations.append({"total": total, "gen": gen, "score": score, "update": update,
                                "other": total - gen - score - update, "cpu": ev["cpu_end"] - ev["cpu_start"]})
        self._handshake("@@STEP " + json.dumps(self.iterations[-1]))
        self._start()


def _instrument(clock: _Clock) -> None:
    """Wraps the module-level helpers that ``PPOTrainer.train`` calls by name."""
    batch_generation, forward = trl_ppo.batch_generation, trl_ppo.forward

    def timed_batch_generation(*args, **kwargs):
        clock.mark("gen_start")
        query_responses, logits = batch_generation(*args, **kwargs)
        clock.mark("gen_end")
        clock.generated.append(logits.shape[1])  # new tokens sampled (no stop token: all of them)
        return query_responses, logits

    def timed_forward(model, *args, **kwargs):
        if isinstance(model, trl_ppo.PolicyAndValueWrapper):  # the update's forward (the ref's is not)
            clock.mark("update_start")
        return forward(model, *args, **kwargs)

    trl_ppo.batch_generation = timed_batch_generation
    trl_ppo.forward = timed_forward


def run(directory: Path, epochs: int, updates: int, warmup: int, threads: int | None, lockstep: bool) -> dict:
    spec = json.loads((directory / "spec.json").read_text())
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(spec["seed"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                        pad_token=spec["pad_token"], eos_token=spec["eos_token"])
    dtype = spec.get("dtype", "float32")
    as_dtype = {"dtype": getattr(torch, dtype)}
    policy = AutoModelForCausalLM.from_pretrained(directory / "policy", **as_dtype)
    ref = AutoModelForCausalLM.from_pretrained(directory / "policy", **as_dtype)
    value = AutoModelForSequenceClassification.from_pretrained(directory / "value", num_labels=1, **as_dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(directory / "reward", num_labels=1, **as_dtype)
    prompts = spec["prompts"]
    batch, minibatches = len(prompts), spec.get("minibatches", 1)
    if batch % minibatches:
        raise ValueError(f"trl_ppo_runner: {directory / 'spec.json'}: minibatches {minibatches} must divide "
                         f"the {batch} prompts")
    cuda = torch.cuda.is_available()
    dataset = datasets.Dataset.from_dict({"input_ids": prompts})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = PPOConfig(
            output_dir=str(directory / f"trl_out_{epochs}"),
            per_device_train_batch_size=batch,  # TRL 1.9.0: the rollout batch; minibatches split it
            gradient_accumulation_steps=1,
            num_mini_batches=minibatches,
            num_ppo_epochs=epochs,
            total_episodes=batch * (warmup + updates),
            local_rollout_forward_batch_size=batch,
            response_length=spec["response_length"],
            stop_token=None,
            stop_token_id=None,
            temperature=spec["temperature"],
            kl_coef=spec["kl_coef"],
            missing_eos_penalty=None,
            learning_rate=spec["learning_rate"],
            num_sample_generations=0,
            bf16=dtype == "bfloat16",
            fp16=False,
            use_cpu=not cuda,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_strategy="no",
            seed=spec["seed"],
            dataloader_num_workers=0,
        )
    clock = _Clock(lockstep)
    _instrument(clock)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=dataset,
                         eval_dataset=dataset, callbacks=[clock])
    trainer.train()

    iterations = clock.iterations
    if len(iterations) != warmup + updates:
        raise RuntimeError(f"trl_ppo_runner: expected {warmup + updates} iterations, timed {len(iterations)}")
    steady = iterations[warmup:]
    median = {k: statistics.median(it[k] for it in steady) for k in steady[0]}
    return {
        "epochs": epochs, "updates": updates, "warmup": warmup, "batch": batch,
        "seconds_per_iter": median["total"], "cpu_seconds_per_iter": median["cpu"], "split": median,
        "iterations": iterations,
        "versions": {"trl": trl.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "datasets": datasets.__version__},
        "torch_threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": dtype, "minibatches": minibatches,
        "new_tokens_per_iteration": clock.generated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="the directory ppo_step.py wrote")
    parser.add_argument("--epochs", type=int, required=True, help="PPO epochs per iteration")
    parser.add_argument("--updates", type=int, required=True, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--lockstep", action="store_true",
                        help="pause before the first and after every iteration until a line arrives on stdin")
    parser.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    a = parser.parse_args()
    if a.epochs < 1 or a.updates < 1 or a.warmup < 0:
        parser.error("--epochs and --updates must be >= 1, --warmup >= 0")
    a.out.write_text(json.dumps(run(a.directory, a.epochs, a.updates, a.warmup, a.threads, a.lockstep), indent=2) + "\n")


if __name__ == "__main__":
    main()
