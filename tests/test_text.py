"""graphrt.text: chat templates rendered exactly as transformers renders them, stop ids, streaming detokenization."""
import json
import random
import shutil
from datetime import datetime

import jinja2
import pytest
from transformers import AutoTokenizer

from graphrt.text import (ChatTemplate, TemplateError, TextStream, chat_template_from_gguf_metadata,
                          generation_eos_ids, load_chat_template, load_tokenizer)

CONVERSATIONS = {
    "one-user": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "  Tell me a joke.\n\n"}],
    "non-ascii": [{"role": "system", "content": "Réponds en français 🙂"},
                  {"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"},
                  {"role": "user", "content": "Merci, ça va ? 👍🏽"}],
}

# A template of the Llama 3.1 Instruct kind, with a role check added so `raise_exception` is exercised.
LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool', 'ipython'] %}
        {{- raise_exception("Unknown role '" + message.role + "' in message " + loop.index0|string) }}
    {%- endif %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
            {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville — 天気",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "名前"}},
                   "required": ["city"]}}}]
TOOL_CHAT = [{"role": "system", "content": "Use tools when needed."},
             {"role": "user", "content": "Quel temps fait-il à Zürich ?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
             {"role": "tool", "content": '{"temp_c": 21, "ciel": "dégagé"}'}]

# Whitespace control (trim_blocks/lstrip_blocks: blocks on their own lines), loop controls, namespace, tojson.
FEATURES = """{% set ns = namespace(users=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.users = ns.users + (1 if m.role == 'user' else 0) %}
    [{{ m.role }}] {{ m.content }}
    {% if ns.users >= 2 %}
        {% break %}
    {% endif %}
{% endfor %}
{{ messages | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, separators=(',', ': ')) }}
{{ dict(x=1) | tojson }}{{ dict.fromkeys(['k'], 0) | tojson(sort_keys=true) }}
{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ tools }}|{{ documents }}|{{ extra }}
{% if add_generation_prompt %}GEN{% endif %}
"""


@pytest.fixture(scope="module")
def hf_smol(default_model):
    return AutoTokenizer.from_pretrained(str(default_model))


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return load_tokenizer(default_model / "tokenizer.json")


def _tok_dir(tmp_path, default_model, config: dict, jinja: str | None = None):
    shutil.copy(default_model / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return tmp_path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, default_model):
    eos = {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "normalized": False,
           "rstrip": False, "single_word": False, "special": True}  # the dict form older configs use
    config = {"chat_template": LLAMA31, "bos_token": "<|begin_of_text|>", "eos_token": eos}
    return _tok_dir(tmp_path_factory.mktemp("llama31"), default_model, config)


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    return AutoTokenizer.from_pretrained(str(llama_dir))


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_smollm2_template_matches_transformers(default_model, hf_smol, name, gen):
    msgs = CONVERSATIONS[name]
    ours = load_chat_template(default_model).render(msgs, add_generation_prompt=gen)
    assert ours == hf_smol.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ("You are a helpful AI assistant named SmolLM" in ours) == (msgs[0]["role"] != "system")


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_llama31_template_matches_transformers(llama_dir, hf_llama, name, gen):
    msgs, template = CONVERSATIONS[name], load_chat_template(llama_dir)
    assert (template.bos_token, template.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    ours = template.render(msgs, add_generation_prompt=gen, date_string="26 Jul 2024")
    assert ours == hf_llama.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                                date_string="26 Jul 2024")
    assert ours.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")


@pytest.mark.parametrize("extra", [{}, {"tools_in_user_message": False}, {"builtin_tools": ["brave_search"]}])
def test_llama31_tools_match_transformers(llama_dir, hf_llama, extra):
    ours = load_chat_template(llama_dir).render(TOOL_CHAT, tools=TOOLS, date_string="1 Jan 2025", **extra)
    theirs = hf_llama.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False, add_generation_prompt=True,
                                          date_string="1 Jan 2025", **extra)
    assert ours == theirs
    assert "天気" in ours and '"Zürich"' in ours  # tojson keeps non-ASCII (ensure_ascii=False)


