"""Tokenizer loading and a ChatML chat template (the format SmolLM2-Instruct and Qwen2 use)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(path: Path | None) -> Tokenizer | None:
    return Tokenizer.from_file(str(path)) if path is not None else None


def default_system_prompt(model_dir: Path) -> str | None:
    """The system message the checkpoint's own chat template inserts when none is given."""
    cfg = Path(model_dir) / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    template = json.loads(cfg.read_text()).get("chat_template") or ""
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
    return m.group(1) if m else None


def chat_prompt(messages: list[dict[str, str]], system: str | None = None) -> str:
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then the assistant's turn."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + messages
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"
