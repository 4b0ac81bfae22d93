"""MetricsWriter (JSONL, TensorBoard hook, rewind) and ProgressBar."""

from __future__ import annotations

import io
import json
import logging
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.train import MetricsWriter, ProgressBar


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_converts_and_flushes(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False, is_primary=True)
    record = writer.write(np.int64(3), {"loss": jnp.float32(0.25), "n": np.int32(7), "lr": 1e-3, "ok": np.bool_(True)})
    assert record == {"step": 3, "loss": 0.25, "n": 7, "lr": 1e-3, "ok": 1.0}
    assert type(record["loss"]) is float and type(record["n"]) is int
    writer.write(4, {"loss": 0.5})
    # Readable before close: every write is flushed.
    assert read_jsonl(tmp_path / "metrics.jsonl") == [record, {"step": 4, "loss": 0.5}]
    writer.write_text(4, "sample", "Q: hi\nA: hello")
    assert read_jsonl(tmp_path / "samples.jsonl") == [{"step": 4, "key": "sample", "text": "Q: hi\nA: hello"}]
    assert writer.read() == [record, {"step": 4, "loss": 0.5}]
    writer.close()


def test_non_scalar_metric_is_rejected(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, is_primary=True) as writer:
        with pytest.raises(ValueError, match=r"metric 'loss' must be a scalar, got shape \(2,\)"):
            writer.write(1, {"loss": np.zeros(2)})


def test_non_primary_writes_nothing(tmp_path):
    with MetricsWriter(tmp_path / "run", is_primary=False) as writer:
        assert writer.write(1, {"loss": 1.0}) == {"step": 1, "loss": 1.0}
        writer.write_text(1, "s", "x")
        writer.rewind(0)
        assert writer.read() == []
    assert not (tmp_path / "run").exists()


def test_rewind_drops_later_steps_and_torn_lines(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, is_primary=True) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
            writer.write_text(step, "s", f"t{step}")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss"')  # a crash mid-line
    with MetricsWriter(tmp_path, tensorboard=False, is_primary=True) as writer:
        writer.rewind(3)
        writer.write(4, {"loss": 40.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 3.0},
        {"step": 4, "loss": 40.0},
    ]
    assert [r["text"] for r in read_jsonl(tmp_path / "samples.jsonl")] == ["t1", "t2", "t3"]


def test_tensorboard_when_tensorboardx_is_importable(tmp_path, monkeypatch):
    calls = []

    class FakeSummaryWriter:
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, key, value, step):
            calls.append(("scalar", key, value, step))

        def add_text(self, key, text, step):
            calls.append(("text", key, text, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    with MetricsWriter(tmp_path, is_primary=True) as writer:
        writer.write(2, {"loss": 0.5, "eval/acc": 1.0})
        writer.write_text(2, "sample", "hello")
    assert calls == [
        ("init", str(tmp_path)),
        ("scalar", "loss", 0.5, 2),
        ("scalar", "eval/acc", 1.0, 2),
        ("text", "sample", "hello", 2),
        ("close",),
    ]
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 2, "loss": 0.5, "eval/acc": 1.0}]


def test_jsonl_only_is_logged_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    monkeypatch.setitem(sys.modules, "flax.metrics.tensorboard", None)
    with caplog.at_level(logging.INFO, logger="rlhf_jax.train.metrics"):
        with MetricsWriter(tmp_path, is_primary=True) as writer:
            writer.write(1, {"loss": 1.0})
            writer.write(2, {"loss": 1.0})
    messages = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(messages) == 1 and "metrics.jsonl only" in messages[0]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_bar_lines_without_tty():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(100, "sft", initial=20, interval=10.0, stream=stream, is_primary=True, clock=clock)
    clock.now = 102.0
    bar.update(21, tokens=1000)  # first update prints
    clock.now = 105.0
    bar.update(22, tokens=1000)  # within the interval: silent
    clock.now = 120.0
    bar.update(60, tokens=38000)  # 40 steps in 20 s = 2 steps/s; 40000 tokens / 20 s; 40 steps left
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1] == "sft 60/100 [ 60%] 2.00 steps/s 2,000 tok/s ETA 0:00:20"
    clock.now = 140.0
    bar.update(100)  # the last step always prints
    bar.close()  # already shown: no duplicate line
    assert len(stream.getvalue().splitlines()) == 3
    assert stream.getvalue().splitlines()[-1] == "sft 100/100 [100%] 2.00 steps/s 1,000 tok/s ETA 0:00:00"


def test_progress_bar_redraws_on_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream, clock = Tty(), FakeClock()
    bar = ProgressBar(10, stream=stream, is_primary=True, clock=clock)
    for step in range(1, 4):
        clock.now += 1.0
        bar.update(step)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
    assert text.split("\r")[-1] == "3/10 [ 30%] 1.00 steps/s ETA 0:00:07\n"


def test_progress_bar_silent_off_primary():
    stream = io.StringIO()
    bar = ProgressBar(5, stream=stream, is_primary=False)
    bar.update(5)
    bar.close()
    assert stream.getvalue() == ""


def test_progress_bar_padding_efficiency_and_mfu_by_hand():
    """Two right-padded batches counted by hand: 3 + 1 and 4 + 2 real tokens in [2, 4] masks
    (10 of 16 tokens real: pad 62%); FLOPs over 2 s against a given peak."""
    from rlhf_jax.train.metrics import BatchCount, batch_count

    masks = [np.array([[1, 1, 1, 0], [1, 0, 0, 0]]), np.array([[1, 1, 1, 1], [1, 1, 0, 0]])]
    counts = [batch_count(m) for m in masks]
    assert counts == [BatchCount(4, 8), BatchCount(6, 8)]
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(4, "rm", interval=0.0, stream=stream, is_primary=True, clock=clock, peak_flops=1e6)
    clock.now += 1.0
    bar.update(1, counts[0]._replace(flops=3e5))
    clock.now += 1.0
    bar.update(2, counts[1]._replace(flops=5e5))
    # 10 real of 16 padded tokens; 8e5 FLOPs in 2 s on a 1 MFLOP/s peak = 40%.
    assert stream.getvalue().splitlines()[-1] == (
        "rm 2/4 [ 50%] 1.00 steps/s 5 tok/s pad 62% MFU 40% of 1.0 MFLOP/s ETA 0:00:02")


def test_train_flops_per_token_and_measured_peak():
    """PaLM's 6N + 12·L·H·Q·T against a hand count of the matmul weights, and a positive,
    cached peak."""
    from rlhf_jax.model import ModelConfig
    from rlhf_jax.train.metrics import batch_count, measured_peak_flops, train_flops_per_token

    c = ModelConfig(arch="llama", vocab_size=100, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=16,
                    max_len=32)
    per_layer = 8 * 8 + 8 * 4 * 2 + 8 * 8 + 3 * 8 * 16  # q; k, v (1 kv head of 4); o; SwiGLU
    n = 2 * per_layer + 100 * 8  # + the LM head
    assert train_flops_per_token(c, 10) == 6 * n + 12 * 2 * 2 * 4 * 10
    assert batch_count(np.ones((3, 2, 10)), c).flops == 60 * train_flops_per_token(c, 10)
    peak = measured_peak_flops("float32")
    assert peak > 0 and measured_peak_flops("float32") == peak
