"""The Wolkowicz–Styan bounds and the result type."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from .rounding import U_DOUBLE, down, up

__all__ = ["Bound", "LayerBound", "WSBounds", "ws_bounds"]

_T = TypeVar("_T")


def _fields_from(cls: type[_T], d: Any, what: str, convert: Mapping[str, Any] | None = None) -> _T:
    """``cls(**d)`` for a mapping that ``to_dict()`` wrote (possibly through JSON), with the
    keys checked: unknown ones and missing required ones are named in a ValueError."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{what}.from_dict expects a mapping (what to_dict() returns); got {type(d).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in d if k not in names)
    if unknown:
        raise ValueError(f"{what}.from_dict: unknown keys {', '.join(unknown)}")
    required = [f.name for f in fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{what}.from_dict: missing keys {', '.join(missing)}")
    kw = dict(d)
    for key, fn in (convert or {}).items():
        if kw.get(key) is not None:
            try:
                kw[key] = fn(kw[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{what}.from_dict: cannot read {key!r}: {exc}") from None
    return cls(**kw)


@dataclass(frozen=True)
class WSBounds:
    """Wolkowicz–Styan bounds of a real symmetric n x n matrix from tr and tr of its square."""

    n: int
    trace: float
    trace_sq: float
    mean: float
    std: float
    lambda_max_lower: float
    lambda_max_upper: float
    lambda_min_lower: float
    lambda_min_upper: float
    #: The rank bound the four bounds used (None: the plain bounds with dimension n).
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WSBounds:
        """The WSBounds that :meth:`to_dict` (or its JSON) describes."""
        return _fields_from(cls, d, "WSBounds")


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {v!r}")
    return v


def _sup_upper(n: int, a: float, b: float, t2: float) -> float:
    """sup of the WS upper bound u(n) = t/n + sqrt((n-1)/n) sqrt(t2 - t^2/n) over numbers
    with sum t in [a, b] and sum of squares t2 (the largest; u grows with t2).

    For a fixed t2, u(n) is concave in t with its maximum sqrt(t2) at t = sqrt(t2), and it is
    real for |t| <= sqrt(n t2): the sup is at sqrt(t2) clamped into [a, b] (docs/certificates.md).
    """
    root = math.sqrt(max(t2, 0.0))
    lo, hi = max(a, -math.sqrt(n) * root), min(b, math.sqrt(n) * root)
    if lo > hi:  # only through rounding (the feasibility check passed): the sums of [a, b] themselves
        lo, hi = a, b
    t = min(max(root, lo), hi)
    if n == 1:
        return t
    return min(root, t / n + math.sqrt((n - 1) / n) * math.sqrt(max(t2 - t * t / n, 0.0)))


def _inf_lower(n: int, a: float, b: float, t2_lo: float, t2_hi: float) -> float:
    """inf of the WS lower bound l(n) = t/n + sqrt(n t2 - t^2) / (n sqrt(n-1)) over sums t in
    [a, b] and sums of squares t2 in [t2_lo, t2_hi] that some n real numbers have.

    l grows with t2, so t2 = max(t2_lo, t^2/n); in t the result is t/n where t^2 >= n t2_lo and
    concave in between, so the inf is at an end of the feasible t-range or at +-sqrt(n t2_lo).
    """
    reach = math.sqrt(n * max(t2_hi, 0.0))
    lo, hi = max(a, -reach), min(b, reach)
    if lo > hi:  # only through rounding (the feasibility check passed)
        lo, hi = a, b
    if n == 1:
        return lo
    edge = math.sqrt(n * max(t2_lo, 0.0))
    cands = [lo, hi] + [c for c in (-edge, edge) if lo <= c <= hi]
    den = n * math.sqrt(n - 1)
    return min(c / n + math.sqrt(max(n * t2_lo - c * c, 0.0)) / den for c in cands)


_U = U_DOUBLE
#: Relative tolerance of the feasibility check itself (t^2/n and the comparison round).
_CHECK_TOL = 16 * _U


def _ws(t: float, t2: float, n: int, what: str, e1: float = 0.0,
        e2: float = 0.0) -> tuple[float, float, float, float, float, float]:
    """(mean, std, lambda_max_lower, lambda_max_upper, lambda_min_lower, lambda_min_upper) valid
    for every moment pair with |trace - t| <= e1 and |trace_sq - t2| <= e2 (the rounding
    allowances), rounded outward."""
    a, b = t - e1, t + e1
    t2_lo, t2_hi = max(t2 - e2, 0.0), t2 + e2
    closest = 0.0 if a <= 0.0 <= b else min(a * a, b * b)  # the smallest t^2 the box allows
    slack = _CHECK_TOL * max(t2_hi, closest / n)
    if t2_hi + slack < closest / n:
        more = f" (within the rounding allowances {e1:.3g}, {e2:.3g})" if e1 or e2 else ""
        raise ValueError(
            f"no real symmetric {what} has trace {t!r} and trace_sq {t2!r}{more}: "
            f"trace_sq must be >= trace^2/{n} = {t * t / n!r}"
        )
    if n == 1:
        farthest = max(a * a, b * b)
        if farthest * (1.0 + _CHECK_TOL) + e2 < t2_lo:
            raise ValueError(f"no real symmetric {what} has trace {t!r} and trace_sq {t2!r}: "
                             "its one eigenvalue is the trace, so trace_sq must equal trace^2")
    t2_hi = max(t2_hi, closest / n)  # a shortfall within the check's tolerance is rounding
    m = t / n
    s = math.sqrt(max(t2 / n - m * m, 0.0))
    if n == 1:  # the one eigenvalue is the trace: [t - e1, t + e1] (and within +-sqrt(trace_sq))
        lo = max(down(a, 1) if e1 else a, -math.sqrt(t2_hi))
        hi = min(up(b, 1) if e1 else b, math.sqrt(t2_hi))
        lo, hi = (lo, hi) if lo <= hi else (a, b)
        return m, s, lo, hi, lo, hi
    # each bound is a few roundings of terms no larger than |t|/n and sqrt(trace_sq)
    w = 8 * _U * (max(abs(a), abs(b)) / n + math.sqrt(t2_hi))
    max_hi = _sup_upper(n, a, b, t2_hi) + w
    max_lo = _inf_lower(n, a, b, t2_lo, t2_hi) - w
    min_lo = -_sup_upper(n, -b, -a, t2_hi) - w
    min_hi = -_inf_lower(n, -b, -a, t2_lo, t2_hi) + w
    return m, s, max_lo, max_hi, min_lo, min_hi


def _count(value: Any, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer ({what}); got {value!r}")
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1 ({what}); got {int(value)}")
    return int(value)


def _allowance(value: Any, name: str) -> float:
    v = _real(value, name)
    if v < 0:
        raise ValueError(f"{name} is a rounding allowance and cannot be negative; got {v!r}")
    return v


def ws_bounds(trace: float, trace_sq: float, n: int, rank: int | None = None, *, trace_err: float = 0.0,
              trace_sq_err: float = 0.0) -> WSBounds:
    """Wolkowicz–Styan (1980) bounds on the extreme eigenvalues of a real symmetric matrix.

    With m = trace/n and s^2 = trace_sq/n - m^2 (the mean and variance of the eigenvalues)::

        m + s/sqrt(n-1) <= lambda_max <= m + s*sqrt(n-1)
        m - s*sqrt(n-1) <= lambda_min <= m - s/sqrt(n-1)

    For n = 1 all four equal m.  Raises ValueError when n < 1 or when no real symmetric
    matrix has these moments (trace_sq < trace^2/n, or for n = 1 trace_sq != trace^2, beyond
    the allowances and the check's own rounding).

    ``trace_err``, ``trace_sq_err``: rounding allowances (absolute) of the two moments.  The
    bounds then hold for every pair of moments within them (the worst case over the box), so
    they hold for the exact moments whenever the computed ones are that close; bound() passes
    the allowances of its error model (docs/numerics.md).  Every bound is rounded outward.

    ``rank``: an upper bound r < n on the rank of the matrix (rank-aware bounds).  Its
    non-zero eigenvalues, padded with zeros, are then r numbers with the same two moments,
    so the bounds with n = r hold for them, and the matrix also has the eigenvalue 0::

        max(WS_lower(r), 0) <= lambda_max <= max(WS_upper(r), 0)

    (and the mirror image for lambda_min).  These are never looser than the plain bounds
    with dimension n; the result is intersected with them anyway (proof: docs/certificates.md).
    ``mean`` and ``std`` stay those of the n eigenvalues.
    """
    n = _count(n, "n", "the matrix dimension")
    t = _real(trace, "trace")
    t2 = _real(trace_sq, "trace_sq")
    e1 = _allowance(trace_err, "trace_err")
    e2 = _allowance(trace_sq_err, "trace_sq_err")
    if t2 < 0 and t2 + e2 < 0:
        raise ValueError(f"trace_sq is the squared Frobenius norm and cannot be negative; got {t2!r}")
    m, s, max_lo, max_hi, min_lo, min_hi = _ws(t, t2, n, f"{n}x{n} matrix", e1, e2)
    if rank is None:
        return WSBounds(n, t, t2, m, s, max_lo, max_hi, min_lo, min_hi)
    r = _count(rank, "rank", "an upper bound on the rank of the matrix")
    if r >= n:
        return WSBounds(n, t, t2, m, s, max_lo, max_hi, min_lo, min_hi, rank=n)
    try:
        _, _, r_max_lo, r_max_hi, r_min_lo, r_min_hi = _ws(t, t2, r, f"matrix of rank <= {r}", e1, e2)
    except ValueError as exc:
        if r != 1:
            raise
        raise ValueError(f"no real symmetric matrix of rank <= 1 has trace {t!r} and trace_sq {t2!r}: "
                         "its one non-zero eigenvalue is the trace, so trace_sq must equal trace^2") from exc
    return WSBounds(n, t, t2, m, s,
                    lambda_max_lower=max(max_lo, r_max_lo, 0.0),
                    lambda_max_upper=min(max_hi, max(r_max_hi, 0.0)),
                    lambda_min_lower=max(min_lo, min(r_min_lo, 0.0)),
                    lambda_min_upper=min(min_hi, r_min_hi, 0.0),
                    rank=r)


@dataclass(frozen=True)
class LayerBound:
    """Bounds on the extreme eigenvalues of one diagonal block H^{ll} of the curvature.

    H^{ll} is the curvature restricted to the parameters of layer ``layer`` (1-based; its
    ``n_params`` = d_l (d_{l-1} + bias) weights and biases).  The four ``lambda_*`` fields
    are the rank-aware Wolkowicz–Styan bounds (``rank`` bounds the rank of H^{ll}); the
    ``*_plain`` fields use the dimension alone.  Since H^{ll} is a principal submatrix of H,
    lambda_max(H) >= lambda_max(H^{ll}) >= ``lambda_max_lower`` (Cauchy interlacing).
    """

    layer: int
    n_params: int
    rank: int
    trace: float
    trace_sq: float
    lambda_max_lower: float
    lambda_max_upper: float
    lambda_min_lower: float
    lambda_min_upper: float
    lambda_max_upper_plain: float
    lambda_min_lower_plain: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerBound:
        """The LayerBound that :meth:`to_dict` (or its JSON) describes."""
        return _fields_from(cls, d, "LayerBound")


#: Default of Bound's brackets (compared by identity): replaced by the WS intervals.
_WS_INTERVAL: tuple[float, float] = (-math.inf, math.inf)


@dataclass(frozen=True)
class Bound:
    """Exact tr(H), tr(H^2) of the loss curvature over a data set, and the WS bounds.

    ``trace`` and ``trace_sq`` are exact to float64 rounding; the four ``lambda_*`` fields
    bound the extreme eigenvalues of the P x P curvature matrix (P = ``n_params``).
    """

    n_params: int
    n_samples: int
    trace: float
    trace_sq: float
    mean: float
    std: float
    lambda_max_lower: float
    lambda_max_upper: float
    lambda_min_lower: float
    lambda_min_upper: float
    curvature: str
    reduction: str
    backend: str
    elapsed_s: float
    # ---- filled by bound() since issue 4; None where not computed ---------------------
    #: Upper bound on the rank of the curvature matrix, and the rank-aware WS bounds.
    rank: int | None = None
    lambda_max_upper_rank: float | None = None
    lambda_min_lower_rank: float | None = None
    #: WS bounds of each diagonal block H^{ll} (per-layer sharpness), from the same pass.
    #: bound() always sets them; a Bound made by hand without them has none.
    layer_bounds: tuple[LayerBound, ...] = ()
    #: Certified intervals (lower, upper): the best of every bound computed (see the docs).
    #: bound() always sets them; a Bound made by hand without them gets the WS intervals
    #: (lambda_max_lower, lambda_max_upper) and (lambda_min_lower, lambda_min_upper).
    lambda_max_bracket: tuple[float, float] = field(default=_WS_INTERVAL)
    lambda_min_bracket: tuple[float, float] = field(default=_WS_INTERVAL)
    #: exact=True: extreme Rayleigh quotients from Lanczos (lambda_max is a lower bound on the
    #: true largest eigenvalue, lambda_min an upper bound on the smallest; both converge to
    #: them), the residual norms |H y - lambda y| of their unit vectors, and the tightness
    #: ratio lambda_max_upper / lambda_max (None unless lambda_max > 0).
    lambda_max: float | None = None
    lambda_min: float | None = None
    lambda_max_residual: float | None = None
    lambda_min_residual: float | None = None
    tightness: float | None = None
    lanczos_iterations: int | None = None
    lanczos_converged: bool | None = None
    lanczos_s: float | None = None
    #: certify=k: the deflated (Kahan) certificate from certify_k Ritz pairs whose residual
    #: block has spectral norm certify_residual.
    certify_k: int | None = None
    certify_residual: float | None = None
    lambda_max_upper_deflated: float | None = None
    lambda_min_lower_deflated: float | None = None
    #: certify=True: the requested relative width hi/lo - 1, the width reached (the widest of the
    #: ends asked for) and whether it met the request.
    certify_rtol: float | None = None
    certify_width: float | None = None
    certify_met: bool | None = None
    #: Rounding allowances (absolute, docs/numerics.md): the exact tr(H) and tr(H^2) lie within
    #: them of ``trace`` and ``trace_sq``; every bound above was widened by what they imply.
    trace_allowance: float | None = None
    trace_sq_allowance: float | None = None
    #: The loss whose curvature this is: "cross_entropy", "mse" or "bce".
    loss: str = "cross_entropy"

    def __post_init__(self) -> None:
        if self.lambda_max_bracket is _WS_INTERVAL:
            object.__setattr__(self, "lambda_max_bracket", (self.lambda_max_lower, self.lambda_max_upper))
        if self.lambda_min_bracket is _WS_INTERVAL:
            object.__setattr__(self, "lambda_min_bracket", (self.lambda_min_lower, self.lambda_min_upper))

    def to_dict(self) -> dict[str, Any]:
        """Every field; ``layer_bounds`` as a list of dicts, the brackets as tuples (JSON: lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Bound:
        """The Bound that :meth:`to_dict` wrote, also after a JSON round trip (lists become
        tuples again, ``layer_bounds`` LayerBound objects); keys missing from an older file
        take their defaults, unknown keys are refused."""
        return _fields_from(cls, d, "Bound", convert=_BOUND_CONVERT)

    def __repr__(self) -> str:
        name = "H" if self.curvature == "hessian" else "G"
        return (
            f"Bound({self.curvature}, reduction={self.reduction!r}, P={self.n_params}, N={self.n_samples}, "
            f"backend={self.backend!r}, {self.elapsed_s:.3g} s)\n"
            f"  tr({name})   = {self.trace:.10g}\n"
            f"  tr({name}^2) = {self.trace_sq:.10g}\n"
            f"  lambda_max in [{self.lambda_max_lower:.6g}, {self.lambda_max_upper:.6g}]\n"
            f"  lambda_min in [{self.lambda_min_lower:.6g}, {self.lambda_min_upper:.6g}]"
            + self._repr_extra()
        )

    def _repr_extra(self) -> str:
        lines = []
        if self.rank is not None and self.lambda_max_upper_rank is not None:
            lines.append(f"  rank <= {self.rank}: lambda_max <= {self.lambda_max_upper_rank:.6g}, "
                         f"lambda_min >= {self.lambda_min_lower_rank:.6g}")
        if self.certify_k is not None and self.lambda_max_upper_deflated is not None:
            lines.append(f"  deflated (k={self.certify_k}, |R|={self.certify_residual:.3g}): "
                         f"lambda_max <= {self.lambda_max_upper_deflated:.6g}, "
                         f"lambda_min >= {self.lambda_min_lower_deflated:.6g}")
        if self.lambda_max is not None:
            tight = "" if self.tightness is None else f", tightness {self.tightness:.4g}"
            lines.append(f"  Lanczos: lambda_max ~ {self.lambda_max:.8g}, lambda_min ~ {self.lambda_min:.8g} "
                         f"({self.lanczos_iterations} iterations{tight})")
        if self.lambda_max_bracket is not None and self.lambda_min_bracket is not None:  # (a hand-made None)
            lines.append(f"  certified: lambda_max in [{self.lambda_max_bracket[0]:.6g}, {self.lambda_max_bracket[1]:.6g}], "
                         f"lambda_min in [{self.lambda_min_bracket[0]:.6g}, {self.lambda_min_bracket[1]:.6g}]")
        if self.layer_bounds:
            for lb in self.layer_bounds:
                lines.append(f"  layer {lb.layer} (P={lb.n_params}): lambda_max(H^ll) in "
                             f"[{lb.lambda_max_lower:.6g}, {lb.lambda_max_upper:.6g}]")
        return "".join("\n" + line for line in lines)


def _bracket(v: Any) -> tuple[float, float]:
    lo, hi = v  # a pair
    return float(lo), float(hi)


def _layer_bounds(v: Any) -> tuple[LayerBound, ...]:
    return tuple(lb if isinstance(lb, LayerBound) else LayerBound.from_dict(lb) for lb in v)


_BOUND_CONVERT = {"lambda_max_bracket": _bracket, "lambda_min_bracket": _bracket, "layer_bounds": _layer_bounds}
