"""GoldReward: the world's gold labeler as a pure reward function inside jit."""

import jax
import numpy as np
import pytest

from rlhf_jax.data import Prompt, tokenize_prompts
from rlhf_jax.tasks import correct_answer, corrupt_answer, gold_score, pretraining_texts, sample_prompts
from rlhf_jax.tasks.gold_reward import GoldReward
from rlhf_jax.tokenizer import Tokenizer


def test_gold_reward_equals_gold_score_of_the_texts():
    rng = np.random.default_rng(0)
    prompts = sample_prompts(rng, 6)
    tokenizer = Tokenizer.train(pretraining_texts(rng, 300) + [p + correct_answer(p) for p in prompts], 300)
    responses = [correct_answer(p) if i % 2 else corrupt_answer(rng, p, 1 + i % 3) for i, p in enumerate(prompts)]
    ended = [i % 3 != 2 for i in range(6)]
    p_len, n = 40, 24
    arrays = tokenize_prompts([Prompt(p) for p in prompts], tokenizer, p_len)
    tokens = np.full((6, p_len + n), tokenizer.pad_id, np.int32)
    mask = np.zeros_like(tokens)
    tokens[:, :p_len], mask[:, :p_len] = arrays["tokens"], arrays["mask"]
    for i, r in enumerate(responses):  # right-padded responses, EOS when ended
        ids = tokenizer.hf.encode(r, add_special_tokens=False).ids + ([tokenizer.eos_id] if ended[i] else [])
        tokens[i, p_len:p_len + len(ids)], mask[i, p_len:p_len + len(ids)] = ids, 1
    reward = GoldReward(tokenizer.decode, tokenizer.eos_id, p_len)
    got = jax.jit(lambda t, m: reward(None, t, m, m.sum(1) - 1))(tokens, mask)
    want = [gold_score(p, tokenizer.decode(tokenizer.hf.encode(r, add_special_tokens=False).ids), e)
            for p, r, e in zip(prompts, responses, ended)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32 and np.sum(np.asarray(want) == 1.0) >= 1
    with pytest.raises(ValueError, match="prompt_len"):
        GoldReward(tokenizer.decode, tokenizer.eos_id, 0)
