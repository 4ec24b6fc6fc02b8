"""Model and data files of the command line, read as hostile input.

MODEL: an ``.npz`` of ``W0, b0, W1, b1, ...`` (W_l of shape (d_out, d_in) as torch.nn.Linear,
b_l optional per layer; an optional ``activation`` array of names), or a torch.save-d
``nn.Sequential`` (read safely, see :func:`wsbound_fast._problem.torch_input.load_module`).
DATA: an ``.npz`` with ``X`` (N, d) and ``y`` (N,) or (N, C); other arrays are ignored
(never decompressed).

What a file may make us do is bounded before it happens:

- only regular files are opened (a FIFO, a device such as /dev/zero, a directory or a socket
  is refused from ``os.stat``, never opened; the file is then opened non-blocking and checked
  again with ``fstat``, so a swap in between cannot block either);
- an ``.npz`` is read member by member through :mod:`zipfile`: each needed member's ``.npy``
  header (magic, version, a length of at most ``_MAX_HEADER`` bytes) is read and parsed with
  ``np.lib.format.read_array_header_1_0/2_0``; the dtype (numbers only, strings only for
  ``activation``, never objects), the shape, the size the member declares and the total
  against ``max_bytes`` are checked before any array is allocated, and each array is read
  straight into its own buffer (one copy);
- the numbers of members and of layers are bounded by the archive itself (layer indices
  beyond the number of weight arrays are reported, not iterated over);
- torch files are loaded with ``torch.load(weights_only=True)``; its refusals are reported in
  one line of our own.

Every problem with a file raises ValueError (FileNotFoundError for a missing one) with a
message that names the file.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from .._problem import torch_input

__all__ = ["Model", "default_file_limit", "load_data", "load_model", "parse_activation"]

# W<k> / b<k>: layer numbers without leading zeros (W01 would name no layer bound() can find)
_KEY = re.compile(r"^([Wb])(0|[1-9][0-9]*)$")
#: Longest .npy header read (numpy's own default limit is 10000 bytes).
_MAX_HEADER = 1 << 16
#: Most members an archive may list (a model of 50000 layers with biases).
_MAX_MEMBERS = 100_000
#: 'activation': at most this many names of at most this many characters.
_MAX_NAMES, _MAX_NAME_CHARS = 4096, 64
#: Deflate expands at most ~1032 times; an archive that claims more is corrupt.
_MAX_DEFLATE_RATIO = 1100
#: Bytes read from a member at a time.
_CHUNK = 1 << 20
#: What reading a damaged member may raise (zipfile, zlib, the file system).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, RuntimeError, NotImplementedError, ValueError,
                struct.error)


class _FileError(ValueError):
    """A problem with a file, already in words that name it."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


@dataclass
class Model:
    """A model read from a file: a torch module, or layers plus activations (None: not stored)."""

    source: str  # "npz" or "torch"
    layers: Any  # list of (W, b), or the torch module
    activation: Any  # list of names from the npz, or None
    dims: tuple[int, ...]
    description: str


def default_file_limit() -> int:
    """Bytes the arrays read from one file may take: half of the machine's memory, and half
    of the address-space limit (RLIMIT_AS) when one is set."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        total = 8 << 30
    limit = total // 2
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limit = min(limit, soft // 2)
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        pass
    return int(limit)


def _size(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------------------
# opening: regular files only
# --------------------------------------------------------------------------------------


def _kind(mode: int) -> str | None:
    """What a non-regular file is (None: a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"  # pragma: no cover - doors, whiteouts


def _not_regular(path: str, what: str, kind: str) -> Exception:
    if kind == "a directory":
        return IsADirectoryError(f"{what} is a directory, not a file: {path}")
    return ValueError(f"{what} {path} is {kind}, not a regular file; give the path of a file")


def _open_regular(path: str, what: str) -> IO[bytes]:
    """Open ``path`` for reading if, and only if, it is a regular file."""
    try:
        st = os.stat(path)  # follows symlinks: a link to /dev/zero is a device
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None
    kind = _kind(st.st_mode)
    if kind is not None:
        raise _not_regular(path, what, kind)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)  # non-blocking: if it became a FIFO meanwhile, this does not wait
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot open it: {exc.strerror or exc}") from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:  # swapped after the stat
            raise _not_regular(path, what, kind)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------------------
# .npz archives, member by member
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int  # bytes before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"ends after {len(data)} of {n} bytes")
    return data


