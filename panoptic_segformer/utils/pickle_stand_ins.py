"""The names a weights pickle may use, and what they resolve to: stand-ins that check their
arguments and return inert placeholders (see :mod:`panoptic_segformer.utils.weights_pickle`).

Numpy's own pickles name ``numpy.dtype``, ``numpy.ndarray`` and ``numpy[._]core.multiarray.
_reconstruct`` / ``scalar`` / ``numpy[._]core.numeric._frombuffer`` (arrays, scalars, protocol 5
arrays); Python 3 pickles of protocols 0-2 name ``_codecs.encode`` (bytes), ``__builtin__.bytes``
(empty bytes) and ``complex``; ``collections.OrderedDict`` holds state dicts. A placeholder
records a dtype (its code from :data:`DTYPE_CODES`, its byte order), an array (shape, dtype,
order, bytes) or a scalar, and becomes a real numpy object only in :meth:`real`, built here with
``np.frombuffer`` from a dtype of the fixed list and bytes whose count is checked.
"""

import collections
import math
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

__all__ = [
    "DTYPE_CODES",
    "GLOBALS",
    "ArrayPlaceholder",
    "DTypePlaceholder",
    "OrderedDictBeingRead",
    "Placeholder",
    "RefusedPickle",
    "ScalarPlaceholder",
    "StandIn",
    "check_key",
    "describe",
    "refuse",
]

