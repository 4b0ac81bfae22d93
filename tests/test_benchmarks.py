"""The benchmark suite's pure pieces (FLOP and byte counts, the roofline bound, the summary's
met / not-met logic, the scaling fit) against hand counts, and its dry runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments.benchmarks.flops import (
    block_matmul_params,
    decode_bound_tokens_per_s,
    decode_matmul_shapes,
    decode_step_bytes,
    decode_step_flops,
    forward_flops,
    head_matmul_params,
    train_step_flops,
)
from experiments.benchmarks.scaling import linear_fit
from experiments.benchmarks.summary import Row, summary_rows
from rlhf_jax.model import ModelConfig, Transformer, fuse_projections, init_params

REPO = Path(__file__).resolve().parents[1]
GPT2 = ModelConfig(arch="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_len=16)
LLAMA = ModelConfig(arch="llama", vocab_size=96, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=80,
                    max_len=16, tie_embeddings=False)


def kernel_sizes(config: ModelConfig) -> tuple[int, int]:
    """(block matmul weights, head weights) read off the real parameter tree: every ``kernel``
    inside a layer, and the unembedding (tied: the token embedding) or the scalar head."""
    shapes = jax.eval_shape(lambda k: init_params(Transformer(config), k), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    names = [(jax.tree_util.keystr(p), int(np.prod(x.shape))) for p, x in flat]
    blocks = sum(n for name, n in names if "layer_" in name and name.endswith("['kernel']"))
    head_key = "score_head" if config.head == "scalar" else ("embed" if config.tie_embeddings else "lm_head")
    head = sum(n for name, n in names if name.startswith(f"['{head_key}']") and not name.endswith("['bias']"))
    return blocks, head


def test_matmul_params_match_hand_count_and_parameter_tree():
    # GPT-2 d=32, 2 layers: q, k, v, o 4·32² + MLP 2·32·128 per layer; tied unembedding 64·32.
    assert block_matmul_params(GPT2) == 2 * (4 * 32 * 32 + 2 * 32 * 128) == 24576
    assert head_matmul_params(GPT2) == 64 * 32
    # Llama GQA: q, o 64·64; k, v 64·(2 heads · 16); SwiGLU 3·64·80; untied head 96·64.
    assert block_matmul_params(LLAMA) == 3 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 80)
    for config in (GPT2, LLAMA, GPT2.replace(head="scalar")):
        assert (block_matmul_params(config), head_matmul_params(config)) == kernel_sizes(config), config


def test_decode_matmul_shapes_are_the_parameter_trees_kernels():
    """Every matmul weight of the decode weights (``fuse_projections`` of the real parameter
    tree), as ``(k, n)`` with a fused kernel's output axes flattened (a tied unembedding is the
    embedding ``[V, d]`` transposed), once per step: the same multiset as ``decode_matmul_shapes``."""
    for config in (GPT2, LLAMA, GPT2.replace(head="scalar")):
        shapes = jax.eval_shape(lambda k, c=config: fuse_projections(init_params(Transformer(c), k), c),
                                jax.random.key(0))
        kernels = []
        for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]:
            name = jax.tree_util.keystr(path)
            if name.endswith("['kernel']") and ("layer_" in name or "head" in name):
                kernels.append((x.shape[0], int(np.prod(x.shape[1:]))))
            elif name == "['embed']['embedding']" and config.tie_embeddings and config.head == "lm":
                kernels.append(tuple(x.shape[::-1]))
        expanded = [(k, n) for k, n, count in decode_matmul_shapes(config) for _ in range(count)]
        assert sorted(expanded) == sorted(kernels), config
        flops = sum(2 * 5 * k * n * count for k, n, count in decode_matmul_shapes(config))
        assert flops == decode_step_flops(config, 5, 0)


def test_forward_and_train_flops_match_hand_count():
    # batch 3, seq 5: 2·(24576 + 2048)·5 per row, plus attention 4·d·layers per (query, key)
    # pair over the causal pairs 1 + 2 + 3 + 4 + 5 = 15.
    per_row = 2 * (24576 + 2048) * 5 + 4 * 32 * 2 * 15
    assert forward_flops(GPT2, 3, 5) == 3 * per_row == 810240
    assert train_step_flops(GPT2, 3, 5) == 3 * 810240
    # one decode step per sequence attending 7 keys
    assert decode_step_flops(GPT2, 3, 7) == 3 * (2 * (24576 + 2048) + 4 * 32 * 2 * 7)


def test_decode_bytes_and_bandwidth_bound():
    # float32 weights (24576 + 2048)·4 bytes; KV: K and V, 2 layers, 2 heads × 16, 10 keys, 4 bytes
    weights, cache = 26624 * 4, 2 * 2 * 2 * 16 * 10 * 4
    assert decode_step_bytes(GPT2, 8, 10) == weights + 8 * cache
    assert decode_step_bytes(GPT2.replace(dtype="bfloat16"), 8, 10, weight_bytes=2) == 26624 * 2 + 8 * cache / 2
    # bandwidth-bound: a vast peak leaves bytes / bandwidth
    r = decode_bound_tokens_per_s(GPT2, 8, 10, peak_flops=1e30, bandwidth=1e9)
    assert r["bound_tok_s"] == pytest.approx(8 * 1e9 / (weights + 8 * cache))
    assert r["bound_tok_s"] == pytest.approx(r["bandwidth_tok_s"])
    # compute-bound: a vast bandwidth leaves FLOPs / peak
    r = decode_bound_tokens_per_s(GPT2, 8, 10, peak_flops=1e9, bandwidth=1e30)
    assert r["bound_tok_s"] == pytest.approx(8 * 1e9 / decode_step_flops(GPT2, 8, 10))
    assert r["intensity"] == pytest.approx(decode_step_flops(GPT2, 8, 10) / (weights + 8 * cache))


def test_summary_met_logic():
    faster = Row("b", "tok/s", ours=300.0, peer=100.0, target=2.5, unit="tok/s")
    assert faster.ratio == 3.0 and faster.met is True
    assert Row("b", "tok/s", ours=200.0, peer=100.0, target=2.5).met is False
    # seconds: lower is better, the ratio is peer / ours
    slower = Row("b", "s/it", ours=4.0, peer=5.0, target=1.5, unit="s", higher_is_better=False)
    assert slower.ratio == 1.25 and slower.met is False
    assert Row("b", "s/it", ours=2.0, peer=5.0, target=1.5, higher_is_better=False).met is True
    # a target on our own number (a fraction of peak), with or without a peer
    assert Row("b", "mfu", ours=0.41, peer=0.9, target=0.40, target_on="ours").met is True
    assert Row("b", "mfu", ours=0.39, target=0.40, target_on="ours").met is False
    # a ceiling on our own number (seconds): met when at or below it
    ceiling = Row("b", "s/it", ours=0.7, target=0.8, target_on="ours", unit="s", higher_is_better=False)
    assert ceiling.met is True and ceiling.cells()[-2:] == ["≤ 0.8 s", "yes"]
    assert Row("b", "s/it", ours=0.9, target=0.8, target_on="ours", unit="s", higher_is_better=False).met is False
    # nothing to compare: n/a, never "yes"; no target: no verdict
    missing = Row("b", "s/it", ours=2.0, peer=None, target=1.5, higher_is_better=False)
    assert missing.met is None and missing.cells()[-1] == "n/a"
    assert Row("b", "x", ours=1.0, peer=1.0).met is None
    assert faster.cells() == ["b", "tok/s", "300 tok/s", "100 tok/s", "3.00×", "≥ 2.5×", "yes"]


def test_summary_rows_from_benchmark_json():
    ppo = {"results": [{"epochs": 1, "ours": {"seconds_per_iter": 2.0}, "trl": {"seconds_per_iter": 6.0}},
                       {"epochs": 4, "ours": {"seconds_per_iter": 5.0}, "trl": None}]}
    train = {"results": [{"key": "small", "kind": "sft", "sides": [
        {"label": "ours", "seconds": 1.0, "tokens_per_s": 900.0, "mfu": 0.30},
        {"label": "ours ×2dev", "seconds": 0.7, "tokens_per_s": 1300.0, "mfu": 0.45},
        {"label": "torch ×2thr", "seconds": 1.5, "tokens_per_s": 600.0, "mfu": 0.2},
        {"label": "torch ×1thr", "seconds": 0.9, "tokens_per_s": 1000.0, "mfu": 0.35}]}]}
    gpu_peer = {"shape_name": "llama-1b", "bench": {"arch": "llama", "n_layers": 22, "d_model": 2048,
                                                     "dtype": "bfloat16", "minibatches": 4},
                "results": [{"epochs": 1, "ours": {"seconds_per_iter": 1.5, "split": {"gen": 0.5}},
                             "trl": {"seconds_per_iter": 9.0, "split": {"gen": 6.0}}}]}
    iteration, generation = summary_rows({"ppo_step_gpu": gpu_peer})
    # issue 18 item 5: ≥ 5× TRL per iteration on the GPU, and the generation ratio printed (no target)
    assert (iteration.ratio, iteration.target, iteration.met) == (6.0, 5.0, True)
    assert "4 minibatches" in iteration.metric and iteration.benchmark == "ppo_step_gpu"
    assert (generation.ratio, generation.target) == (12.0, None) and "transformers.generate" in generation.metric
    rows = summary_rows({"ppo_step": ppo, "train_step": train})
    assert [(r.ratio, r.met) for r in rows[:2]] == [(3.0, True), (None, None)]  # TRL skipped: n/a
    speed, mfu = rows[2:]
    # our fastest side against torch's fastest thread setting
    assert "ours ×2dev" in speed.metric and "torch ×1thr" in speed.metric
    assert speed.ratio == pytest.approx(1.3) and speed.met is True
    assert mfu.ours == 0.45 and mfu.met is True
    roof = {"decode": [{"model": "tiny", "batch": 32, "step_s": 0.006, "tok_s": 5333.0,
                        "bound": {"bound_tok_s": 8000.0}, "matmuls": {"xla_s": 0.003, "torch_s": 0.002}}]}
    bound, matmuls = summary_rows({"roofline": roof})
    assert bound.ratio == pytest.approx(5333.0 / 8000.0)
    # the step against its matmuls alone: half of it would be matmuls at XLA's rate
    assert matmuls.ratio == pytest.approx(0.5) and matmuls.cells()[2:4] == ["6.00 ms", "3.00 ms"]
    # with the attention timed too: the step against its kernel floor, issue 18's ≤ 1.5× for tiny at batch 32
    floor = summary_rows({"roofline": {"decode": [{**roof["decode"][0], "floor_s": 0.004}]}})[2]
    assert floor.ours == pytest.approx(1.5) and floor.met is True and floor.cells()[5] == "≤ 1.5"
    assert summary_rows({"roofline": {"decode": [{**roof["decode"][0], "floor_s": 0.0035}]}})[2].met is False
    # the rows split over host devices: each form against the floor and against the floor split alike
    split = {"devices": 2, "cache_block": 16, "step": {"step_s": 0.0055}, "blocked": {"step_s": 0.005},
             "floor_s": 0.003}
    rows = summary_rows({"roofline": {"decode": [{**roof["decode"][0], "floor_s": 0.004, "split": split}]}})[3:]
    assert [(r.metric.split(": ")[1], round(r.ours, 4), r.met) for r in rows] == [
        ("the same on 2 host devices", 1.375, True),
        ("the same on 2 host devices ÷ the floor split alike", 1.8333, False),
        ("the same, cache_block=16 on 2 host devices", 1.25, True),
        ("the same, cache_block=16 on 2 host devices ÷ the floor split alike", 1.6667, False)]


def test_linear_fit():
    fit = linear_fit([8, 16, 32, 64], [1.0 + 0.5 * x for x in (8, 16, 32, 64)])
    assert fit["slope"] == pytest.approx(0.5) and fit["intercept"] == pytest.approx(1.0) and fit["r2"] == pytest.approx(1.0)
    assert linear_fit([1, 2, 3, 4], [1.0, 4.0, 9.0, 16.0])["r2"] < 0.99


def _suite(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks", *args, "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "=== summary" in proc.stdout
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_cpu_suite_dry_run_end_to_end(tmp_path):
    """Every CPU benchmark wired: ours run with micro shapes (JSON written), the peers' scripts
    parse their command line; a missing TRL interpreter does not fail a dry run."""
    record = _suite(tmp_path, "--suite", "cpu", "--quick", "--trl-python", str(tmp_path / "no-python"))
    status = {name: s["status"] for name, s in record["steps"].items()}
    assert status == {"generation": "checked", "train_step": "ok", "ppo_step": "checked", "roofline": "ok",
                      "scaling": "ok"}
    out = tmp_path / "out"
    for name in ("train_step", "roofline", "scaling"):
        assert json.loads((out / f"{name}.json").read_text())
    assert (out / "scaling.png").stat().st_size > 0
    roof = json.loads((out / "roofline.json").read_text())["decode"]
    # batch 32 also split over the host devices (one per core by default), batch 1 cannot be
    assert [r["batch"] for r in roof] == [1, 32] and roof[0]["split"] is None
    if (os.cpu_count() or 1) > 1:
        split = roof[1]["split"]
        assert split["devices"] == os.cpu_count() and split["step"]["step_s"] > 0 and split["blocked"]["step_s"] > 0
        assert split["floor_s"] == pytest.approx(split["matmuls_s"] + split["attention_s"])
    train = json.loads((out / "train_step.json").read_text())
    assert [r["kind"] for r in train["results"]] == ["sft", "rm"]
    for r in train["results"]:  # ours and the torch peer, whose first two losses matched
        labels = [side["label"] for side in r["sides"]]
        assert labels[0] == "ours" and len(labels) > 1 and all(x.startswith("torch") for x in labels[1:]), labels
        for side in r["sides"][1:]:
            np.testing.assert_allclose(side["first_losses"], r["sides"][0]["first_losses"], rtol=1e-4)
    assert any(r["benchmark"] == "scaling" for r in record["summary"])


TRL_PYTHON = os.environ.get("TRL_PYTHON", "/work/trl-venv/bin/python")


@pytest.mark.slow
@pytest.mark.skipif(not Path(TRL_PYTHON).exists(), reason=f"no TRL 1.9.0 interpreter at {TRL_PYTHON} (set TRL_PYTHON; "
                    "experiments/benchmarks/README.md, 'The TRL virtualenv')")
def test_gpu_suite_trl_peer_dry_run_on_cpu(tmp_path):
    """The GPU suite's TRL peer (ppo_step's llama-1b path) with micro shapes on the CPU: both
    sides run the Llama in bf16 with 2 minibatches, TRL samples every token, and the summary has
    the iteration (issue 18's ≥ 5× target) and generation rows."""
    record = _suite(tmp_path, "--suite", "gpu", "--only", "ppo_step_gpu", "--trl-python", TRL_PYTHON)
    assert {n: s["status"] for n, s in record["steps"].items()} == {"ppo_step_gpu": "ok"}
    peer = json.loads((tmp_path / "out" / "ppo_step_gpu.json").read_text())
    assert peer["shape_name"] == "micro-llama" and peer["bench"]["minibatches"] == 2
    (result,) = peer["results"]
    trl = result["trl"]
    assert trl["versions"]["trl"] == "1.9.0" and (trl["dtype"], trl["minibatches"]) == ("bfloat16", 2)
    assert trl["new_tokens_per_iteration"] == [peer["bench"]["new"]] * 2  # warm-up + 1 timed, no early stop
    assert result["ours"]["split"]["gen"] > 0 and trl["split"]["gen"] > 0
    rows = [r for r in record["summary"] if r["benchmark"] == "ppo_step_gpu"]
    assert [r["target"] for r in rows] == [5.0, None] and all(r["ratio"] for r in rows)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent does not)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_run_step_kills_the_step_and_what_it_started_at_its_timeout(tmp_path):
    """A step past its timeout is killed with its children (ppo_step's TRL runner), and says so
    by returning None; one that ends in time returns its exit code."""
    from experiments.benchmarks.__main__ import run_step

    parent = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "  # not holding the step's output open
              "print('pid', child.pid, flush=True); time.sleep(120)")
    log = tmp_path / "step.log"
    assert run_step([sys.executable, "-c", parent], log, dict(os.environ), timeout_s=3.0) is None
    child = next(int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("pid "))
    for _ in range(50):  # the killed child is reaped by whoever adopted it
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)
    assert run_step([sys.executable, "-c", "import sys; sys.exit(3)"], log, dict(os.environ), timeout_s=60.0) == 3


