"""Lazy public names for packages whose members import heavy libraries (torch, zarr)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Mapping


def lazy_attributes(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any], all_names: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: `exports` maps a public name to the absolute
    module defining it; the module is imported on first access and the value cached in
    `namespace` (the package's globals)."""
    names = sorted(set(all_names))

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
