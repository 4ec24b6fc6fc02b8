"""The hidden-layer activations a problem may name: names, core codes, resolution."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

#: Name -> (code in the C++ core, default parameter).  The parameter is only used by
#: ``leaky_relu`` (its negative slope; torch's default is 0.01).
ACTIVATIONS: dict[str, tuple[int, float]] = {
    "identity": (0, 0.0),
    "tanh": (1, 0.0),
    "sigmoid": (2, 0.0),
    "softplus": (3, 0.0),
    "gelu": (4, 0.0),
    "gelu_tanh": (5, 0.0),
    "silu": (6, 0.0),
    "relu": (7, 0.0),
    "leaky_relu": (8, 0.01),
}


class Activation(NamedTuple):
    """A resolved hidden-layer activation: its name, core code and parameter."""

    name: str
    code: int
    param: float


def resolve_activation(spec: Any, where: str) -> Activation:
    param = None
    name = spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        name, param = spec
    if not isinstance(name, str):
        raise TypeError(f"{where} must be an activation name (str) or a (name, parameter) pair; got {spec!r}")
    key = name.strip().lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    code, default = ACTIVATIONS[key]
    if param is None:
        param = default
    elif key != "leaky_relu":
        raise ValueError(f"{where}: activation {key!r} takes no parameter; got {spec!r}")
    elif not isinstance(param, numbers.Real) or isinstance(param, bool) or not math.isfinite(param):
        raise ValueError(f"{where}: the leaky_relu negative slope must be a finite real number; got {param!r}")
    return Activation(key, code, float(param))


def validate_activations(activation: Any, n_layers: int) -> tuple[Activation, ...]:
    """The hidden layers' activations.  None is accepted only without hidden layers: plain
    (W, b) layers do not say which function sits between them, and a guess would give the
    curvature of another model."""
    n_hidden = n_layers - 1
    if activation is None:
        if n_hidden == 0:
            return ()
        raise ValueError(
            f"activation is required: the model has {n_hidden} hidden layer{'s' if n_hidden > 1 else ''} and plain "
            "(W, b) layers do not say which activation follows each; pass activation='tanh' (or 'relu', 'gelu', "
            "...; one name for every hidden layer, or a list with one per hidden layer)"
        )
    if isinstance(activation, str) or (
        isinstance(activation, tuple) and len(activation) == 2 and isinstance(activation[0], str)
        and not isinstance(activation[1], str)
    ):
        act = resolve_activation(activation, "activation")
        return (act,) * n_hidden
    if isinstance(activation, Sequence):
        if len(activation) != n_hidden:
            raise ValueError(
                f"activation: a list must hold one name per hidden layer, {n_hidden} for {n_layers} layers; "
                f"got {len(activation)}"
            )
        return tuple(resolve_activation(a, f"activation[{i}]") for i, a in enumerate(activation))
    raise TypeError(f"activation must be a name (str) or a list of {n_hidden} names; got {type(activation).__name__}")
