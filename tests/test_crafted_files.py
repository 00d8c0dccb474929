"""Files a user is handed never run code: a corpus of crafted files, one per way in (weights
pickles, torch archives, exported programs, configs, the deformable-attention operator's level
table), each refused with an error naming the file (or the bad value), and nothing written: the
marker file each payload would create stays absent.

Every file is loaded in one subprocess, so that a crash fails the test instead of the suite.
After the safe loads the same subprocess loads the code payloads the unsafe way (plain
``pickle.load``, ``torch.jit.load``, ``torch.export.load``, detectron2's default YAML loading):
their markers then appear, so each payload is real and each refusal above could have failed.
"""

import importlib
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROTO2 = pickle.PROTO + b"\x02"


class _Opens:
    """Unpickling it calls ``open(path, "w")``: the file appears if a loader runs the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _ScriptedPayload(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) creates ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.mapped = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mapped.sum()

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.mapped = torch.from_file(self.path, True, 1, dtype=torch.uint8)


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def _text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _bytes(value: bytes) -> bytes:
    return pickle.BINBYTES + struct.pack("<I", len(value)) + value


def _dtype(code: str, state: bytes) -> bytes:
    """``numpy.dtype(code, False, True)`` then BUILD with the pickled tuple ``state``."""
    return (
        _global("numpy", "dtype")
        + _text(code)
        + pickle.NEWFALSE
        + pickle.NEWTRUE
        + pickle.TUPLE3
        + pickle.REDUCE
        + state
        + pickle.BUILD
    )


def _state(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


NUMERIC_STATE = _state(_int(3), _text("<"), pickle.NONE * 3, _int(-1), _int(-1), _int(0))
# a state whose flags (63) say "holds Python objects": numpy would then read 8 bytes of the file
# as a PyObject* in scalar / _reconstruct / frombuffer
OBJECT_STATE = _state(_int(3), _text("|"), pickle.NONE * 3, _int(-1), _int(-1), _int(63))
REWRITTEN_DTYPE = _dtype("f8", OBJECT_STATE)


def _reconstruct(dtype: bytes, data: bytes, shape: Tuple[int, ...] = (1,)) -> bytes:
    shape_bytes = pickle.MARK + b"".join(_int(n) for n in shape) + pickle.TUPLE
    return (
        _global("numpy.core.multiarray", "_reconstruct")
        + _global("numpy", "ndarray")
        + _int(0)
        + pickle.TUPLE1
        + _bytes(b"b")
        + pickle.TUPLE3
        + pickle.REDUCE
        + _state(_int(1), shape_bytes, dtype, pickle.NEWFALSE, _bytes(data))
        + pickle.BUILD
    )


def _pickle(body: bytes) -> bytes:
    return PROTO2 + body + pickle.STOP


def _pickles(markers: Path):
    """{name: (bytes, expected message)} of crafted weight pickles."""
    opens = _Opens(markers / "pickle.pkl")
    scalar = _global("numpy.core.multiarray", "scalar") + REWRITTEN_DTYPE
    frombuffer = _global("numpy._core.numeric", "_frombuffer")  # numpy 2's name
    return {
        "dtype_rewrite_then_scalar.pkl": (
            _pickle(
                scalar + _bytes(struct.pack("<Q", 0x4141414141)) + pickle.TUPLE2 + pickle.REDUCE
            ),
            r"numpy.dtype\('f8'\) with the state \(3, '\|', None, None, None, -1, -1, 63\)",
        ),
        "dtype_rewrite_then_reconstruct.pkl": (
            _pickle(_reconstruct(REWRITTEN_DTYPE, b"\x00" * 8)),
            "only numeric dtypes",
        ),
        "dtype_rewrite_then_frombuffer.pkl": (
            _pickle(
                frombuffer
                + pickle.MARK
                + _bytes(b"\x00" * 8)
                + REWRITTEN_DTYPE
                + _int(1)
                + pickle.TUPLE1
                + _text("C")
                + pickle.TUPLE
                + pickle.REDUCE
            ),
            "only numeric dtypes",
        ),
        "dtype_built_twice.pkl": (
            _pickle(_dtype("f8", NUMERIC_STATE) + OBJECT_STATE + pickle.BUILD),
            r"a second BUILD on numpy.dtype\('f8'\)",
        ),
        "object_array.pkl": (
            pickle.dumps({"w": np.array([1, "a"], dtype=object)}, protocol=2),
            r"numpy.dtype\('O8'",
        ),
        "structured_array.pkl": (
            pickle.dumps({"w": np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])}, protocol=4),
            r"numpy.dtype\('V8'",
        ),
        "subarray_array.pkl": (
            pickle.dumps({"w": np.zeros(2, dtype=[("a", "<f4", (2,))])}, protocol=5),
            r"numpy.dtype\('V8'",
        ),
        "string_array.pkl": (pickle.dumps(np.array(["ab"]), protocol=2), r"numpy.dtype\('U2'"),
        "reduce_global.pkl": (
            pickle.dumps({"model": {"w": np.zeros(2), "b": opens}}, protocol=2),
            r"it asks for io.open",
        ),
        "reduce_stack_global.pkl": (pickle.dumps([opens], protocol=4), r"it asks for io.open"),
        "inst.pkl": (
            b"(S'" + str(markers / "inst.pkl").encode() + b"'\nS'w'\niio\nopen\n.",
            "INST",
        ),
        "obj.pkl": (
            _pickle(pickle.MARK + _global("collections", "OrderedDict") + pickle.OBJ),
            "OBJ",
        ),
        "newobj.pkl": (
            _pickle(_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.NEWOBJ),
            "NEWOBJ",
        ),
        "reduce_of_a_string.pkl": (
            _pickle(_text("os.system") + pickle.EMPTY_TUPLE + pickle.REDUCE),
            "REDUCE of str",
        ),
        "build_on_a_dict.pkl": (
            _pickle(pickle.EMPTY_DICT + pickle.EMPTY_DICT + pickle.BUILD),
            "BUILD on dict",
        ),
        "persistent_id.pkl": (b"P" + str(markers / "persid").encode() + b"\n.", "PERSID"),
        "binary_persistent_id.pkl": (_pickle(_text("storage") + pickle.BINPERSID), "BINPERSID"),
        "extension_code.pkl": (_pickle(pickle.EXT1 + b"\x01"), "EXT1"),
        "set.pkl": (pickle.dumps({1, 2}, protocol=4), "EMPTY_SET"),
        "huge_bytes.pkl": (
            b"\x80\x04" + pickle.BINBYTES8 + struct.pack("<Q", 2**62) + b"abc.",
            f"a size of {2**62} bytes, past the end of the file",
        ),
        "huge_text.pkl": (
            b"\x80\x04" + pickle.BINUNICODE8 + struct.pack("<Q", 2**63) + b"abc.",
            "past the end of the file",
        ),
        "huge_integer.pkl": (_pickle(pickle.LONG4 + struct.pack("<i", 2**31 - 1)), "an integer of"),
        "huge_array_shape.pkl": (
            _pickle(_reconstruct(_dtype("f4", NUMERIC_STATE), b"\x00" * 4, (2**30, 2**30))),
            r"shape \(1073741824, 1073741824\) and dtype <f4 holding 4 bytes",
        ),
        "cycle.pkl": (
            _pickle(pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.BINGET + b"\x00" + b"a"),
            "a container holding itself",
        ),
        "deep_nesting.pkl": (
            _pickle(pickle.EMPTY_LIST * 200_000 + pickle.APPEND * 199_999),
            "nested deeper than 100",
        ),
    }


def _torch_files(markers: Path):
    """{name: (bytes, expected message)} of crafted torch archives."""
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2**16)}}, buffer)  # 256 KiB of zeros
    stored = buffer.getvalue()
    deflated = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(stored)) as src, zipfile.ZipFile(deflated, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename), zipfile.ZIP_DEFLATED)
    # the central directory's sizes of the largest record, rewritten to 2 GiB - 1
    inflated = bytearray(stored)
    with zipfile.ZipFile(io.BytesIO(stored)) as src:
        largest = max(src.infolist(), key=lambda info: info.file_size)
    entry = stored.index(b"PK\x01\x02")  # the central directory's first record
    while struct.unpack("<I", stored[entry + 42 : entry + 46])[0] != largest.header_offset:
        entry = stored.index(b"PK\x01\x02", entry + 4)
    inflated[entry + 20 : entry + 28] = struct.pack("<II", 2**31 - 1, 2**31 - 1)
    code = io.BytesIO()
    torch.save({"model": {"b": _Opens(markers / "code.pth")}}, code)
    return {
        "deflated.pth": (deflated.getvalue(), r"its record '[^']+' is compressed \(zip method 8"),
        "inflated_sizes.pth": (bytes(inflated), r"its records declare \d+ bytes, more than the"),
        "code.pth": (code.getvalue(), "cannot be read as weights only"),
    }


def _exported_files(folder: Path, markers: Path):
    """A TorchScript file whose __setstate__ creates a file, and a torch.export archive whose
    weights config says its weight is pickled (the pickle creates a file)."""
    torch.jit.script(_ScriptedPayload(str(markers / "payload.ts"))).save(str(folder / "payload.ts"))
    program = torch.export.export(_Scale(), (torch.ones(2),))
    torch.export.save(program, str(folder / "plain.pt2"))
    with zipfile.ZipFile(folder / "plain.pt2") as src, zipfile.ZipFile(
        folder / "pickled_weights.pt2", "w"
    ) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("weights/model_weights_config.json"):
                config = json.loads(data)
                for entry in config["config"].values():
                    entry["use_pickle"] = True
                data = json.dumps(config).encode()
            elif info.filename.endswith("weights/weight_0"):
                data = pickle.dumps(_Opens(markers / "pickled_weights.pt2"), protocol=2)
            out.writestr(info, data)
    expected = r"a \w+ file is a program, and loading it runs code"
    return {"payload.ts": expected, "pickled_weights.pt2": expected}


def _configs(folder: Path, markers: Path):
    tag = f'!!python/object/apply:io.open ["{markers / "config.yaml"}", "w"]'
    (folder / "tagged_base.yaml").write_text(f"MODEL:\n  WEIGHTS: {tag}\n")
    (folder / "child.yaml").write_text('_BASE_: "tagged_base.yaml"\n')
    (folder / "python_tag.yaml").write_text(f"MODEL:\n  DEVICE: {tag}\n")
    expected = r"refusing a config that is not plain YAML data.*python/object/apply:io.open"
    return {"python_tag.yaml": expected, "child.yaml": expected}


# (H, W) per level, level starts, S: the level sizes wrap in int64 or exceed value
LEVELS = {
    "wrapping_levels": ([[2**32, 2**32], [5, 6]], [0, 0], 30),
    "level_past_value": ([[5, 6], [2**62, 4]], [0, 30], 30),
    "negative_level": ([[-5, -6], [5, 6]], [0, 30], 30),
}

LOADER = r"""
import json, os, sys
import torch

