"""Model weights <-> Flower ArrayRecord with as few copies of the weights as possible.

Flower's own conversions copy the weights twice per direction: ``ArrayRecord(state_dict)``
writes each tensor with ``np.save`` into a BytesIO and copies its value out;
``Array.numpy()`` parses the bytes with ``np.load`` (a copy) and ``load_state_dict`` copies
again into the parameters. The helpers here produce and read the same ``.npy`` bytes (an
``Array`` of ``stype`` "numpy.ndarray", exactly what ``np.save`` writes), with one copy each way:

* :func:`array_view`: a read-only numpy view of an Array's bytes (no copy);
* :func:`record_from_state`: an ArrayRecord built with one copy of each tensor;
* :func:`load_into`: copy an ArrayRecord straight into a model's parameters and buffers;
* :func:`trainable_state`: the entries that travel (trainable parameters only).

Anything unusual (Fortran order, object dtypes, another serialisation type, bfloat16) falls
back to Flower's own conversion.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from nlu.model import trainable_state  # noqa: F401  (re-exported: what travels)

_NUMPY = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY


def array_view(a: Array) -> np.ndarray:
    """The values of ``a`` as a read-only numpy array sharing its bytes (a copy only in fallbacks)."""
    data = a.data
    if a.stype != _NUMPY or not isinstance(data, (bytes, bytearray, memoryview)):
        return a.numpy()
    head = io.BytesIO(bytes(memoryview(data)[:4096]))
    try:
        major, _ = np.lib.format.read_magic(head)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    except ValueError:
        return a.numpy()
    if fortran or dtype.hasobject:
        return a.numpy()
    count = math.prod(shape)
    return np.frombuffer(data, dtype=dtype, count=count, offset=head.tell()).reshape(shape)


def array_from_numpy(arr: np.ndarray) -> Array:
    """An Array holding ``arr`` serialised as ``np.save`` would, with one copy of the values."""
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    if arr.dtype.hasobject:
        return Array(arr)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    body = memoryview(arr).cast("B") if arr.size else b""
    data = b"".join((head.getvalue(), body))
    return Array(dtype=str(arr.dtype), shape=tuple(arr.shape), stype=_NUMPY, data=data)


def record_from_state(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state)`` with one copy of each tensor (same bytes as Flower's conversion)."""
    out = {}
    for k, t in state.items():
        t = t.detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: Flower's path raises the same way
            return ArrayRecord(state)
        out[k] = array_from_numpy(t.cpu().numpy())
    return ArrayRecord(array_dict=out, keep_input=True)


def record_from_numpy(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays, one copy each."""
    return ArrayRecord(array_dict={k: array_from_numpy(v) for k, v in arrays.items()}, keep_input=True)


def load_into(model: torch.nn.Module, record: ArrayRecord, partial: bool = False) -> None:
    """``model.load_state_dict(record.to_torch_state_dict())`` with one copy of the weights.

    ``partial=True`` loads the record's entries only (they must all be entries of the model's
    state dict): the messages of a run carry the trainable parameters alone
    (:func:`trainable_state`), the frozen ones never travel.

    Raises
    ------
    RuntimeError
        If keys or shapes differ from the model's state dict (as ``load_state_dict`` does);
        with ``partial``, if the record holds a key the model does not have.
    """
    state = model.state_dict()
    keys = set(record.keys())
    if partial:
        extra = sorted(keys - set(state))
        if extra:
            raise RuntimeError(f"weights do not fit the model: unexpected {extra[:3]}")
        state = {k: v for k, v in state.items() if k in keys}
    elif keys != set(state):
        missing, extra = sorted(set(state) - keys), sorted(keys - set(state))
        raise RuntimeError(f"weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for k, dst in state.items():
            src = array_view(record[k])
            if tuple(src.shape) != tuple(dst.shape):
                raise RuntimeError(f"{k}: shape {tuple(src.shape)}, the model has {tuple(dst.shape)}")
            if dst.device.type == "cpu" and dst.dtype != torch.bfloat16:
                np.copyto(dst.numpy(), src, casting="unsafe")
            else:
                dst.copy_(torch.from_numpy(np.array(src)))
