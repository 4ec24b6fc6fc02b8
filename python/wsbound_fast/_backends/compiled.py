"""The compiled core (cpp/): finding the fastest variant this CPU runs, and calling it.

The bindings convert and check their arguments, release the GIL and poll for Ctrl-C
(cpp/bind_common.hpp); what reaches them here is a validated problem.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import numpy as np

from .._engine.schedule import Moments, ProgressFn
from .._problem.problem import Problem

#: Environment variable that pins the variant: "auto" (default), "baseline" or "avx2".
ENV_VARIANT = "WSBOUND_FAST_CORE"
_MODULES = {"baseline": "_core", "avx2": "_core_avx2"}


def cpu_has_avx2_fma() -> bool:
    """Whether this CPU runs the x86-64-v3 variant (AVX2 and FMA), as NumPy detects it."""
    try:
        from numpy._core._multiarray_umath import (
            __cpu_features__ as feats,  # NumPy >= 2
        )
    except ImportError:  # pragma: no cover - NumPy 1.x
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            return False
    return bool(feats.get("AVX2") and feats.get("FMA3"))


def _import(variant: str) -> ModuleType:
    return importlib.import_module(f"wsbound_fast.{_MODULES[variant]}")


@functools.lru_cache(maxsize=None)
def load_core(variant: str | None = None) -> ModuleType:
    """The compiled core module.  ``variant`` (or $WSBOUND_FAST_CORE): auto, baseline, avx2."""
    choice = (variant or os.environ.get(ENV_VARIANT) or "auto").strip().lower()
    if choice not in ("auto", *_MODULES):
        raise ValueError(f"{ENV_VARIANT} must be 'auto', 'baseline' or 'avx2'; got {choice!r}")
    try:
        if choice == "auto":
            if cpu_has_avx2_fma():
                try:
                    return _import("avx2")
                except ImportError:
                    pass  # not built for this platform: the baseline serves
            return _import("baseline")
        return _import(choice)
    except ImportError as exc:
        raise ImportError(
            f"wsbound_fast's compiled extension ({_MODULES.get(choice, '_core')}) could not be imported: "
            f"{exc}. Reinstall with `pip install .` from the source tree (a C++17 compiler is needed), "
            "or pass backend='numpy' to use the NumPy implementation."
        ) from exc


def moments(prob: Problem, progress: ProgressFn | None = None) -> Moments:
    """The C++ engine's moment pass (cpp/wsbound/engine.cpp)."""
    return Moments(*load_core().moments(
        list(prob.weights), list(prob.biases), [a.code for a in prob.activations], [a.param for a in prob.activations],
        prob.X, prob.labels, prob.hessian, prob.structured, prob.batch_size, prob.group_blocks, prob.threads,
        progress, prob.f32, prob.loss_code, list(prob.parts or ()),
    ))


def hvp(prob: Problem, V: np.ndarray) -> np.ndarray:
    """The C++ core's unnormalised product sum_n H_n V[j] of a (k, P) float64 array (cpp/wsbound/hvp.cpp)."""
    return load_core().hvp(
        list(prob.weights), list(prob.biases), [a.code for a in prob.activations],
        [a.param for a in prob.activations], prob.X, prob.labels, V, prob.hessian, prob.batch_size, prob.threads,
        prob.loss_code,
    )
