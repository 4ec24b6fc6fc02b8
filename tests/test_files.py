"""MODEL and DATA files as hostile input (_cli/files.py): every hostile file is refused in one
line of our own, exit status 2, quickly and within a 2 GiB address space (the CLI runs in a
subprocess under RLIMIT_AS with a timeout, tests/hostile_files.py); and what is accepted is
read exactly as np.load reads it, only the arrays needed."""

from __future__ import annotations

import os
import sys
import zipfile

import numpy as np
import pytest

import hostile_files as H
from wsbound_fast._cli import files as cli_files

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS, /proc and FIFOs: Linux")

#: A refusal reads a header or a directory, never an array: it takes a Python start-up.
SECONDS = 20.0  # (measured 0.3-0.6 s, 2-3 s with torch's import; generous for a loaded machine)
PEAK = 120 << 20  # peak resident memory of a refusal without torch (measured ~30 MiB)
PEAK_TORCH = 400 << 20  # with torch imported (measured ~220 MiB)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    return tmp, {c.name: c for c in H.build(tmp)}


CASES = ["model /dev/zero", "data /dev/zero", "symlink to /dev/zero", "model FIFO", "data FIFO", "model directory",
         "keys W0, W99999999999999999999", "keys W0, W10000000", "keys W0, b99999999999", "header shape (10**12, 8)",
         "DATA header shape (10**12, 8)", "DATA dtype <U100000000", "activation dtype <U100000000", "DATA object dtype",
         "header length 4 GiB", "member notes.txt", "member without .npy magic", "stored member declaring 1.5 GB",
         "deflated member declaring 1.5 GB", "DATA of 1.5 GB (limit 1 GiB)", "garbage bytes"]


def _refused(r: H.Result, case: H.Case, peak: int) -> None:
    assert r.rc == 2, (r.rc, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("wsbound-fast: error: ") and case.match in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    for text in case.absent:
        assert text not in r.stderr, (text, lines[0])
    assert r.seconds < SECONDS, r.seconds
    assert 0 < r.peak_bytes < peak, r.peak_bytes / 2**20


def test_every_case_is_listed(hostile):
    _, cases = hostile
    assert sorted(n for n in cases if "ignored" not in n) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_hostile_file_refused(hostile, name):
    _, cases = hostile
    case = cases[name]
    peak = PEAK
    if name == "garbage bytes":  # neither an .npz nor a zip: read as a torch file
        try:
            import torch  # noqa: F401
        except ImportError:
            case = H.Case(case.name, case.argv, "needs PyTorch, which is not installed")
        peak = PEAK_TORCH
    _refused(H.run(case.argv, timeout=60), case, peak)


def test_ignored_members_are_never_decompressed(hostile):
    """A 500 MB deflated member beside X and y (a ~0.5 MB file): bound runs, and its memory
    stays far below the member's size (before: every member was decompressed, 1.5 GB RSS
    for a 1.5 GB one)."""
    _, cases = hostile
    (case,) = [c for n, c in cases.items() if "ignored" in n]
    r = H.run(case.argv, timeout=120)
    assert r.rc == 0, r.stderr
    assert r.peak_bytes < PEAK, r.peak_bytes / 2**20
    import json

    assert json.loads(r.stdout)["n_samples"] == 11


@pytest.mark.parametrize("which", [0, 1])
def test_torch_refusals_are_our_own_line(torch, tmp_path, which):
    case = H.build_torch(tmp_path)[which]
    _refused(H.run(case.argv, timeout=120), case, PEAK_TORCH)


def test_fifo_is_never_opened(tmp_path, monkeypatch):
    """The stat says FIFO: the path is not opened at all (an open for reading would block)."""
    fifo = tmp_path / "f.npz"
    os.mkfifo(fifo)
    opened = []
    real = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(p) or real(p, *a, **k))
    with pytest.raises(ValueError, match="is a FIFO"):
        cli_files.load_data(str(fifo))
    with pytest.raises(ValueError, match="is a FIFO"):
        cli_files.load_model(str(fifo))
    assert opened == []


def test_swapped_for_a_fifo_after_the_stat(tmp_path, monkeypatch):
    """A regular file replaced by a FIFO between the stat and the open: the non-blocking open
    returns at once and fstat refuses it."""
    fifo = tmp_path / "f.npz"
    os.mkfifo(fifo)
    regular = os.stat(H.__file__)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if str(p) == str(fifo) else real_stat(p, *a, **k))
    with pytest.raises(ValueError, match="is a FIFO"):
        cli_files.load_data(str(fifo))


