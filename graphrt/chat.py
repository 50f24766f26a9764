"""`ChatSession`: a multi-turn conversation whose later turns reuse the KV cache of the earlier ones.

Each turn renders the whole conversation with the checkpoint's chat template, keeps the longest
prefix of tokens whose K/V are already in the cache (row 0, positions 0..n-1), and prefills only the
rest. The last token of a reply was sampled but never fed back, so the cache holds the prompt and the
reply minus its last token.
"""
from __future__ import annotations

from typing import Iterator

from .runtime import Runtime
from .sampling import SamplingParams
from .text import TextStream


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, rt: Runtime, system: str | None = None, max_new_tokens: int = 256,
                 use_graph: bool | None = None, **sampling):
        self.rt, self.max_new_tokens, self.use_graph = rt, max_new_tokens, use_graph
        self.sampling = sampling
        SamplingParams(**sampling)  # validate now, not at the first turn
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []          # tokens whose K/V sit in the cache, from position 0
        self.prefilled: list[int] = []       # tokens prefilled per turn
        self.reused: list[int] = []          # cached tokens reused per turn

    def send(self, content: str) -> Iterator[str]:
        """Add a user message; yields the reply's text as it is generated (the whole reply, also
        when the caller stops early, joins the conversation)."""
        rt = self.rt
        if not isinstance(content, str) or not content.strip():
            raise ValueError("a chat message needs some text")
        messages = self.messages + [{"role": "user", "content": content}]
        ids = rt.encode(rt.apply_chat_template(messages))
        keep = min(common_prefix(self.cached, ids), len(ids) - 1)  # prefill at least one token
        self.prefilled.append(len(ids) - keep)
        self.reused.append(keep)
        self.cached = []  # until this turn is complete, the cache beyond `keep` is in flux
        reply: list[int] = []
        pieces = TextStream(rt.tokenizer, prompt_ids=ids)
        text = []
        try:
            for gained in rt.stream([ids[keep:]], self.max_new_tokens, stop_at_eos=True, start=keep,
                                    use_graph=self.use_graph, **self.sampling):
                reply += gained[0]
                piece = pieces.push_many(gained[0])
                if piece:
                    text.append(piece)
                    yield piece
            rest = pieces.finish()
            if rest:
                text.append(rest)
                yield rest
        finally:
            answer = rt.tokenizer.decode(reply, skip_special_tokens=True)
            self.messages = messages + [{"role": "assistant", "content": answer}]
            self.cached = ids + reply[:-1]

    def reply(self, content: str) -> str:
        return "".join(self.send(content))
