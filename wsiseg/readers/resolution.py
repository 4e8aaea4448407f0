"""Which resolution (µm per level-0 pixel) a slide's metadata can be trusted to give.

Every backend turns what its file says into an `MppReading`: the mpp when it is plausible,
or why it is not (missing, not a number, unknown unit, implausible value, disagreeing with
the objective).  A refused mpp is never used silently; `require_mpp` puts the reason in its
error, and an explicit `--mpp` replaces it.

Plausibility rules:
* within MPP_RANGE (image editors write 72 or 300 dpi, i.e. 352.8 or 84.7 µm/px);
* at most MAX_NUCLEUS_MPP: coarser scans show a 7 µm nucleus as 3 px or fewer, below what a
  nucleus model can see;
* within OBJECTIVE_TOLERANCE of 10 / objective power.  Scanners image at about 10 µm / M
  per pixel (0.25 µm/px at 40x, 0.5 at 20x: Aperio, Hamamatsu and 3DHistech 20x/40x modes
  give 0.22-0.26 µm/px at 40x), so a value off by more than 4x is a metadata error.
"""

from __future__ import annotations

from collections.abc import Sequence

import math
import re
from dataclasses import dataclass

#: Micrometres per pixel a microscope slide can plausibly have (anything else is not a scan).
MPP_RANGE: tuple[float, float] = (0.02, 50.0)
#: Coarsest file resolution accepted without an explicit --mpp (µm/px).
MAX_NUCLEUS_MPP = 2.0
#: How far (factor) an mpp may stray from 10 / objective power before it is refused.
OBJECTIVE_TOLERANCE = 4.0
#: Micrometres per scanner pixel at 1x objective power (mpp ~ 10 / power).
UM_AT_1X = 10.0

#: Micrometres per length unit, by the symbols OME-XML (UnitsLength) and ImageJ use.
UM_PER_UNIT: dict[str, float] = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6, "in": 25_400.0, "inch": 25_400.0,
}  # fmt: skip


@dataclass(frozen=True)
class MppReading:
    """What a file says about its resolution.

    mpp: (x, y) µm per level-0 pixel when trusted, else None.
    problem: why a value the file holds is not trusted (one clause, no file name); None when
        the mpp is trusted or the file holds no resolution at all.
    """

    mpp: tuple[float, float] | None = None
    problem: str | None = None

    def __post_init__(self) -> None:
        if self.mpp is not None and self.problem is not None:
            raise ValueError("an MppReading has either an mpp or a problem, not both")


def judge_mpp(
    mpp_x: object, mpp_y: object, *, objective_power: float | None = None, source: str = "metadata"
) -> MppReading:
    """Check a file's (mpp_x, mpp_y) against MPP_RANGE, MAX_NUCLEUS_MPP and the objective.

    mpp_x, mpp_y: the values as stored (numbers or strings); both None means "not stated".
    objective_power: the scan's objective magnification, when the file states it.
    source: where the values come from, for the message (e.g. "aperio.MPP").
    """
    if mpp_x in (None, "") and mpp_y in (None, ""):
        return MppReading()
    try:
        x, y = float(mpp_x), float(mpp_y)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return MppReading(problem=f"{source} = {mpp_x!r} x {mpp_y!r} is not a number")
    stated = f"{source} = {x:g} µm/px" if x == y else f"{source} = {x:g} x {y:g} µm/px"
    if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
        return MppReading(problem=f"{stated} is not a positive number")
    lo, hi = MPP_RANGE
    if not (lo <= x <= hi and lo <= y <= hi):
        return MppReading(
            problem=f"{stated} ({25_400 / max(x, y):.0f} dpi) is implausible for a microscope scan "
            "(an image editor's default?)"
        )
    if objective_power is not None and objective_power > 0:
        expected = UM_AT_1X / objective_power
        if max(x, y) > OBJECTIVE_TOLERANCE * expected or min(x, y) < expected / OBJECTIVE_TOLERANCE:
            return MppReading(
                problem=f"{stated} disagrees with the objective power {objective_power:g}x "
                f"(about {expected:.2g} µm/px expected)"
            )
    coarse = max(x, y)
    if coarse > MAX_NUCLEUS_MPP:
        return MppReading(
            problem=f"{stated} is implausibly coarse: a 7 µm nucleus would be {7 / coarse:.1f} px, too small "
            f"for a nucleus model (at most {MAX_NUCLEUS_MPP:g} µm/px)"
        )
    return MppReading((x, y))


def length_in_um(value: object, unit: str | None) -> float | None:
    """A length in µm from a value and a unit symbol (UM_PER_UNIT; None means µm), or None
    when the value is not a number or the unit is unknown."""
    scale = UM_PER_UNIT.get("µm" if unit is None else unit.strip())
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if scale is None else number * scale


