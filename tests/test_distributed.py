"""bound / hvp / eigsh / plan with client= (dask.distributed): the tiles of block pairs as tasks on
a LocalCluster of processes, reduced on the client in the engine's order (docs/design.md, "On a
cluster").  The moments are bitwise those of the local engine at the same blocks, for any number
of workers, schedule or rerun; products bitwise reproducible and equal to the local ones to
rounding; faults (a killed worker, Ctrl-C, a task's error); the error without dask."""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import dask.array as da
import wsbound_fast as wsb
from wsbound_fast._backends import distributed as wsb_dist

BATCH = 16
N_400 = 400
N = 150  # ten blocks, the last of six samples: 55 block pairs


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def client1():
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as cluster, distributed.Client(cluster, set_as_default=False) as c:
        yield c


def _model(depth: int, soft: bool = False, n: int = N, seed: int = 0, widths=(9, 7)):
    rng = np.random.default_rng(seed + 10 * depth + soft)
    dims = [6, *widths[: depth - 1], 4]
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), 0.3 * rng.normal(size=o) if l != 1 else None)
              for l, (i, o) in enumerate(zip(dims[:-1], dims[1:]))]
    X = rng.normal(size=(n, dims[0]))
    if soft:
        y = rng.random(size=(n, dims[-1]))
        y /= y.sum(axis=1, keepdims=True)
    else:
        y = rng.integers(0, dims[-1], size=n)
    return layers, X, y


def _same(a: wsb.Bound, b: wsb.Bound) -> None:
    assert a.trace == b.trace and a.trace_sq == b.trace_sq, (a.trace, b.trace, a.trace_sq, b.trace_sq)
    assert a.lambda_max_bracket == b.lambda_max_bracket and a.lambda_min_bracket == b.lambda_min_bracket
    assert a.trace_sq_allowance == b.trace_sq_allowance
    for la, lb in zip(a.layer_bounds, b.layer_bounds):
        assert la.trace == lb.trace and la.trace_sq == lb.trace_sq


@pytest.mark.parametrize("case", ["1-hessian", "2-hessian", "2-ggn", "3-hessian-soft", "2-hessian-f32",
                                  "2-ggn-sum-numpy", "3-hessian-numpy-soft"])
def test_bitwise_the_local_engine(client, case: str) -> None:
    """At the same blocks the cluster's moments are the local engine's, bit for bit."""
    parts = case.split("-")
    depth, curvature = int(parts[0]), parts[1]
    layers, X, y = _model(depth, soft="soft" in parts)
    kw = dict(activation="tanh", curvature=curvature, batch_size=BATCH, backend="numpy" if "numpy" in parts else "cpp",
              reduction="sum" if "sum" in parts else "mean", dtype="float32" if "f32" in parts else None)
    _same(wsb.bound(layers, X, y, **kw), wsb.bound(layers, X, y, client=client, **kw))


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_diagonal_losses(client, loss: str) -> None:
    layers, X, _ = _model(2)
    Y = np.random.default_rng(5).random(size=(N, 4))
    kw = dict(activation="tanh", batch_size=BATCH, loss=loss)
    _same(wsb.bound(layers, X, Y, backend="numpy", **kw), wsb.bound(layers, X, Y, backend="numpy", client=client, **kw))
    _same(wsb.bound(layers, X, Y, **kw), wsb.bound(layers, X, Y, client=client, **kw))


def test_default_plan_is_the_local_plan(client) -> None:
    layers, X, y = _model(2, n=300)
    local = wsb.bound(layers, X, y, activation="tanh")
    _same(local, wsb.bound(layers, X, y, activation="tanh", client=client))


def test_torch_backend_bitwise(client) -> None:
    pytest.importorskip("torch")
    layers, X, y = _model(2)
    kw = dict(activation="tanh", batch_size=BATCH, backend="torch")
    _same(wsb.bound(layers, X, y, **kw), wsb.bound(layers, X, y, client=client, **kw))
    kw32 = dict(kw, dtype="float32")
    _same(wsb.bound(layers, X, y, **kw32), wsb.bound(layers, X, y, client=client, **kw32))


def test_one_and_two_workers_and_reruns_bitwise(client, client1) -> None:
    layers, X, y = _model(2, n=400)
    kw = dict(activation="tanh", batch_size=BATCH, exact=True, lanczos_maxiter=40)
    runs = [wsb.bound(layers, X, y, client=c, **kw) for c in (client, client1, client)]
    for r in runs[1:]:
        _same(runs[0], r)
        assert r.lambda_max == runs[0].lambda_max  # the products too: a partition fixed by the blocks
    assert runs[0].lambda_max == pytest.approx(wsb.bound(layers, X, y, **kw).lambda_max, rel=1e-12)


