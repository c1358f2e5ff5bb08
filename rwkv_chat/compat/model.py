"""`rwkv.model.RWKV` of the `rwkv` 0.8.32 package, as a thin layer over `rwkv_chat.engine`.

    model = RWKV(model="RWKV-x070-World-0.1B", strategy="cpu fp32")   # ".pth" optional
    out, state = model.forward([510, 33], None)     # out: float32 logits [vocab]; state: a list
    out[0] -= 1e10                                  # logits and states are ordinary tensors
    out, state = model.forward([token], state)      # the list is updated in place and returned

The state is 0.8.32's flat list: per layer `[att_x, aa, bb, pp, ffn_x]` for v4 and
`[att_x, wkv, ffn_x]` for v5.2/v6/v7 (wkv [H, N, N] float32, [h][k][v] for v5.2/v6 and [h][v][k]
for v7), so code that builds or edits states by hand keeps working.

Differences from 0.8.32, on purpose:
- one class for every version (v7 needs no RWKV_V7_ON), and every strategy works for every
  version (v7 int8, layer splits, streaming); `load_state(path)` reads tuned state files;
- logits are always float32 on the CPU (0.8.32 returns them on the head's device, v7 in the
  strategy's dtype);
- `forward(None)` starts from the checkpoint's merged tuned state for every version (0.8.32's
  v7 ignores it); `generate_zero_state()` exists for every version;
- converted files (`convert_model.py`) and `convert_and_save_and_exit` are not needed and are
  refused with a clear error; a bad file or strategy raises an `RWKVChatError` naming it.
"""
from __future__ import annotations

import contextlib
import types

import torch

from ..engine.model import RWKV as EngineRWKV
from ..engine.state import RWKVState
from ..errors import ModelLoadError, StateMismatchError
from ..progress import terminal_bar

_VERSION_NUMBER = {"4": 4, "5.2": 5.2, "6": 6.0, "7": 7}


class RWKV:
    """An RWKV v4 / v5.2 / v6 / v7 model with the `rwkv` 0.8.32 calling conventions."""

    def __init__(self, model: str, strategy: str, verbose: bool = True, convert_and_save_and_exit=None):
        if convert_and_save_and_exit is not None:
            raise ModelLoadError(
                f"{model}: convert_and_save_and_exit is not supported: rwkv-chat loads raw checkpoints "
                "directly under any strategy, so there is nothing to convert"
            )
        with contextlib.ExitStack() as stack:
            progress = stack.enter_context(terminal_bar(model, f"Reading {model}")) if verbose else None
            self.engine = EngineRWKV(model, strategy=strategy, progress=progress)
        engine = self.engine
        self.version = _VERSION_NUMBER[engine.version]
        self.n_layer, self.n_embd = engine.n_layer, engine.n_embd
        self.n_head, self.head_size = engine.n_head, engine.head_size
        self.RESCALE_LAYER = engine.rescale
        self.args = types.SimpleNamespace(
            MODEL_NAME=str(engine.path), strategy_string=engine.strategy,
            n_layer=engine.n_layer, n_embd=engine.n_embd, n_att=engine.n_embd, n_ffn=engine.dims.ffn_dim,
            n_head=engine.n_head, head_size=engine.head_size, vocab_size=engine.vocab_size,
            time_state=engine._initial_wkv is not None,
        )
        self.strategy = [self._layer_strategy(i) for i in range(engine.n_layer + 1)]
        self._template = [t for layer in engine.zero_state().layers for t in layer]
        self._per_layer = len(self._template) // engine.n_layer
        if verbose:
            print(f"Loaded {engine.path} ({engine.shape.describe()}): " + "; ".join(engine.describe_plan()))

    def _layer_strategy(self, i: int) -> types.SimpleNamespace:
        """0.8.32's per-slot plan entry: device, atype (activations), wtype (weights), stream."""
        plan, device = self.engine.plan[i], self.engine.devices[i]
        return types.SimpleNamespace(
            device=device if plan.device == "dml" else plan.device,
            atype=plan.dtype, wtype=torch.uint8 if plan.quant else plan.weight_dtype, stream=plan.stream,
        )

    # ------------------------------------------------------------------ states
    def generate_zero_state(self) -> list[torch.Tensor]:
        """An all-zero state list (v4's pp entries at -1e30)."""
        return self._flat(self.engine.zero_state())

    def load_state(self, path) -> list[torch.Tensor]:
        """A tuned state file (RWKV-PEFT state tuning, v5.2/v6/v7) as a state list for `forward`.
        Not in 0.8.32, whose scripts build the list by hand (and get v7's layout wrong)."""
        return self._flat(self.engine.load_state(path))

    @staticmethod
    def _flat(state: RWKVState) -> list[torch.Tensor]:
        return [t for layer in state.layers for t in layer]

    def _engine_state(self, state: list) -> RWKVState:
        """A flat state list as the engine's state. Tensors on another device or dtype are
        converted; a list of the wrong length or shapes raises StateMismatchError."""
        template = self._template
        if not isinstance(state, (list, tuple)) or len(state) != len(template):
            got = f"a list of {len(state)}" if isinstance(state, (list, tuple)) else type(state).__name__
            raise StateMismatchError(
                f"state must be a list of {len(template)} tensors ({self._per_layer} per layer x "
                f"{self.n_layer} layers) for {self.engine.shape.describe()}, got {got}"
            )
        tensors = []
        for index, (tensor, like) in enumerate(zip(state, template)):
            if not isinstance(tensor, torch.Tensor) or tensor.shape != like.shape:
                shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise StateMismatchError(
                    f"state[{index}] (layer {index // self._per_layer}) is {shape}, expected {list(like.shape)} "
                    f"for {self.engine.shape.describe()}"
                )
            if tensor.dtype != like.dtype or tensor.device != like.device:
                tensor = tensor.to(device=like.device, dtype=like.dtype)
            tensors.append(tensor)
        n = self._per_layer
        return RWKVState(self.engine.shape, [tensors[i : i + n] for i in range(0, len(tensors), n)])

    # ------------------------------------------------------------------ running
    def forward(self, tokens, state, full_output: bool = False):
        """Feed tokens (a list of ids, or one id); return (logits, state). The logits are float32
        [vocab] for the last token, or [T, vocab] with full_output for more than one token (as in
        0.8.32, a single token always gives [vocab]). A given state list is updated in place and
        returned; None starts from the model's initial state."""
        if isinstance(tokens, int):
            tokens = [tokens]
        tokens = [int(t) for t in tokens]
        start = self.engine.initial_state() if state is None else self._engine_state(state)
        logits, new_state = self.engine.forward(tokens, start, full_output=full_output and len(tokens) > 1)
        flat = self._flat(new_state)
        if state is None or not isinstance(state, list):
            return logits, flat
        state[:] = flat
        return logits, state

    def __repr__(self) -> str:
        return f"rwkv_chat.compat.model.RWKV({str(self.engine.path)!r}, strategy={self.engine.strategy!r})"
