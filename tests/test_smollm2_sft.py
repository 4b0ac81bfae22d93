"""Issue 16's done-when: `rlhf-jax sft` on SmolLM2-135M-Instruct (the GGUF, as a Hugging Face
directory by `rlhf-jax fetch smollm2 --hf-dir`) with `messages` data writes `model/`, which
`transformers` loads with the same logits as ours, the same tokenizer ids, pad and stop ids, and
`rlhf-jax generate` answers from."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TRANSFORMERS_MISSING

DIALOGUES = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "6."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome."}],
]


@pytest.mark.slow
def test_sft_on_smollm2_with_messages_exports_hf_dir(smollm2_gguf, tmp_path, capsys):
    torch = pytest.importorskip("torch", reason=TRANSFORMERS_MISSING)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_MISSING)
    from rlhf_jax.cli import main
    from rlhf_jax.hf import load_pretrained
    from rlhf_jax.model import forward
    from rlhf_jax.tokenizer import Tokenizer

    base = tmp_path / "base"
    assert main(["fetch", "smollm2", "--dir", str(smollm2_gguf.parent), "--hf-dir", str(base)]) == 0
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": d}) + "\n" for d in DIALOGUES))
    config = {
        "workdir": str(tmp_path / "sft"), "model": {"hf_dir": str(base), "scan_layers": True},
        "train_data": str(data), "batch_size": 2, "max_len": 96, "buckets": [96],
        "optimizer": {"lr": 1e-4, "schedule": "constant"}, "loop": {"total_steps": 2}, "sample_prompts": 0,
    }
    (tmp_path / "sft.json").write_text(json.dumps(config))
    assert main(["sft", "--config", str(tmp_path / "sft.json")]) == 0

    out = tmp_path / "sft" / "model"
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = Tokenizer.from_file(out)
    # The pad decision: a spare special token, no stop id, inside the embedding, everywhere.
    assert (tok.pad_id, tok.stop_ids, tok.vocab_size) == (0, (2,), 49152)
    assert (ref.config.pad_token_id, ref_tok.pad_token_id, len(ref_tok)) == (0, 0, ref.config.vocab_size)
    model, params = load_pretrained(out)
    text = tok.apply_chat_template(DIALOGUES[1][:4], add_generation_prompt=True)
    assert ref_tok.apply_chat_template(DIALOGUES[1][:4], add_generation_prompt=True, tokenize=False) == text
    ids = np.array([tok.encode(text)])
    assert ref_tok.encode(text, add_special_tokens=False) == ids[0].tolist()
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(forward(model, params, ids, np.ones_like(ids)).logits)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    capsys.readouterr()
    assert main(["generate", "--set", f"model={out}", "--set", "user=What is 2+2?", "--set", "max_new_tokens=12"]) == 0
    assert capsys.readouterr().out.strip()  # `rlhf-jax generate` answers from the exported model
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in steps)