def _members_listed(f: IO[bytes]) -> int | None:
    """The number of members the archive's end record declares (before zipfile parses them)."""
    end = getattr(zipfile, "_EndRecData", None)
    try:
        rec = end(f) if end is not None else None
        return None if rec is None else int(rec[getattr(zipfile, "_ECD_ENTRIES_TOTAL", 4)])
    except (OSError, IndexError, TypeError, ValueError, struct.error):  # pragma: no cover - zipfile decides
        return None
    finally:
        f.seek(0)


class _Npz:
    """An ``.npz`` archive whose members are read only when asked for, headers first."""

    def __init__(self, zf: zipfile.ZipFile, path: str, what: str, file_size: int) -> None:
        self.zf, self.path, self.what = zf, path, what
        infos = zf.infolist()
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if not name.endswith(".npy"):
                raise self.error(f"member {name!r} is not a .npy array; expected an .npz archive as np.savez writes "
                                 "(arrays only)")
            key = name[:-4]
            if key in self.members:
                raise self.error(f"member {name!r} is listed twice")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise self.error(f"member {name!r} uses compression method {info.compress_type}; np.savez and "
                                 "np.savez_compressed write stored or deflated members only")
            if info.compress_size > file_size or (
                info.file_size != info.compress_size if info.compress_type == zipfile.ZIP_STORED
                else info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024
            ):
                raise self.error(f"member {name!r} is damaged: it declares {info.file_size} bytes from "
                                 f"{info.compress_size} stored, in a file of {file_size}")
            self.members[key] = info

    @property
    def keys(self) -> list[str]:
        return list(self.members)

    def error(self, message: str) -> ValueError:
        return _FileError(f"{self.what} {self.path}: {message}")

    def header(self, key: str) -> _Header:
        """The member's .npy header, read (at most _MAX_HEADER bytes of it) and checked."""
        info = self.members[key]
        try:
            with self.zf.open(info) as f:
                magic = _read_exact(f, 8)
                if magic[:6] != b"\x93NUMPY":
                    raise self.error(f"member {info.filename!r} is not a .npy array (no .npy magic)")
                version = (magic[6], magic[7])
                if version == (1, 0):
                    raw = _read_exact(f, 2)
                    (length,) = struct.unpack("<H", raw)
                elif version in ((2, 0), (3, 0)):
                    raw = _read_exact(f, 4)
                    (length,) = struct.unpack("<I", raw)
                else:
                    raise self.error(f"member {info.filename!r}: unsupported .npy format version "
                                     f"{version[0]}.{version[1]}")
                if length > _MAX_HEADER:
                    raise self.error(f"member {info.filename!r}: its .npy header claims {length} bytes "
                                     f"(more than {_MAX_HEADER}); not read")
                text = _read_exact(f, length)
        except _FileError:
            raise
        except EOFError as exc:
            raise self.error(f"member {info.filename!r} is truncated: its .npy header {exc}") from None
        except _READ_ERRORS as exc:
            raise self.error(f"member {info.filename!r} cannot be read: {_one_line(exc)}") from None
        if version == (3, 0):  # the 2.0 layout with a UTF-8 header: read the 2.0 way if it is ASCII
            if not text.isascii():
                raise self.error(f"member {info.filename!r}: a .npy 3.0 header with non-ASCII text is not read")
            magic = magic[:6] + b"\x02\x00"
        buf = io.BytesIO(magic + raw + text)
        np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        try:
            shape, fortran, dtype = read(buf, max_header_size=_MAX_HEADER)
        except Exception as exc:  # anything the header's text makes numpy raise: the file's fault
            raise self.error(f"member {info.filename!r} has a malformed .npy header: {_one_line(exc)}") from None
        return _Header(tuple(int(s) for s in shape), bool(fortran), dtype, len(magic) + len(raw) + len(text))

    def check(self, key: str, strings: bool = False) -> _Header:
        """The member's header, with its dtype and declared size checked (nothing allocated)."""
        h = self.header(key)
        name, dt = f"{key!r}", h.dtype
        if dt.hasobject:
            raise self.error(f"array {name} holds Python objects (dtype {dt}), which are not read (they would need "
                             "unpickling); save numbers")
        if strings:
            if dt.kind != "U" or dt.itemsize > 4 * _MAX_NAME_CHARS or math.prod(h.shape) > _MAX_NAMES:
                raise self.error(f"array {name} must be a string or a 1-D array of at most {_MAX_NAMES} strings of "
                                 f"at most {_MAX_NAME_CHARS} characters; got dtype {dt}, shape {h.shape}")
        elif dt.kind not in "biuf" or dt.subdtype is not None:
            raise self.error(f"array {name} has dtype {dt}; expected numbers (a float or integer dtype)")
        if any(s > 1 << 62 for s in h.shape) or (h.nbytes == 0 and math.prod(s for s in h.shape if s) > 1 << 62):
            raise self.error(f"array {name} has an implausible shape {h.shape}")
        info = self.members[key]
        if info.file_size != h.offset + h.nbytes:
            raise self.error(f"member {info.filename!r} is damaged: its header describes {h.nbytes} bytes of "
                             f"{dt} {h.shape} but the member holds {info.file_size - h.offset}")
        return h

    def read(self, key: str, h: _Header) -> np.ndarray:
        """The array, read into its own buffer in chunks (one copy, no file-sized temporary),
        its end and CRC checked."""
        info = self.members[key]
        arr = np.empty(h.shape[::-1] if h.fortran else h.shape, dtype=h.dtype)
        view = arr.reshape(-1).view(np.uint8) if arr.size else np.empty(0, np.uint8)
        try:
            with self.zf.open(info) as f:
                _read_exact(f, h.offset)
                done = 0
                while done < view.size:
                    chunk = f.read(min(view.size - done, _CHUNK))
                    if not chunk:
                        raise EOFError(f"ends after {done} of {view.size} bytes of data")
                    view[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    done += len(chunk)
                if f.read(1):  # also where zipfile checks the CRC
                    raise zipfile.BadZipFile("more data than its header describes")
        except _FileError:  # pragma: no cover - none raised in there
            raise
        except EOFError as exc:
            raise self.error(f"member {info.filename!r} is truncated: it {exc}") from None
        except _READ_ERRORS as exc:
            raise self.error(f"member {info.filename!r} cannot be read: {_one_line(exc)}") from None
        return arr.T if h.fortran else arr

    def load(self, keys: list[str], limit: int, strings: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """The arrays ``keys`` (all present), after every header was checked and their total
        size against ``limit``."""
        headers = {k: self.check(k, strings=k in strings) for k in keys}
        total = sum(h.nbytes for h in headers.values())
        if total > limit:
            big = max(headers, key=lambda k: headers[k].nbytes)
            h = headers[big]
            raise self.error(f"the arrays would take {_size(total)} ({big!r}: {h.dtype} {h.shape}), more than the "
                             f"limit of {_size(limit)} for one file (half of the memory available)")
        return {k: self.read(k, h) for k, h in headers.items()}


def _is_torch_zip(names: list[str]) -> bool:
    """torch.save's zip format: every member in one folder, with <folder>/data.pkl."""
    return any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)


@dataclass
class _Opened:
    f: IO[bytes]
    zf: zipfile.ZipFile | None  # None: not a zip archive
    size: int

    def close(self) -> None:
        if self.zf is not None:
            self.zf.close()
        self.f.close()


def _open(path: str, what: str) -> _Opened:
    f = _open_regular(path, what)
    try:
        size = os.fstat(f.fileno()).st_size
        if not zipfile.is_zipfile(f):
            f.seek(0)
            return _Opened(f, None, size)
        f.seek(0)
        n = _members_listed(f)
        if n is not None and n > _MAX_MEMBERS:
            raise ValueError(f"{what} {path}: the archive lists {n} members (more than {_MAX_MEMBERS}); not read")
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise ValueError(f"{what} {path}: cannot read the zip archive: {exc}") from None
        if len(zf.infolist()) > _MAX_MEMBERS:  # pragma: no cover - the end record said less
            zf.close()
            raise ValueError(f"{what} {path}: the archive lists more than {_MAX_MEMBERS} members; not read")
        return _Opened(f, zf, size)
    except BaseException:
        f.close()
        raise


def parse_activation(text: str | None) -> Any:
    """The --activation argument: ``tanh``, ``tanh,relu`` (one per hidden layer) or ``leaky_relu:0.2``."""
    if text is None:
        return None
    items: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        name, sep, param = part.partition(":")
        if sep:
            try:
                items.append((name.strip(), float(param)))
            except ValueError:
                raise ValueError(f"--activation: cannot read the parameter of {part!r} (expected e.g. leaky_relu:0.2)") from None
        else:
            items.append(name)
    return items[0] if len(items) == 1 else items


def _layer_keys(npz: _Npz) -> tuple[int, list[str]]:
    """(number of layers, the keys to read), every name checked against the members."""
    path = npz.path
    keys = npz.keys
    bad = sorted(k for k in keys if k != "activation" and not _KEY.match(k))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"MODEL {path}: unexpected arrays {shown}; expected W0, b0, W1, b1, ... "
                         "(b optional, numbered without leading zeros) and optionally 'activation'")
    weights = [k for k in keys if k.startswith("W")]
    if not weights:
        raise ValueError(f"MODEL {path}: no weight arrays; expected W0, b0, W1, b1, ...")
    L = len(weights)  # a valid file numbers them 0..L-1: any index >= L means a gap

    def index(k: str) -> int | None:  # None: beyond L (never turned into a huge int list)
        digits = k[1:]
        return int(digits) if len(digits) <= len(str(L)) and int(digits) < L else None

    beyond = sorted((k for k in weights if index(k) is None), key=lambda k: (len(k), k))
    if beyond:
        present = {index(k) for k in weights}
        missing = [f"W{i}" for i in range(L) if i not in present][:3]
        raise ValueError(f"MODEL {path}: {beyond[0]} is out of range: {L} weight arrays must be numbered W0..W{L - 1} "
                         f"(missing {', '.join(missing)})")
    stray = sorted((k for k in keys if k.startswith("b") and index(k) is None), key=lambda k: (len(k), k))
    if stray:
        raise ValueError(f"MODEL {path}: bias {', '.join(stray[:3])} has no weight W{stray[0][1:]}")
    return L, keys


