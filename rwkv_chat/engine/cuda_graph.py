"""Single-token decode replayed from a captured CUDA graph (the whole model on one CUDA device).

An eager decode step launches a few thousand small kernels from Python, one after another; at
batch size one the GPU mostly waits for Python. Capturing the step once in a CUDA graph and
replaying it launches the same kernels in one call.

    step = make_decode_step(model)      # warms up and captures once (a second or so)
    step.reset(state)                   # start from a state (None: model.initial_state())
    logits = step(token)                # float32 [vocab] on the GPU, a static buffer that the next
                                        # call overwrites: .cpu() or .clone() what you keep
    state = step.state()                # an independent RWKVState (logits on the CPU, like forward)

The step keeps its recurrent state in its own static buffers and advances it in place, so a
generation loop copies nothing per token; `state()` and `reset()` move states in and out. The math
is the engine's own (`model._module.block` layer by layer, the fp16 rescale, ln_out and the head),
exactly what `model.forward` runs for one token. `make_decode_step(model, use_graph=False)` runs
the same step eagerly on any device; the CPU tests compare it with `model.forward`.

Importing this module needs no GPU and does nothing.
"""
from __future__ import annotations

import torch

from ..errors import TokenError
from .common import layer_norm
from .state import RWKVState


def graph_unsupported_reason(model) -> str | None:
    """Why `model` cannot be captured in a CUDA graph, or None when it can."""
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    devices = {str(d) for d in model.devices}
    if len(devices) != 1 or torch.device(next(iter(devices))).type != "cuda":
        return f"the strategy places the model on {', '.join(sorted(devices))}; a graph needs it all on one GPU"
    if any(plan.stream for plan in model.plan):
        return "streamed layers (*N+) copy their weights from host memory for every token"
    return None


def make_decode_step(model, *, use_graph: bool = True, warmup: int = 2) -> "DecodeStep":
    """A callable one-token decode step for `model` (see the module docstring). With use_graph,
    raises ValueError when the model cannot be captured (`graph_unsupported_reason`) and
    RuntimeError when the capture itself fails."""
    return DecodeStep(model, use_graph=use_graph, warmup=warmup)


class DecodeStep:
    """Static input/output buffers around one decode step, optionally replayed from a CUDA graph."""

    def __init__(self, model, *, use_graph: bool = True, warmup: int = 2):
        if use_graph:
            reason = graph_unsupported_reason(model)
            if reason is not None:
                raise ValueError(f"cannot capture a CUDA graph of this model: {reason}")
        self.model = model
        self.device = model.devices[0]
        self._graph: torch.cuda.CUDAGraph | None = None
        with torch.inference_mode():
            self._state = model.zero_state()  # its tensors are the static state buffers
            self._x = torch.zeros(1, model.n_embd, dtype=model.emb.dtype, device=self.device)  # embedded token
            self._logits = torch.zeros(model.vocab_size, dtype=torch.float32, device=model.devices[-1])
        self._staging = None  # pinned host copy of the embedded token (graph mode)
        self._copied = None  # event: the staging row has reached the GPU
        self._tokens = 0
        self._logits_valid = False
        self._reset_logits = None
        if use_graph:
            self._staging = torch.zeros(1, model.n_embd, dtype=model.emb.dtype).pin_memory()
            self._copied = torch.cuda.Event()
            self._capture(warmup)
        self.reset(None)

    @property
    def uses_graph(self) -> bool:
        return self._graph is not None

    # ------------------------------------------------------------------ the step itself
    def _body(self) -> None:
        """One token through every layer: reads self._x and the state buffers, writes the state
        buffers and self._logits. Mirrors RWKV.forward for a single token."""
        m = self.model
        x = self._x
        v_first = None
        for i, (weights, layer_state) in enumerate(zip(m.layers, self._state.layers)):
            plan, device = m.plan[i], m.devices[i]
            x = x.to(device=device, dtype=plan.dtype)
            if v_first is not None:
                v_first = v_first.to(device=device, dtype=plan.dtype)
            x, new_state, v_first = m._module.block(x, weights, layer_state, v_first)
            for buffer, value in zip(layer_state, new_state):
                buffer.copy_(value)
            if m.rescale and (i + 1) % m.rescale == 0:
                x = x / 2
        x = x.to(device=m.devices[-1], dtype=m.plan[-1].dtype)
        self._logits.copy_(m.head(layer_norm(x, m.ln_out))[0])

    def _capture(self, warmup: int) -> None:
        with torch.cuda.device(self.device):
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.inference_mode():
                    for _ in range(max(1, warmup)):  # lazy init (cuBLAS, kernel builds) happens here
                        self._body()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.inference_mode(), torch.cuda.graph(graph):
                    self._body()
            except Exception as error:
                raise RuntimeError(f"capturing the decode step in a CUDA graph failed: {error}") from error
        self._graph = graph

    def __call__(self, token: int) -> torch.Tensor:
        """Feed one token; return the float32 logits buffer (valid until the next call)."""
        if isinstance(token, bool) or not isinstance(token, int):
            token = int(self.model._check_tokens([token])[0])
        if not 0 <= token < self.model.vocab_size:
            raise TokenError(f"token id {token} is outside [0, {self.model.vocab_size})")
        row = self.model.emb[token].unsqueeze(0)
        with torch.inference_mode():
            if self._graph is None:
                self._x.copy_(row)
                self._body()
            else:
                with torch.cuda.device(self.device):
                    self._copied.synchronize()  # the previous token left the staging row
                    self._staging.copy_(row)
                    self._x.copy_(self._staging, non_blocking=True)
                    self._copied.record()
                    self._graph.replay()
        self._tokens += 1
        self._logits_valid = True
        return self._logits

    # ------------------------------------------------------------------ states in and out
    def reset(self, state: RWKVState | None = None) -> None:
        """Continue from `state` (copied in; None: the model's initial state)."""
        if state is None:
            state = self.model.initial_state()
        else:
            self.model.check_state(state)
        with torch.inference_mode():
            for buffers, values in zip(self._state.layers, state.layers):
                for buffer, value in zip(buffers, values):
                    buffer.copy_(value)
        self._tokens = state.tokens
        self._reset_logits = None if state.logits is None else state.logits.clone()
        self._logits_valid = False

    def state(self) -> RWKVState:
        """An independent copy of the current state, like the one `model.forward` returns."""
        layers = [[t.clone() for t in layer] for layer in self._state.layers]
        logits = self._logits.cpu().clone() if self._logits_valid else self._reset_logits
        return RWKVState(self.model.shape, layers, logits, self._tokens)
