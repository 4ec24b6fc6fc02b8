"""The user's inputs as validation takes them: a torch module's trainable parameters as the
parameter subset, a loader of (X, y) batches collected into X and y, and torch objects adapted
(torch_input.adapt).  One place for the steps that bound(), hvp(), eigsh(), dense_hessian()
and the cluster path all take before validate()."""

from __future__ import annotations

from typing import Any

from . import loaders, torch_input


def adapt_inputs(layers: Any, X: Any, y: Any, activation: Any, *, loss: Any, params: Any, memory_limit: Any,
                 keep_tensors: bool = False) -> tuple[Any, Any, Any, Any, Any]:
    """(layers, X, y, activation, params) for validate(); ``memory_limit`` (bytes, or None for
    the default) bounds what a collected loader keeps in memory."""
    params = torch_input.selected_params(layers, params)
    X, y = loaders.resolve(X, y, memory_limit if isinstance(memory_limit, int) else None)
    layers, X, y, activation = torch_input.adapt(layers, X, y, activation, keep_tensors=keep_tensors, loss=loss)
    return layers, X, y, activation, params
