"""Text in and out of the model: tokenizer, chat template, stop ids, streaming detokenization.

Chat templates render exactly as transformers' ``apply_chat_template(..., tokenize=False)`` renders them (same
jinja2 sandbox settings, filters, globals and template variables)."""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .config import ConfigError

# Named special tokens transformers passes to every template (when the tokenizer has them set).
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_CHATML = ("{% for message in messages %}"
           "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class TemplateError(ConfigError):
    """A chat template that does not compile, or that refused the conversation (its ``raise_exception``)."""


def load_tokenizer(path: Path | None) -> Tokenizer | None:
    """The tokenizer in ``path`` (a tokenizer.json), or None without one."""
    return Tokenizer.from_file(str(path)) if path is not None else None


def _plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON-like types so the sandbox never sees a rich object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, to_base in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):  # subclasses (enums, numpy scalars, ...): back to the base type
            return to_base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"  # anything else becomes an inert placeholder naming its type


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` refusing underscore-prefixed attribute names."""
    def __init__(*args, **kwargs):
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


def _dict(*args, **kwargs) -> dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without handing them the ``dict`` type."""
    return dict(*args, **kwargs)


_dict.fromkeys = dict.fromkeys


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_dict, namespace=_Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from e


def _check_messages(messages: Any) -> list[dict]:
    """Validate, drop None-valued keys, plain-copy and alias reasoning fields, as transformers does."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat template needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"messages[{i}] needs a str {key!r}, got {m!r}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template and the special-token texts it may use; ``other_tokens`` holds (name, text) pairs for
    unk/sep/pad/cls/mask_token. Compiled on construction, so a broken template fails here (TemplateError)."""
    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    other_tokens: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _compile(self.source)

    @classmethod
    def chatml(cls, bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
        """The ChatML fallback for checkpoints without a template of their own."""
        return cls(_CHATML, bos_token, eos_token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for ``messages``; ``extra`` (tools, documents, date_string, ...) goes to the template.
        As in transformers, tools/documents default to None, unset tokens stay undefined and ``extra`` wins."""
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token, **dict(self.other_tokens)}
        context = {k: v for k, v in tokens.items() if v is not None}
        context.update(tools=None, documents=None)
        context.update(_plain(extra))
        try:
            return _compile(self.source).render(messages=_check_messages(messages),
                                                add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed to render: {e}") from e


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict with "content"."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def load_chat_template(model_dir: Path) -> ChatTemplate:
    """The checkpoint's chat template: ``chat_template.jinja`` if present (newer transformers saves it there), else
    tokenizer_config.json's ``chat_template`` (a string, or a list of {"name", "template"}: "default" is used);
    ChatML when there is none. Special tokens come from tokenizer_config.json, overridden by a legacy
    special_tokens_map.json when the config has no ``added_tokens_decoder`` (transformers' precedence)."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    tokens = {name: _token_text(cfg.get(name)) for name in _NAMED_TOKENS}
    legacy = model_dir / "special_tokens_map.json"
    if "added_tokens_decoder" not in cfg and legacy.is_file():
        tokens.update({k: _token_text(v) for k, v in _read_json(legacy).items() if k in _NAMED_TOKENS})
    bos, eos = tokens.pop("bos_token"), tokens.pop("eos_token")
    other = tuple((k, v) for k, v in tokens.items() if v is not None)
    source = cfg.get("chat_template")
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    elif isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        if "default" not in named:
            raise ConfigError(f"{cfg_path} has several chat templates ({sorted(map(str, named))}) but no 'default'")
        source = named["default"]
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"{cfg_path}: chat_template must be a string or a list of {{name, template}}")
    if not source:
        return ChatTemplate.chatml(bos, eos)
    return ChatTemplate(source, bos, eos, other)


def chat_template_from_gguf_metadata(template: str | None, bos: str | None, eos: str | None) -> ChatTemplate:
    """A GGUF file's ``tokenizer.chat_template`` (with its bos/eos token texts); ChatML when it has none."""
    return ChatTemplate(template, bos, eos) if template else ChatTemplate.chatml(bos, eos)


def generation_eos_ids(model_dir: Path, config_eos: tuple[int, ...]) -> tuple[int, ...]:
    """config.json's eos ids followed by generation_config.json's ``eos_token_id`` (int or list), deduplicated."""
    ids = list(config_eos)
    path = Path(model_dir) / "generation_config.json"
    extra = _read_json(path).get("eos_token_id") if path.is_file() else None
    extra = [extra] if isinstance(extra, int) else (extra or [])
    if not isinstance(extra, list) or any(type(i) is not int for i in extra):
        raise ConfigError(f"{path}: eos_token_id must be an int or a list of ints, got {extra!r}")
    return tuple(dict.fromkeys(ids + extra))


class TextStream:
    """Incremental detokenization on ``tokenizers.decoders.DecodeStream``: ``push`` returns the text each token
    completes, holding back incomplete UTF-8 characters. Pushes concatenate to ``tokenizer.decode(generated_ids)``;
    ``finish()`` adds what a one-shot decode still has (U+FFFD for a character cut off at the end). ``prompt_ids``'
    last tokens are decoding context, so a Metaspace decoder keeps the reply's leading space (byte-level: no change).
    """
    CONTEXT = 8  # prompt tokens of context: more than enough for one character or a leading space

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        ctx = list(prompt_ids or [])[-self.CONTEXT:]
        self._ctx_text = tokenizer.decode(ctx, skip_special_tokens=skip_special_tokens) if ctx else ""
        if self._ctx_text.endswith("\ufffd"):  # prompt ends inside a character: its text cannot be a clean prefix
            ctx, self._ctx_text = [], ""
        self._ctx, self._ids, self._manual = ctx, [], False
        self.text = ""  # everything returned so far
        try:
            self._stream = DecodeStream(ids=ctx, skip_special_tokens=skip_special_tokens)
        except TypeError:  # an older tokenizers without ``ids``: step through the context, dropping its text
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            for i in ctx:
                self._stream.step(tokenizer, i)

    def push(self, token_id: int) -> str:
        """Add one generated token; the newly completed text ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        if not self._manual:
            try:
                new = self._stream.step(self.tokenizer, int(token_id)) or ""
            except Exception:  # DecodeStream refuses decoders that rewrite earlier text: diff full decodes instead
                self._manual = True
        if self._manual:
            full = self._full_text()
            new = "" if full.endswith("\ufffd") or not full.startswith(self.text) else full[len(self.text):]
        self.text += new
        return new

    def push_many(self, ids: Iterable[int]) -> str:
        """``push`` each of ``ids``; their text joined."""
        return "".join(self.push(i) for i in ids)

    def finish(self) -> str:
        """The text a one-shot decode has beyond what was pushed out (a trailing U+FFFD for a cut-off character)."""
        full = self._full_text()
        new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += new
        self._manual = True  # the DecodeStream still holds what was just flushed; diff full decodes from here on
        return new

    def _full_text(self) -> str:
        full = self.tokenizer.decode(self._ctx + self._ids, skip_special_tokens=self.skip_special_tokens)
        return full[len(self._ctx_text):] if full.startswith(self._ctx_text) else full
