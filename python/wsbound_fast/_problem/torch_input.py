"""PyTorch input: ``nn.Sequential`` MLPs and tensors, converted to the array form of bound().

torch is an optional dependency.  Nothing here imports it at module import time: a torch
object can only exist once the user has imported torch, so :func:`is_module` and
:func:`is_tensor` look at ``sys.modules`` and never import it themselves;
:func:`from_torch` and :func:`load_module` import it when called.

Mapping (module -> activation name of :func:`wsbound_fast.bound`)::

    Linear                      -> a (W, b) layer (W of shape (out, in), b or None)
    Tanh, Sigmoid, SiLU, ReLU   -> "tanh", "sigmoid", "silu", "relu"
    GELU(approximate="none")    -> "gelu";  GELU(approximate="tanh") -> "gelu_tanh"
    Softplus(beta=1, threshold>=20) -> "softplus" (the exact log(1 + e^z); see below)
    LeakyReLU(negative_slope=a) -> ("leaky_relu", a)
    Identity                    -> "identity" (between two Linear layers)
    Flatten (first module only, default start_dim=1, end_dim=-1): X is reshaped to (N, -1)
    Dropout                     -> skipped: the curvature is that of the model in eval mode
    LogSoftmax(dim=1 or -1) as the very last module -> skipped: cross-entropy of
                                   log-softmax outputs equals cross-entropy of the logits
    nested nn.Sequential        -> flattened in order

torch's ``Softplus`` returns z itself above ``threshold`` (default 20) for speed; we use
the exact softplus everywhere.  Above the threshold the two differ by log(1 + e^-z) <
e^-threshold in value and first derivative, and by less than that in the second
derivative (torch's is 0 there), i.e. by < 2.1e-9 for the default threshold: we accept
thresholds >= 20 and reject smaller ones, where the models would differ materially.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from .activations import validate_activations
from .losses import resolve_loss
from .problem import PART_ALL
from .validate import Parts, _part

__all__ = ["from_torch", "is_module", "is_tensor", "load_module"]

#: Smallest Softplus threshold accepted (see the module docstring).
MIN_SOFTPLUS_THRESHOLD = 20.0


def _torch_if_imported() -> Any:
    return sys.modules.get("torch")


def is_module(obj: Any) -> bool:
    """True when ``obj`` is a ``torch.nn.Module`` (without importing torch)."""
    torch = _torch_if_imported()
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_tensor(obj: Any) -> bool:
    """True when ``obj`` is a ``torch.Tensor`` (without importing torch)."""
    torch = _torch_if_imported()
    return torch is not None and isinstance(obj, torch.Tensor)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "PyTorch is needed for torch models (pip install 'wsbound_fast[torch]', or a CPU build of torch); "
            f"it could not be imported: {exc}"
        ) from exc
    return torch


def tensor_to_numpy(t: Any, *, dtype: Any = None, copy: bool = True) -> np.ndarray:
    """A host NumPy array of a tensor on any device (detached; bfloat16 and the like as float64).

    ``copy=False`` may return a read-only view of a CPU tensor's memory (for X and y, which
    are only read); weights are always copied.
    """
    torch = _import_torch()
    t = t.detach()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.to(torch.float64)  # bfloat16, float8: no NumPy dtype
    arr = t.cpu().numpy()
    if not copy:
        view = np.asarray(arr, dtype=dtype)
        view.flags.writeable = False
        return view
    return np.array(arr, dtype=dtype)  # a copy: never a view of the tensor's memory


def _flatten_children(module: Any, prefix: str, out: list[tuple[str, Any]]) -> None:
    torch = _import_torch()
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if type(child) is torch.nn.Sequential:
            _flatten_children(child, path, out)
        else:
            out.append((path, child))


def _describe(module: Any, path: str, pos: int) -> str:
    return f"{type(module).__name__} at position {pos} (module '{path}')"


def _activation_of(m: Any, where: str) -> Any:
    """The bound() activation of an activation module, or None when ``m`` is not one."""
    nn = _import_torch().nn
    simple = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "identity"}
    kind = type(m)
    if kind in simple:  # (inplace=True makes no difference to the function)
        return simple[kind]
    if kind is nn.GELU:
        if m.approximate == "none":
            return "gelu"
        if m.approximate == "tanh":
            return "gelu_tanh"
        raise ValueError(f"{where}: GELU(approximate={m.approximate!r}) is not supported; expected 'none' or 'tanh'")
    if kind is nn.Softplus:
        if float(m.beta) != 1.0:
            raise ValueError(f"{where}: Softplus(beta={m.beta}) is not supported; only beta=1")
        if not float(m.threshold) >= MIN_SOFTPLUS_THRESHOLD:
            raise ValueError(
                f"{where}: Softplus(threshold={m.threshold}) is linear above its threshold and differs from the "
                f"exact softplus that wsbound_fast uses; only threshold >= {MIN_SOFTPLUS_THRESHOLD:g} is accepted "
                "(torch's default is 20)"
            )
        return "softplus"
    if kind is nn.LeakyReLU:
        slope = float(m.negative_slope)
        if not math.isfinite(slope):
            raise ValueError(f"{where}: LeakyReLU negative_slope must be finite; got {slope}")
        return ("leaky_relu", slope)
    return None


def _linear_params(m: Any) -> tuple[np.ndarray, np.ndarray | None]:
    Wn = tensor_to_numpy(m.weight, dtype=np.float64)
    bn = None if m.bias is None else tensor_to_numpy(m.bias, dtype=np.float64)
    return Wn, bn


def _is_linear(m: Any) -> bool:
    torch = _import_torch()
    if type(m) is torch.nn.Linear:
        return True
    # weight_norm / spectral_norm etc. via torch.nn.utils.parametrize subclass Linear on the fly;
    # .weight then is the effective weight and forward is Linear's.
    from torch.nn.utils import parametrize

    return isinstance(m, torch.nn.Linear) and parametrize.is_parametrized(m)


def convert(module: Any) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], list[Any], bool]:
    """(layers, activations, leading_flatten) of a supported torch module; see :func:`from_torch`."""
    torch = _import_torch()
    nn = torch.nn
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch expects a torch.nn.Sequential (or nn.Linear); got {type(module).__name__}")
    if _is_linear(module):
        return [_linear_params(module)], [], False
    if type(module) is not nn.Sequential:
        raise TypeError(
            f"from_torch supports torch.nn.Sequential stacks of Linear and activation modules (or one nn.Linear); "
            f"got {type(module).__name__}, whose forward() cannot be read. Rebuild the model as nn.Sequential, or "
            "pass its layers to bound() as a list of (W, b) arrays with activation=..."
        )
    items: list[tuple[str, Any]] = []
    _flatten_children(module, "", items)
    layers: list[tuple[np.ndarray, np.ndarray | None]] = []
    acts: list[Any] = []
    flatten = False
    pending: tuple[Any, str] | None = None  # the activation seen since the last Linear
    last_linear: str | None = None
    for pos, (path, m) in enumerate(items):
        where = _describe(m, path, pos)
        if _is_linear(m):
            if layers and pending is None:
                raise ValueError(
                    f"{where} follows Linear '{last_linear}' with no activation in between; insert one "
                    "(nn.Identity() for a deliberately linear hidden layer) or merge the two layers"
                )
            if pending is not None:
                acts.append(pending[0])
            W, b = _linear_params(m)
            layers.append((W, b))
            pending, last_linear = None, path
            continue
        if type(m) is nn.Flatten:
            if pos != 0:
                raise ValueError(f"{where}: only a Flatten as the first module is supported")
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError(f"{where}: only Flatten(start_dim=1, end_dim=-1) is supported; got "
                                 f"start_dim={m.start_dim}, end_dim={m.end_dim}")
            flatten = True
            continue
        if type(m) in (nn.Dropout,):
            continue  # the curvature of the model in eval mode
        if type(m) is nn.LogSoftmax:
            if pos != len(items) - 1 or not layers:
                raise ValueError(f"{where}: a LogSoftmax is supported only as the last module, after the last Linear")
            if m.dim not in (None, 1, -1):
                raise ValueError(f"{where}: LogSoftmax(dim={m.dim}) must act on the class dimension (dim=1 or -1)")
            if pending is not None:
                raise ValueError(f"{pending[1]}: an activation after the last Linear layer is not supported")
            continue
        act = _activation_of(m, where)
        if act is None and isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"{where}: the layer is not initialised yet (a lazy module); run one forward pass first")
        if act is None:
            raise ValueError(
                f"unsupported module {where}; supported: Linear, Tanh, Sigmoid, Softplus, GELU, SiLU, ReLU, "
                "LeakyReLU, Identity, Dropout, a leading Flatten, a final LogSoftmax, nested Sequential"
            )
        if not layers:
            raise ValueError(f"{where}: an activation before the first Linear layer is not supported")
        if pending is not None:
            raise ValueError(f"{where} follows the activation {pending[1]}; only one activation per hidden layer "
                             "is supported")
        pending = (act, where)
    if not layers:
        raise ValueError("the nn.Sequential holds no Linear layer")
    if pending is not None:
        raise ValueError(
            f"{pending[1]}: an activation after the last Linear layer is not supported; the last Linear's outputs "
            "are the logits the loss takes (softmax cross-entropy, mse, or bce with logits: drop a final Sigmoid)"
        )
    return layers, acts, flatten


def ends_with_log_softmax(module: Any) -> bool:
    """Whether a torch module's last module is a LogSoftmax (which :func:`convert` skips: it
    leaves cross-entropy unchanged, but not the squared error or binary cross-entropy)."""
    torch = _import_torch()
    if type(module) is not torch.nn.Sequential:
        return False
    items: list[tuple[str, Any]] = []
    _flatten_children(module, "", items)
    return bool(items) and type(items[-1][1]) is torch.nn.LogSoftmax


def trainable_layers(module: Any) -> Parts | None:
    """Which parameters of each Linear layer of a torch module are trainable (``requires_grad``),
    as per-layer parts (a weight and its bias may differ); None when all are."""
    if _is_linear(module):
        linears = [("", module)]
    else:
        items: list[tuple[str, Any]] = []
        _flatten_children(module, "", items)
        linears = [(path, m) for path, m in items if _is_linear(m)]
    parts = []
    for _, m in linears:
        w = bool(m.weight.requires_grad)
        b = w if m.bias is None else bool(m.bias.requires_grad)
        parts.append(_part(w, b, m.bias is not None))
    return None if all(p == PART_ALL for p in parts) else Parts(parts)


def selected_params(layers: Any, params: Any) -> Any:
    """``params`` for validation: as given, or for a torch module left at None, the flags of
    its trainable layers (:func:`trainable_layers`)."""
    if params is None and is_module(layers):
        return trainable_layers(layers)
    return params


def from_torch(module: Any) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], list[Any]]:
    """``(layers, activations)`` of a ``torch.nn.Sequential`` MLP, for :func:`wsbound_fast.bound`.

    ``layers`` is a list of (W, b) float64 NumPy copies (b None for ``bias=False``),
    ``activations`` one name per hidden layer (``("leaky_relu", slope)`` for LeakyReLU).
    Supported modules: Linear; Tanh, Sigmoid, Softplus (beta=1, threshold >= 20; computed as
    the exact softplus), GELU (approximate "none" or "tanh"), SiLU, ReLU, LeakyReLU, Identity
    between Linear layers; Dropout (skipped: the eval-mode model); a leading Flatten; a final
    LogSoftmax (skipped: it does not change the cross-entropy); nested Sequential.  A single
    ``nn.Linear`` is logistic regression.  Anything else raises ValueError (TypeError for a
    module that is not a Sequential) naming the module and its position.

    ``wsb.bound(module, X, y)`` does this itself, and also applies a leading Flatten to X.
    """
    layers, acts, _ = convert(module)
    return layers, acts


def adapt(layers: Any, X: Any, y: Any, activation: Any, *, keep_tensors: bool = False,
          loss: Any = "cross_entropy") -> tuple[Any, Any, Any, Any]:
    """bound()'s inputs with torch objects replaced by arrays; no-op (and no import) without torch.

    For a module, ``activation`` must be None (take the module's) or agree with the module,
    and a final LogSoftmax is refused for a ``loss`` other than cross-entropy.
    With ``keep_tensors`` (the torch backend) X and y stay tensors, on their device.
    """
    if is_module(layers):
        name = resolve_loss(loss, None)[0].name
        if name != "cross_entropy" and ends_with_log_softmax(layers):
            raise ValueError(f"layers: the torch module ends with a LogSoftmax, whose outputs are log-probabilities; "
                             f"loss={name!r} takes the logits: drop the LogSoftmax")
        layers, acts, flatten = convert(layers)
        if activation is not None:
            mine = validate_activations(acts, len(layers))
            given = validate_activations(activation, len(layers))
            if mine != given:
                raise ValueError(
                    f"activation={activation!r} disagrees with the torch module's activations "
                    f"{[a.name if a.name != 'leaky_relu' else (a.name, a.param) for a in mine]}; leave activation=None "
                    "to use the module's"
                )
        activation = acts
        if flatten:
            X = X.reshape(X.shape[0], -1) if keep_tensors and is_tensor(X) and X.ndim >= 2 else _flattened(X)
    if keep_tensors:
        return layers, X, y, activation
    if is_tensor(X):
        X = tensor_to_numpy(X, copy=False)
    if is_tensor(y):
        y = tensor_to_numpy(y, copy=False)
    return layers, X, y, activation


def _flattened(X: Any) -> Any:
    if is_tensor(X):
        X = tensor_to_numpy(X, copy=False)
    arr = np.asarray(X)
    if arr.ndim >= 2:
        return arr.reshape(arr.shape[0], -1)
    return arr  # validation reports the shape


#: Module classes a saved model file may construct (everything from_torch understands).
def _safe_classes() -> list[Any]:
    nn = _import_torch().nn
    return [nn.Sequential, nn.Linear, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU, nn.ReLU, nn.LeakyReLU,
            nn.Identity, nn.Flatten, nn.Dropout, nn.LogSoftmax]


def _refusal(exc: BaseException) -> str:
    """torch.load's refusal in our own words, one line: the global it would have needed, or
    the reason without torch's advice (add_safe_globals, weights_only=False)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"unsupported GLOBAL ([\w.]+)", text)
    if found:
        return f"it needs {found.group(1)}, which is not one of the modules allowed"
    advice = ("weights_only", "safe_globals", "Re-running", "re-running", "Please", "please", "Check the documentation",
              "trust", "In PyTorch", "WeightsUnpickler error:")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not any(a in ln for a in advice)]
    reason = useful[0] if useful else (lines[0].split(". ")[0] if lines else type(exc).__name__)
    reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", reason)
    return reason[:200] + ("..." if len(reason) > 200 else "")


