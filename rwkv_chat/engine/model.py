"""The RWKV model: load a checkpoint under a strategy, run tokens through it."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import StateMismatchError, TokenError
from . import batch, loader, memory
from .common import layer_norm, pair, vector
from .ops import cpu as cpu_ops, select
from .placement import cpu_activations, rescale_every, resolve_device
from .quant import dequantize, make_linear, quantize_groups
from .state import RWKVState, ordinary, time_state_layout
from .strategy import LayerPlan, parse_strategy, plan_layers

ProgressCallback = Callable[[int, int, str], None]  # progress(done, total, what), once per layer; the caller draws it


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _state_tensor_problem(i: int, j: int, tensor, shape, dtype, device) -> str:
    where = f"state layer {i} tensor {j}"
    if not isinstance(tensor, torch.Tensor):
        return f"{where} is a {type(tensor).__name__}, not a tensor"
    for what, got, want in (("shape", list(tensor.shape), list(shape)), ("dtype", tensor.dtype, dtype),
                            ("device", tensor.device, device), ("layout", tensor.layout, torch.strided)):
        if got != want:
            return f"{where} has {what} {got}, expected {want}"
    return f"{where} is not contiguous (call .contiguous() on it)"


class QuantizedRows:
    """A quantized embedding table (QuantLinear's format, `bits` 8 or 4); indexing returns fp32 rows."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bits: int, n_embd: int):
        self.q, self.scale, self.bits = q, scale, bits
        self.shape = (q.shape[0], n_embd)

    def __getitem__(self, index) -> torch.Tensor:
        index = torch.as_tensor(index)
        rows = dequantize(self.q[index.reshape(-1)], self.scale[index.reshape(-1)], self.bits, self.shape[1])
        return rows.reshape(*index.shape, self.shape[1])

    def __len__(self) -> int:
        return self.q.shape[0]


class Embedding:
    """emb.weight as stored at load (the first slot's weight dtype, or i8 / i4 like its weights);
    looking up token rows applies ln0 in fp32, as the reference's first LayerNorm does. Rounding
    the raw rows, not the normalised ones, keeps each token's signal where ln0's bias is large."""

    def __init__(self, sd, plan):
        weight = sd["emb.weight"]
        self.ln0 = (vector(sd["blocks.0.ln0.weight"], torch.float32, "cpu"),
                    vector(sd["blocks.0.ln0.bias"], torch.float32, "cpu"))
        if not plan.quant:
            self.rows = memory.converted(weight, plan.weight_dtype)
            return
        qs, scales = [], []
        for start, stop in memory.row_blocks(weight):
            block = weight[start:stop]
            q, scale = quantize_groups(block.float(), plan.quant)
            memory.release(block)
            qs.append(q)
            scales.append(scale)
        self.rows = QuantizedRows(torch.cat(qs), torch.cat(scales), plan.quant, weight.shape[1])

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return layer_norm(self.rows[ids].float(), self.ln0)


class RWKV:
    """An RWKV v4 / v5.2 / v6 / v7 world model placed according to a ChatRWKV strategy string.

    >>> model = RWKV("RWKV-x070-World-0.1B.pth", strategy="cpu fp32")
    >>> logits, state = model.forward([510, 33], None)
    """

    def __init__(self, model_path: str | os.PathLike, strategy: str = "cpu fp32", *,
                 progress: ProgressCallback | None = None):
        segments = parse_strategy(strategy)  # bad strategy: fail before touching the file
        self.strategy = " -> ".join(s.text for s in segments)
        self.path = loader.resolve_path(model_path)
        if sys.platform != "emscripten":
            torch.set_flush_denormal(True)  # decays drive fp32 states into denormals: 60x slower on CPU

        sd = loader.read_tensors(self.path)
        self.version = loader.detect_version(sd, self.path)
        dims = loader.read_dims(sd, self.version, self.path)
        weights = loader.validate(sd, self.version, dims, self.path)  # unused entries are never read
        self.dims = dims
        self.n_layer, self.n_embd, self.vocab_size = dims.n_layer, dims.n_embd, dims.vocab_size
        self.n_head, self.head_size = dims.n_head, dims.head_size
        self.shape = dims.shape
        self.fingerprint = loader.fingerprint(self.path)

        plan = plan_layers(segments, self.n_layer)
        segment_of = {}
        for seg in segments:
            segment_of.setdefault(seg.device, seg.text)
        self.devices = [resolve_device(p, segment_of[p.device]) for p in plan]
        self.plan: list[LayerPlan] = [cpu_activations(p) for p in plan]
        self._all_cpu = all(torch.device(d).type == "cpu" for d in self.devices)
        # the residual stream's dtype in each slot: fp32 on the CPU whatever the weights (layer_norm
        # hands each layer its own dtype; a one-call layer works in fp32 throughout)
        self._stream_dtypes = [torch.float32 if torch.device(d).type == "cpu" else p.dtype
                               for p, d in zip(self.plan, self.devices)]
        self.rescale = rescale_every(self.strategy, self.version)
        self._module = loader.VERSION_MODULES[self.version]
        merged = loader.time_state_tensors(sd, dims, self.path, self.version)
        self._load_weights(weights, progress)
        self._initial_wkv = merged
        self._batch_layers = None  # the layers for forward_batch, made on its first call
        # every layer in one C call per token where they all can (CPU kernels, v6 / v7), else None
        self._one_call = None if self.rescale else cpu_ops.one_call_layers(self.layers, self.version)
        self._state_spec = [[(tuple(t.shape), t.dtype, t.device) for t in layer] for layer in self.zero_state().layers]

    # ------------------------------------------------------------------ loading
    def _load_weights(self, sd: dict[str, torch.Tensor], progress: ProgressCallback | None) -> None:
        with memory.releasing(self.path):
            self._convert(sd, progress)
        memory.release_freed_memory()

    def _convert(self, sd: dict[str, torch.Tensor], progress: ProgressCallback | None) -> None:
        path = self.path
        release = memory.release
        for key, tensor in sd.items():
            loader.check_finite(key, tensor, path)
            release(tensor)
        arena = memory.arena_for(path)  # host-resident weights on 2 MiB pages (memory.py)
        hosted = lambda i: memory.packing(
            arena if self.plan[i].stream or torch.device(self.devices[i]).type == "cpu" else None)
        self.emb = Embedding(sd, self.plan[0])  # stays in host memory; rows move per call
        release(sd["emb.weight"])
        self.layers = []
        total = self.n_layer + 1
        for i in range(self.n_layer):
            plan, device = self.plan[i], self.devices[i]
            get = lambda name, i=i: sd[f"blocks.{i}.{name}"]
            scale = 1.0 / 2 ** (i // self.rescale) if self.rescale else 1.0
            ops = select.backend(device)
            with hosted(i):
                self.layers.append(self._module.prepare_layer(get, plan, device, ops, output_scale=scale,
                                                              n_head=self.n_head, layer=i))
            prefix = f"blocks.{i}."
            for key, tensor in sd.items():
                if key.startswith(prefix):
                    release(tensor)
            memory.release_freed_memory(collect=False)
            if progress:
                progress(i + 1, total, f"layer {i + 1}/{self.n_layer}")
        head_plan, head_device = self.plan[-1], self.devices[-1]
        self.ln_out = pair(lambda n: sd[n], "ln_out", head_plan.dtype, head_device)
        with hosted(self.n_layer):
            self.head = make_linear(sd["head.weight"], head_plan, head_device)
        release(sd["head.weight"])
        if progress:
            progress(total, total, "head")

    # ------------------------------------------------------------------ states
    def zero_state(self) -> RWKVState:
        layers = [self._module.zero_state(self.shape, self.plan[i], self.devices[i]) for i in range(self.n_layer)]
        return RWKVState(self.shape, layers)

    def initial_state(self) -> RWKVState:
        """The merged tuned state when the checkpoint carries one, else zeros."""
        state = self.zero_state()
        if self._initial_wkv is not None:
            self._install_wkv(state, self._initial_wkv)
        return state

    def load_state(self, path: str | os.PathLike) -> RWKVState:
        """A tuned state file (RWKV-PEFT state tuning) as a fresh starting state for this model."""
        file = Path(os.path.expanduser(loader.path_text(path, "state file")))
        wkv = loader.fit_time_state(loader.read_state_file(file), self.dims, file, self.version)
        state = self.zero_state()
        self._install_wkv(state, wkv)
        return state

    def check_state(self, state: RWKVState) -> None:
        """Raise StateMismatchError unless `state` fits this model exactly: the same model shape,
        one entry per layer, and every tensor of the shape, dtype and device a kernel expects
        (strided, contiguous). Cheap enough for every forward call (a few µs per layer)."""
        if not isinstance(state, RWKVState):
            raise StateMismatchError(f"expected an RWKVState, got {type(state).__name__}")
        state.check_compatible(self.shape)
        if isinstance(state.tokens, bool) or not isinstance(state.tokens, int) or state.tokens < 0:
            raise StateMismatchError(f"state.tokens must be an integer >= 0, got {state.tokens!r}")
        layers, spec = state.layers, self._state_spec
        if not isinstance(layers, (list, tuple)) or len(layers) != len(spec):
            got = len(layers) if isinstance(layers, (list, tuple)) else type(layers).__name__
            raise StateMismatchError(f"state has {got} layers; {self.shape.describe()} needs {len(spec)}")
        for i, (layer, expected) in enumerate(zip(layers, spec)):
            if not isinstance(layer, (list, tuple)) or len(layer) != len(expected):
                got = f"{len(layer)} tensors" if isinstance(layer, (list, tuple)) else f"a {type(layer).__name__}"
                raise StateMismatchError(f"state layer {i} has {got}; this model needs {len(expected)}")
            for j, (tensor, (shape, dtype, device)) in enumerate(zip(layer, expected)):
                if not (isinstance(tensor, torch.Tensor) and tensor.shape == shape and tensor.dtype == dtype
                        and tensor.device == device and tensor.layout == torch.strided and tensor.is_contiguous()):
                    raise StateMismatchError(_state_tensor_problem(i, j, tensor, shape, dtype, device))

    def _install_wkv(self, state: RWKVState, wkv: list[torch.Tensor]) -> None:
        for i, tensor in enumerate(wkv):
            state.layers[i][1] = time_state_layout(self.version, tensor).contiguous().to(self.devices[i])

    def state_from_tensors(self, tensors: dict[str, torch.Tensor], tokens: int = 0) -> RWKVState:
        return RWKVState.from_tensors(self.shape, tensors, self.zero_state(), tokens)

    # ------------------------------------------------------------------ running
    def forward(self, tokens: list[int], state: RWKVState | None = None, full_output: bool = False):
        """Feed tokens; return (float32 CPU logits of the last token, or [T, vocab] with full_output,
        and the new state). The state passed in is left unchanged. Logits and state are ordinary
        tensors: callers may edit them in place (`logits[0] -= 1e10`)."""
        ids = self._check_tokens(tokens)
        if state is None:
            state = self.initial_state()
        else:
            self.check_state(state)
        with torch.inference_mode(), self._thread_mode(len(ids)):
            logits, new_state = self._forward(ids, state, full_output)
        return ordinary(logits), new_state.made_ordinary()

    def forward_batch(self, tokens: list[int], states: list[RWKVState | None]):
        """One token for each of B sequences in one step (see engine/batch.py): the weights are
        read once for all of them. Returns (float32 CPU logits [B, vocab], B new states); the
        states passed in are left unchanged (None stands for `initial_state()`)."""
        ids = self._check_tokens(tokens)
        if len(states) != len(ids):
            raise TokenError(f"forward_batch() got {len(ids)} tokens for {len(states)} states")
        states = [self.initial_state() if s is None else s for s in states]
        for state in states:
            self.check_state(state)
        # decode threading whatever B is: torch on one thread (a step's products are small; a
        # second torch thread mostly waits at barriers), the C kernels keep theirs
        with torch.inference_mode(), self._thread_mode(1):
            if len(ids) == 1:  # the single-token forward (and its one-call layers) is the batch of one
                logits, new_state = self._forward(ids, states[0], False)
                logits, new_states = logits.unsqueeze(0), [new_state]
            else:
                logits, new_states = self._forward_batch(ids, states)
        return ordinary(logits), [s.made_ordinary() for s in new_states]

    def _forward_batch(self, ids: torch.Tensor, states: list[RWKVState]):
        if self._batch_layers is None:
            self._batch_layers = batch.batch_layers(self.layers)
            self._batch_head = batch.batch_linear(self.head)
        layers = self._batch_layers
        x, new_layers = self._run_layers(self.emb[ids], layers, batch.layer_states(layers, states))
        logits = self._batch_head(self._final_norm(x)).float().cpu()
        per_sequence = batch.sequence_states(layers, new_layers, len(ids))
        new_states = [RWKVState(self.shape, layers, logits[b].clone(), state.tokens + 1)
                      for b, (layers, state) in enumerate(zip(per_sequence, states))]
        return logits, new_states

    def decoding(self):
        """A context for one step of a decode loop (sampling included): the single-token thread
        settings then hold across the work between forward calls, not only inside them."""
        return self._thread_mode(1)

    def _thread_mode(self, n_tokens: int):
        kernels = self.layers[0].ops.kernels if self._all_cpu else None
        return kernels.token_mode(n_tokens) if kernels is not None else contextlib.nullcontext()

    def _forward(self, ids: torch.Tensor, state: RWKVState, full_output: bool):
        x, new_layers = self._run_layers(self.emb[ids], self.layers, state.layers)
        if not full_output:
            x = x[-1:]
        logits = self.head(self._final_norm(x)).float().cpu()
        new_state = RWKVState(self.shape, new_layers, logits[-1].clone(), state.tokens + len(ids))
        return (logits if full_output else logits[0]), new_state

    def _run_layers(self, x: torch.Tensor, layers, states):
        """x through every layer -> (x, new per-layer states)."""
        batch = layers is self._batch_layers
        if self._one_call is not None and (batch or x.shape[0] == 1):
            x, new_layers = self.layers[0].ops.layers(self.version, self._one_call, x,
                                                      states if batch else [[s] for s in states])
            return x, (new_layers if batch else [layer[0] for layer in new_layers])
        v_first = None
        new_layers = []
        for i, (w, layer_state) in enumerate(zip(layers, states)):
            device, dtype = self.devices[i], self._stream_dtypes[i]
            x = x.to(device=device, dtype=dtype)
            if v_first is not None:
                v_first = v_first.to(device=device, dtype=dtype)
            x, layer_state, v_first = self._module.block(x, w, layer_state, v_first)
            new_layers.append(layer_state)
            if self.rescale and (i + 1) % self.rescale == 0:
                x = x / 2
        return x, new_layers

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x.to(device=self.devices[-1]), self.ln_out)

    def _check_tokens(self, tokens) -> torch.Tensor:
        if isinstance(tokens, int):
            tokens = [tokens]
        try:
            ids = torch.as_tensor(tokens if isinstance(tokens, torch.Tensor) else list(tokens))
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise TokenError(f"token ids must be a list of integers ({error})") from None
        if ids.dim() != 1 or ids.numel() == 0:
            raise TokenError(f"forward() needs a non-empty list of token ids, got shape {list(ids.shape)}")
        if ids.dtype not in _INTEGER_DTYPES:
            raise TokenError(f"token ids must be integers, got {ids.dtype} values")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise TokenError(
                f"token id {bad} is outside the vocabulary of {self.path.name} ({self.vocab_size} tokens, "
                f"ids 0..{self.vocab_size - 1})"
                + ("; was the text encoded with a tokenizer for a larger vocabulary?" if bad > 0 else "")
            )
        return ids.to(device="cpu", dtype=torch.long)

    def describe_plan(self) -> list[str]:
        """One line per run of layers sharing a placement, e.g. '0-9: cuda fp16i8'."""
        lines, start = [], 0
        for i in range(1, len(self.plan) + 1):
            if i == len(self.plan) or self.plan[i] != self.plan[start]:
                last = i - 1
                what = "head" if start == self.n_layer else (f"layers {start}-{min(last, self.n_layer - 1)}"
                                                           + (" + head" if last == self.n_layer else ""))
                lines.append(f"{what}: {self.plan[start].describe()}")
                start = i
        return lines

    def __repr__(self) -> str:
        return f"RWKV({str(self.path)!r}, strategy={self.strategy!r}) # {self.shape.describe()}"
