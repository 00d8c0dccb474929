"""panoptic_segformer.utils.safe_load: weight files are read as data, code in them never runs."""

import codecs
import os
import pickle
import re
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from panoptic_segformer.utils.safe_load import load_pickle, load_torch


def assert_same(loaded, expected):
    assert type(loaded) is type(expected)
    if isinstance(expected, np.ndarray):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        assert loaded.flags.writeable
        assert loaded.strides == expected.strides or expected.size == 0  # (no layout if empty)
        np.testing.assert_array_equal(loaded, expected)
    elif isinstance(expected, np.generic):
        assert loaded.dtype == expected.dtype and loaded.tobytes() == expected.tobytes()
    elif isinstance(expected, dict):
        assert list(loaded) == list(expected)
        for key in expected:
            assert_same(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(loaded) == len(expected)
        for a, b in zip(loaded, expected):
            assert_same(a, b)
    else:
        assert loaded == expected


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickles_of_numpy_weights_load_at_every_protocol(tmp_path, protocol):
    rng = np.random.default_rng(0)
    weights = OrderedDict(
        [
            ("conv1.weight", rng.standard_normal((4, 3, 2, 2)).astype(np.float32)),
            ("fc.weight", np.asfortranarray(rng.standard_normal((3, 5)))),
            ("bn.num_batches_tracked", np.int64(7)),
            ("mask", np.array([True, False])),
            ("empty", np.zeros((0, 2), np.float16)),
        ]
    )
    checkpoint = {
        "model": weights,
        "__author__": "Detectron2 Model Zoo",
        "meta": [1, 2.5, None, True, b"\x00\xff", ("a", -3)],
    }
    (tmp_path / "w.pkl").write_bytes(pickle.dumps(checkpoint, protocol=protocol))
    assert_same(load_pickle(str(tmp_path / "w.pkl")), checkpoint)


def legitimate_checkpoints():
    """What weight files hold: detectron2's model zoo layout, Caffe2 / Detectron1 ``blobs`` (with
    momenta and an ``__author__``), a converted torchvision state dict (OrderedDict), and every
    numeric dtype, byte order, layout and numpy scalar type."""
    rng = np.random.default_rng(1)
    dtypes = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]
    arrays = {
        f"{byteorder}{code}": (rng.standard_normal((2, 3)) * 50).astype(f"{byteorder}{code}")
        for code in dtypes
        for byteorder in ("<", ">")
    }
    scalars = {code: np.array([3], dtype=code)[0] for code in dtypes}
    base = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    layouts = {
        "fortran": np.asfortranarray(base),
        "transposed": base.transpose(1, 0, 2),  # protocol 5: numpy's 'K' order, axis order kept
        "strided": base[:, ::2],  # copied to C order by numpy's pickle
        "zero-d": np.array(2.5),
        "empty": np.zeros((0, 3), np.int64),
    }
    blobs = {"conv1_w": base, "conv1_w_momentum": base * 0, "res2_0_branch2a_b": base[0, 0]}
    return {
        "model zoo": {"model": arrays, "__author__": "Detectron2 Model Zoo", "scalars": scalars},
        "caffe2": {"blobs": blobs, "cfg": "MODEL:\n  TYPE: generalized_rcnn\n"},
        "torchvision": {
            "model": OrderedDict(sorted(arrays.items())),
            "matching_heuristics": True,
            "__author__": "torchvision",
        },
        "layouts": layouts,
        "python values": {
            "iteration": 2**40,
            "negative": -(2**70),  # a long
            "lrs": (0.1, float("inf"), -0.0),
            "flags": [True, False, None],
            "key types": {0: "int", 1.5: "float", ("a", 1): "tuple", b"k": "bytes"},
            "text": "héllo ✓",
            "raw": b"\x00\xff" * 3,
            "empty": b"",
            "complex": 1 - 2j,
            "nested": [[{"deep": [(1, [2])]}]],
        },
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("name", list(legitimate_checkpoints()))
def test_legitimate_files_load_as_pickle_load_gives_them(tmp_path, protocol, name):
    data = pickle.dumps(legitimate_checkpoints()[name], protocol=protocol)
    (tmp_path / "w.pkl").write_bytes(data)
    assert_same(load_pickle(str(tmp_path / "w.pkl")), pickle.loads(data, encoding="latin1"))


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_state_dicts_metadata_is_kept_and_nothing_else_is_set(tmp_path, protocol):
    """torch's state dicts are OrderedDicts with a ``_metadata`` attribute (BUILD on the
    OrderedDict); no other attribute may be set that way (it would shadow a method)."""
    state = OrderedDict(w=np.zeros(2, np.float32))
    state._metadata = OrderedDict([("", {"version": 1})])
    (tmp_path / "w.pkl").write_bytes(pickle.dumps(state, protocol=protocol))
    loaded = load_pickle(str(tmp_path / "w.pkl"))
    assert_same(loaded, state)
    assert loaded._metadata == state._metadata
    state = OrderedDict(w=1)
    state.keys = "shadowed"
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(state, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="BUILD on an OrderedDict with .*_metadata"):
        load_pickle(str(tmp_path / "bad.pkl"))


def py2_string(value: bytes) -> bytes:
    """A Python 2 8-bit ``str``."""
    return pickle.BINSTRING + struct.pack("<i", len(value)) + value


def py2_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def python2_dtype(dtype: np.dtype) -> bytes:
    """What Python 2's pickle writes for a numpy dtype: ``dtype("f4", 0, 1)`` and its state."""
    return b"".join(
        [
            pickle.GLOBAL + b"numpy\ndtype\n",
            py2_string(dtype.str[1:].encode()) + py2_int(0) + py2_int(1) + pickle.TUPLE3,
            pickle.REDUCE,
            pickle.MARK + py2_int(3) + py2_string(dtype.str[:1].encode()),
            pickle.NONE * 3 + py2_int(-1) + py2_int(-1) + py2_int(0) + pickle.TUPLE,
            pickle.BUILD,
        ]
    )


def python2_pickle(name: str, array: np.ndarray) -> bytes:
    """What Python 2's pickle writes for ``{name: array}`` at protocol 2 (Detectron1 and Caffe2
    files): numpy's own reduce (``numpy.core.multiarray._reconstruct``, ``dtype("f4", 0, 1)``
    and its state), with every string, the array data included, an 8-bit ``str``."""
    shape = pickle.MARK + b"".join(py2_int(n) for n in array.shape) + pickle.TUPLE
    return b"".join(
        [
            pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + py2_string(name.encode()),
            pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n",
            pickle.GLOBAL + b"numpy\nndarray\n",
            py2_int(0) + pickle.TUPLE1 + py2_string(b"b") + pickle.TUPLE3 + pickle.REDUCE,
            pickle.MARK + py2_int(1) + shape + python2_dtype(array.dtype) + pickle.NEWFALSE,
            py2_string(array.tobytes()) + pickle.TUPLE + pickle.BUILD,
            pickle.SETITEM + pickle.STOP,
        ]
    )


def test_python2_pickles_load(tmp_path):
    array = np.array([[1.0, -2.0], [0.5, 3.0]], dtype="<f4")
    data = python2_pickle("res2_0_branch2a_w", array)
    (tmp_path / "R-50.pkl").write_bytes(data)
    loaded = load_pickle(str(tmp_path / "R-50.pkl"))
    assert list(loaded) == ["res2_0_branch2a_w"]
    assert_same(loaded["res2_0_branch2a_w"], array)
    assert_same(loaded, pickle.loads(data, encoding="latin1"))


def test_python2_numpy_scalars_and_ordered_dicts_load(tmp_path):
    """Python 2 pickles a numpy scalar as scalar(dtype, 8-bit str) and an OrderedDict as
    OrderedDict([[key, value], ...])."""
    scalar = b"".join(
        [
            pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n",
            python2_dtype(np.dtype("<i8")),
            py2_string(np.int64(-7).tobytes()),
            pickle.TUPLE2 + pickle.REDUCE,
        ]
    )
    pair = pickle.EMPTY_LIST + pickle.MARK + py2_string(b"iter") + scalar + pickle.APPENDS
    data = b"".join(
        [
            pickle.PROTO + b"\x02" + pickle.GLOBAL + b"collections\nOrderedDict\n",
            pickle.EMPTY_LIST + pair + pickle.APPEND + pickle.TUPLE1 + pickle.REDUCE,
            pickle.STOP,
        ]
    )
    (tmp_path / "w.pkl").write_bytes(data)
    loaded = load_pickle(str(tmp_path / "w.pkl"))
    assert_same(loaded, OrderedDict([("iter", np.int64(-7))]))
    assert_same(loaded, pickle.loads(data, encoding="latin1"))


@pytest.mark.parametrize("name, load", [("R-50.pkl", load_pickle), ("model.pth", load_torch)])
def test_a_file_that_would_run_code_is_refused_naming_the_file(crafted_weights, name, load):
    path = crafted_weights.write(name)
    with pytest.raises(
        pickle.UnpicklingError, match=f"(?s)refusing to load '{re.escape(str(path))}': .*io.open"
    ):
        load(str(path))
    assert not crafted_weights.marker.exists()


class _Rot13:
    def __reduce__(self):
        return (codecs.encode, ("text", "rot13"))


def test_only_the_latin1_codec_of_python3_pickles_is_allowed(tmp_path):
    # protocols 0-2 write bytes as _codecs.encode(text, "latin1"); any other codec is refused
    (tmp_path / "w.pkl").write_bytes(pickle.dumps({"x": _Rot13()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"_codecs.encode\('text', 'rot13'\)"):
        load_pickle(str(tmp_path / "w.pkl"))


def test_torch_weights_load(tmp_path):
    checkpoint = {"model": OrderedDict(w=torch.arange(4.0)), "iteration": 3, "lrs": (0.1, 1e-2)}
    torch.save(checkpoint, tmp_path / "model.pth")
    loaded = load_torch(str(tmp_path / "model.pth"))
    assert torch.equal(loaded["model"]["w"], checkpoint["model"]["w"])
    assert loaded["iteration"] == 3 and loaded["lrs"] == (0.1, 1e-2)


FUZZ = r"""
import collections, pickle, random, sys, time
import numpy as np
from panoptic_segformer.utils.weights_pickle import RefusedPickle, read_pickle

rng = np.random.default_rng(0)
checkpoint = {
    "model": collections.OrderedDict(
        [("conv.weight", rng.standard_normal((4, 3, 2, 2)).astype(np.float32)),
         ("bn.num_batches_tracked", np.int64(7)),
         ("fc.weight", np.asfortranarray(rng.standard_normal((3, 5)))),
         ("mask", np.array([True, False]))]
    ),
    "blobs": {"res2_w": np.arange(6, dtype=">i2").reshape(2, 3), "res2_w_momentum": np.zeros(3)},
    "__author__": "fuzz",
    "meta": [1, 2.5, None, (b"\x00\xff", "text", -(2**70)), 1 - 2j],
}
bases = [pickle.dumps(checkpoint, protocol=p) for p in (0, 2, 4, 5)]
allowed = (type(None), bool, int, float, complex, str, bytes, bytearray, np.ndarray, np.generic)


def check(obj):
    if isinstance(obj, dict):
        for key, value in obj.items():
            check(key), check(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            check(value)
    elif not isinstance(obj, allowed) or isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise AssertionError(f"loaded a {type(obj)}")


def mutate(data, rand):
    data = bytearray(data)
    for _ in range(rand.randint(1, 3)):
        where = rand.randrange(len(data))
        kind = rand.randrange(5)
        if kind == 0:
            data[where] ^= 1 << rand.randrange(8)
        elif kind == 1:
            data[where] = rand.randrange(256)
        elif kind == 2:
            data[where:where] = bytes(rand.randrange(256) for _ in range(rand.randint(1, 8)))
        elif kind == 3:
            del data[where : where + rand.randint(1, 16)]
        else:
            data[where:where] = data[rand.randrange(len(data)) :][: rand.randint(1, 64)]
    return bytes(data)


rand = random.Random(0)
counts = collections.Counter()
start = time.perf_counter()
for i in range(int(sys.argv[1])):
    data = mutate(bases[i % len(bases)], rand)
    try:
        check(read_pickle(data))
        counts["loaded"] += 1
    except RefusedPickle:
        counts["refused"] += 1
print(counts["loaded"], counts["refused"], round(time.perf_counter() - start, 2))
"""


def test_mutated_checkpoints_load_or_are_refused_never_crash_or_hang():
    """5,000 byte-level mutations (bit flips, byte changes, insertions, deletions, copied runs)
    of a checkpoint pickled at protocols 0, 2, 4 and 5: each loads (as containers, numbers,
    strings and numeric arrays only) or is refused, in a subprocess with a time limit."""
    done = subprocess.run(
        [sys.executable, "-c", FUZZ, "5000"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded, refused, seconds = done.stdout.split()
    assert int(loaded) + int(refused) == 5000
    assert int(loaded) > 100 and int(refused) > 1000, done.stdout  # both ways are exercised
    assert float(seconds) < 30