@pytest.mark.slow
def test_suite_time_limit_keeps_what_was_measured(tmp_path):
    """``--time-limit-s``: gpu_check's dry run is cut off mid-run (status ``timeout``), the TRL
    peer after it is skipped for the spent time, and the summary is still written."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks", "--suite", "gpu", "--dry-run",
                           "--time-limit-s", "8", "--trl-python", str(tmp_path / "no-python"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "summary.json").read_text())
    assert record["steps"]["gpu_check"]["status"] == "timeout"
    assert record["steps"]["gpu_check"]["seconds"] < 60  # killed, not run to its end
    assert record["steps"]["ppo_step_gpu"] == {"status": "skipped", "reason": "the suite's time limit (8 s) is spent"}


@pytest.mark.slow
def test_gpu_suite_dry_run_on_cpu(tmp_path):
    """The GPU suite's gpu_check (scanned layers, bf16, SFT / decode sweep / PPO-ptx with its
    phase split / blocked decode) with micro shapes on the CPU, and its summary rows with issue
    18's targets."""
    record = _suite(tmp_path, "--suite", "gpu", "--trl-python", str(tmp_path / "no-python"))
    # without TRL's interpreter the TRL peer is skipped, with the reason
    assert {n: s["status"] for n, s in record["steps"].items()} == {"gpu_check": "ok", "ppo_step_gpu": "skipped"}
    assert "no TRL interpreter" in record["steps"]["ppo_step_gpu"]["reason"]
    check = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert check["errors"] == {} and check["skipped"] == [], (check["errors"], check["skipped"])
    assert check["config"]["scan_layers"] and check["config"]["dtype"] == "bfloat16"
    # the headline batch and the sweep unrolled (the default), then batch 4 compiled with XLA's
    # command buffers (an option the CPU ignores), with the cache in blocks of new / 2, and scanned;
    # every part timed, in the order run
    assert [(d["batch"], d["scan_decode"], d["cache_block"], bool(d["compiler_options"])) for d in check["decode"]] \
        == [(4, False, 0, False), (2, False, 0, False), (4, False, 0, True), (4, False, 4, False), (4, True, 0, False)]
    assert list(check["part_s"]) == ["sft[auto,none]", "decode[4]", "ppo", "decode[2]", "ppo_phases",
                                     "decode[4,command_buffers]", "ppo[command_buffers]", "sft[auto,none,packed]",
                                     "decode[4,cache_block=4]", "decode[4,scan_decode=True]"]
    # the SFT rows right padded (the cuDNN attention masks them by lengths), then the same rows as
    # packed segments (a bias), at the same loss
    assert (check["sft"]["rows"], check["sft_packed"]["rows"]) == ("right padded", "packed")
    # the PPO iteration compiled again under the command buffers, from the state the first one left
    graphs = check["ppo"]["command_buffers"]
    assert graphs["compiler_options"] and graphs["iteration_s"] > 0 and np.isfinite(graphs["kl"])
    assert check["sft_packed"]["loss"] == pytest.approx(check["sft"]["loss"], rel=1e-3)
    assert check["setup_s"] > 0 and all(s > 0 for s in check["part_s"].values())
    assert set(check["ppo"]["phases_s"]) == {"rollout", "experience", "update"}
    # the SFT step and the unrolled decode profiled (on a CPU: XLA:CPU's ops on the host)
    profiled = [check["sft"]["profile"]] + [d["profile"] for d in check["decode"] if "profile" in d]
    assert len(profiled) == 2 and all(p["mode"] == "host" and p["calls"] == 1 for p in profiled)
    for p in profiled:
        assert 0 < p["busy_s"] <= p["wall_s"] and p["by_category"]["matmul"] > 0 and p["top"]
    metrics = [r["metric"] for r in record["summary"]]
    for needle in ("SFT step", "fraction of the HBM bound", "PPO-ptx iteration", "PPO-ptx iteration: compile",
                   "PPO phase rollout", "given as packed (a bias)", "XLA command buffers vs the default compile"):
        assert any(needle in m for m in metrics), (needle, metrics)
    assert sum(r["target"] is not None for r in record["summary"]) == 4
    # the device named in the summary; the CPU keeps no allocator figures, so no part has any
    assert record["device_kinds"] == ["cpu"] and check["memory"] == {}
    # the memory plan of the SFT step and the PPO iteration, set beside the measured peak on a GPU
    assert check["sft"]["plan_gib"] > 0 and check["ppo"]["plan_gib"] > check["sft"]["plan_gib"]
    for part in ("sft", "ppo"):  # XLA's own buffer assignment of the compiled programs, the state donated
        compiled = check[part]["compiled_gib"]
        assert compiled["argument"] > 0 and compiled["temp"] > 0 and 0 < compiled["alias"] <= compiled["argument"]