files, controls, markers = json.load(open(sys.argv[1]))


def load(kind, path):
    if kind == "pickle":
        from panoptic_segformer.utils.safe_load import load_pickle
        return load_pickle(path)
    if kind == "torch":
        from panoptic_segformer.utils.safe_load import load_torch
        return load_torch(path)
    if kind == "exported":
        from panoptic_segformer.deploy import ExportedNetwork
        return ExportedNetwork(path)
    if kind == "config":
        from panoptic_segformer.d2.config import get_config
        return get_config(path)
    if kind == "levels":
        from panoptic_segformer.layers import multi_scale_deformable_attention
        from panoptic_segformer.layers.ms_deform_attn_op import load_operator
        shapes, starts, s = json.load(open(path))
        args = (
            torch.zeros(1, s, 1, 2), torch.tensor(shapes), torch.tensor(starts),
            torch.full((1, 3, 1, len(shapes), 2, 2), 0.5), torch.ones(1, 3, 1, len(shapes), 2),
        )
        errors = []
        for implementation in ("pytorch", "cpu"):
            try:
                multi_scale_deformable_attention(*args, implementation=implementation)
            except (ValueError, RuntimeError) as e:
                errors.append(f"{implementation}: {e}")
        op, _ = load_operator("cpu")
        try:
            op(*args)  # the operator itself, as a direct caller or an exported program calls it
        except RuntimeError as e:
            errors.append(f"operator: {str(e).splitlines()[0]}")
        if len(errors) == 3:
            raise ValueError(" | ".join(errors))
        return errors


