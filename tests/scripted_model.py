"""A stand-in model whose next token is chosen by a rule over the text so far: random weights
write gibberish, so exact format checks (stop strings, chat turns, penalties) need forced text."""
from __future__ import annotations

from collections.abc import Callable

import torch

from rwkv_chat.tokenizer import Tokenizer


class ScriptedState:
    """Stand-in for RWKVState: the whole token history, and the logits after it."""

    def __init__(self, history: tuple[int, ...] = (), logits: torch.Tensor | None = None):
        self.history = history
        self.logits = logits

    @property
    def tokens(self) -> int:
        return len(self.history)


class ScriptedModel:
    """`rule(text_so_far) -> text the model wants to write next`; the model's logits put the first
    token of that text on top (8), `runner_up` second (5) and everything else far below.
    An empty wish puts `idle` on top. `token_rule(history) -> token id` picks the top token
    from the token history instead."""

    vocab_size = 65536

    def __init__(self, tokenizer: Tokenizer, rule: Callable[[str], str] | None = None, *,
                 token_rule: Callable[[tuple[int, ...]], int] | None = None, runner_up: int = 33, idle: int = 34):
        self.tokenizer = tokenizer
        self.rule = rule
        self.token_rule = token_rule
        self.runner_up = runner_up
        self.idle = idle
        self.forward_calls = 0

    def initial_state(self) -> ScriptedState:
        return ScriptedState()

    def forward(self, tokens, state=None):
        self.forward_calls += 1
        history = (state.history if state is not None else ()) + tuple(tokens)
        top = self._next_token(history)
        logits = torch.full((self.vocab_size,), -30.0)
        logits[self.runner_up] = 5.0
        logits[top] = 8.0
        return logits, ScriptedState(history, logits)

    def _next_token(self, history: tuple[int, ...]) -> int:
        if self.token_rule is not None:
            return self.token_rule(history)
        wish = self.rule(self.tokenizer.decode(history))
        return self.tokenizer.encode(wish)[0] if wish else self.idle