def test_gpu_check_allocator_gib():
    """``allocator_gib``: the allocator's bytes as GiB under our names, the keys a backend lacks
    left out, and ``None`` where it keeps no figures (the CPU here, and an empty dict)."""
    from experiments.benchmarks.gpu_check import allocator_gib

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    stats = {"bytes_in_use": 3 * 2**30, "peak_bytes_in_use": 2**32 + 2**29, "bytes_limit": 72 * 2**30,
             "num_allocs": 7}
    assert allocator_gib(Device(stats)) == {"in_use": 3.0, "peak": 4.5, "limit": 72.0}
    assert allocator_gib(Device({"bytes_in_use": 2**29})) == {"in_use": 0.5}
    assert allocator_gib(Device({})) is None and allocator_gib(Device(None)) is None
    assert allocator_gib() is None  # jax's CPU devices return no memory_stats


def test_gpu_check_records_memory_per_part_and_drops_the_ppo_state(tmp_path, monkeypatch):
    """``gpu_check.main``'s orchestration with its measurements replaced by stand-ins: every part,
    a failing one too, gets the device memory read after it, and the PPO state is gone before the
    packed SFT rows run."""
    import gc
    import weakref

    from experiments.benchmarks import gpu_check

    class PPOState:  # stands in for the two 1.1B models with their Adam moments
        pass

    held: list[weakref.ref] = []
    alive_at_packed: list[bool] = []

    def sft(config, params, shapes, peak, repeats, profiled=False, packed=False):
        if packed:
            gc.collect()
            alive_at_packed.append(held[0]() is not None)
        return {"step_s": 1.0, "loss": 0.0, "rows": "packed" if packed else "right padded"}

    def ppo(config, params, shapes, peak, bandwidth):
        state = PPOState()
        held.append(weakref.ref(state))
        return {"iteration_s": 1.0, "floors_s": {}, "run": state}

    def decode(config, params16, batch, shapes, bandwidth, repeats, profiled=False, compiler_options=None):
        if compiler_options:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return {"batch": batch, "step_s": 1e-3}

    reads = iter(range(1, 100))
    monkeypatch.setattr(gpu_check, "sft_check", sft)
    monkeypatch.setattr(gpu_check, "ppo_check", ppo)
    monkeypatch.setattr(gpu_check, "ppo_phases", lambda run, floors: {"phases_s": {"rollout": 1.0}})
    monkeypatch.setattr(gpu_check, "ppo_recompiled", lambda run, options: {"iteration_s": 0.5})
    monkeypatch.setattr(gpu_check, "decode_check", decode)
    monkeypatch.setattr(gpu_check, "allocator_gib", lambda: {"in_use": float(next(reads)), "limit": 72.0})
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")  # main sets it only where unset
    gpu_check.main(["--dry-run", "--json", str(tmp_path / "check.json")])
    check = json.loads((tmp_path / "check.json").read_text())
    assert list(check["memory"]) == list(check["part_s"]) == [
        "sft[auto,none]", "decode[4]", "ppo", "decode[2]", "ppo_phases", "decode[4,command_buffers]",
        "ppo[command_buffers]", "sft[auto,none,packed]", "decode[4,cache_block=4]", "decode[4,scan_decode=True]"]
    assert [m["in_use"] for m in check["memory"].values()] == list(range(1, 11))
    assert list(check["errors"]) == ["decode[4,command_buffers]"]
    assert alive_at_packed == [False]
    assert check["sft"]["memory"] == {"in_use": 1.0, "limit": 72.0}  # the part's result carries its reading


