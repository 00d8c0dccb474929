"""Runs code as if some installed packages were not installed.

``hide(names)`` wraps every finder of ``sys.meta_path`` so that the named top-level packages (and
their submodules) are found by none: ``import cv2`` raises ``ModuleNotFoundError`` and
``importlib.util.find_spec("cv2")`` returns None, as on a machine without them. Used by
``tests/test_collection.py`` to collect the suite once per optional dependency left out.
"""

import sys
from typing import Iterable, Optional


class _Hiding:
    """A meta-path finder that finds nothing under the hidden names and defers the rest."""

    def __init__(self, finder: object, names: frozenset) -> None:
        self._finder = finder
        self._names = names

    def find_spec(self, fullname: str, path: Optional[object] = None, target: object = None):
        if fullname.split(".")[0] in self._names:
            return None
        find_spec = getattr(self._finder, "find_spec", None)
        return find_spec(fullname, path, target) if find_spec else None

    def __getattr__(self, name: str):
        return getattr(self._finder, name)


def hide(names: Iterable[str]) -> None:
    """Makes the top-level packages ``names`` unimportable in this process (forgets any already
    imported)."""
    names = frozenset(names)
    for module in [m for m in sys.modules if m.split(".")[0] in names]:
        del sys.modules[module]
    sys.meta_path[:] = [_Hiding(finder, names) for finder in sys.meta_path]
