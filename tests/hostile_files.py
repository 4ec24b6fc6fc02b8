"""Hostile and odd MODEL / DATA files for ``wsbound-fast bound``, and a runner that measures
each refusal: the CLI in a subprocess under an address-space limit (RLIMIT_AS) with a
timeout, its exit status, stderr, wall time and peak resident memory (``os.wait4``).

Used by tests/test_files.py; ``python tests/hostile_files.py`` prints the measurements.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Address-space limit of the CLI under test (the issue's "under a memory limit").
AS_LIMIT = 2 << 30


def npy_header(descr: str, shape: tuple[int, ...], version: tuple[int, int] = (1, 0)) -> bytes:
    """The bytes of an .npy header for any descr and shape (no data)."""
    buf = io.BytesIO()
    d = {"descr": descr, "fortran_order": False, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buf, d)
    else:
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def zip_entries(path: Path, entries: list[tuple[str, bytes, dict]]) -> Path:
    """A zip archive written by hand, so that its directory may lie: each entry is (name,
    bytes stored, options) with options ``method`` (0 stored, 8 deflated: the bytes are
    compressed here), ``size`` (the uncompressed size declared), ``hole`` (that many zero
    bytes appended as a hole in a sparse file: stored, consistent, never written)."""
    central = []
    with open(path, "wb") as f:
        for name, data, opt in entries:
            method = opt.get("method", 0)
            hole = opt.get("hole", 0)
            stored = data if method == 0 else zlib.compress(data, 9)[2:-4]  # raw deflate
            usize = opt.get("size", len(data) + hole)
            csize = len(stored) + hole
            crc = zlib.crc32(data) & 0xFFFFFFFF
            offset = f.tell()
            raw = name.encode()
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, csize, usize, len(raw), 0))
            f.write(raw)
            f.write(stored)
            if hole:
                f.seek(hole, os.SEEK_CUR)
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, csize,
                                       usize, len(raw), 0, 0, 0, 0, 0, offset) + raw)
        start = f.tell()
        for c in central:
            f.write(c)
        size = f.tell() - start
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), size, start, 0))
    return path


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@dataclass
class Case:
    name: str
    argv: list[str]  # after "bound"
    match: str  # in the one line on stderr (exit status 2); "" for a case that must succeed
    absent: tuple[str, ...] = ()  # never in stderr


def build(tmp: Path) -> list[Case]:
    """Write every hostile file under ``tmp``; return the cases."""
    rng = np.random.default_rng(0)
    W0, W1 = rng.normal(size=(5, 6)), rng.normal(size=(3, 5))
    X, y = rng.normal(size=(11, 6)), rng.integers(0, 3, 11)
    model, data = tmp / "model.npz", tmp / "data.npz"
    np.savez(model, W0=W0, W1=W1)
    np.savez(data, X=X, y=y)
    M, D = str(model), str(data)
    act = ["--activation", "tanh"]
    cases: list[Case] = []

    def add(name: str, argv: list[str], match: str, *absent: str) -> None:
        cases.append(Case(name, argv, match, absent))

    # not regular files: refused from a stat, never opened
    add("model /dev/zero", ["/dev/zero", D, *act], "is a device")
    add("data /dev/zero", [M, "/dev/zero", *act], "is a device")
    link = tmp / "zero-link.npz"
    link.symlink_to("/dev/zero")
    add("symlink to /dev/zero", [str(link), D, *act], "is a device")
    fifo = tmp / "fifo.npz"
    os.mkfifo(fifo)
    add("model FIFO", [str(fifo), D, *act], "is a FIFO")
    add("data FIFO", [M, str(fifo), *act], "is a FIFO")
    add("model directory", [str(tmp), D, *act], "is a directory")
    # layer numbers bounded by the number of members
    for key in ("W99999999999999999999", "W10000000"):
        p = tmp / f"keys-{key}.npz"
        np.savez(p, W0=W0, **{key: W1})
        add(f"keys W0, {key}", [str(p), D, *act], f"{key} is out of range")
    p = tmp / "keys-b-huge.npz"
    np.savez(p, W0=np.ones((3, 6)), b99999999999=np.ones(3))
    add("keys W0, b99999999999", [str(p), D], "b99999999999 has no weight")
    # crafted .npy headers: refused from the header, nothing allocated
    p = zip_entries(tmp / "shape-1e12.npz", [("W0.npy", npy_header("<f8", (10**12, 8)), {}),
                                             ("W1.npy", _npy(W1), {})])
    add("header shape (10**12, 8)", [str(p), D, *act], "is damaged: its header describes 64000000000000 bytes")
    p = zip_entries(tmp / "x-shape-1e12.npz", [("X.npy", npy_header("<f8", (10**12, 8)), {}), ("y.npy", _npy(y), {})])
    add("DATA header shape (10**12, 8)", [M, str(p), *act], "is damaged")
    p = zip_entries(tmp / "x-U.npz", [("X.npy", npy_header("<U100000000", (11,)), {}), ("y.npy", _npy(y), {})])
    add("DATA dtype <U100000000", [M, str(p), *act], "has dtype <U100000000; expected numbers")
    p = zip_entries(tmp / "act-U.npz", [("W0.npy", _npy(W0), {}), ("W1.npy", _npy(W1), {}),
                                        ("activation.npy", npy_header("<U100000000", (1,)), {})])
    add("activation dtype <U100000000", [str(p), D], "'activation' must be a string")
    p = zip_entries(tmp / "x-object.npz", [("X.npy", npy_header("|O", (11, 6)) + b"\x80\x04N.", {}),
                                           ("y.npy", _npy(y), {})])
    add("DATA object dtype", [M, str(p), *act], "holds Python objects")
    long = b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{"
    p = zip_entries(tmp / "header-4g.npz", [("W0.npy", long, {}), ("W1.npy", _npy(W1), {})])
    add("header length 4 GiB", [str(p), D, *act], "header claims 4294967280 bytes")
    # members that are not .npy arrays
    p = zip_entries(tmp / "notes.npz", [("W0.npy", _npy(W0), {}), ("notes.txt", b"hello", {})])
    add("member notes.txt", [str(p), D, *act], "member 'notes.txt' is not a .npy array")
    p = zip_entries(tmp / "magic.npz", [("W0.npy", b"this is not an array", {}), ("W1.npy", _npy(W1), {})])
    add("member without .npy magic", [str(p), D, *act], "is not a .npy array (no .npy magic)")
    # a directory that lies about sizes
    p = zip_entries(tmp / "lies.npz", [("X.npy", _npy(X), {"size": 1_500_000_000}), ("y.npy", _npy(y), {})])
    add("stored member declaring 1.5 GB", [M, str(p), *act], "is damaged: it declares 1500000000 bytes")
    p = zip_entries(tmp / "ratio.npz", [("X.npy", _npy(X), {"method": 8, "size": 1_500_000_000}), ("y.npy", _npy(y), {})])
    add("deflated member declaring 1.5 GB", [M, str(p), *act], "is damaged: it declares 1500000000 bytes")
    # consistent but over the limit (half of RLIMIT_AS): a sparse file, never read
    n = 1_500_000_000 // 48
    head = npy_header("<f8", (n, 6))
    p = zip_entries(tmp / "big.npz", [("X.npy", head, {"hole": 48 * n}), ("y.npy", _npy(np.zeros(n, np.int8)), {})])
    add("DATA of 1.5 GB (limit 1 GiB)", [M, str(p), *act], "more than the limit of")
    # ignored members are never decompressed: a 500 MB deflated array of zeros beside X and y
    p = tmp / "bomb.npz"
    import zipfile

    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("X.npy", _npy(X))
        z.writestr("y.npy", _npy(y))
        with z.open("junk.npy", "w", force_zip64=True) as w:
            total = 500_000_000
            w.write(npy_header("|u1", (total,)))
            chunk = bytes(1 << 22)
            for _ in range(total // len(chunk)):
                w.write(chunk)
            w.write(bytes(total % len(chunk)))
    add(f"DATA with an ignored 500 MB member ({p.stat().st_size // 1000} kB file)", [M, str(p), *act, "--json"], "")
    # files that are neither
    garbage = tmp / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 not a pickle")
    add("garbage bytes", [str(garbage), D, *act], "not a readable .npz", "weights_only", "safe_globals")
    return cases


def build_torch(tmp: Path) -> list[Case]:
    """Torch files torch.load(weights_only=True) refuses (needs torch to write them)."""
    import torch

    nn = torch.nn
    evil = tmp / "evil.pt"
    torch.save(_Evil(), evil)
    bn = tmp / "bn.pt"
    torch.save(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), bn)
    data = tmp / "data.npz"
    if not data.exists():
        rng = np.random.default_rng(0)
        np.savez(data, X=rng.normal(size=(11, 6)), y=rng.integers(0, 3, 11))
    advice = ("add_safe_globals", "weights_only=False", "weights_only` set to `False", "safe_globals(")
    return [Case("torch pickle calling os.system", [str(evil), str(data)], "it needs posix.system", advice),
            Case("torch file with BatchNorm1d", [str(bn), str(data)], "it needs torch.nn.modules.batchnorm.BatchNorm1d",
                 advice)]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int


def _limit() -> None:  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


#: Runs the CLI as ``python -m wsbound_fast`` does, then writes its own peak resident set
#: (VmHWM: of this process since its exec, not the forking parent's) to the file in argv[1].
_WRAPPER = r"""
import sys
from wsbound_fast._cli.main import main
try:
    rc = main(sys.argv[2:])
