"""Tracking during training: wsb.Tracker, wsb.History and its records.

A :class:`Tracker` holds a fixed evaluation set (X, y) and the options of :func:`bound`; every
k-th training step it calls ``bound()`` on the model's current weights and appends a
:class:`Record` to its :class:`History`.  A History saves to JSON (everything, each record's
full :class:`Bound` included) or CSV (the record columns) and loads back equal.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .._problem import loaders
from .._problem.validate import _is_int
from .._spectral.bounds import Bound
from .bound import bound
from .plan import Plan, plan

__all__ = ["History", "Record", "Tracker"]

#: The ``format`` key of a saved history, and the first word of a CSV file's comment line.
FORMAT = "wsbound_fast.history"
VERSION = 1


def _real(value: Any, name: str, optional: bool = True) -> float | None:
    """``float(value)`` for a real number (a Python or NumPy number, a one-element tensor)."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number{' or None' if optional else ''}; got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number{' or None' if optional else ''}; got {value!r}") from None


def _step(value: Any, name: str = "step") -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer >= 0; got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return int(value)


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (lower, upper); got {value!r}") from None
    lo_f, hi_f = _real(lo, f"{name}[0]", False), _real(hi, f"{name}[1]", False)
    assert lo_f is not None and hi_f is not None
    return lo_f, hi_f


@dataclass(frozen=True)
class Record:
    """What :class:`Tracker` recorded at one training step.

    ``lambda_max_bracket`` / ``lambda_min_bracket``: the certified intervals (lower, upper) of
    the largest and smallest eigenvalue of the curvature (``Bound.lambda_max_bracket``);
    ``trace``, ``trace_sq``: tr(H) and tr(H^2); ``train_loss``: the loss the training loop
    passed (None if it passed none); ``lambda_max``: the Lanczos estimate of the largest
    eigenvalue (with ``certify`` or ``exact``; a lower bound that converges to it, else None);
    ``seconds``: wall time of the ``bound()`` call; ``certify_met``: whether ``certify=True``
    reached its requested width (None without it); ``metrics``: any other numbers the loop
    passed (``tracker.step(model, accuracy=0.9)``).  ``bound``: the full :class:`Bound`
    (saved in JSON, not in CSV, and not compared: two records are equal when the fields above
    are).
    """

    step: int
    trace: float
    trace_sq: float
    lambda_max_bracket: tuple[float, float]
    lambda_min_bracket: tuple[float, float]
    train_loss: float | None = None
    lambda_max: float | None = None
    seconds: float | None = None
    certify_met: bool | None = None
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    bound: Bound | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "step", _step(self.step))
        for name in ("trace", "trace_sq"):
            set_(self, name, _real(getattr(self, name), name, False))
        for name in ("train_loss", "lambda_max", "seconds"):
            set_(self, name, _real(getattr(self, name), name))
        for name in ("lambda_max_bracket", "lambda_min_bracket"):
            set_(self, name, _pair(getattr(self, name), name))
        if self.certify_met is not None and not isinstance(self.certify_met, bool):
            raise TypeError(f"certify_met must be True, False or None; got {self.certify_met!r}")
        set_(self, "metrics", _metrics(self.metrics))
        if self.bound is not None and not isinstance(self.bound, Bound):
            raise TypeError(f"bound must be a wsbound_fast.Bound or None; got {type(self.bound).__name__}")

    @classmethod
    def from_bound(cls, res: Bound, step: int, *, train_loss: Any = None, seconds: float | None = None,
                   metrics: Mapping[str, Any] | None = None) -> Record:
        """The record of ``res`` (a :func:`bound` result) at ``step``."""
        return cls(step=step, trace=res.trace, trace_sq=res.trace_sq, lambda_max_bracket=res.lambda_max_bracket,
                   lambda_min_bracket=res.lambda_min_bracket, train_loss=train_loss, lambda_max=res.lambda_max,
                   seconds=seconds, certify_met=res.certify_met, metrics=metrics or {}, bound=res)

    def to_dict(self) -> dict[str, Any]:
        """Every field (the brackets as lists, ``bound`` as ``Bound.to_dict()`` or None)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["lambda_max_bracket"] = list(self.lambda_max_bracket)
        out["lambda_min_bracket"] = list(self.lambda_min_bracket)
        out["metrics"] = dict(self.metrics)
        out["bound"] = None if self.bound is None else self.bound.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        """The Record that :meth:`to_dict` wrote (also after a JSON round trip)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"Record.from_dict expects a mapping; got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise ValueError(f"Record.from_dict: unknown keys {', '.join(unknown)}")
        missing = [k for k in ("step", "trace", "trace_sq", "lambda_max_bracket", "lambda_min_bracket") if k not in d]
        if missing:
            raise ValueError(f"Record.from_dict: missing keys {', '.join(missing)}")
        kw = dict(d)
        if kw.get("bound") is not None and not isinstance(kw["bound"], Bound):
            kw["bound"] = Bound.from_dict(kw["bound"])
        return cls(**kw)


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers; got {type(value).__name__}")
    out: dict[str, float] = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric names must be non-empty strings; got {key!r}")
        if key in _RESERVED:
            raise ValueError(f"metric name {key!r} is taken by a record column; choose another name")
        x = _real(v, f"metric {key!r}", False)
        assert x is not None
        out[key] = x
    return out


