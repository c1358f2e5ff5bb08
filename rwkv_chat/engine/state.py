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
        """Rebuild a state from `to_tensors` output, with devices and dtypes taken from `like`."""
        layers = []
        for i, template_layer in enumerate(like.layers):
            layer = []
            for j, template in enumerate(template_layer):
                key = f"layer.{i}.{j}"
                if key not in tensors:
                    raise StateMismatchError(f"saved state lacks {key} (expected for {shape.describe()})")
                tensor = tensors[key]
                if tuple(tensor.shape) != tuple(template.shape):
                    raise StateMismatchError(
                        f"saved state {key} has shape {list(tensor.shape)}, expected {list(template.shape)} "
                        f"for {shape.describe()}"
                    )
                layer.append(tensor.to(device=template.device, dtype=template.dtype).clone())
            layers.append(layer)
        extra = set(tensors) - {f"layer.{i}.{j}" for i, l in enumerate(like.layers) for j in range(len(l))} - {"logits"}
        if extra:
            raise StateMismatchError(f"saved state has unexpected entries {sorted(extra)[:3]} for {shape.describe()}")
        logits = tensors.get("logits")
        return cls(shape, layers, None if logits is None else logits.float().clone(), tokens)

    def to_time_state(self) -> dict[str, torch.Tensor]:
        """The tuned-state file layout: blocks.{i}.att.time_state, [H, N, N] stored [h][v][k]."""
        if self.shape.version == "4":
            raise StateMismatchError("RWKV v4 has no matrix-valued state to save as a tuned state file")
        out = {}
        for i, layer in enumerate(self.layers):
            wkv = layer[1].detach().float().cpu()
            if self.shape.version in ("5.2", "6"):
                wkv = wkv.transpose(1, 2)  # [h][k][v] -> [h][v][k]
            out[f"blocks.{i}.att.time_state"] = wkv.contiguous()
        return out