def test_gpu_check_summary_sets_the_measured_peak_against_the_plan():
    sft = {"batch": 8, "seq": 2048, "attention_impl": "auto", "remat_policy": "none", "mfu": 0.4, "compile_s": 7.0,
           "step_s": 0.3, "plan_gib": 43.8}
    rows = {r.metric: r for r in summary_rows({"gpu_check": {"sft": {**sft, "memory": {"peak": 40.0}}}})}
    row = next(r for m, r in rows.items() if "memory plan" in m)
    assert (row.ours, row.peer, row.ratio) == (40.0, 43.8, pytest.approx(43.8 / 40.0))  # > 1: the plan bounds it
    assert not any("memory plan" in r.metric for r in summary_rows({"gpu_check": {"sft": sft}}))  # a CPU: no peak


def test_profile_summary_device_kernels_by_call():
    """A hand-made GPU trace: kernels on the device's Stream line only (a derived line repeats
    them), inside the profiled calls' windows only, overlaps counted once in the busy time."""
    from experiments.benchmarks.profile_summary import CALL, category, summarize

    def x(pid, tid, name, ts, dur, **args):
        return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur, "args": args}

    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 10, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 11, "name": "thread_name", "args": {"name": "XLA Ops"}},
        x(1, 5, CALL, 0, 100), x(1, 5, CALL, 200, 100),
        x(2, 10, "sm90_xmma_gemm_bf16", 10, 30, hlo_op="custom-call.1"),
        x(2, 10, "loop_add_fusion", 30, 20, hlo_op="add_fusion"),
        x(2, 10, "cudnn_flash_fprop", 210, 50, hlo_op="custom-call.2"),
        x(2, 10, "loop_add_fusion", 150, 10, hlo_op="add_fusion"),  # between the calls: not counted
        x(2, 11, "sm90_xmma_gemm_bf16", 10, 30),  # the derived line's copy: not counted
        x(1, 5, "loop_add_fusion", 10, 5, hlo_op="add_fusion"),  # a host event: not a kernel here
    ]
    s = summarize(events)
    assert (s["mode"], s["calls"], s["kernels_per_call"]) == ("device", 2, 1.5)
    assert s["wall_s"] == pytest.approx(100e-6) and s["busy_s"] == pytest.approx(45e-6)  # (40 + 50) / 2
    assert s["busy_fraction"] == pytest.approx(0.45)
    assert s["by_category"] == pytest.approx({"attention": 25e-6, "matmul": 15e-6, "fusion/other": 10e-6})
    assert [k["name"] for k in s["top"]] == ["cudnn_flash_fprop", "sm90_xmma_gemm_bf16", "loop_add_fusion"]
    # without a device process: the host's HLO-op events are the kernels
    host = summarize([e for e in events if e.get("pid") == 1])
    assert host["mode"] == "host" and host["kernels_per_call"] == 0.5 and host["busy_s"] == pytest.approx(2.5e-6)
    names = ["ynn_fusion", "dot.3", "copy.2", "ncclDevKernel_AllReduce", "input_reduce_fusion"]
    assert [category(n) for n in names] == ["matmul", "matmul", "copy", "collective", "fusion/other"]
    with pytest.raises(ValueError, match="profile_summary.call"):
        summarize(events[:4])
