"""Workloads of bench/compare.py: data, architecture and trained weights (cached as .npz).

Trained weights are cached in bench/results/weights-<name>-<key>.npz, where <key> is a hash
of the whole configuration (data, sizes, activation, training), so a changed configuration
never reuses stale weights.  Delete the files to retrain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import wsbound_fast as wsb
from wsbound_fast._cli.demo import init_mlp, loss_and_grads, train

RESULTS = Path(__file__).resolve().parent / "results"

Layers = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    data: str  # "digits", "digits-resampled", "synthetic-mnist"
    n_samples: int
    sizes: tuple[int, ...]
    activation: str
    curvatures: tuple[str, ...]
    trainer: str  # "demo" (wsbound_fast._cli.demo.train, tanh only) or "torch-adam"
    epochs: int
    lr: float
    seed: int = 0
    # bounds on the peers' work, so that a big workload stays bounded (see compare.py)
    peer_max_seconds: float = 120.0
    dense_ok: bool = False  # whether the dense autograd route is attempted
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum((a + 1) * b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    def key(self) -> str:
        cfg = {k: v for k, v in asdict(self).items() if k not in ("description", "peer_max_seconds", "dense_ok")}
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def full_workloads() -> dict[str, Workload]:
    return {
        "dense": Workload("dense", "digits, 64-32-10 tanh (the dense autograd route still fits)", "digits", 1797,
                          (64, 32, 10), "tanh", ("hessian",), "demo", 300, 0.5, dense_ok=True),
        "W1": Workload("W1", "the paper's setting: digits, 64-128-10 tanh trained to low loss", "digits", 1797,
                       (64, 128, 10), "tanh", ("hessian", "ggn"), "demo", 2000, 0.5),
        "W2": Workload("W2", "deep: digits resampled to N = 2000, 64-256-256-256-10 GELU", "digits-resampled", 2000,
                       (64, 256, 256, 256, 10), "gelu", ("hessian",), "torch-adam", 300, 1e-3),
        "W3": Workload("W3", "large: 4000 synthetic MNIST-sized samples, 784-1024-10 tanh", "synthetic-mnist", 4000,
                       (784, 1024, 10), "tanh", ("hessian",), "demo", 30, 0.1, peer_max_seconds=90.0),
    }


def quick_workloads() -> dict[str, Workload]:
    """Tiny versions of the same settings, for a smoke run (well under a minute in all)."""
    return {
        "dense": Workload("dense", "quick: digits[:300], 64-8-10 tanh", "digits", 300, (64, 8, 10), "tanh",
                          ("hessian",), "demo", 50, 0.5, peer_max_seconds=2.0, dense_ok=True),
        "W1": Workload("W1", "quick: digits[:400], 64-16-10 tanh", "digits", 400, (64, 16, 10), "tanh",
                       ("hessian", "ggn"), "demo", 50, 0.5, peer_max_seconds=2.0),
        "W2": Workload("W2", "quick: digits resampled to 200, 64-16-16-16-10 GELU", "digits-resampled", 200,
                       (64, 16, 16, 16, 10), "gelu", ("hessian",), "torch-adam", 30, 1e-2, peer_max_seconds=2.0),
        "W3": Workload("W3", "quick: 300 synthetic MNIST-sized samples, 784-24-10 tanh", "synthetic-mnist", 300,
                       (784, 24, 10), "tanh", ("hessian",), "demo", 10, 0.1, peer_max_seconds=2.0),
    }


def make_data(w: Workload) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (float64) and class labels of a workload."""
    rng = np.random.default_rng(1000 + w.seed)
    if w.data == "digits":
        X, y = wsb.load_digits()
        if w.n_samples > len(y):
            raise ValueError("the digits have 1797 samples")
        return X[: w.n_samples].copy(), y[: w.n_samples].copy()
    if w.data == "digits-resampled":
        # all 1797 digits first (while they last), the rest drawn from them with replacement
        X, y = wsb.load_digits()
        idx = np.arange(min(w.n_samples, len(y)))
        if w.n_samples > len(y):
            idx = np.concatenate([idx, rng.integers(0, len(y), size=w.n_samples - len(y))])
        return X[idx].copy(), y[idx].copy()
    if w.data == "synthetic-mnist":
        # 28x28 "images" in [0, 1]: about 19 % of the pixels lit (as in MNIST), labels from a fixed
        # random linear teacher so that the task is learnable.
        N, d = w.n_samples, w.sizes[0]
        X = np.where(rng.random((N, d)) < 0.19, rng.random((N, d)), 0.0)
        teacher = rng.standard_normal((d, w.sizes[-1]))
        y = np.argmax((X - X.mean(axis=0)) @ teacher, axis=1).astype(np.int64)
        return X, y
    raise ValueError(f"unknown data {w.data!r}")