for kind, path in files:
    try:
        load(kind, path)
        print(json.dumps([path, "loaded", "", ""]), flush=True)
    except Exception as e:
        print(json.dumps([path, "refused", type(e).__name__, str(e)]), flush=True)
print(json.dumps(["markers after the safe loads", sorted(os.listdir(markers))]), flush=True)

# the unsafe ways: each payload runs, so each refusal above was a real one
import pickle
for kind, path in controls:
    try:
        if kind == "pickle":
            pickle.load(open(path, "rb"))
        elif kind == "ts":
            torch.jit.load(path)
        elif kind == "pt2":
            torch.export.load(path)
        elif kind == "config":
            from detectron2.config import get_cfg
            get_cfg().merge_from_file(path)
    except Exception:
        pass
print(json.dumps(["markers after the unsafe loads", sorted(os.listdir(markers))]), flush=True)
"""


class _ConfigsRead:
    """Whether detectron2's config loader (which reads the YAML files) imports here."""

    def __init__(self) -> None:
        try:
            importlib.import_module("detectron2.config")
            self.why = ""
        except ImportError as e:
            self.why = str(e)

    def __bool__(self) -> bool:
        return not self.why


CONFIGS_READ = _ConfigsRead()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Writes the corpus, loads it in one subprocess; returns ({file name: (outcome, error type,
    message)}, markers after the safe loads, markers after the unsafe ones, {name: expected})."""
    folder = tmp_path_factory.mktemp("crafted")
    markers = folder / "markers"
    markers.mkdir()
    files, expected = [], {}
    for kind, written in (("pickle", _pickles(markers)), ("torch", _torch_files(markers))):
        for name, (data, message) in written.items():
            (folder / name).write_bytes(data)
            files.append((kind, str(folder / name)))
            expected[name] = message
    written_files = [("exported", _exported_files(folder, markers))]
    if CONFIGS_READ:
        written_files.append(("config", _configs(folder, markers)))
    for kind, written in written_files:
        for name, message in written.items():
            files.append((kind, str(folder / name)))
            expected[name] = message
    for name, level_table in LEVELS.items():
        (folder / f"{name}.json").write_text(json.dumps(level_table))
        files.append(("levels", str(folder / f"{name}.json")))
        expected[f"{name}.json"] = "must be positive|holds more tokens than"
    controls = [
        ("pickle", str(folder / "reduce_global.pkl")),
        ("ts", str(folder / "payload.ts")),
        ("pt2", str(folder / "pickled_weights.pt2")),
        *([("config", str(folder / "python_tag.yaml"))] if CONFIGS_READ else []),
    ]
    job = folder / "job.json"
    job.write_text(json.dumps([files, controls, str(markers)]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(job)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]  # no crash
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    results = {Path(path).name: tuple(rest) for path, *rest in lines[:-2]}
    assert len(results) == len(files)
    return results, lines[-2][1], lines[-1][1], expected


CRAFTED = sorted(
    [
        *_pickles(Path("m")),
        "deflated.pth",
        "inflated_sizes.pth",
        "code.pth",
        "payload.ts",
        "pickled_weights.pt2",
        "python_tag.yaml",
        "child.yaml",
        *(f"{name}.json" for name in LEVELS),
    ]
)


@pytest.mark.parametrize("name", CRAFTED)
def test_a_crafted_file_is_refused_naming_it(corpus, name):
    if name.endswith(".yaml") and not CONFIGS_READ:
        pytest.skip(f"config files are read by detectron2's config loader ({CONFIGS_READ.why})")
    results, _, _, expected = corpus
    outcome, error, message = results[name]
    assert outcome == "refused", (name, message)
    assert re.search(expected[name], message, re.S), message
    if not name.endswith(".json"):  # the operator's inputs are tensors, not a file
        assert name in message
    assert error in ("UnpicklingError", "UntrustedCode", "ValueError")


def test_nothing_is_written_and_the_payloads_are_real(corpus):
    _, after_safe, after_unsafe, _ = corpus
    assert after_safe == []
    payloads = ["payload.ts", "pickle.pkl", "pickled_weights.pt2"]
    assert after_unsafe == sorted(payloads + (["config.yaml"] if CONFIGS_READ else []))