def test_dask_array_X(client) -> None:
    layers, X, y = _model(2, n=230)
    Xd = da.from_array(X, chunks=(37, 3))  # chunks that are not the blocks, split along features too
    local = wsb.bound(layers, X, y, activation="tanh", batch_size=BATCH)
    _same(local, wsb.bound(layers, Xd, y, activation="tanh", batch_size=BATCH, client=client))
    _same(local, wsb.bound(layers, Xd, da.from_array(y, chunks=50), activation="tanh", batch_size=BATCH, client=client))
    Xi = np.round(10 * X).astype(np.int32)  # integer X: converted lazily, as the local engine does
    _same(wsb.bound(layers, Xi, y, activation="tanh", batch_size=BATCH), wsb.bound(layers, da.from_array(Xi, chunks=64), y,
                                                               activation="tanh", batch_size=BATCH, client=client))
    bad = X.copy()
    bad[100, 2] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        wsb.bound(layers, da.from_array(bad, chunks=50), y, activation="tanh", client=client)
    with pytest.raises(ValueError, match="features per sample"):
        wsb.bound(layers, da.from_array(X[:, :5], chunks=50), y, activation="tanh", client=client)


def test_progress_counts_block_pairs_as_tiles_finish(client) -> None:
    layers, X, y = _model(2)
    seen: list[tuple[int, int]] = []
    wsb.bound(layers, X, y, activation="tanh", batch_size=BATCH, client=client, callback=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (55, 55)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 1


def test_products_on_the_cluster(client, client1, monkeypatch) -> None:
    layers, X, y = _model(2, n=1100)  # five blocks of the product (256 samples)
    v = np.random.default_rng(1).normal(size=(wsb.bound(layers, X[:20], y[:20], activation="tanh").n_params, 3))
    local = wsb.hvp(layers, X, y, v, activation="tanh")
    assert np.array_equal(wsb.hvp(layers, X, y, v, activation="tanh", client=client), local)  # one task: the local sum, bitwise
    monkeypatch.setattr(wsb_dist, "PRODUCT_TASK_SAMPLES", 256)  # five tasks, a tree of four additions
    d2, d1 = wsb.hvp(layers, X, y, v, activation="tanh", client=client), wsb.hvp(layers, X, y, v, activation="tanh", client=client1)
    assert np.array_equal(d1, d2) and np.array_equal(d2, wsb.hvp(layers, X, y, v, activation="tanh", client=client))
    np.testing.assert_allclose(d2, local, rtol=1e-12, atol=1e-14 * np.abs(local).max())
    np.testing.assert_allclose(wsb.hvp(layers, X, y, v, activation="tanh", client=client, backend="numpy"), local, rtol=1e-11,
                               atol=1e-13 * np.abs(local).max())
    e_loc = wsb.eigsh(layers, X, y, activation="tanh", k=2, which="BE")
    e_d = wsb.eigsh(layers, X, y, activation="tanh", k=2, which="BE", client=client)
    np.testing.assert_allclose(e_d, e_loc, rtol=1e-9)
    res = wsb.bound(layers, X, y, activation="tanh", client=client, certify=True)
    lo, hi = res.lambda_max_bracket
    assert res.certify_met and lo <= e_loc[-1] * (1 + 1e-9) and hi >= e_loc[-1] * (1 - 1e-9)


def test_plan_on_a_cluster(client) -> None:
    layers, _, _ = _model(2)
    p = wsb.plan(layers, 2000, batch_size=50, client=client)
    assert p.workers == 2 and p.tiles >= 1 and 1 <= p.tile_blocks <= p.n_blocks
    assert p.task_input_bytes == 2 * p.tile_blocks * 50 * (8 * 6 + 8)
    k8 = wsb.plan(layers, 2000, batch_size=50, workers=8)
    assert k8.tiles >= p.tiles and k8.predicted_seconds < p.predicted_seconds


# -- faults ------------------------------------------------------------------------------------


def _slow_model():
    """About a second of tiles on two workers here."""
    return _model(2, n=2400, widths=(48,), seed=3)


def test_a_killed_worker_changes_nothing(client) -> None:
    layers, X, y = _slow_model()
    kw = dict(activation="tanh", batch_size=40)
    ref = wsb.bound(layers, X, y, **kw)
    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)
    victim = max(pids.values())
    killed: list[int] = []

    def kill(done: int, total: int) -> None:
        if not killed and done:
            os.kill(victim, signal.SIGKILL)
            killed.append(done)

    res = wsb.bound(layers, X, y, client=client, callback=kill, **kw)
    assert killed and killed[0] < 1830  # mid-run
    _same(ref, res)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it