# numpy's dtype.__reduce__ spells a numeric dtype by kind and item size
DTYPE_CODES = frozenset(
    ["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]
)
_MAX_NDIM = 64  # numpy's limit
_KEY_TYPES = (type(None), bool, int, float, str, bytes)


class RefusedPickle(Exception):
    """The file asks for something outside the grammar (the message says what)."""


def refuse(message: str) -> None:
    raise RefusedPickle(message)


def describe(value: Any, depth: int = 0) -> str:
    """A short repr for messages (never the repr of a whole buffer or container)."""
    if isinstance(value, (str, bytes, bytearray)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, (tuple, list)):
        items = [describe(v, depth + 1) for v in value[:8]] if depth < 3 else ["..."]
        items += ["..."] if len(value) > 8 else []
        text = ", ".join(items) + ("," if isinstance(value, tuple) and len(value) == 1 else "")
        return f"({text})" if isinstance(value, tuple) else f"[{text}]"
    if isinstance(value, dict):
        return f"a dict of {len(value)} items"
    if isinstance(value, (int, float, complex, type(None))):
        return repr(value)[:40]
    return str(value)


# ---------------------------------------------------------------------------------------------
# Placeholders: what the stand-ins return; BUILD goes to their set_state.


class Placeholder:
    built = False

    def set_state(self, state: Any) -> None:
        refuse(f"BUILD on {self}")


class DTypePlaceholder(Placeholder):
    """``numpy.dtype(code, align, copy)``; BUILD sets its byte order."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.byteorder = "="  # numpy's default until BUILD says otherwise

    def __str__(self) -> str:
        return f"numpy.dtype({self.code!r})"

    def set_state(self, state: Any) -> None:
        if self.built:
            refuse(f"a second BUILD on {self}")
        # (version, byte order, subarray, names, fields, item size, alignment, flags): a
        # numeric dtype has no subarray, names or fields, and flags 0 (flags say "holds objects")
        if not (
            isinstance(state, tuple)
            and len(state) == 8
            and state[0] == 3
            and state[1] in ("<", ">", "|", "=")
            and state[2:5] == (None, None, None)
            and state[5:] == (-1, -1, 0)
            and all(type(v) is int for v in state[5:])
        ):
            refuse(
                f"{self} with the state {describe(state)}: only numeric dtypes "
                "(3, byte order, None, None, None, -1, -1, 0)"
            )
        if (state[1] == "|") != (self.code in ("b1", "i1", "u1")):
            refuse(f"{self} with byte order {state[1]!r}")
        self.byteorder = state[1]
        self.built = True

    def real(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.byteorder)


class ArrayPlaceholder(Placeholder):
    """An array: ``_reconstruct(ndarray, (0,), b"b")`` then BUILD with (version, shape, dtype,
    Fortran order, bytes), or ``_frombuffer(bytes, dtype, shape, order[, axis order])``."""

    def __init__(self) -> None:
        self.shape: Tuple[int, ...] = ()
        self.dtype: Optional[DTypePlaceholder] = None
        self.order = "C"
        self.axis_order: Optional[Tuple[int, ...]] = None
        self.data = b""
        self.native = False  # convert to the native byte order (as numpy's __setstate__)

    def __str__(self) -> str:
        return "a numpy array"

    def set_state(self, state: Any) -> None:
        if self.built:
            refuse("a second BUILD on a numpy array")
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]  # version 1 (older numpy writes no version)
        if not (isinstance(state, tuple) and len(state) == 4):
            refuse(
                f"a numpy array with the state {describe(state)}: only (1, shape, dtype, "
                "fortran, bytes)"
            )
        shape, dtype, fortran, data = state
        if fortran not in (0, 1) or type(fortran) not in (bool, int):
            refuse(f"a numpy array whose Fortran flag is {describe(fortran)}")
        self.record(data, dtype, shape, "F" if fortran else "C")
        self.native = True  # numpy's __setstate__ gives the native byte order

    def record(self, data: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> None:
        if not isinstance(dtype, DTypePlaceholder):
            refuse(f"a numpy array of dtype {describe(dtype)}: only numeric dtypes")
        if not (
            isinstance(shape, tuple)
            and len(shape) <= _MAX_NDIM
            and all(type(n) is int and n >= 0 for n in shape)
        ):
            refuse(f"a numpy array of shape {describe(shape)}")
        if isinstance(data, str):  # Python 2 files hold the bytes as an 8-bit str
            data = data.encode("latin1")
        if not isinstance(data, (bytes, bytearray)):
            refuse(f"a numpy array whose data is {type(data).__name__}, not bytes")
        if order not in ("C", "F", "K"):
            refuse(f"a numpy array of order {describe(order)}")
        if axis_order is not None and (
            order != "K"
            or not isinstance(axis_order, tuple)
            or sorted(axis_order) != list(range(len(shape)))
        ):
            refuse(f"a numpy array of shape {shape} with axis order {describe(axis_order)}")
        self.data, self.dtype, self.shape, self.order = data, dtype, shape, order
        self.axis_order = axis_order
        self.built = True

    def real(self) -> np.ndarray:
        if not self.built:
            refuse("a numpy array without its state (no BUILD)")
        dtype = self.dtype.real()
        count = math.prod(self.shape)
        if count * dtype.itemsize != len(self.data):
            refuse(
                f"a numpy array of shape {self.shape} and dtype {dtype.str} holding "
                f"{len(self.data)} bytes (it needs {count * dtype.itemsize})"
            )
        target = dtype.newbyteorder("=") if self.native else dtype
        if count == 0:  # (no buffer to view; an empty array has the usual strides)
            return np.empty(self.shape, dtype=target, order="F" if self.order == "F" else "C")
        flat = np.frombuffer(self.data, dtype=dtype, count=count)
        if self.axis_order is not None:  # numpy's _frombuffer of a transposed layout
            array = flat.reshape(self.shape, order="C").transpose(self.axis_order)
        else:
            array = flat.reshape(self.shape, order="F" if self.order == "F" else "C")
        return array.astype(target, order="K")  # a copy: writable, owning its memory, same layout


class ScalarPlaceholder(Placeholder):
    """``scalar(dtype, bytes)``: a numpy scalar."""

    def __init__(self, dtype: DTypePlaceholder, data: bytes) -> None:
        self.dtype, self.data = dtype, data

    def __str__(self) -> str:
        return "a numpy scalar"

    def real(self) -> np.generic:
        dtype = self.dtype.real()
        if len(self.data) != dtype.itemsize:
            refuse(f"a numpy scalar of dtype {dtype.str} holding {len(self.data)} bytes")
        return np.frombuffer(self.data, dtype=dtype)[0]


class OrderedDictBeingRead(collections.OrderedDict):
    """An OrderedDict being read; BUILD may set torch's ``_metadata`` (a state dict's)."""

    metadata: Any = None

    def set_state(self, state: Any) -> None:
        if not (isinstance(state, dict) and list(state) == ["_metadata"]):
            refuse(f"BUILD on an OrderedDict with {describe(state)}: only torch's _metadata")
        if self.metadata is not None:
            refuse("a second BUILD on an OrderedDict")
        self.metadata = state["_metadata"]


# ---------------------------------------------------------------------------------------------
# Stand-ins: what the names a file may use resolve to.


class StandIn:
    def __init__(self, name: str, call: Optional[Callable[..., Any]]) -> None:
        self.name, self._call = name, call

    def __str__(self) -> str:
        return self.name

    def __call__(self, args: Tuple[Any, ...]) -> Any:
        if self._call is None:
            refuse(f"a call of {self.name}")
        try:
            return self._call(*args)
        except TypeError:  # a wrong number of arguments
            refuse(f"{self.name} called with {describe(args)}")


_NDARRAY = StandIn("numpy.ndarray", None)  # only as _reconstruct's first argument


def _dtype(code: Any, align: Any = False, copy: Any = True) -> DTypePlaceholder:
    if isinstance(code, bytes):
        code = code.decode("latin1")
    if code not in DTYPE_CODES or align not in (0, 1) or copy not in (0, 1):
        refuse(
            f"numpy.dtype{describe((code, align, copy))}: only the numeric dtypes "
            f"{', '.join(sorted(DTYPE_CODES))}"
        )
    return DTypePlaceholder(code)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> ArrayPlaceholder:
    if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        refuse(f"numpy _reconstruct{describe((cls, shape, typecode))}")
    return ArrayPlaceholder()


def _frombuffer(
    data: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None
) -> ArrayPlaceholder:
    array = ArrayPlaceholder()
    array.record(data, dtype, shape, order, axis_order)
    return array


def _scalar(dtype: Any, data: Any) -> ScalarPlaceholder:
    if isinstance(data, str):  # Python 2
        data = data.encode("latin1")
    if not isinstance(dtype, DTypePlaceholder) or not isinstance(data, bytes):
        refuse(f"numpy scalar{describe((dtype, data))}: only numeric dtypes and bytes")
    return ScalarPlaceholder(dtype, data)


def _latin1(text: Any, encoding: Any) -> bytes:
    # Python 3 writes bytes at protocols 0-2 as _codecs.encode(text, "latin1")
    if not isinstance(text, str) or encoding != "latin1":
        refuse(f"_codecs.encode{describe((text, encoding))}: only (str, 'latin1')")
    return text.encode("latin1")


def _empty_bytes() -> bytes:  # b"" at protocols 0-2 (bytes(n) would allocate n bytes)
    return b""


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(type(v) in (int, float) for v in (real, imag)):
        refuse(f"complex{describe((real, imag))}: only numbers")
    return complex(real, imag)


def _ordered_dict(items: Any = None) -> OrderedDictBeingRead:
    # Python 2 pickles an OrderedDict as OrderedDict([[key, value], ...]); Python 3 as
    # OrderedDict() and SETITEMS
    items = [] if items is None else items
    if not isinstance(items, list) or not all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in items
    ):
        refuse(f"collections.OrderedDict({describe(items)}): only a list of pairs")
    result = OrderedDictBeingRead()
    for key, value in items:
        check_key(key)
        result[key] = value
    return result


GLOBALS: Dict[Tuple[str, str], StandIn] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): StandIn("numpy.dtype", _dtype),
    ("collections", "OrderedDict"): StandIn("collections.OrderedDict", _ordered_dict),
    ("_codecs", "encode"): StandIn("_codecs.encode", _latin1),
    ("__builtin__", "bytes"): StandIn("bytes", _empty_bytes),
    ("__builtin__", "complex"): StandIn("complex", _complex),
    ("builtins", "complex"): StandIn("complex", _complex),
    **{
        (f"{core}.{module}", name): StandIn(f"numpy {name}", call)
        for core in ("numpy.core", "numpy._core")  # numpy 1.x / Python 2, numpy 2
        for module, name, call in (
            ("multiarray", "_reconstruct", _reconstruct),
            ("multiarray", "scalar", _scalar),
            ("numeric", "_frombuffer", _frombuffer),
        )
    },
}


def check_key(key: Any) -> None:
    if isinstance(key, tuple):
        for item in key:
            check_key(item)
    elif type(key) not in _KEY_TYPES:
        refuse(f"a dict key of type {type(key).__name__}")
