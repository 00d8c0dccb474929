"""Reading a weights pickle as data: an interpreter of the pickle opcodes whose grammar admits only
what checkpoints hold.

``pickle.load`` runs a program: the file names functions (any importable name) and the loader
calls them, and objects rebuild themselves from bytes of the file (numpy's ``dtype.__setstate__``
and ``scalar`` read raw memory as object pointers when the file says a dtype holds objects).
Allow-listing names is not enough when an allowed callable interprets raw bytes, so nothing the
file names is called here. The grammar:

* containers: ``dict``, ``collections.OrderedDict``, ``list``, ``tuple`` (dict keys: None, bool,
  int, float, str, bytes, tuples of these);
* None, bool, int, float, complex, str, bytes, bytearray;
* numpy arrays and scalars of a numeric dtype (bool, int8-64, uint8-64, float16/32/64,
  complex64/128) in any byte order, rebuilt by the loader with ``np.frombuffer`` from raw bytes
  whose count is checked against the shape and the dtype.

The few names numpy's and Python's own pickles of these use resolve to stand-ins
(:mod:`panoptic_segformer.utils.pickle_stand_ins`) that check their arguments and return inert
placeholders recording them. BUILD (``__setstate__``) applies to those placeholders only, once
each (a dtype's byte order; an array's shape, dtype, order and bytes), plus torch's
``_metadata`` attribute of an ``OrderedDict``; a placeholder becomes a real array or scalar only
once the whole file is read.

Refused, with the reason and the byte offset: any other name, INST / OBJ / NEWOBJ (instances of
classes), persistent ids, extension codes, sets, out-of-band buffers, sizes past the end of the
file, integers over 64 bytes, cycles, nesting deeper than :data:`MAX_DEPTH`.
"""

import codecs
import collections
import struct
from typing import Any, Callable, Dict, List

from panoptic_segformer.utils.pickle_stand_ins import (
    GLOBALS,
    ArrayPlaceholder,
    OrderedDictBeingRead,
    Placeholder,
    RefusedPickle,
    ScalarPlaceholder,
    StandIn,
    check_key,
    refuse,
)

__all__ = ["MAX_DEPTH", "RefusedPickle", "read_pickle"]

MAX_DEPTH = 100  # containers in containers; checkpoints nest about 5 deep
_MAX_INT_BYTES = 64  # LONG1 / LONG4 (a Python 2 long); checkpoints need 8


# ---------------------------------------------------------------------------------------------
# The interpreter.

_REFUSED_OPCODES = {
    b"P": "PERSID (a persistent id: the file asks the loader for an object by name)",
    b"Q": "BINPERSID (a persistent id: the file asks the loader for an object by name)",
    b"i": "INST (an instance of a class the file names)",
    b"o": "OBJ (an instance of a class)",
    b"\x81": "NEWOBJ (an instance of a class)",
    b"\x92": "NEWOBJ_EX (an instance of a class)",
    b"\x82": "EXT1 (an object of the extension registry)",
    b"\x83": "EXT2 (an object of the extension registry)",
    b"\x84": "EXT4 (an object of the extension registry)",
    b"\x8f": "EMPTY_SET (a set)",
    b"\x90": "ADDITEMS (a set)",
    b"\x91": "FROZENSET (a set)",
    b"\x97": "NEXT_BUFFER (an out-of-band buffer)",
    b"\x98": "READONLY_BUFFER (an out-of-band buffer)",
}


