"""`{"messages": [...]}` records (`rlhf_jax.data.messages`): SFT targets on assistant turns only
(a hand-computed mask, and each family's template shape), comparisons and prompts rendered by the
template, and errors naming the file, line and field."""

from __future__ import annotations

import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from rlhf_jax.data import (DataError, read_comparisons, read_demonstrations, read_prompts, tokenize_comparisons,
                           tokenize_demonstrations, tokenize_prompts)
from rlhf_jax.data.messages import ChatComparison, ChatDemonstration, ChatPrompt
from rlhf_jax.tokenizer import Tokenizer
from test_chat import CORPUS, FAMILY_TOKENS, GEMMA, LLAMA3
from rlhf_jax.tokenizer import PAD_TOKEN

SIMPLE_CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "<|pad|>", "user", "assistant", "system", "hi", "there",
         "hello", "you", "how", "are", "fine", "thanks", "bad", "good"]
DIALOGUE = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"},
            {"role": "user", "content": "how are"}, {"role": "assistant", "content": "fine thanks"}]


@pytest.fixture(scope="module")
def word_tok():
    """Word-level ChatML tokenizer: every word one token, so masks can be written by hand."""
    hf = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in WORDS[1:4]])
    return Tokenizer(hf, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=SIMPLE_CHATML)


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sft_targets_are_assistant_turns_hand_computed(word_tok, tmp_path):
    records = read_demonstrations(write(tmp_path, "d.jsonl", [{"messages": DIALOGUE}]))
    assert records == [ChatDemonstration(tuple(DIALOGUE))]
    arrays = tokenize_demonstrations(records, word_tok, buckets=(32,))
    words = "<|im_start|> user hi there <|im_end|> <|im_start|> assistant hello you <|im_end|> " \
            "<|im_start|> user how are <|im_end|> <|im_start|> assistant fine thanks <|im_end|>".split()
    n = len(words)
    assert arrays["tokens"][0, :n].tolist() == [WORDS.index(w) for w in words]  # no BOS/EOS added
    assert (arrays["tokens"][0, n:] == word_tok.pad_id).all() and arrays["mask"][0].sum() == n
    #                 <s> user hi there </s> <s> assistant hello you </s>
    expected_mask = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1,
                     0, 0, 0, 0, 0, 0, 0, 1, 1, 1]  # ... fine thanks </s>
    assert arrays["loss_mask"][0, :n].tolist() == expected_mask
    # train_on_prompt: every token
    assert tokenize_demonstrations(records, word_tok, buckets=(32,), train_on_prompt=True)["loss_mask"][0].sum() == n


@pytest.mark.parametrize("template, turn_end", [(LLAMA3, "<|eot_id|>"), (GEMMA, "<end_of_turn>")])
def test_targets_per_family_template(template, turn_end):
    """The target tokens decode to each answer followed by its end-of-turn token (the newline a
    template writes after it is no target), and the ids are the template's own, up to the last
    end of turn."""
    base = Tokenizer.train(CORPUS, vocab_size=320, special_tokens=(PAD_TOKEN, "<|bos|>", "<|eos|>", *FAMILY_TOKENS))
    tok = Tokenizer(base.hf, chat_template=template)
    dialogue = [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "the mat."},
                {"role": "user", "content": "the dog"}, {"role": "assistant", "content": "sat on the log!"}]
    arrays = tokenize_demonstrations([ChatDemonstration(tuple(dialogue))], tok, buckets=(128,))
    n = int(arrays["mask"][0].sum())
    text = tok.apply_chat_template(dialogue)
    assert arrays["tokens"][0, :n].tolist() == tok.encode(text[:text.rindex(turn_end) + len(turn_end)])
    runs, run = [], []
    for t, m in zip(arrays["tokens"][0, :n], arrays["loss_mask"][0, :n]):
        if m:
            run.append(int(t))
        elif run:
            runs, run = [*runs, run], []
    runs += [run] if run else []
    assert [tok.decode(r, skip_special=False) for r in runs] == [f"the mat.{turn_end}", f"sat on the log!{turn_end}"]


