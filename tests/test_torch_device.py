"""backend="torch" off the CPU without a GPU: device placement and host synchronisations.

A CUDA run fails on what a CPU run cannot show: a tensor made without ``device=`` (or a
``torch.from_numpy`` never moved) meeting the computation's tensors, and it slows down on
hidden host synchronisations (``.item()``, ``float(t)``, ``if t.any()``, ``.cpu()``) inside
the loop over block pairs.  Here the torch backend computes on torch's ``meta`` device
(shapes only, no data; planned as an accelerator, since it is not the CPU) under a dispatch
mode that applies CUDA's rule -- every tensor of an operation on the compute device, CPU
0-dim tensors excepted -- and counts the copies from the device to the host.  Values are
not computed; their exactness on the CPU is the business of test_torch_backend.py.
"""

from __future__ import annotations

import collections
import math
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import reference as R  # noqa: E402
from test_structured import SPECS  # noqa: E402
from wsbound_fast._backends import torch as torch_backend  # noqa: E402
from wsbound_fast._problem import validate as validation  # noqa: E402

#: Copies between devices (checked separately) and ops that take no tensor data.
_COPIES = {"aten._to_copy.default", "aten.copy_.default"}
#: Ops that read a device value on the host (each a synchronisation on CUDA).
_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
          "aten.equal.default", "aten.masked_select.default"}


class DeviceRules(TorchDispatchMode):
    """Raise on an op that mixes the compute device with non-scalar CPU tensors; count the
    device -> host copies and host reads of device values; stand in zeros for the data of a
    device -> host copy (meta tensors have none)."""

    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device = device
        self.ops = 0
        self.on_device = 0
        self.to_host: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.ops += 1
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devs = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        self.on_device += self.device in devs
        if name in _READS and self.device in devs:
            raise AssertionError(f"{name}: a device value read on the host (a synchronisation on CUDA)")
        if name == "aten._to_copy.default" and tensors[0].device.type == self.device \
                and torch.device(kwargs.get("device", self.device)).type == "cpu":
            self.to_host[name] += 1
            return torch.zeros(tensors[0].shape, dtype=kwargs.get("dtype") or tensors[0].dtype)
        if name == "aten.copy_.default" and tensors[0].device.type == "cpu" and tensors[1].device.type == self.device:
            self.to_host[name] += 1
            return tensors[0].zero_()
        if name not in _COPIES and len(devs) > 1:
            raise AssertionError(f"{name} mixes devices {sorted(devs)} (CUDA refuses this)")
        return func(*args, **kwargs)


def _check_X_meta(X, d_in):
    """check_X without its NaN/Inf scan (a meta tensor holds no values to read)."""
    if isinstance(X, torch.Tensor) and X.device.type == "meta":
        validation.check_X_shape(tuple(X.shape), d_in)
        return X.detach()
    return torch_backend.check_X.__wrapped__(X, d_in)


@pytest.fixture
def meta_X(monkeypatch):
    orig = torch_backend.check_X
    _check_X_meta.__wrapped__ = orig
    monkeypatch.setattr(torch_backend, "check_X", _check_X_meta)


def test_rules_catch_a_cpu_tensor_and_a_host_read():
    """The mode is not vacuous: the two mistakes it is there for raise."""
    a = torch.zeros(3, 4, device="meta")
    with DeviceRules(), pytest.raises(AssertionError, match="mixes devices"):
        a + torch.ones(3, 4)  # a tensor made without device=
    with DeviceRules(), pytest.raises(AssertionError, match="mixes devices"):
        a @ torch.from_numpy(np.ones((4, 2)))  # from_numpy never moved
    with DeviceRules(), pytest.raises(AssertionError, match="synchronisation"):
        bool((a > 0).any())
    with DeviceRules() as m:
        a + torch.tensor(2.0)  # a CPU scalar is allowed, as on CUDA
        out = a.sum(dim=0).cpu()
    assert m.to_host and out.device.type == "cpu"


#: (model, curvature, structured path, where X lives, precision): every model and path once,
#: the three places of X and the two precisions in turn.
_PLACES = [("numpy", "float64"), ("host tensor", "float32"), ("device tensor", "float64")]
CASES = [(spec, curv, structured) for spec in SPECS for curv in ("hessian", "ggn") for structured in (True, False)
         if not (structured and spec.depth == 1 and curv == "hessian")]
CASES = [case + _PLACES[i % 3] for i, case in enumerate(CASES)]


@pytest.mark.parametrize(("spec", "curvature", "structured", "x_kind", "dtype"), CASES,
                         ids=[f"{'-'.join(map(str, s.dims))}-{c}-{'k' if k else 'g'}-{x}-{d}" for s, c, k, x, d in CASES])