#: The CSV columns of a record, in order (the metrics follow, one column each).
CSV_COLUMNS = ("step", "train_loss", "trace", "trace_sq", "lambda_max_lo", "lambda_max_hi", "lambda_min_lo",
               "lambda_min_hi", "lambda_max", "seconds", "certify_met")
_RESERVED = frozenset(CSV_COLUMNS) | {f.name for f in fields(Record)}


def _cell(value: Any) -> str:
    """A CSV cell that reads back exactly: repr of a float (the shortest round trip), '' for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _read_cell(text: str, column: str, kind: str, line: int) -> Any:
    if text == "":
        return None
    try:
        if kind == "int":
            return int(text)
        if kind == "bool":
            return {"True": True, "False": False}[text]
        return float(text)
    except (ValueError, KeyError):
        raise ValueError(f"line {line}, column {column!r}: cannot read {text!r} as {kind}") from None


@dataclass
class History:
    """The records of a :class:`Tracker` run, in step order.

    ``lr``: the learning rate of the run (None if not given; :func:`plot_history` draws
    2/``lr`` from it); ``curvature`` ("hessian" or "ggn") and ``loss`` (the loss's name) as
    the records' bounds had them.  Iterating, ``len`` and indexing go over the records;
    :meth:`column` gives one field (or metric) of every record.  :meth:`save` writes JSON or
    CSV by the file's suffix and :meth:`load` reads either back: ``History.load(path) ==
    history`` (float values are written exactly; NaN values compare unequal, as NaN does).
    """

    records: list[Record] = field(default_factory=list)
    lr: float | None = None
    curvature: str | None = None
    loss: str | None = None

    def __post_init__(self) -> None:
        if self.lr is not None:
            self.lr = _learning_rate(self.lr)
        for name in ("curvature", "loss"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"{name} must be a string or None; got {v!r}")
        records, self.records = list(self.records), []
        for r in records:
            self.append(r)

    def append(self, record: Record) -> None:
        """Add ``record`` at the end; its step must come after the last one's."""
        if not isinstance(record, Record):
            raise TypeError(f"a History holds wsbound_fast.Record objects; got {type(record).__name__}")
        if self.records and record.step <= self.records[-1].step:
            raise ValueError(f"step must increase: record at step {record.step} after step {self.records[-1].step}")
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def __repr__(self) -> str:
        steps = f", steps {self.records[0].step}..{self.records[-1].step}" if self.records else ""
        lr = "" if self.lr is None else f", lr={self.lr:g}"
        return f"History({len(self.records)} records{steps}{lr}, curvature={self.curvature!r}, loss={self.loss!r})"

    @property
    def metric_names(self) -> list[str]:
        """The names of the records' metrics, in the order they first appear."""
        names: dict[str, None] = {}
        for r in self.records:
            names.update(dict.fromkeys(r.metrics))
        return list(names)

    def column(self, name: str) -> list[Any]:
        """One value per record: a field (``"step"``, ``"train_loss"``, ``"lambda_max_bracket"``,
        ...; the CSV names ``"lambda_max_lo"`` etc. too) or a metric (None where a record lacks it)."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a string; got {name!r}")
        ends = {"lambda_max_lo": ("lambda_max_bracket", 0), "lambda_max_hi": ("lambda_max_bracket", 1),
                "lambda_min_lo": ("lambda_min_bracket", 0), "lambda_min_hi": ("lambda_min_bracket", 1)}
        if name in ends:
            key, i = ends[name]
            return [getattr(r, key)[i] for r in self.records]
        if name in {f.name for f in fields(Record)}:
            return [getattr(r, name) for r in self.records]
        if name in self.metric_names:
            return [r.metrics.get(name) for r in self.records]
        raise ValueError(f"name must be a record field or a metric ({', '.join(CSV_COLUMNS)}, "
                         f"{', '.join(self.metric_names) or 'no metrics'}); got {name!r}")

    # ---- saving and loading ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`save` writes: a format tag, the run's settings and the records."""
        return {"format": FORMAT, "version": VERSION, "lr": self.lr, "curvature": self.curvature,
                "loss": self.loss, "records": [r.to_dict() for r in self.records]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> History:
        """The History that :meth:`to_dict` wrote (also after a JSON round trip)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"History.from_dict expects a mapping; got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"not a saved history: its 'format' is {d.get('format')!r}, not {FORMAT!r}")
        if d.get("version") != VERSION:
            raise ValueError(f"history format version {d.get('version')!r} is not supported (this is {VERSION})")
        unknown = sorted(str(k) for k in d if k not in {"format", "version", "lr", "curvature", "loss", "records"})
        if unknown:
            raise ValueError(f"History.from_dict: unknown keys {', '.join(unknown)}")
        records = d.get("records", [])
        if not isinstance(records, list):
            raise TypeError(f"History.from_dict: 'records' must be a list; got {type(records).__name__}")
        return cls([Record.from_dict(r) for r in records], lr=d.get("lr"), curvature=d.get("curvature"),
                   loss=d.get("loss"))

    def save(self, path: str | Path) -> Path:
        """Write the history to ``path``: JSON for a ``.json`` suffix (everything, each record's
        full Bound included), CSV for ``.csv`` (one row per record: the columns
        :data:`CSV_COLUMNS`, then one per metric; a first comment line ``# wsbound_fast.history
        {...}`` holds lr, curvature and loss; pandas reads it with ``comment="#"``).  Floats are
        written exactly (JSON and ``repr``).  Returns the path."""
        p, kind = _history_path(path)
        if kind == "json":
            text = json.dumps(self.to_dict(), indent=1)
            p.write_text(text + "\n", encoding="utf-8")
            return p
        metrics = self.metric_names
        with p.open("w", encoding="utf-8", newline="") as fh:
            meta = {"version": VERSION, "lr": self.lr, "curvature": self.curvature, "loss": self.loss}
            fh.write(f"# {FORMAT} {json.dumps(meta)}\n")
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow([*CSV_COLUMNS, *metrics])
            for r in self.records:
                cells = [r.step, r.train_loss, r.trace, r.trace_sq, *r.lambda_max_bracket, *r.lambda_min_bracket,
                         r.lambda_max, r.seconds, r.certify_met]
                writer.writerow([_cell(v) for v in cells] + [_cell(r.metrics.get(m)) for m in metrics])
        return p

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a history that :meth:`save` wrote (JSON or CSV, by the suffix)."""
        p, kind = _history_path(path)
        if kind == "json":
            with p.open(encoding="utf-8") as fh:
                try:
                    doc = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}: not a JSON history ({exc})") from None
            return cls.from_dict(doc)
        return _load_csv(cls, p)


_CSV_KINDS = {"step": "int", "certify_met": "bool"}


def _load_csv(cls: type[History], p: Path) -> History:
    meta: dict[str, Any] = {}
    with p.open(encoding="utf-8", newline="") as fh:
        first = fh.readline()
        line = 1
        if first.startswith("#"):
            body = first[1:].strip()
            if not body.startswith(FORMAT):
                raise ValueError(f"{p}: line 1 is a comment but not a wsbound_fast history header: {first.strip()!r}")
            try:
                meta = json.loads(body[len(FORMAT):] or "{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}: cannot read the header comment ({exc})") from None
            if meta.pop("version", VERSION) != VERSION:
                raise ValueError(f"{p}: history format version is not {VERSION}")
            header_text = fh.readline()
            line = 2
        else:
            header_text = first
        header = next(csv.reader([header_text]), [])
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{p}: not a history CSV: the header lacks {', '.join(missing)}")
        if len(set(header)) != len(header):
            raise ValueError(f"{p}: the header names a column twice")
        records = []
        for cells in csv.reader(fh):
            line += 1
            if not cells:
                continue
            if len(cells) != len(header):
                raise ValueError(f"{p}: line {line} has {len(cells)} cells, the header {len(header)}")
            row = {c: _read_cell(v, c, _CSV_KINDS.get(c, "float"), line) for c, v in zip(header, cells)}
            metrics = {c: v for c, v in row.items() if c not in CSV_COLUMNS and v is not None}
            try:
                records.append(Record(
                    step=row["step"], trace=row["trace"], trace_sq=row["trace_sq"],
                    lambda_max_bracket=(row["lambda_max_lo"], row["lambda_max_hi"]),
                    lambda_min_bracket=(row["lambda_min_lo"], row["lambda_min_hi"]),
                    train_loss=row["train_loss"], lambda_max=row["lambda_max"], seconds=row["seconds"],
                    certify_met=row["certify_met"], metrics=metrics))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{p}: line {line}: {exc}") from None
    unknown = sorted(set(meta) - {"lr", "curvature", "loss"})
    if unknown:
        raise ValueError(f"{p}: unknown keys in the header comment: {', '.join(unknown)}")
    try:
        return cls(records, lr=meta.get("lr"), curvature=meta.get("curvature"), loss=meta.get("loss"))
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None


def _history_path(path: Any) -> tuple[Path, str]:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path; got {type(path).__name__}")
    p = Path(path)
    kind = p.suffix.lower().lstrip(".")
    if kind not in ("json", "csv"):
        raise ValueError(f"path must end in .json or .csv (the format is read from the suffix); got {str(path)!r}")
    return p, kind


def _learning_rate(value: Any) -> float:
    lr = _real(value, "lr", False)
    assert lr is not None
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0; got {value!r}")
    return lr


def _every(value: Any) -> int | frozenset[int]:
    if _is_int(value):
        if value < 1:
            raise ValueError(f"every must be >= 1 (record every k-th step) or a collection of steps; got {value}")
        return int(value)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"every must be an integer k >= 1 or a collection of step numbers; got {value!r}")
    steps = frozenset(_step(s, "every: each step") for s in value)
    if not steps:
        raise ValueError("every must name at least one step; got an empty collection")
    return steps


