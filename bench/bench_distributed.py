"""The exact moments on dask.distributed against the local engine (issue 15).

A W3-shaped model (784-1024-10 tanh, random weights, synthetic MNIST-sized inputs) with the
Hessian's moments, on the same cores: the local C++ engine with 1 and 2 threads against a
LocalCluster of processes with 1 and 2 workers of one thread each (the same blocks, so the
results must agree bitwise).  Reports the overhead of the cluster path at the same cores,
the speed-up from 1 to 2 workers, the bytes moved (scattered once, between workers, and
returned per task), and a projection for N = 60 000 on k workers from wsb.plan(workers=k).

    python bench/bench_distributed.py [--n 8000] [--repeats 1] [--json bench/results/distributed.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import wsbound_fast as wsb
from _timing import best_of


def w3(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(size=(1024, 784)) / 28.0, 0.1 * rng.normal(size=1024)),
              (rng.normal(size=(10, 1024)) / 32.0, 0.1 * rng.normal(size=10))]
    X = np.clip(rng.normal(0.13, 0.3, size=(n, 784)), 0.0, 1.0)  # pixel-like inputs in [0, 1]
    y = rng.integers(0, 10, size=n)
    return layers, X, y


def transfer_bytes(client) -> int:
    """Bytes the workers have sent each other so far (dask's own count)."""
    return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from dask.distributed import Client, LocalCluster
    from wsbound_fast._backends import validate_for
    from wsbound_fast._backends.distributed import Cluster

    layers, X, y = w3(args.n)
    batch = wsb.plan(layers, args.n, threads=2).batch_size  # the same blocks everywhere
    rows: dict[str, dict] = {}
    for cores in (1, 2):
        t_loc, loc = best_of(lambda: wsb.bound(layers, X, y, activation="tanh", batch_size=batch, threads=cores), args.repeats)
        rows[f"local {cores} thread(s)"] = {"seconds": t_loc, "trace_sq": loc.trace_sq}
        print(f"local engine, {cores} thread(s): {t_loc:.2f} s", flush=True)
        with LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=40) as cluster, Client(cluster) as client:
            wsb.bound(layers, X[:64], y[:64], activation="tanh", client=client)  # the workers import the package once
            moved0, cpu0 = transfer_bytes(client), time.process_time()
            t_cl, res = best_of(lambda: wsb.bound(layers, X, y, activation="tanh", batch_size=batch, client=client), args.repeats)
            client_cpu = (time.process_time() - cpu0) / args.repeats  # the client and the scheduler (one process)
            moved = (transfer_bytes(client) - moved0) / args.repeats
            kw = dict(activation="tanh", curvature="hessian", reduction="mean", batch_size=batch, threads=None,
                      memory_limit=None, device=None, dtype=None, loss="cross_entropy")
            prob = validate_for("cpp", layers, X, y, client=client, **kw)
            with Cluster(client, prob, "cpp") as cl:
                tiles = cl.tile_plan().tiles
                t_setup = best_of(lambda: Cluster(client, prob, "cpp").close(), 1)[0]
        L = 2
        n_tasks = len(tiles)
        used = [len({k for ij in t for k in ij}) for t in tiles]
        result_bytes = [8 * (u * (2 * L + L * L) + len(t) * L * L) + 8 * u for u, t in zip(used, tiles)]
        block_bytes = batch * (784 * 8 + 8)
        rows[f"cluster {cores} worker(s)"] = {
            "seconds": t_cl, "trace_sq": res.trace_sq, "bitwise_local": res.trace_sq == loc.trace_sq
            and res.trace == loc.trace, "tiles": n_tasks, "tile_blocks": cl.tile_plan().group,
            "overhead": t_cl / t_loc - 1.0, "setup_seconds": t_setup, "client_cpu_seconds": client_cpu,
            "scattered_bytes": int(X.nbytes + 8 * args.n),
            "inter_worker_bytes_per_task": moved / n_tasks,
            "input_bytes_per_task_max": max(used) * block_bytes,
            "result_bytes_per_task": float(np.mean(result_bytes)),
        }
        r = rows[f"cluster {cores} worker(s)"]
        print(f"LocalCluster, {cores} worker(s) x 1 thread: {t_cl:.2f} s (overhead {100 * r['overhead']:+.1f} % vs "
              f"local at {cores} core(s); setup, scatter included, {t_setup:.2f} s; client + scheduler CPU "
              f"{client_cpu:.2f} s), {n_tasks} tiles of "
              f"{r['tile_blocks']} blocks, bitwise the local engine: {r['bitwise_local']}; bytes per task: inputs "
              f"<= {r['input_bytes_per_task_max'] / 2**20:.2f} MiB, moved between workers "
              f"{r['inter_worker_bytes_per_task'] / 2**20:.2f} MiB, result {r['result_bytes_per_task']:.0f} B",
              flush=True)
    s1, s2 = rows["cluster 1 worker(s)"]["seconds"], rows["cluster 2 worker(s)"]["seconds"]
    print(f"speed-up 1 -> 2 workers: {s1 / s2:.2f}x (local 1 -> 2 threads: "
          f"{rows['local 1 thread(s)']['seconds'] / rows['local 2 thread(s)']['seconds']:.2f}x)")
    same = rows["cluster 1 worker(s)"]["trace_sq"] == rows["cluster 2 worker(s)"]["trace_sq"]
    print(f"1 and 2 workers bitwise equal: {same}")
    # projection for the MNIST training set from the plan, scaled by the measured rate of one worker
    p_here = wsb.plan(layers, args.n, batch_size=batch, workers=1)
    scale = s1 / p_here.predicted_seconds
    print(f"\nprojection, N = 60000 (plan's predicted seconds x {scale:.3f}, the measured/predicted ratio of one "
          f"worker here):")
    print("| workers | tiles | blocks per tile side | task memory | inputs per task | predicted |")
    print("|---|---|---|---|---|---|")
    proj = []
    for k in (1, 2, 4, 8, 16, 32, 64, 128):
        p = wsb.plan(layers, 60000, workers=k)
        sec = p.predicted_seconds * scale
        proj.append({"workers": k, "tiles": p.tiles, "tile_blocks": p.tile_blocks, "seconds": sec,
                     "task_memory_bytes": p.task_memory_bytes, "task_input_bytes": p.task_input_bytes})
        print(f"| {k} | {p.tiles} | {p.tile_blocks} | {p.task_memory_bytes / 2**20:.0f} MiB | "
              f"{p.task_input_bytes / 2**20:.1f} MiB | {sec / 60:.1f} min |")
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "batch": batch, "runs": rows, "projection": proj}, indent=2))


if __name__ == "__main__":
    main()
