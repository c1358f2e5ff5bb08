"""The model engine: torch only, no UI."""
from .model import RWKV
from .state import ModelShape, RWKVState
from .strategy import LayerPlan, parse_strategy, plan_layers

__all__ = ["RWKV", "RWKVState", "ModelShape", "LayerPlan", "parse_strategy", "plan_layers"]