def test_blocks_lost_with_a_worker_are_sent_again(client) -> None:
    """A worker killed before any tile ran: the blocks scattered to it alone are lost (dask cannot
    recompute scattered data); they are scattered again and their tiles resubmitted."""
    layers, X, y = _model(2, n=400)
    kw = dict(activation="tanh", curvature="hessian", reduction="mean", batch_size=BATCH, threads=None,
              memory_limit=None, device=None, dtype=None, loss="cross_entropy")
    from wsbound_fast._backends import validate_for

    prob = validate_for("cpp", layers, X, y, client=client, **kw)
    ref = wsb.bound(layers, X, y, activation="tanh", batch_size=BATCH)
    client.wait_for_workers(2, timeout=60)
    with wsb_dist.Cluster(client, prob, "cpp") as cl:
        holders = client.who_has(cl._x)
        victim_addr = next(iter(holders[cl._x[0].key]))
        os.kill(client.run(os.getpid, workers=[victim_addr])[victim_addr], signal.SIGKILL)
        deadline = time.perf_counter() + 20
        while cl._x[0].status != "cancelled" and time.perf_counter() < deadline:
            time.sleep(0.05)
        assert cl._x[0].status == "cancelled"
        mom = cl.moments()
        assert cl._x[0].status == "finished"  # scattered again
        v = np.ones(prob.n_params)
        np.testing.assert_array_equal(cl.products()(v[None, :])[0], wsb.hvp(layers, X, y, v, activation="tanh", batch_size=BATCH,
                                                                            reduction="sum"))
    from wsbound_fast._engine.schedule import total_moments

    assert total_moments(mom.trace, mom.blocks)[1] / N_400**2 == ref.trace_sq
    client.wait_for_workers(2, timeout=60)


def test_ctrl_c_cancels_the_tasks(client) -> None:
    layers, X, y = _slow_model()
    client.wait_for_workers(2, timeout=60)
    started: list[float] = []

    def interrupt(done: int, total: int) -> None:
        if not started:
            started.append(time.perf_counter())
            threading.Timer(0.05, _thread.interrupt_main).start()

    with pytest.raises(KeyboardInterrupt):
        wsb.bound(layers, X, y, activation="tanh", batch_size=20, client=client, callback=interrupt)
    assert time.perf_counter() - started[0] < 1.5
    deadline = time.perf_counter() + 5
    while any(client.processing().values()) and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert not any(client.processing().values())  # nothing left running on the cluster
    assert wsb.bound(layers[:1], X, y, activation="tanh", client=client).trace > 0  # and the client still works


def test_a_task_error_surfaces_as_itself(client) -> None:
    layers, X, y = _model(2)
    # a dask.array that says it has 6 features per sample but holds 5: only a task finds out
    lying = da.from_array(X[:, :5], chunks=(BATCH, 5)).map_blocks(lambda b: b, chunks=((BATCH,) * 9 + (6,), (6,)),
                                                                  dtype=X.dtype)
    with pytest.raises(ValueError, match=r"width 5 does not match layers\[0\] \(6\)"):
        wsb.bound(layers, lying, y, activation="tanh", batch_size=BATCH, client=client)


def test_client_without_dask(monkeypatch) -> None:
    layers, X, y = _model(1)
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    for call in (lambda: wsb.bound(layers, X, y, activation="tanh", client=object()), lambda: wsb.hvp(layers, X, y, np.ones(28),
                                                                                   activation="tanh", client=object()),
                 lambda: wsb.plan(layers, 100, client=object())):
        with pytest.raises(ImportError, match=r"wsbound_fast\[dask\]"):
            call()


def test_client_must_be_a_client() -> None:
    layers, X, y = _model(1)
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        wsb.bound(layers, X, y, activation="tanh", client="tcp://localhost:8786")
    assert wsb_dist.is_dask_array(da.zeros(3)) and not wsb_dist.is_dask_array(np.zeros(3))


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_parameter_subsets(client, backend: str) -> None:
    """A subset with a layer's weights alone and another's bias alone: the cluster's moments are
    the local engine's, bit for bit."""
    layers, X, y = _model(3)
    kw = dict(activation="tanh", batch_size=BATCH, backend=backend, params=["b0", "W1", "W2"])
    _same(wsb.bound(layers, X, y, **kw), wsb.bound(layers, X, y, client=client, **kw))
