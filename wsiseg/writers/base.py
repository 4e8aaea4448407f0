"""What every streaming writer shares: write batches, then close (publish) or abort (discard)."""

from __future__ import annotations

from typing import Any, TypeVar

W = TypeVar("W", bound="StreamingWriter")


class StreamingWriter:
    """Base of the output writers.  Used as a context manager, an exception aborts the write
    and a normal exit closes it, so nothing half-written is ever left under the final name."""

    _closed: bool = False

    def close(self) -> Any:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: W) -> W:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