finally:
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    with open(sys.argv[1], "w") as f:
        f.write(str(hwm))
raise SystemExit(rc)
"""


def run(argv: list[str], timeout: float = 60.0) -> Result:
    """``wsbound-fast bound ARGV`` in a subprocess under RLIMIT_AS = AS_LIMIT; exit status 124
    if it ran past ``timeout`` (then killed); its peak resident memory (VmHWM, Linux)."""
    with tempfile.TemporaryDirectory() as d:
        hwm = Path(d) / "hwm"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(hwm), "bound", *argv], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, preexec_fn=_limit, timeout=timeout)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = 124, str(exc.stdout or ""), str(exc.stderr or "")
        seconds = time.perf_counter() - t0
        peak = int(hwm.read_text()) if hwm.exists() else -1
        return Result(rc, out, err, seconds, peak)


def main() -> None:  # pragma: no cover - a measurement script
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cases = build(tmp)
        try:
            cases += build_torch(tmp)
        except ImportError:
            pass
        print(f"| case | exit | seconds | peak RSS (MiB) | stderr |\n|---|---|---|---|---|")
        for c in cases:
            r = run(c.argv)
            line = r.stderr.strip().splitlines()
            print(f"| {c.name} | {r.rc} | {r.seconds:.2f} | {r.peak_bytes / 2**20:.0f} | "
                  f"{(line[0] if line else '')[:110]} |")


if __name__ == "__main__":  # pragma: no cover
    main()