#: bound() options a Tracker passes on (everything but the model and the data).
_BOUND_OPTIONS = tuple(n for n in inspect.signature(bound).parameters if n not in ("layers", "X", "y"))


class Tracker:
    """Record the curvature of a model's loss while it trains: every ``every``-th step,
    :func:`bound` on the model's current weights over the fixed data (``X``, ``y``).

    >>> tracker = wsb.Tracker(X, y, every=10, lr=0.1)                   # doctest: +SKIP
    >>> for i in range(steps):                                          # doctest: +SKIP
    ...     loss = train_step(model)
    ...     tracker.step(model, train_loss=loss.item())
    >>> tracker.history.save("sharpness.csv"); wsb.plot_history(tracker.history, "sharpness.png")

    ``X``, ``y``: the evaluation data, as for :func:`bound` (e.g. a fixed batch, or the whole
    training set for full-batch gradient descent); the curvature is that of the loss over them.
    ``every``: an integer k (record the steps 0, k, 2k, ...) or a collection of step numbers
    (e.g. geometrically spaced ones).  ``lr``: the learning rate, kept in the history for the
    2/``lr`` line of :func:`plot_history` (the stability threshold of plain gradient descent
    with step ``lr`` on this loss; with heavy-ball momentum m it is (2 + 2m)/``lr``).
    ``certify`` (default True: each record's ``lambda_max_bracket`` is certified to the relative
    width ``rtol``, by block Lanczos on top of the moment pass), ``activation``, ``loss``,
    ``curvature`` and every other keyword (``backend``, ``threads``, ``rtol``, ...) are passed to
    :func:`bound` unchanged; an unknown keyword is a TypeError here.  ``certify=None`` gives the
    moments and their bounds only (one pass over the data, what :meth:`plan` predicts).

    The model (a ``torch.nn.Sequential`` or a list of (W, b) arrays) is read afresh at every
    record, so pass the module being trained.  :attr:`history` is the :class:`History`.
    """

    def __init__(self, X: Any, y: Any = None, *, every: int | Iterable[int] = 1, lr: float | None = None,
                 activation: Any = None, loss: Any = "cross_entropy", curvature: str = "hessian",
                 certify: int | bool | None = True, **bound_options: Any) -> None:
        self.every = _every(every)
        unknown = sorted(set(bound_options) - set(_BOUND_OPTIONS))
        if unknown:
            raise TypeError(f"Tracker() got unexpected keyword arguments {', '.join(map(repr, unknown))} "
                            f"(bound() takes {', '.join(_BOUND_OPTIONS)})")
        # a loader of (X, y) batches is collected once here (a generator could not be read twice)
        limit = bound_options.get("memory_limit")
        self.X, self.y = loaders.resolve(X, y, limit if isinstance(limit, int) else None)
        self.options: dict[str, Any] = {"activation": activation, "loss": loss, "curvature": curvature,
                                        "certify": certify, **bound_options}
        self.history = History(lr=None if lr is None else _learning_rate(lr))
        self._next = 0

    @property
    def lr(self) -> float | None:
        return self.history.lr

    @property
    def n_samples(self) -> int:
        """The number of samples in X."""
        shape = getattr(self.X, "shape", None)
        return int(shape[0]) if shape is not None and len(shape) else len(self.X)

    def due(self, step: int) -> bool:
        """Whether :meth:`step` records at ``step``."""
        s = _step(step)
        return s % self.every == 0 if isinstance(self.every, int) else s in self.every

    def step(self, model: Any, step: int | None = None, *, train_loss: Any = None,
             **metrics: Any) -> Record | None:
        """Call once per training step: records (and returns the :class:`Record`) when
        :meth:`due`, else returns None at no cost.  ``step``: this step's number (default: one
        after the previous call's, starting at 0); ``train_loss`` and any other keyword numbers
        (``accuracy=...``) are stored in the record."""
        s = self._next if step is None else _step(step)
        self._next = s + 1
        if not self.due(s):
            return None
        return self.record(model, s, train_loss=train_loss, **metrics)

    def record(self, model: Any, step: int | None = None, *, train_loss: Any = None, **metrics: Any) -> Record:
        """Record now, whatever the step (``step`` defaults as in :meth:`step`)."""
        s = self._next if step is None else _step(step)
        self._next = s + 1
        last = self.history.records[-1].step if self.history.records else None
        if last is not None and s <= last:
            raise ValueError(f"step must increase: step {s} after the recorded step {last}")
        train = _real(train_loss, "train_loss")
        checked = _metrics(metrics)
        t0 = time.perf_counter()
        res = bound(model, self.X, self.y, **self.options)
        seconds = time.perf_counter() - t0
        rec = Record.from_bound(res, s, train_loss=train, seconds=seconds, metrics=checked)
        if self.history.curvature is None:
            self.history.curvature, self.history.loss = res.curvature, res.loss
        self.history.append(rec)
        return rec

    def plan(self, model: Any) -> Plan:
        """:func:`plan` for one record's moment pass on ``model`` (``predicted_seconds``;
        ``certify``/``exact`` add Lanczos passes of curvature-vector products on top)."""
        opts = self.options
        keep = {k: opts[k] for k in ("batch_size", "threads", "memory_limit") if k in opts}
        return plan(model, self.n_samples, activation=opts["activation"], curvature=opts["curvature"],
                    loss=opts["loss"], **keep)

    def __repr__(self) -> str:
        every = self.every if isinstance(self.every, int) else sorted(self.every)
        return f"Tracker(every={every!r}, {len(self.history)} records, lr={self.lr!r})"
