"""Small random problems for the compiled core's tests, and a recorder of _core.moments,
_core.pair_sums and _core.hvp on them: a change to the core that must keep cross-entropy's bits
can be checked against a snapshot taken before it (bits move with the compiler, Eigen and the
CPU variant, so no snapshot is kept in the repository).

    python tests/ce_snapshot.py OUT.npz      # record the current build's outputs
"""

from __future__ import annotations

import importlib
import itertools
import pathlib
import subprocess

import numpy as np

BATCH = 4
N = 11  # three blocks, the last one of three samples


def compiler_version() -> str:
    """`c++ -dumpfullversion` (the compiler the build uses by default), or '' without one."""
    try:
        return subprocess.run(["c++", "-dumpfullversion"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def cores() -> dict:
    """The baseline core and, where importable, the AVX2 + FMA one."""
    out = {"baseline": importlib.import_module("wsbound_fast._core")}
    try:
        out["avx2"] = importlib.import_module("wsbound_fast._core_avx2")
    except ImportError:
        pass
    return out


def problem(depth: int, soft: bool):
    """A random tanh / softplus MLP with depth layers (C = 3), its inputs and labels."""
    rng = np.random.default_rng(100 + 10 * depth + soft)
    dims = {1: [4, 3], 2: [4, 6, 3], 3: [3, 5, 4, 3]}[depth]
    weights = [rng.normal(size=(o, i)) / np.sqrt(i) for i, o in zip(dims[:-1], dims[1:])]
    biases = [None if (l == 0 and depth == 3) else 0.3 * rng.normal(size=o) for l, o in enumerate(dims[1:])]
    X = rng.normal(size=(N, dims[0]))
    if soft:
        y = rng.random(size=(N, dims[-1]))
        y /= y.sum(axis=1, keepdims=True)
        y[::3] *= 0.7
    else:
        y = rng.integers(0, dims[-1], size=N).astype(np.int64)
    acts = [1, 3][: depth - 1]
    V = rng.normal(size=(2, sum(W.size + (0 if b is None else b.size) for W, b in zip(weights, biases))))
    return weights, biases, acts, [0.0] * len(acts), X, y, V


def cases():
    """(name, callable(core) -> tuple of arrays) for every recorded call."""
    out = []
    for depth, soft in itertools.product((1, 2, 3), (False, True)):
        W, b, acts, params, X, y, V = problem(depth, soft)
        for hessian, structured, f32 in itertools.product((True, False), (True, False), (False, True)):
            tag = f"d{depth}-{'soft' if soft else 'hard'}-{'H' if hessian else 'G'}-{'K' if structured else 'g'}-{int(f32)}"
            out.append((f"moments-{tag}", lambda c, W=W, b=b, a=acts, p=params, X=X, y=y, h=hessian, s=structured, f=f32:
                        c.moments(W, b, a, p, X, y, h, s, BATCH, 2, 1, None, f)))
            if f32:
                continue
            Xb = [X[lo:lo + BATCH] for lo in range(0, N, BATCH)]
            yb = [np.ascontiguousarray(y[lo:lo + BATCH]) for lo in range(0, N, BATCH)]
            pairs = np.array([(0, 0), (0, 2), (1, 2)], dtype=np.int64)
            out.append((f"pairsums-{tag}", lambda c, W=W, b=b, a=acts, p=params, Xb=Xb, yb=yb, h=hessian, s=structured,
                        pairs=pairs: c.pair_sums(W, b, a, p, Xb, yb, pairs, h, s, 1)))
        for hessian in (True, False):
            out.append((f"hvp-d{depth}-{'soft' if soft else 'hard'}-{int(hessian)}",
                        lambda c, W=W, b=b, a=acts, p=params, X=X, y=y, V=V, h=hessian:
                        (c.hvp(W, b, a, p, X, y, V, h, BATCH, 1),)))
    return out


def record() -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"compiler": np.array(compiler_version())}
    for variant, core in cores().items():
        for name, call in cases():
            for i, a in enumerate(call(core)):
                arrays[f"{variant}/{name}/{i}"] = np.asarray(a)
    return arrays


if __name__ == "__main__":
    import sys

    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path("ce_snapshot.npz")
    data = record()
    np.savez(out, **data)
    print(f"{out}: {len(data) - 1} arrays, compiler {data['compiler']}")
