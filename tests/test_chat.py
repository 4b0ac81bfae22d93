"""Chat templates against `transformers`' `apply_chat_template` (text and ids), with templates of
each family's shape written here, and the errors for bad messages and raising templates."""

from __future__ import annotations

import pytest

from conftest import TRANSFORMERS_MISSING
from rlhf_jax.chat import ChatTemplateError, apply_chat_template
from rlhf_jax.tokenizer import PAD_TOKEN, Tokenizer

# ChatML (SmolLM2, Qwen): a default system turn when the chat has none.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3: BOS, header tokens, trimmed content, a date from strftime_now, whitespace control.
LLAMA3 = """{{- bos_token }}
{%- set date_string = strftime_now("%d %b %Y") %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Gemma: <start_of_turn>, assistant renamed to model, no system role, alternation enforced.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Gemma 3: a system message is folded into the first user turn; a conditional expression.
GEMMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# A system-message branch with a namespace, loop controls, tools through tojson, an EOS after
# assistant turns and a {% generation %} block; raises on a tool turn.
BRANCHY = """{%- set ns = namespace(system=none) %}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
{%- endfor %}
{%- if ns.system is not none %}[SYS] {{ ns.system }}
{% elif tools %}[SYS] tools: {{ tools | tojson }}
{% endif %}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% continue %}{% endif %}
  {%- if m.role == 'tool' %}{{ raise_exception('tool turns are not supported at index ' ~ loop.index0) }}{% endif %}
  {%- if m.role == 'assistant' %}[A] {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}
{% else %}[U] {{ m.content }}
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}[A] {% endif %}"""

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "gemma3": GEMMA3, "branchy": BRANCHY}
FAMILY_TOKENS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<start_of_turn>", "<end_of_turn>")
CORPUS = ["the cat sat on the mat.", "the dog sat on the log!", "naïve café — ünïcode ✓"] * 20

CHATS = [
    [{"role": "user", "content": "hi there"}],
    [{"role": "user", "content": "  the cat?  "}, {"role": "assistant", "content": "a dog."},
     {"role": "user", "content": "naïve café ✓\nnew line"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the mat"},
     {"role": "assistant", "content": "sat"}],
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find <x> & \"y\"",
                                             "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory):
    """Factory: template name -> (ours, transformers' tokenizer from our saved directory)."""
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_MISSING)
    base = Tokenizer.train(CORPUS, vocab_size=320,
                           special_tokens=(PAD_TOKEN, "<|bos|>", "<|eos|>", *FAMILY_TOKENS))
    cache = {}

    def get(name):
        if name not in cache:
            tok = Tokenizer(base.hf, chat_template=TEMPLATES[name])
            path = tok.save(tmp_path_factory.mktemp(name)).parent
            cache[name] = tok, transformers.AutoTokenizer.from_pretrained(path)
        return cache[name]

    return get


def render_both(name, chat_tokenizers, chat, **kw):
    tok, ref = chat_tokenizers(name)
    try:
        expected = ref.apply_chat_template(chat, tokenize=False, **kw)
    except Exception as e:  # transformers raises jinja2's TemplateError
        with pytest.raises(ChatTemplateError, match="raised"):
            tok.apply_chat_template(chat, **kw)
        return type(e), None
    ids = ref.apply_chat_template(chat, tokenize=True, **kw)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert tok.apply_chat_template(chat, **kw) == expected
    assert tok.apply_chat_template(chat, tokenize=True, **kw) == ids
    return expected, ids


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("gen", [False, True])
def test_templates_match_transformers(name, gen, chat_tokenizers):
    rendered = []
    for chat in CHATS:
        text, ids = render_both(name, chat_tokenizers, chat, add_generation_prompt=gen)
        rendered.append(text)
    if name == "gemma":  # the system chat raised in both
        assert issubclass(rendered[2], Exception) and "<start_of_turn>model\n" in rendered[1]
    if name == "gemma3":  # the system text opens the first user turn
        assert "<start_of_turn>user\nbe brief\n\nthe mat<end_of_turn>" in rendered[2]
    if name == "branchy":
        tools_text, _ = render_both(name, chat_tokenizers, CHATS[0], add_generation_prompt=gen, tools=TOOLS)
        assert 'Find <x> & \\"y\\"' in tools_text  # tojson does not HTML-escape
        assert "[SYS] be brief" in rendered[2] and "sat<|eos|>" in rendered[2]
    if name in ("chatml", "llama3"):
        tok, _ = chat_tokenizers(name)
        special = {tok.hf.token_to_id(t) for t in FAMILY_TOKENS}
        assert special & set(tok.apply_chat_template(CHATS[0], tokenize=True))  # kept whole


