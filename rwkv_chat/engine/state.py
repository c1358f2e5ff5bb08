"""The recurrent state an RWKV model carries from token to token."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StateMismatchError


@dataclass(frozen=True)
class ModelShape:
    version: str
    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int

    def describe(self) -> str:
        return (
            f"RWKV v{self.version}, {self.n_layer} layers x {self.n_embd} "
            f"({self.n_head} heads of {self.head_size}), vocab {self.vocab_size}"
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelShape":
        return cls(
            version=str(data["version"]),
            **{k: int(data[k]) for k in ("n_layer", "n_embd", "n_head", "head_size", "vocab_size")},
        )


VERSIONS = ("4", "5.2", "6", "7")
STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def state_layout(shape: ModelShape) -> list[list[tuple[int, ...]]]:
    """The tensor shapes of a state of `shape`, per layer (see RWKVState)."""
    C, H, N = shape.n_embd, shape.n_head, shape.head_size
    per_layer = [(C,)] * 5 if shape.version == "4" else [(C,), (H, N, N), (C,)]
    return [list(per_layer) for _ in range(shape.n_layer)]


def check_state_tensors(shape: ModelShape, tensors: dict[str, torch.Tensor]) -> None:
    """Raise StateMismatchError unless `tensors` (as `RWKVState.to_tensors` makes them) hold
    exactly the entries of a state of `shape`: every layer.{i}.{j} of its shape, plus optional
    logits [vocab]; all dense floating-point tensors with finite values."""
    expected = {f"layer.{i}.{j}": s for i, layer in enumerate(state_layout(shape)) for j, s in enumerate(layer)}
    if not isinstance(tensors, dict):
        raise StateMismatchError(f"saved state is a {type(tensors).__name__}, not a dict of tensors")
    extra = sorted(str(k) for k in set(tensors) - set(expected) - {"logits"})
    if extra:
        raise StateMismatchError(f"saved state has unexpected entries {extra[:3]} for {shape.describe()}")
    for key, want in [*expected.items(), ("logits", (shape.vocab_size,))]:
        if key not in tensors:
            if key == "logits":
                continue
            raise StateMismatchError(f"saved state lacks {key} (expected for {shape.describe()})")
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            raise StateMismatchError(f"saved state {key} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != want:
            raise StateMismatchError(
                f"saved state {key} has shape {list(tensor.shape)}, expected {list(want)} for {shape.describe()}"
            )
        if tensor.dtype not in STATE_DTYPES or tensor.layout != torch.strided:
            raise StateMismatchError(f"saved state {key} is {tensor.dtype} ({tensor.layout}), expected floating point")
        if tensor.is_meta:
            raise StateMismatchError(f"saved state {key} is a meta tensor (a shape without data)")
        if not bool(torch.isfinite(tensor).all()):
            raise StateMismatchError(f"saved state {key} contains NaN or infinite values")


def time_state_layout(version: str, wkv: torch.Tensor) -> torch.Tensor:
    """One layer's wkv state between the tuned-state file layout ([h][v][k]) and the engine's:
    v5.2/v6 compute in [h][k][v] (transposed: the swap is its own inverse), v7 in [h][v][k]."""
    return wkv.transpose(-1, -2) if version in ("5.2", "6") else wkv


def ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or when it was made under `torch.inference_mode` (which forbids in-place
    edits outside that mode) a normal tensor over the same memory: no copy, about a microsecond."""
    if not tensor.is_inference():
        return tensor
    try:
        return tensor.new_empty(0).set_(tensor)  # made out here, so not an inference tensor
    except RuntimeError:  # a backend without set_ (some out-of-tree devices): copy instead
        return tensor.clone()


class RWKVState:
    """Per-layer tensors plus the logits after the last token fed.

    layers[i] is [att_x, aa, bb, pp, ffn_x] for v4 and [att_x, wkv, ffn_x] for v5.2/v6/v7.
    x_prev entries hold the layer-normed input of the previous token. wkv is float32:
    [H, K, V] for v5.2/v6 and [H, V, K] for v7.
    """

    __slots__ = ("shape", "layers", "logits", "tokens")

    def __init__(self, shape: ModelShape, layers: list[list[torch.Tensor]], logits=None, tokens: int = 0):
        self.shape = shape
        self.layers = layers
        self.logits = logits
        self.tokens = tokens

    def copy(self) -> "RWKVState":
        return RWKVState(
            self.shape,
            [[t.clone() for t in layer] for layer in self.layers],
            None if self.logits is None else self.logits.clone(),
            self.tokens,
        )

    def made_ordinary(self) -> "RWKVState":
        """This state, its tensors turned into normal ones in place (see `ordinary`); call it
        outside inference mode."""
        self.layers = [[ordinary(t) for t in layer] for layer in self.layers]
        if self.logits is not None:
            self.logits = ordinary(self.logits)
        return self

    def __deepcopy__(self, memo) -> "RWKVState":
        return self.copy()

    def check_compatible(self, shape: ModelShape) -> None:
        if self.shape != shape:
            raise StateMismatchError(
                f"this state belongs to {self.shape.describe()}, not to the loaded {shape.describe()}"
            )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat CPU tensors for safetensors; `from_tensors` reverses it."""
        out = {f"layer.{i}.{j}": t.detach().cpu().contiguous() for i, layer in enumerate(self.layers) for j, t in enumerate(layer)}
        if self.logits is not None:
            out["logits"] = self.logits.detach().cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, shape: ModelShape, tensors: dict[str, torch.Tensor], like: "RWKVState", tokens: int = 0) -> "RWKVState":
        """Rebuild a state from `to_tensors` output (checked by `check_state_tensors`), with
        devices and dtypes taken from `like`."""
        check_state_tensors(shape, tensors)
        layers = [
            [tensors[f"layer.{i}.{j}"].to(device=template.device, dtype=template.dtype).clone()
             for j, template in enumerate(template_layer)]
            for i, template_layer in enumerate(like.layers)
        ]
        logits = tensors.get("logits")
        return cls(shape, layers, None if logits is None else logits.float().clone(), tokens)

    def to_time_state(self) -> dict[str, torch.Tensor]:
        """The tuned-state file layout: blocks.{i}.att.time_state, [H, N, N] stored [h][v][k]."""
        if self.shape.version == "4":
            raise StateMismatchError("RWKV v4 has no matrix-valued state to save as a tuned state file")
        out = {}
        for i, layer in enumerate(self.layers):
            wkv = time_state_layout(self.shape.version, layer[1].detach().float().cpu())
            out[f"blocks.{i}.att.time_state"] = wkv.contiguous()
        return out