#: TIFF ResolutionUnit names (as tifffile, OpenSlide and TiffSlide spell them) -> µm per unit.
_TIFF_UNITS: dict[str, float | None] = {
    "2": 25_400.0, "inch": 25_400.0, "3": 10_000.0, "centimeter": 10_000.0, "1": None, "none": None,
}  # fmt: skip


def _ratio(value: object) -> float | None:
    """A TIFF RATIONAL as tifffile ((num, den)) or OpenSlide/TiffSlide (number or string) give it."""
    try:
        if isinstance(value, (tuple, list)):
            return float(value[0]) / float(value[1])
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None


def tiff_tag_mpp(
    x_resolution: object,
    y_resolution: object,
    resolution_unit: object,
    description: str | None = None,
    *,
    objective_power: float | None = None,
) -> MppReading:
    """Resolution from TIFF XResolution/YResolution (pixels per unit) and ResolutionUnit.

    Inch and centimetre units count.  Unit NONE with ImageJ's `unit=micron` (or another
    length) in the ImageDescription counts in that unit; unit NONE with pixels-per-unit 1
    (tifffile's default) means "not stated"; any other unit-less value is a problem.
    """
    px_x, px_y = _ratio(x_resolution), _ratio(y_resolution)
    if px_x is None or px_y is None:
        return MppReading()
    unit_key = str(resolution_unit).strip().lower().rsplit(".", 1)[-1] if resolution_unit is not None else "2"
    if unit_key not in _TIFF_UNITS:
        return MppReading(problem=f"the TIFF resolution unit {resolution_unit!r} is unknown")
    um_per_unit = _TIFF_UNITS[unit_key]
    source = "TIFF resolution"
    if um_per_unit is None:
        text = description or ""
        match = re.search(r"^unit=(\S+)\s*$", text, re.MULTILINE) if "ImageJ=" in text else None
        if match is not None:
            unit = match.group(1).replace("\\u00B5", "µ")
            um_per_unit = UM_PER_UNIT.get(unit)
            if um_per_unit is None:
                return MppReading(problem=f"the ImageJ resolution unit {unit!r} is not a length")
            source = "ImageJ resolution"
        elif px_x == 1.0 and px_y == 1.0:
            return MppReading()
        else:
            return MppReading(
                problem=f"the TIFF resolution ({px_x:g} px per unit) has an unknown unit (ResolutionUnit NONE)"
            )
    if px_x <= 0 or px_y <= 0:
        return MppReading(problem=f"the TIFF resolution ({px_x:g} x {px_y:g} px per unit) is not positive")
    return judge_mpp(um_per_unit / px_x, um_per_unit / px_y, objective_power=objective_power, source=source)


def mpp_from_override(mpp: float | None) -> MppReading | None:
    """The reading for an explicit --mpp (trusted as given), or None without one."""
    return None if mpp is None else MppReading((float(mpp), float(mpp)))


#: A slide coarser than the model's resolution by more than this factor is upsampled further than
#: the built-in model was validated on (its validation images include 0.5 µm/px scans run at
#: 0.25 µm/px, a factor of 2): `check` and the report warn.  A 20x slide on a 40x model is not warned.
UPSAMPLE_WARNING_FACTOR = 2.05


def upsampling_warning(slide_mpp: float | None, model_mpp: float | None) -> str | None:
    """One sentence when a slide at slide_mpp µm/px is upsampled more than
    UPSAMPLE_WARNING_FACTOR times to a model working at model_mpp µm/px, else None."""
    if not slide_mpp or not model_mpp or slide_mpp <= UPSAMPLE_WARNING_FACTOR * model_mpp:
        return None
    return (f"the slide ({slide_mpp:.3g} µm/px) is {slide_mpp / model_mpp:.1f}x coarser than the model's "
            f"{model_mpp:.3g} µm/px: nuclei are upsampled and small ones may be missed")


#: An mpp given to a run (--mpp or a slide manifest's) that differs from the file's own by more
#: than this factor is a warning in `wsiseg check` and in the run's report.
MPP_OVERRIDE_WARNING_RATIO = 1.1


def override_warning(mpp: float | None, file_mpp: Sequence[float] | None, given: str = "--mpp") -> str | None:
    """One sentence when `mpp`, given to a run in place of the file's own plausible resolution
    `file_mpp` ((x, y) µm/px, `SlideProperties.file_mpp`), differs from it by more than
    MPP_OVERRIDE_WARNING_RATIO: right for a mislabelled scan, a typo otherwise.  given: how the
    value was given ("--mpp", "the manifest's mpp").  None when the two agree or either is unknown."""
    if not mpp or not file_mpp:
        return None
    own = float(sum(file_mpp) / len(file_mpp))
    ratio = max(mpp, own) / min(mpp, own)
    if ratio <= MPP_OVERRIDE_WARNING_RATIO:
        return None
    return (f"{given} {mpp:g} µm/px replaces the file's own {own:g} ({ratio:.1f}x "
            f"{'coarser' if mpp > own else 'finer'}): right only if the file is mislabelled")