def test_bad_messages():
    for messages, match in [
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
         r"messages\[1\]\.role: 'robot' is not one of system, user, assistant, tool"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content: must be a str, got NoneType"),
        ([{"content": "x"}], r"messages\[0\]\.role: None"),
        (["hi"], r"messages\[0\]: must be a dict"),
        ("hi", r"messages: must be a list"),
    ]:
        with pytest.raises(ChatTemplateError, match=match):
            apply_chat_template(CHATML, messages)


def test_template_errors_name_template_and_message():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    with pytest.raises(ChatTemplateError, match="gemma.jinja raised: System role not supported"):
        apply_chat_template(GEMMA, chat, template_name="gemma.jinja")
    tool_chat = [{"role": "user", "content": "u"}, {"role": "tool", "content": "t"}]
    with pytest.raises(ChatTemplateError, match="chat_template raised: tool turns are not supported at index 1"):
        apply_chat_template(BRANCHY, tool_chat)
    with pytest.raises(ChatTemplateError, match="chat_template: line 1: "):
        apply_chat_template("{% for m in messages %}", chat)
    # The sandbox: inputs are immutable and Python internals are out of reach.
    with pytest.raises(ChatTemplateError, match="raised: "):
        apply_chat_template("{{ messages.append(1) }}", chat)
    with pytest.raises(ChatTemplateError, match="raised: "):
        apply_chat_template("{{ messages.__class__.__subclasses__() }}", chat)


def test_tokenizer_without_template():
    tok = Tokenizer.train(CORPUS, vocab_size=280)
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template(CHATS[0])


@pytest.mark.parametrize("name, turn_end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"),
                                            ("gemma", "<end_of_turn>"), ("gemma3", "<end_of_turn>"),
                                            ("branchy", "<|eos|>")])
def test_stop_ids_from_template_turn_end(name, turn_end, chat_tokenizers, tmp_path):
    """The template's end-of-turn token joins EOS in `stop_ids`; the pad is none of them; the
    saved `generation_config.json` lists them for `transformers`' `generate`."""
    tok, _ = chat_tokenizers(name)
    assert tok.template_turn_end() == turn_end
    expected = tuple(sorted({tok.eos_id, tok.hf.token_to_id(turn_end)}))
    assert tok.stop_ids == expected and tok.pad_id not in tok.stop_ids
    tok.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.stop_ids == expected and loaded.pad_id == tok.pad_id
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_MISSING)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    eos = generation.eos_token_id
    assert sorted(eos if isinstance(eos, list) else [eos]) == list(expected)


def test_no_turn_end_when_template_raises_or_writes_none(chat_tokenizers):
    tok, _ = chat_tokenizers("chatml")
    plain = Tokenizer(tok.hf, chat_template="{% for m in messages %}{{ m.content }}\n{% endfor %}")
    assert plain.template_turn_end() is None and plain.stop_ids == (plain.eos_id,)
    raising = Tokenizer(tok.hf, chat_template="{{ raise_exception('no') }}")
    assert raising.template_turn_end() is None


def test_template_errors_name_the_file(chat_tokenizers, tmp_path):
    """A template read from a file names that file when it raises (`tokenizer_config.json`, or
    `chat_template.jinja`, which wins)."""
    tok, _ = chat_tokenizers("gemma")
    tok.save(tmp_path)
    system = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json raised: System role not supported"):
        Tokenizer.from_file(tmp_path).apply_chat_template(system)
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no ' ~ messages[0].role) }}")
    with pytest.raises(ChatTemplateError, match=r"chat_template\.jinja raised: no system"):
        Tokenizer.from_file(tmp_path).apply_chat_template(system)