def test_moments_stay_on_the_device(spec, curvature, structured, x_kind, dtype, refs, meta_X):
    """Every block pair's work on the compute device, whatever the model (depths 1-4, both
    curvatures and contraction paths, soft labels, layers without bias), precision and
    where X lives; the two arrays of per-block partial sums (traces and trace magnitudes; block
    moments and norms) are the only device -> host copies however many block pairs there are,
    and no device value is read on the host."""
    layers, X, y = refs.model(spec)
    X = np.tile(X, (2, 1))
    y = np.tile(y, 2) if y.ndim == 1 else np.tile(y, (2, 1))
    Xa = {"numpy": X, "host tensor": torch.from_numpy(X), "device tensor": torch.from_numpy(X).to("meta")}[x_kind]
    prob = torch_backend.validate_torch(layers, Xa, y, activation=spec.activation_arg(), curvature=curvature,
                                         reduction="mean", device="meta", dtype=dtype, batch_size=4)
    prob = replace(prob, structured=structured, group_blocks=2)
    nb = math.ceil(prob.n_samples / 4)
    assert nb >= 4
    progress = []
    with DeviceRules() as m:
        trace, blocks, trace_abs, norms = torch_backend.moments(prob, progress=lambda d, t: progress.append(d))
    assert progress[-1] == nb * (nb + 1) // 2
    assert m.on_device > 50 * nb  # the work did run on the device
    assert sum(m.to_host.values()) == 2, m.to_host
    assert trace.shape == trace_abs.shape == (spec.depth,)
    assert blocks.shape == norms.shape == (spec.depth, spec.depth)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("spec", SPECS[1::2], ids=lambda s: "-".join(map(str, s.dims)))
def test_products_stay_on_the_device(spec, curvature, refs):
    """The curvature-vector product: one (k, P) result copied to the host per call, nothing
    else, whatever the number of blocks."""
    layers, X, y = refs.model(spec)
    prob = torch_backend.validate_torch(layers, np.tile(X, (5, 1)), np.tile(y, 5) if y.ndim == 1 else
                                         np.tile(y, (5, 1)), activation=spec.activation_arg(),
                                         curvature=curvature, reduction="mean", device="meta")
    products = torch_backend.hvp_products(prob, 2, 3)
    V = np.random.default_rng(0).standard_normal((2, prob.n_params))
    with DeviceRules() as m:
        out = products(V)
        products(V[:1])
    assert out.shape == V.shape
    assert sum(m.to_host.values()) == 2 and m.on_device > 20


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that aten ops allocate while the mode is on (meta or CPU),
    freed when the last tensor seen on them dies; views share their storage."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, list[int]] = {}  # storage -> [bytes, tensors seen on it]
        self.seen: set[int] = set()

    def _drop(self, key, tid):
        self.seen.discard(tid)
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.refs[key]
            self.live -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        inputs = tree_flatten((args, kwargs))[0]
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in self.seen:
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self.refs:
                self.refs[key][1] += 1
            elif func._schema.is_mutable or any(t is a for a in inputs):
                continue  # an input's storage: allocated before the mode, or counted already
            else:
                self.refs[key] = [st.nbytes(), 1]
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
            self.seen.add(id(t))
            weakref.finalize(t, self._drop, key, id(t))
        return out


@pytest.mark.parametrize(("dims", "curvature", "n", "budget"), [
    ([40, 128, 128, 128, 6], "hessian", 64, 56 * 2**20),  # generic, dense cross terms: batch 8, groups of 3 of 8
    ([100, 256, 10], "hessian", 160, 6 * 2**20),  # K route, blocks (L-1, L-1) and (L-1, L)
    ([60, 96, 96, 10], "ggn", 128, 4 * 2**20),  # K route of the GGN
], ids=["deep-generic", "kroute-hessian", "kroute-ggn"])
def test_moments_keep_within_memory_limit(dims, curvature, n, budget, meta_X):
    """Models under a budget that caches only some blocks at once: the storage that moments()
    allocates on the device (features of the groups held, the next group's, the block pair's
    temporaries, the K route's chunks of sample pairs) stays within memory_limit.  (A group's
    features kept alive by a loop variable while the next group is computed went 5-13 % over
    it.)"""
    rng = np.random.default_rng(2)
    layers = [(rng.normal(size=(b, a)), rng.normal(size=b)) for a, b in zip(dims[:-1], dims[1:])]
    X = torch.empty((n, dims[0]), dtype=torch.float64, device="meta")
    prob = torch_backend.validate_torch(layers, X, rng.integers(0, dims[-1], n), activation="gelu",
                                         curvature=curvature, reduction="mean", device="meta", memory_limit=budget)
    nb = math.ceil(n / prob.batch_size)
    assert 1 < prob.group_blocks < nb  # features are recomputed: the case at stake
    with LiveBytes() as m, pytest.raises(NotImplementedError, match="meta"):
        torch_backend.moments(prob)  # all the work, then the partial sums cannot come to the host
    assert 0.4 * budget < m.peak <= budget, (m.peak / budget, prob.batch_size, prob.group_blocks, nb)