def test_comparisons_and_prompts_as_messages(word_tok, tmp_path):
    prefix = DIALOGUE[:3]
    path = write(tmp_path, "c.jsonl", [
        {"messages": prefix, "responses": ["bad", "good", [{"role": "assistant", "content": "fine"}]],
         "ranking": [1, 2, 0]},
        {"messages": prefix, "chosen": "good", "rejected": "bad"},
        {"chosen": [*prefix, {"role": "assistant", "content": "good"}],
         "rejected": [*prefix, {"role": "assistant", "content": "bad"}]},
        {"prompt": prefix, "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
    ])
    records = read_comparisons(path)
    assert all(isinstance(r, ChatComparison) and r.prompt == tuple(prefix) for r in records)
    assert [m[0]["content"] for m in records[0].responses] == ["good", "fine", "bad"]
    assert records[1] == records[2] == records[3]
    arrays = tokenize_comparisons(records, word_tok, k_max=3, max_len=24)
    for k, answer in enumerate(["good", "fine", "bad"]):
        full = word_tok.apply_chat_template([*prefix, {"role": "assistant", "content": answer}], tokenize=True)
        n = int(arrays["mask"][0, k].sum())
        assert arrays["tokens"][0, k, :n].tolist() == full  # ends at <|im_end|>: the score is read there
    assert arrays["valid"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0]]

    prompts = read_prompts(write(tmp_path, "p.jsonl", [{"messages": prefix}, {"messages": DIALOGUE[:1]}]))
    assert prompts[0] == ChatPrompt(tuple(prefix))
    out = tokenize_prompts(prompts, word_tok, max_len=20)
    for row, messages in zip(out["tokens"], (prefix, DIALOGUE[:1])):
        expected = word_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert row[len(row) - len(expected):].tolist() == expected  # left padded, no extra BOS