def test_arrays_read_as_np_load_reads_them(tmp_path):
    rng = np.random.default_rng(1)
    X = np.asfortranarray(rng.normal(size=(7, 3)))  # Fortran order
    y = rng.integers(0, 4, 7).astype(">i4")  # big-endian
    for save in (np.savez, np.savez_compressed):
        p = tmp_path / f"{save.__name__}.npz"
        save(p, X=X, y=y, Z=np.zeros((0, 5)))
        Xr, yr = cli_files.load_data(str(p))
        with np.load(p) as f:
            assert np.array_equal(Xr, f["X"]) and Xr.dtype == f["X"].dtype
            assert np.array_equal(yr, f["y"]) and yr.dtype == f["y"].dtype
        assert Xr.flags.writeable and Xr.flags.f_contiguous
    W0, W1 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(2, 4))
    p = tmp_path / "m.npz"
    np.savez_compressed(p, W0=W0, b0=np.zeros(4), W1=W1, activation=np.array(["leaky_relu:0.2"]))
    m = cli_files.load_model(str(p))
    assert m.dims == (3, 4, 2) and m.activation == ("leaky_relu", 0.2)
    assert np.array_equal(m.layers[0][0], W0) and m.layers[1][1] is None


def test_npy_versions_2_and_3(tmp_path):
    X = np.arange(12.0).reshape(4, 3)
    y = np.array([0, 1, 0, 1])
    for version in ((2, 0), (3, 0)):
        head = H.npy_header("<f8", (4, 3), version=(2, 0))
        if version == (3, 0):
            head = head[:6] + b"\x03\x00" + head[8:]
        p = H.zip_entries(tmp_path / f"v{version[0]}.npz", [("X.npy", head + X.tobytes(), {}),
                                                             ("y.npy", H._npy(y), {})])
        Xr, yr = cli_files.load_data(str(p))
        assert np.array_equal(Xr, X) and np.array_equal(yr, y)
    head = H.npy_header("<f8", (4, 3))
    p = H.zip_entries(tmp_path / "v9.npz", [("X.npy", head[:6] + b"\x09\x00" + head[8:] + X.tobytes(), {}),
                                            ("y.npy", H._npy(y), {})])
    with pytest.raises(ValueError, match="unsupported .npy format version 9.0"):
        cli_files.load_data(str(p))


def test_limit_and_damage_in_process(tmp_path):
    X, y = np.ones((100, 10)), np.zeros(100, np.int64)
    p = tmp_path / "d.npz"
    np.savez(p, X=X, y=y)
    assert cli_files.load_data(str(p), max_bytes=X.nbytes + y.nbytes)[0].shape == (100, 10)
    with pytest.raises(ValueError, match=r"the arrays would take 8.59 KiB \('X': float64 \(100, 10\)\), more than "
                                         r"the limit of 8.59 KiB"):
        cli_files.load_data(str(p), max_bytes=X.nbytes + y.nbytes - 1)
    # a member cut short of its declared size, and a wrong CRC
    data = H._npy(X)
    p = H.zip_entries(tmp_path / "short.npz", [("X.npy", data[:-8], {"size": len(data)}), ("y.npy", H._npy(y), {})])
    with pytest.raises(ValueError, match="is damaged: it declares"):
        cli_files.load_data(str(p))
    raw = bytearray((tmp_path / "d.npz").read_bytes())
    at = raw.find(X.tobytes()[:64])
    raw[at] ^= 1
    (tmp_path / "crc.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="'X.npy' cannot be read: Bad CRC-32"):
        cli_files.load_data(str(tmp_path / "crc.npz"))


@pytest.mark.parametrize("keys, match", [
    ({"W0": 1, "W2": 1}, "W2 is out of range: 2 weight arrays must be numbered W0..W1 (missing W1)"),
    ({"W1": 1}, "W1 is out of range: 1 weight arrays must be numbered W0..W0 (missing W0)"),
    ({"W0": 1, "W01": 1}, "unexpected arrays W01"),
    ({"W0": 1, "b1": 1}, "bias b1 has no weight W1"),
    ({"W0": 1, **{f"x{i}": 1 for i in range(8)}}, "unexpected arrays x0, x1, x2, x3, x4 and 3 more"),
])
def test_layer_names(tmp_path, keys, match):
    p = tmp_path / "m.npz"
    np.savez(p, **{k: np.ones((3, 2)) for k in keys})
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        cli_files.load_model(str(p))


def test_duplicate_and_compressed_members(tmp_path):
    y = H._npy(np.zeros(3, np.int64))
    p = H.zip_entries(tmp_path / "dup.npz", [("y.npy", y, {}), ("y.npy", y, {})])
    with pytest.raises(ValueError, match="member 'y.npy' is listed twice"):
        cli_files.load_data(str(p))
    p = tmp_path / "bz.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_BZIP2) as z:
        z.writestr("X.npy", H._npy(np.ones((3, 2))))
        z.writestr("y.npy", y)
    with pytest.raises(ValueError, match="compression method 12"):
        cli_files.load_data(str(p))


def test_torch_archive_size_checked_before_torch_reads_it(torch, tmp_path):
    nn = torch.nn
    p = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)), p)
    assert cli_files.load_model(str(p)).dims == (6, 4, 3)
    with pytest.raises(ValueError, match=r"MODEL .*m.pt: the torch archive declares .* more than the limit of 100 bytes"):
        cli_files.load_model(str(p), max_bytes=100)