def mean_ce(layers: Layers, X: np.ndarray, y: np.ndarray, activation: str) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the MLP (any activation of torch_model)."""
    import torch

    model = torch_model(layers, activation, torch.float64)
    with torch.no_grad():
        z = model(torch.from_numpy(X))
        loss = torch.nn.functional.cross_entropy(z, torch.from_numpy(y)).item()
        acc = (z.argmax(dim=1) == torch.from_numpy(y)).double().mean().item()
    return float(loss), float(acc)


def _train_torch_adam(w: Workload, X: np.ndarray, y: np.ndarray) -> Layers:
    import torch

    torch.manual_seed(w.seed)
    layers = init_mlp(w.sizes, np.random.default_rng(w.seed))
    model = torch_model(layers, w.activation, torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=w.lr)
    Xt, yt = torch.from_numpy(X).float(), torch.from_numpy(y)
    for _ in range(w.epochs):  # full batch
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(Xt), yt).backward()
        opt.step()
    return layers_of(model)


def trained_layers(w: Workload, X: np.ndarray, y: np.ndarray, cache: bool = True) -> tuple[Layers, dict[str, Any]]:
    """The workload's trained weights (float64), from the cache when present; and training info."""
    path = RESULTS / f"weights-{w.name}-{w.key()}.npz"
    if cache and path.exists():
        with np.load(path) as f:
            L = len(w.sizes) - 1
            layers = [(f[f"W{i}"], f[f"b{i}"]) for i in range(L)]
        cached = True
    else:
        if w.trainer == "demo":
            if w.activation != "tanh":
                raise ValueError("the demo trainer is tanh only")
            layers = train(init_mlp(w.sizes, np.random.default_rng(w.seed)), X, y, epochs=w.epochs, lr=w.lr)
        elif w.trainer == "torch-adam":
            layers = _train_torch_adam(w, X, y)
        else:
            raise ValueError(f"unknown trainer {w.trainer!r}")
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **{f"W{i}": W for i, (W, _) in enumerate(layers)},
                     **{f"b{i}": b for i, (_, b) in enumerate(layers)})
        cached = False
    if w.activation == "tanh":
        loss, acc, _ = loss_and_grads(layers, X, y)
    else:
        loss, acc = mean_ce(layers, X, y, w.activation)
    return layers, {"trainer": w.trainer, "epochs": w.epochs, "lr": w.lr, "seed": w.seed, "loss": loss,
                    "accuracy": acc, "cache": str(path.relative_to(RESULTS.parent.parent)) if cache else None,
                    "from_cache": cached}


# ----------------------------------------------------------------------------- torch bridge

def torch_model(layers: Layers, activation: str, dtype: Any) -> Any:
    """torch.nn.Sequential with these weights (Linear layout (d_out, d_in)); float ``dtype``."""
    import torch

    acts = {"tanh": torch.nn.Tanh, "gelu": lambda: torch.nn.GELU(approximate="none"), "sigmoid": torch.nn.Sigmoid}
    mods: list[Any] = []
    for i, (W, b) in enumerate(layers):
        # created in ``dtype``: a float32 module filled from float64 and cast up would have
        # float32-rounded weights (a 1e-8-relative difference in every float64 comparison)
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.asarray(W, dtype=np.float64)))
            if b is not None:
                lin.bias.copy_(torch.from_numpy(np.asarray(b, dtype=np.float64)))
        mods.append(lin)
        if i < len(layers) - 1:
            mods.append(acts[activation]())
    return torch.nn.Sequential(*mods)


def layers_of(model: Any) -> Layers:
    import torch

    return [(m.weight.detach().double().numpy().copy(), m.bias.detach().double().numpy().copy())
            for m in model if isinstance(m, torch.nn.Linear)]