def _npz_model(npz: _Npz, limit: int) -> Model:
    path = npz.path
    L, keys = _layer_keys(npz)
    arrays = npz.load(keys, limit, strings=("activation",))
    activation = None
    if "activation" in arrays:
        act = arrays.pop("activation")
        if act.ndim > 1 or act.size == 0:
            raise ValueError(f"MODEL {path}: 'activation' must be a string or a 1-D array of strings; "
                             f"got shape {act.shape}")
        activation = parse_activation(",".join(np.atleast_1d(act).tolist()))
    layers = [(arrays[f"W{i}"], arrays.get(f"b{i}")) for i in range(L)]
    for i, (W, _) in enumerate(layers):
        if W.ndim != 2:
            raise ValueError(f"MODEL {path}: W{i} must be 2-D (d_out, d_in); got shape {W.shape}")
    dims = (int(layers[0][0].shape[1]),) + tuple(int(W.shape[0]) for W, _ in layers)
    return Model("npz", layers, activation, dims, path)


def _npz_of(op: _Opened, path: str, what: str) -> _Npz:
    assert op.zf is not None
    return _Npz(op.zf, path, what, op.size)


def load_model(path: str, max_bytes: int | None = None) -> Model:
    """Read MODEL: an .npz of W0, b0, ... or (with torch installed) a saved nn.Sequential.

    ``max_bytes``: the most the arrays of the file may take (default :func:`default_file_limit`).
    """
    limit = default_file_limit() if max_bytes is None else int(max_bytes)
    op = _open(path, "MODEL")
    try:
        if op.zf is not None and not _is_torch_zip(op.zf.namelist()):
            return _npz_model(_npz_of(op, path, "MODEL"), limit)
        if op.zf is not None:  # torch's zip: what it would read, bounded before torch sees it
            declared = sum(i.file_size for i in op.zf.infolist())
            if declared > limit:
                raise ValueError(f"MODEL {path}: the torch archive declares {_size(declared)}, more than the limit of "
                                 f"{_size(limit)} for one file")
        try:
            torch_input._import_torch()
        except ImportError:
            raise ValueError(f"MODEL {path} is not an .npz of W0, b0, W1, b1, ...; reading it as a saved torch "
                             "module needs PyTorch, which is not installed") from None
        op.f.seek(0)
        try:
            module = torch_input.load_module(path, op.f)
        except ValueError as exc:
            raise ValueError(f"MODEL {exc}") from None
    finally:
        op.close()
    layers, _, _ = torch_input.convert(module)  # errors name the unsupported module
    dims = (int(layers[0][0].shape[1]),) + tuple(int(W.shape[0]) for W, _ in layers)
    return Model("torch", module, None, dims, f"{path} (torch {type(module).__name__})")


def load_data(path: str, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read DATA: an .npz with X and y (only those two members are read)."""
    limit = default_file_limit() if max_bytes is None else int(max_bytes)
    op = _open(path, "DATA")
    try:
        if op.zf is None or _is_torch_zip(op.zf.namelist()):
            raise ValueError(f"DATA {path} is not an .npz archive (expected one with arrays X and y, e.g. from np.savez)")
        npz = _npz_of(op, path, "DATA")
        missing = [k for k in ("X", "y") if k not in npz.members]
        if missing:
            held = sorted(npz.keys)
            shown = ", ".join(held[:10]) + (f" and {len(held) - 10} more" if len(held) > 10 else "")
            raise ValueError(f"DATA {path}: missing array {' and '.join(missing)}; it holds {shown or 'nothing'}")
        arrays = npz.load(["X", "y"], limit)
    finally:
        op.close()
    return arrays["X"], arrays["y"]
