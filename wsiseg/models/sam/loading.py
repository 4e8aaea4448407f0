"""Import SAM's model classes (`segment_anything.modeling`) without needing torchvision.

The `segment_anything` package's own `__init__` imports its predictor helpers, which
import torchvision; the `modeling` subpackage (ImageEncoderViT, PromptEncoder,
MaskDecoder, TwoWayTransformer, Sam) needs only torch.  wsiseg uses those classes as
they are (no vendored copy), so it loads the subpackage without running the package
`__init__` when the normal import fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

_PACKAGE = "segment_anything"
_MODELING = "segment_anything.modeling"
_INSTALL_HINT = "install it with `pip install segment-anything`"


def import_sam_modeling() -> ModuleType:
    """Return the `segment_anything.modeling` module, importable even without torchvision.

    The normal import is tried first, so nothing changes where torchvision is installed.
    Otherwise the subpackage is imported under a temporary, non-executed parent package
    module; that placeholder is removed again afterwards, so a later
    `import segment_anything` runs the real package `__init__` (and fails or succeeds as
    it would have without wsiseg).

    Raises ImportError naming `pip install segment-anything` when the package is missing.
    """
    module = sys.modules.get(_MODELING)
    if module is not None:
        return module
    try:
        return importlib.import_module(_MODELING)
    except ImportError as exc:
        first_error = exc

    # A failed package __init__ may already have imported the modeling subpackage.
    module = sys.modules.get(_MODELING)
    if module is not None:
        return module
    spec = getattr(sys.modules.get(_PACKAGE), "__spec__", None) or importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"the SAM segmentor needs the segment-anything package: {_INSTALL_HINT}") from first_error
    logger.debug("importing %s without the package __init__ (%s)", _MODELING, first_error)

    placeholder: ModuleType | None = None
    if _PACKAGE not in sys.modules:
        placeholder = importlib.util.module_from_spec(spec)  # not executed: no torchvision import
        sys.modules[_PACKAGE] = placeholder
    try:
        return importlib.import_module(_MODELING)
    except ImportError as exc:
        raise ImportError(
            f"could not import {_MODELING} ({exc}); reinstall it with `pip install --force-reinstall segment-anything`"
        ) from exc
    finally:
        if placeholder is not None and sys.modules.get(_PACKAGE) is placeholder:
            del sys.modules[_PACKAGE]