def test_llama31_strftime_now_matches_transformers(llama_dir, hf_llama):
    msgs = CONVERSATIONS["system"]
    for _ in range(2):  # a second try only if the day changed between the two renders
        day = datetime.now().date()
        ours = load_chat_template(llama_dir).render(msgs)
        theirs = hf_llama.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if datetime.now().date() == day:
            break
    assert ours == theirs
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}\n" in ours


def test_bad_role_raises_in_both(llama_dir, hf_llama):
    msgs = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "boo"}]
    with pytest.raises(jinja2.TemplateError) as theirs:
        hf_llama.apply_chat_template(msgs, tokenize=False, date_string="1 Jan 2025")
    with pytest.raises(TemplateError) as ours:
        load_chat_template(llama_dir).render(msgs, date_string="1 Jan 2025")
    assert isinstance(ours.value, ValueError)
    assert str(ours.value) == str(theirs.value) == "Unknown role 'wizard' in message 1"


@pytest.mark.parametrize("gen", [True, False])
def test_template_features_match_transformers(hf_smol, gen):
    msgs = CONVERSATIONS["non-ascii"] + [{"role": "user", "content": "x", "name": None, "thinking": "hmm"}]
    ours = ChatTemplate(FEATURES, None, "<|im_end|>").render(msgs, add_generation_prompt=gen, extra="Ω")
    theirs = hf_smol.apply_chat_template(msgs, chat_template=FEATURES, tokenize=False,
                                         add_generation_prompt=gen, extra="Ω")
    assert ours == theirs
    assert '"reasoning_content": "hmm"' in ours and "None" in ours  # reasoning aliased, unset tokens empty
    assert '"name"' not in ours and "[user] x" not in ours  # None-valued keys dropped; {% break %} worked


def test_jinja_file_wins_and_named_templates(tmp_path, default_model):
    config = {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                {"name": "default", "template": "{{ eos_token }}{{ messages[0].content }}"}],
              "eos_token": "<e>", "bos_token": "<b>"}
    d = _tok_dir(tmp_path, default_model, config)
    msgs = CONVERSATIONS["one-user"]
    assert load_chat_template(d).render(msgs) == "<e>Hello!"
    assert AutoTokenizer.from_pretrained(str(d)).apply_chat_template(msgs, tokenize=False) == "<e>Hello!"
    (d / "chat_template.jinja").write_text("{{ bos_token }}[{{ messages[-1].content }}]")
    assert load_chat_template(d).render(msgs) == "<b>[Hello!]"
    assert AutoTokenizer.from_pretrained(str(d)).apply_chat_template(msgs, tokenize=False) == "<b>[Hello!]"
    del config["chat_template"][1]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="default"):
        load_chat_template(d)


def test_chatml_fallback(tmp_path, default_model):
    d = _tok_dir(tmp_path, default_model, {"eos_token": "<|im_end|>"})
    msgs = CONVERSATIONS["multi-turn"]
    expect = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    template = load_chat_template(d)
    assert template.source == ChatTemplate.chatml().source and template.eos_token == "<|im_end|>"
    assert template.render(msgs) == expect + "<|im_start|>assistant\n"
    assert template.render(msgs, add_generation_prompt=False) == expect
    assert load_chat_template(tmp_path / "missing").render(msgs, add_generation_prompt=False) == expect
    assert chat_template_from_gguf_metadata(None, "<s>", "</s>") == ChatTemplate.chatml("<s>", "</s>")
    assert chat_template_from_gguf_metadata("{{ bos_token }}!", "<s>", None).render(msgs) == "<s>!"