class _Machine:
    """The pickle virtual machine over ``data``, with the opcodes of the grammar only."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.stack: List[Any] = []
        self.marks: List[List[Any]] = []
        self.memo: Dict[int, Any] = {}

    # reading the file
    def take(self, n: int) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            refuse(f"a size of {n} bytes, past the end of the file")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            refuse("a truncated line")
        return self.take(end + 1 - self.pos)[:-1]

    # the stack and the memo
    def push(self, value: Any) -> None:
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack:
            refuse("an empty stack")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            refuse("an empty stack")
        return self.stack[-1]

    def mark(self) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def pop_mark(self) -> List[Any]:
        """The items since the last MARK; the stack before it is the stack again."""
        if not self.marks:
            refuse("no MARK")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def pop_n(self, n: int) -> List[Any]:
        if len(self.stack) < n:
            refuse("an empty stack")
        items = self.stack[len(self.stack) - n :]
        del self.stack[len(self.stack) - n :]
        return items

    def get(self, index: int) -> None:
        if index not in self.memo:
            refuse(f"the memo entry {index}, never stored")
        self.push(self.memo[index])

    def run(self) -> Any:
        data = self.data
        while True:
            if self.pos >= len(data):
                refuse("no STOP")
            start = self.pos
            code = data[start : start + 1]
            self.pos += 1
            if code == b".":  # STOP
                return self.pop()
            op = _OPS.get(code)
            if op is None:
                what = _REFUSED_OPCODES.get(code, f"the unknown opcode {code!r}")
                raise RefusedPickle(f"{what} at byte {start}")
            try:
                op(self)
            except RefusedPickle as e:
                raise RefusedPickle(f"{e} (opcode at byte {start})") from None

    # the opcodes that need more than a line of _OPS
    def pop_any(self) -> None:
        if self.stack:
            self.stack.pop()
        else:  # POP of an empty stack drops the mark, as pickle's
            self.pop_mark()

    def int_line(self) -> None:
        text = self.line()  # protocol 0 writes True and False as I01 and I00
        self.push({b"00": False, b"01": True}[text] if text in (b"00", b"01") else int(text))

    def long_bytes(self, n: int) -> None:
        if n > _MAX_INT_BYTES:
            refuse(f"an integer of {n} bytes")
        self.push(int.from_bytes(self.take(n), "little", signed=True))

    def quoted(self) -> None:
        text = self.line()
        if len(text) < 2 or text[:1] != text[-1:] or text[:1] not in (b"'", b'"'):
            refuse("a STRING without matching quotes")
        self.push(codecs.escape_decode(text[1:-1])[0].decode("latin1"))

    def append(self, items: List[Any]) -> None:
        target = self.top()
        if type(target) is not list:
            refuse(f"APPEND to {type(target).__name__}")
        target.extend(items)

    def set_items(self, items: List[Any]) -> None:
        target = self.top()
        if type(target) not in (dict, OrderedDictBeingRead):
            refuse(f"SETITEM on {type(target).__name__}")
        if len(items) % 2:
            refuse("an odd number of dict keys and values")
        for key, value in zip(items[::2], items[1::2]):
            check_key(key)
            target[key] = value

    def dict_(self) -> None:
        items = self.pop_mark()
        self.push({})
        self.set_items(items)

    def global_(self, module: Any, name: Any) -> None:
        stand_in = GLOBALS.get((module, name))
        if stand_in is None:
            refuse(
                f"it asks for {module}.{name}; a weights pickle may only hold numeric numpy "
                "arrays, numbers, strings, lists and dicts (anything else could run code)"
            )
        self.push(stand_in)

    def reduce(self) -> None:
        args, func = self.pop(), self.pop()
        if not isinstance(func, StandIn):
            refuse(f"REDUCE of {type(func).__name__} (only the names of the grammar)")
        if type(args) is not tuple:
            refuse(f"REDUCE with arguments of type {type(args).__name__}")
        self.push(func(args))

    def build(self) -> None:
        state = self.pop()
        target = self.top()
        if not isinstance(target, (Placeholder, OrderedDictBeingRead)):
            refuse(f"BUILD on {type(target).__name__}")
        target.set_state(state)


def _sized(fmt: str, convert: Callable[[bytes], Any]) -> Callable[[_Machine], None]:
    """An opcode pushing ``convert`` of a chunk whose size precedes it (``fmt``)."""
    return lambda m: m.push(convert(m.take(m.unpack(fmt))))


def _latin1_text(chunk: bytes) -> str:  # Python 2 8-bit str, as pickle's encoding="latin1"
    return chunk.decode("latin1")


def _utf8(chunk: bytes) -> str:
    return str(chunk, "utf-8", "surrogatepass")


def _empty(kind: type) -> Callable[[_Machine], None]:
    return lambda m: m.push(kind())


_OPS: Dict[bytes, Callable[[_Machine], None]] = {
    # framing, the stack, the memo
    b"\x80": lambda m: m.unpack("<B") <= 5 or refuse("a pickle protocol above 5"),
    b"\x95": lambda m: m.take(8),  # FRAME: the whole file is in memory already
    b"(": _Machine.mark,
    b"0": _Machine.pop_any,
    b"1": _Machine.pop_mark,
    b"2": lambda m: m.push(m.top()),
    b"p": lambda m: m.memo.__setitem__(int(m.line()), m.top()),
    b"q": lambda m: m.memo.__setitem__(m.unpack("<B"), m.top()),
    b"r": lambda m: m.memo.__setitem__(m.unpack("<I"), m.top()),
    b"\x94": lambda m: m.memo.__setitem__(len(m.memo), m.top()),
    b"g": lambda m: m.get(int(m.line())),
    b"h": lambda m: m.get(m.unpack("<B")),
    b"j": lambda m: m.get(m.unpack("<I")),
    # numbers
    b"N": lambda m: m.push(None),
    b"\x88": lambda m: m.push(True),
    b"\x89": lambda m: m.push(False),
    b"I": _Machine.int_line,
    b"J": lambda m: m.push(m.unpack("<i")),
    b"K": lambda m: m.push(m.unpack("<B")),
    b"M": lambda m: m.push(m.unpack("<H")),
    b"L": lambda m: m.push(int(m.line().rstrip(b"L"))),
    b"\x8a": lambda m: m.long_bytes(m.unpack("<B")),
    b"\x8b": lambda m: m.long_bytes(m.unpack("<i")),
    b"F": lambda m: m.push(float(m.line())),
    b"G": lambda m: m.push(m.unpack(">d")),
    # strings and bytes
    b"S": _Machine.quoted,
    b"T": _sized("<i", _latin1_text),
    b"U": _sized("<B", _latin1_text),
    b"V": lambda m: m.push(str(m.line(), "raw-unicode-escape")),
    b"\x8c": _sized("<B", _utf8),
    b"X": _sized("<I", _utf8),
    b"\x8d": _sized("<Q", _utf8),
    b"C": _sized("<B", bytes),
    b"B": _sized("<I", bytes),
    b"\x8e": _sized("<Q", bytes),
    b"\x96": _sized("<Q", bytearray),
    # containers
    b")": _empty(tuple),
    b"\x85": lambda m: m.push(tuple(m.pop_n(1))),
    b"\x86": lambda m: m.push(tuple(m.pop_n(2))),
    b"\x87": lambda m: m.push(tuple(m.pop_n(3))),
    b"t": lambda m: m.push(tuple(m.pop_mark())),
    b"]": _empty(list),
    b"l": lambda m: m.push(m.pop_mark()),
    b"a": lambda m: m.append([m.pop()]),
    b"e": lambda m: m.append(m.pop_mark()),
    b"}": _empty(dict),
    b"d": _Machine.dict_,
    b"s": lambda m: m.set_items(m.pop_n(2)),
    b"u": lambda m: m.set_items(m.pop_mark()),
    # names, calls and states: only through the stand-ins
    b"c": lambda m: m.global_(m.line().decode("ascii"), m.line().decode("ascii")),
    b"\x93": lambda m: m.global_(*m.pop_n(2)),
    b"R": _Machine.reduce,
    b"b": _Machine.build,
}


# ---------------------------------------------------------------------------------------------
# From placeholders to the result.


class _Materialiser:
    """Replaces the placeholders with real arrays, scalars and OrderedDicts, once per object
    (the memo may share one object many times), refusing cycles and deep nesting."""

    def __init__(self) -> None:
        self.done: Dict[int, Any] = {}
        self.open: set = set()

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        if type(obj) in (type(None), bool, int, float, complex, str, bytes, bytearray):
            return obj
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if key in self.open:
            refuse("a container holding itself")
        if depth > MAX_DEPTH:
            refuse(f"containers nested deeper than {MAX_DEPTH}")
        self.open.add(key)
        result = self.convert(obj, depth + 1)
        self.open.discard(key)
        self.done[key] = result
        return result

    def convert(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, (ArrayPlaceholder, ScalarPlaceholder)):
            return obj.real()
        if type(obj) is OrderedDictBeingRead:
            result = collections.OrderedDict((k, self(v, depth)) for k, v in obj.items())
            if obj.metadata is not None:
                result._metadata = self(obj.metadata, depth)
            return result
        if type(obj) is dict:
            return {k: self(v, depth) for k, v in obj.items()}
        if type(obj) is list:
            return [self(v, depth) for v in obj]
        if type(obj) is tuple:
            return tuple(self(v, depth) for v in obj)
        refuse(f"{obj} as a value (only inside an array or a scalar)")


def read_pickle(data: bytes) -> Any:
    """The object a weights pickle holds, read by the grammar of this module.

    Raises:
        RefusedPickle: what the file asks for outside the grammar, or how it is malformed, and
            where.
    """
    machine = _Machine(data)
    try:
        root = machine.run()
    except RefusedPickle:
        raise
    except Exception as e:  # malformed: a bad number, text, or struct of the file
        raise RefusedPickle(f"a malformed pickle at byte {machine.pos} ({e!r})") from None
    del machine
    try:
        return _Materialiser()(root)
    except RefusedPickle:
        raise
    except Exception as e:  # e.g. numpy refusing a shape
        raise RefusedPickle(f"a malformed pickle ({e!r})") from None
