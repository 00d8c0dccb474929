"""panoptic_segformer.safe_load: weight files are read as data, code in them never runs."""

import codecs
import pickle
import re
import struct
from collections import OrderedDict

import numpy as np
import pytest
import torch

from panoptic_segformer.safe_load import load_pickle, load_torch


def assert_same(loaded, expected):
    assert type(loaded) is type(expected)
    if isinstance(expected, np.ndarray):
        assert loaded.dtype == expected.dtype and loaded.flags.f_contiguous == (
            expected.flags.f_contiguous
        )
        np.testing.assert_array_equal(loaded, expected)
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


def python2_pickle(name: str, array: np.ndarray) -> bytes:
    """What Python 2's pickle writes for ``{name: array}`` at protocol 2 (Detectron1 and Caffe2
    files): numpy's own reduce (``numpy.core.multiarray._reconstruct``, ``dtype("f4", 0, 1)``
    and its state), with every string, the array data included, an 8-bit ``str``."""

    def string(value: bytes) -> bytes:  # a Python 2 str
        return pickle.BINSTRING + struct.pack("<i", len(value)) + value

    def small_int(value: int) -> bytes:
        return pickle.BININT + struct.pack("<i", value)

    dtype = b"".join(
        [
            pickle.GLOBAL + b"numpy\ndtype\n",
            string(array.dtype.str[1:].encode()) + small_int(0) + small_int(1) + pickle.TUPLE3,
            pickle.REDUCE,
            pickle.MARK + small_int(3) + string(array.dtype.str[:1].encode()),
            pickle.NONE * 3 + small_int(-1) + small_int(-1) + small_int(0) + pickle.TUPLE,
            pickle.BUILD,
        ]
    )
    shape = pickle.MARK + b"".join(small_int(n) for n in array.shape) + pickle.TUPLE
    return b"".join(
        [
            pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + string(name.encode()),
            pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n",
            pickle.GLOBAL + b"numpy\nndarray\n",
            small_int(0) + pickle.TUPLE1 + string(b"b") + pickle.TUPLE3 + pickle.REDUCE,
            pickle.MARK + small_int(1) + shape + dtype + pickle.NEWFALSE,
            string(array.tobytes()) + pickle.TUPLE + pickle.BUILD,
            pickle.SETITEM + pickle.STOP,
        ]
    )


def test_python2_pickles_load(tmp_path):
    array = np.array([[1.0, -2.0], [0.5, 3.0]], dtype="<f4")
    (tmp_path / "R-50.pkl").write_bytes(python2_pickle("res2_0_branch2a_w", array))
    loaded = load_pickle(str(tmp_path / "R-50.pkl"))
    assert list(loaded) == ["res2_0_branch2a_w"]
    assert_same(loaded["res2_0_branch2a_w"], array)


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
    with pytest.raises(pickle.UnpicklingError, match="encoding 'rot13'"):
        load_pickle(str(tmp_path / "w.pkl"))


def test_torch_weights_load(tmp_path):
    checkpoint = {"model": OrderedDict(w=torch.arange(4.0)), "iteration": 3, "lrs": (0.1, 1e-2)}
    torch.save(checkpoint, tmp_path / "model.pth")
    loaded = load_torch(str(tmp_path / "model.pth"))
    assert torch.equal(loaded["model"]["w"], checkpoint["model"]["w"])
    assert loaded["iteration"] == 3 and loaded["lrs"] == (0.1, 1e-2)