@pytest.mark.parametrize("messages, error, words", [
    ({"role": "user", "content": "hi"}, TypeError, "list"),
    ([], ValueError, "empty"),
    ([{"role": "user", "content": "hi"}, "hi"], TypeError, "messages[1]"),
    ([{"role": "user"}], ValueError, "'content'"),
    ([{"role": 3, "content": "hi"}], ValueError, "'role'"),
    ([{"role": "user", "content": None}], ValueError, "messages[0]"),
])
def test_bad_messages(messages, error, words):
    with pytest.raises(error) as e:
        ChatTemplate.chatml().render(messages)
    assert words in str(e.value)


def test_broken_template_fails_on_construction():
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", None, None)


@pytest.mark.parametrize("source", [
    "{% set ns = namespace(_x=1) %}", "{% set ns = namespace() %}{% set ns._y = 2 %}",
    "{{ messages.__class__.__mro__ }}", "{{ raise_exception('no: ' + messages[0].role) }}"])
def test_sandbox_and_raise_exception_give_template_errors(source):
    with pytest.raises(TemplateError):
        ChatTemplate(source, None, None).render([{"role": "user", "content": "hi"}])


def test_generation_eos_ids(tmp_path):
    assert generation_eos_ids(tmp_path, (2,)) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 128009, 128008, 2]}))
    assert generation_eos_ids(tmp_path, (128001, 2)) == (128001, 2, 128009, 128008)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "bos_token_id": 1}))
    assert generation_eos_ids(tmp_path, (2, 2, 7)) == (2, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id"):
        generation_eos_ids(tmp_path, (2,))


TEXTS = ["日本の首都は東京です。", "🙂👍🏽 family: 👨‍👩‍👧", "Crème brûlée, naïve façade — Ærøskøbing",
         "The quick brown fox jumps over the lazy dog."]


@pytest.mark.parametrize("with_prompt", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_text_stream_matches_one_shot_decode(tokenizer, text, with_prompt):
    ids = tokenizer.encode(text).ids
    prompt = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").ids if with_prompt else None
    stream = TextStream(tokenizer, prompt)
    pieces = [stream.push(i) for i in ids]
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text and stream.text == text
    assert "\ufffd" not in "".join(pieces) and stream.finish() == ""
    if text.isascii():
        assert all(pieces)
    else:
        assert "" in pieces or text.startswith("Cr")  # CJK and emoji bytes do split across tokens


@pytest.mark.parametrize("skip", [True, False])
def test_text_stream_special_tokens(tokenizer, skip):
    end = tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("Bonjour 🙂").ids + [end] + tokenizer.encode("\nnext").ids
    stream = TextStream(tokenizer, skip_special_tokens=skip)
    text = stream.push_many(ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) != skip and text.startswith("Bonjour 🙂")


def test_text_stream_cut_character_and_random_ids(tokenizer):
    ids = tokenizer.encode("ok 日本の首都").ids
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    stream = TextStream(tokenizer)
    text = stream.push_many(ids[:cut])  # generation stopped inside a character
    assert "\ufffd" not in text and text + stream.finish() == tokenizer.decode(ids[:cut])
    assert stream.text.endswith("\ufffd") and stream.finish() == ""
    rng = random.Random(0)
    ids = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(3000)]
    stream = TextStream(tokenizer)
    text = "".join(stream.push(i) for i in ids)
    assert tokenizer.decode(ids).startswith(text)
    assert text + stream.finish() == tokenizer.decode(ids)


def test_text_stream_falls_back_when_decode_stream_refuses(tokenizer):
    class Refusing:  # what DecodeStream does when a decoder rewrites earlier text (InvalidPrefix)
        def step(self, tokenizer, token_id):
            raise Exception("InvalidPrefix")

    ids = tokenizer.encode("日本の首都は東京です。🙂").ids
    stream = TextStream(tokenizer)
    head = stream.push_many(ids[:3])
    stream._stream = Refusing()
    pieces = [stream.push(i) for i in ids[3:]]
    assert head + "".join(pieces) == tokenizer.decode(ids) and "" in pieces
    assert "\ufffd" not in stream.text and stream.finish() == ""
