"""wsiseg: every cell nucleus in a whole-slide image, as QuPath GeoJSON and Zarr.

`import wsiseg` is cheap: torch, Dask and the models load only when used.
"""

from __future__ import annotations

from wsiseg._version import __version__

__all__ = ["__version__"]