@pytest.mark.parametrize("reader, record, match", [
    (read_demonstrations, {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
     r"line 2, field 'messages': messages\[1\]\.role: 'robot' is not one of"),
    (read_demonstrations, {"messages": [{"role": "user", "content": 3}]}, r"line 2, field 'messages'.*content"),
    (read_demonstrations, {"messages": [{"role": "user", "content": "a"}]}, r"line 2, field 'messages': no assistant"),
    (read_demonstrations, {"messages": "hi"}, r"line 2, field 'messages': must be a list"),
    (read_demonstrations, {"messages": [{"role": "user", "content": "\ud800"}]}, r"field 'messages\[0\]\.content'"),
    (read_comparisons, {"messages": [{"role": "user", "content": "a"}], "responses": ["x", "y"], "ranking": [0, 0]},
     r"line 2, field 'ranking'"),
    (read_comparisons, {"messages": [{"role": "user", "content": "a"}], "responses": ["x", "y"], "ranking": ["a", 1]},
     r"line 2, field 'ranking'"),
    (read_comparisons, {"messages": [{"role": "user", "content": "a"}], "chosen": "x"}, r"line 2, field 'rejected': missing"),
    (read_comparisons, {"messages": [{"role": "user", "content": "a"}], "chosen": "x", "rejected": " "},
     r"field 'rejected': empty"),
    (read_comparisons, {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     r"field 'chosen': shares no message prefix"),
    (read_prompts, {"messages": []}, r"line 2, field 'messages': empty message list"),
])
def test_bad_records_name_file_line_field(tmp_path, reader, record, match):
    good = {read_demonstrations: {"messages": DIALOGUE}, read_prompts: {"messages": DIALOGUE[:1]},
            read_comparisons: {"messages": DIALOGUE[:1], "chosen": "a", "rejected": "b"}}[reader]
    path = write(tmp_path, "bad.jsonl", [good, record])
    with pytest.raises(DataError, match=match) as e:
        reader(path)
    assert str(path) in str(e.value)


def test_template_errors_name_record(word_tok, tmp_path):
    raising = Tokenizer(word_tok.hf, chat_template="{{ raise_exception('no system here') }}")
    records = read_demonstrations(write(tmp_path, "d.jsonl", [{"messages": DIALOGUE}]))
    with pytest.raises(ValueError, match=r"d\.jsonl, line 1: chat_template raised: no system here"):
        tokenize_demonstrations(records, raising, buckets=(32,))
    with pytest.raises(ValueError, match="unlike record 0"):
        tokenize_demonstrations([*records, *read_demonstrations(write(tmp_path, "p.jsonl", [
            {"prompt": "a", "response": "b"}]))], word_tok, buckets=(32,))


def test_demonstration_prompt(word_tok):
    from rlhf_jax.data import Demonstration, Prompt
    from rlhf_jax.data.messages import demonstration_prompt

    assert demonstration_prompt(word_tok, Demonstration("a b", "c")) == (Prompt("a b"), "a b")
    prompt, text = demonstration_prompt(word_tok, ChatDemonstration(tuple(DIALOGUE)))
    assert prompt == ChatPrompt(tuple(DIALOGUE[:3]))
    assert text == word_tok.apply_chat_template(DIALOGUE[:3], add_generation_prompt=True)


@pytest.mark.slow
def test_stages_on_messages(word_tok, tmp_path):
    """SFT -> RM -> PPO, one step each on a tiny random model, every file in `messages` layouts:
    SFT's held-out greedy samples start with the rendered prompt; the RM trains on message
    comparisons (its normalisation on message demonstrations); PPO samples from message prompts."""
    from conftest import random_params
    from rlhf_jax.configs import load_config
    from rlhf_jax.hf import save_pretrained
    from rlhf_jax.model import ModelConfig, Transformer
    from rlhf_jax.stages.ppo import PPOStageConfig, train_ppo
    from rlhf_jax.stages.reward import RMConfig, train_rm
    from rlhf_jax.stages.sft import SFTConfig, train_sft

    model = Transformer(ModelConfig(arch="llama", vocab_size=len(WORDS), d_model=16, n_layers=1, n_heads=2,
                                    d_ff=32, max_len=64))
    save_pretrained(model, random_params(model, seed=1), tmp_path / "base", tokenizer=word_tok)
    demos = write(tmp_path, "demos.jsonl", [{"messages": DIALOGUE}, {"messages": DIALOGUE[:2]}])
    pairs = write(tmp_path, "pairs.jsonl", [{"messages": DIALOGUE[:3], "chosen": "good", "rejected": "bad"}] * 2)
    prompts = write(tmp_path, "prompts.jsonl", [{"messages": DIALOGUE[:3]}, {"messages": DIALOGUE[:1]}])
    ptx = write(tmp_path, "ptx.jsonl", [{"text": "hi there how are you fine thanks"}] * 4)
    common = [f"model.hf_dir={tmp_path / 'base'}", "batch_size=2", "loop.total_steps=1"]

    sft = train_sft(load_config(SFTConfig, None, [*common, f"workdir={tmp_path / 'sft'}", f"train_data={demos}",
                                                  f"eval_data={demos}", "buckets=[32]", "sample_prompts=1",
                                                  "sample_max_new_tokens=4"]))
    samples = [json.loads(line) for line in (tmp_path / "sft" / "samples.jsonl").read_text().splitlines()]
    prompt = word_tok.apply_chat_template(DIALOGUE[:3], add_generation_prompt=True)
    assert [s["key"] for s in samples] == ["sample_0"] and samples[0]["text"].startswith(prompt)
    rm = train_rm(load_config(RMConfig, None, [*common, f"workdir={tmp_path / 'rm'}", f"train_data={pairs}",
                                               f"demos={demos}", "buckets=[32]"]))
    train_ppo(load_config(PPOStageConfig, None, [
        *common, f"model.hf_dir={sft}", f"workdir={tmp_path / 'ppo'}", f"reward_model={rm}", f"train_data={prompts}",
        f"ptx_data={ptx}", "ptx_batch_size=2", "ptx_seq_len=8", "max_prompt_len=24",
        "ppo.generation.max_new_tokens=4", "ppo.num_minibatches=1"]))
    assert (tmp_path / "ppo" / "model" / "config.json").is_file()
