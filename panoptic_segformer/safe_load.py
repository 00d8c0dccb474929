"""Reading weight files as data: nothing in a file can run code while it is loaded.

A pickle names the functions that rebuild its objects, and unpickling calls them, so a crafted
file runs whatever it names (``os.system``, ``builtins.open``, ...) the moment it is read:

* ``.pkl`` files (detectron2's model zoo, Caffe2 / Detectron1 and converted ImageNet weights:
  numpy arrays in dicts) are read by :func:`load_pickle`, an unpickler that rebuilds numpy arrays
  and scalars, ``OrderedDict``, dicts, lists, tuples, numbers, strings and bytes, and refuses
  every other global;
* torch files (``.pth``, ``.pyth``, any other name) are read by :func:`load_torch`, ``torch.load`` with
  ``weights_only=True`` (tensors, numbers, strings, lists, tuples, dicts), on every torch: before
  torch 2.6 its default runs code from the file.

Both raise ``pickle.UnpicklingError`` naming the file, and the global it asked for, before anything
it names is called.
"""

import collections
import pickle
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch

try:  # numpy >= 2 (1.26 has the alias too); numpy 1.x pickles name numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

__all__ = ["load_pickle", "load_torch"]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """What Python 3 writes for ``bytes`` at pickle protocols 0-2: ``_codecs.encode(text,
    "latin1")``; no other codec is needed, so none is allowed."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only 'latin1')")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """What Python 3 writes for ``b""`` at pickle protocols 0-2: ``bytes()``, without arguments
    (``bytes(n)`` would allocate n bytes)."""
    return b""


# (module, name) as the pickle spells it -> what it may rebuild. numpy arrays pickle as
# _reconstruct(ndarray, ...) + state (protocols 0-4) or _frombuffer (5), with dtype objects;
# numpy scalars as scalar(dtype, bytes); Python 2 and numpy 1.x files say numpy.core, numpy 2
# numpy._core.
_ALLOWED: Dict[Tuple[str, str], Callable[..., Any]] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,  # e.g. a torchvision state dict
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,  # protocols 0-2 name builtins as Python 2 did
    **{
        (f"{core}.{module}", name): obj
        for core in ("numpy.core", "numpy._core")
        for module, name, obj in (
            ("multiarray", "_reconstruct", _multiarray._reconstruct),
            ("multiarray", "scalar", _multiarray.scalar),
            ("numeric", "_frombuffer", _numeric._frombuffer),
        )
    },
}


class _WeightsUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` resolving only the globals of :data:`_ALLOWED`."""

    def __init__(self, file: Any, path: str) -> None:
        # latin1: Python 2 files (Detectron1, Caffe2) hold array data as 8-bit str
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {self.path!r}: it asks for {module}.{name}, and a weights "
                ".pkl may only hold numpy arrays, numbers, strings, lists and dicts (anything "
                "else could run code from the file)"
            ) from None


def load_pickle(path: str) -> Any:
    """Unpickles a local ``.pkl`` weights file, rebuilding only numpy arrays and scalars, dicts,
    lists, tuples, numbers and strings (Python 2 files too).

    Raises:
        pickle.UnpicklingError: naming ``path`` and the global, when the file asks for any
            other global (before calling it).
    """
    with open(path, "rb") as f:
        return _WeightsUnpickler(f, path).load()


def load_torch(path: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``.

    Raises:
        pickle.UnpicklingError: naming ``path``, when the file holds anything but tensors,
            numbers, strings, lists, tuples and dicts (torch's message names the global).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(
            f"refusing to load {path!r}: it cannot be read as weights only (tensors, numbers, "
            f"strings, lists and dicts; anything else could run code from the file). {e}"
        ) from e