def load_module(path: str, file: Any = None) -> Any:
    """Read a ``torch.save``-d nn.Sequential without running arbitrary pickled code.

    ``torch.load(weights_only=True)`` with only the module classes of :func:`from_torch`
    allowed: a file that needs anything else is refused with an error, never executed.
    ``file``: an open binary file to read instead of opening ``path`` (which names it).
    Refusals are one line of our own (the class it needs, or the reason), without torch's
    advice to allow more or to turn ``weights_only`` off.
    """
    torch = _import_torch()
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # pragma: no cover - torch < 2.5
        raise ImportError(f"reading a saved torch module safely needs torch >= 2.5; this is {torch.__version__}")
    try:
        with safe_globals(_safe_classes()):
            obj = torch.load(path if file is None else file, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except MemoryError:
        raise ValueError(f"{path}: torch.load ran out of memory reading it (a damaged or hostile file?)") from None
    except Exception as exc:
        allowed = ", ".join(c.__name__ for c in _safe_classes())
        reason = _refusal(exc)
        if reason.startswith("it needs "):
            raise ValueError(f"{path}: torch.load refused it (weights_only=True): {reason} ({allowed}); "
                             "it was not loaded") from None
        raise ValueError(
            f"{path}: not a readable .npz of W0, b0, ... nor a torch.save-d nn.Sequential of supported modules "
            f"(torch.load refused it: {reason})"
        ) from None
    if not isinstance(obj, torch.nn.Module):
        hint = " (a state_dict? save the module itself: torch.save(model, path))" if isinstance(obj, dict) else ""
        raise ValueError(f"{path}: the torch file holds a {type(obj).__name__}, not an nn.Module{hint}")
    return obj
