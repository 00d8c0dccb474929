"""Reading weight files as data: nothing in a file can run code, or touch memory it should not,
while it is loaded.

* ``.pkl`` files (detectron2's model zoo, Caffe2 / Detectron1 and converted ImageNet weights:
  numpy arrays in dicts, Python 2 files too) are read by :func:`load_pickle`, an interpreter of
  the pickle opcodes that admits containers, numbers, strings, bytes and numeric numpy arrays
  and scalars, rebuilt by the loader itself from checked raw bytes, and nothing else
  (:mod:`panoptic_segformer.utils.weights_pickle`);
* torch files (``.pth``, ``.pyth``, any other name) are read by :func:`load_torch`:
  ``torch.load`` with ``weights_only=True`` (tensors, numbers, strings, lists, tuples, dicts) on
  every torch (before torch 2.6 its default runs code from the file), after checking that the
  archive's records are stored as ``torch.save`` writes them: uncompressed, their declared sizes
  within the file (a compressed record could inflate a small file to gigabytes).

Both raise ``pickle.UnpicklingError: refusing to load '<file>': ...``, naming what the file asked
for, before anything it names is called.
"""

import os
import pickle
import zipfile
from typing import Any

import torch

from panoptic_segformer.utils.weights_pickle import RefusedPickle, read_pickle

__all__ = ["load_pickle", "load_torch"]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (torch >= 1.6); older files are one pickle


def _refusal(path: str, reason: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"refusing to load {path!r}: {reason}")


def load_pickle(path: str) -> Any:
    """Reads a local ``.pkl`` weights file: dicts, OrderedDicts, lists, tuples, numbers, strings,
    bytes and numeric numpy arrays and scalars (Python 2 files too, their 8-bit strings as
    latin1 ``str``), as ``pickle.load`` would give them.

    Raises:
        pickle.UnpicklingError: naming ``path`` and what the file asks for outside that, or how
            it is malformed (before anything is called or built from it).
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return read_pickle(data)
    except RefusedPickle as e:
        raise _refusal(path, str(e)) from None


def _check_archive(path: str) -> None:
    """Refuses a torch zip archive with a compressed record, or records declaring more bytes
    than the file holds (``torch.save`` stores every record as is)."""
    with open(path, "rb") as f:
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return  # torch's legacy format: its weights-only unpickler reads the rest
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _refusal(path, f"not a readable torch archive ({e})") from None
    declared = 0
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise _refusal(
                path,
                f"its record {record.filename!r} is compressed (zip method "
                f"{record.compress_type}, {record.file_size} bytes once inflated); torch.save "
                "stores records uncompressed, so this file was not written by it",
            )
        declared += max(record.file_size, record.compress_size)
    if declared > size:
        raise _refusal(
            path,
            f"its records declare {declared} bytes, more than the {size} bytes of the file",
        )


def load_torch(path: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` of a file whose zip records
    are stored as ``torch.save`` writes them.

    Raises:
        pickle.UnpicklingError: naming ``path``, when the file holds anything but tensors,
            numbers, strings, lists, tuples and dicts (torch's message names the global), or
            its archive has a compressed record or records larger than the file.
    """
    _check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(
            path,
            "it cannot be read as weights only (tensors, numbers, strings, lists and dicts; "
            f"anything else could run code from the file). {e}",
        ) from e
