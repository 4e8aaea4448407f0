"""The dense maps of wsiseg-tiny: (B, H, W, 3) uint8 tiles -> foreground, centre, distance.

Map channels (all float32 in [0, 1], tile pixels): 0 nuclear foreground probability,
1 centre heatmap, 2 normalised distance to the nucleus boundary.  The network is a
`UNet(UNetConfig(levels, base_channels, out_channels=3))`; a bundle stores its config in the
component's "config" (levels, base_channels) and the normalisation in the manifest.

A network trained with HoVer-Net's horizontal and vertical maps (a component config with an
"hv" table, `HvSettings`) has two more outputs, h and v in [-1, 1] as (1 + h) / 2 after the
sigmoid; `fold_hv` turns them into an edge map that cuts the distance map between touching
nuclei, so the maps handed on still have the three channels above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from wsiseg.models.prompters.point import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_state,
    manifest_normalisation,
    open_component,
    resolve_device,
    tiles_to_tensor,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from wsiseg.models.prompters.unet import UNetConfig

    from wsiseg.models.bundles import Bundle

N_MAPS = 3
FOREGROUND, CENTRE, DISTANCE = 0, 1, 2
#: the network outputs of a model with horizontal and vertical maps (`HvSettings`)
HORIZONTAL, VERTICAL = 3, 4


@dataclass(frozen=True)
class HvSettings:
    """How a network's horizontal and vertical maps (h, v in [-1, 1]; `wsiseg.training.targets.hv_maps`)
    cut its distance map.  Inside a nucleus h rises from left to right and v from top to bottom;
    where they fall, the pixel lies between two nuclei (or on a nucleus' edge).  The edge
    strength is max(-dh/dx, -dv/dy, 0) / saturation, clipped to [0, 1], the derivatives (per
    pixel) central differences over +-step_px pixels; the distance map becomes
    distance x (1 - edge).  HoVer-Net (Graham et al., Medical Image Analysis 58, 2019) takes the
    Sobel gradients' magnitude, normalised per tile; the falling part alone ignores the rise
    inside every nucleus, and a fixed scale keeps a nucleus' maps independent of its tile."""

    step_px: int = 1
    saturation: float = 0.5

    def __post_init__(self) -> None:
        check_hv(self.step_px, self.saturation)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HvSettings | None:
        """The settings of a component config's "hv" table; None when it has none."""
        table = config.get("hv")
        if table is None:
            return None
        if not isinstance(table, dict):
            raise ValueError(f"hv must be a table (step_px, saturation), got {table!r}")
        unknown = sorted(set(table) - {"step_px", "saturation"})
        if unknown:
            raise ValueError(f"hv has unknown keys {unknown} (known: step_px, saturation)")
        return cls(**table)


def check_hv(step_px: Any, saturation: Any, names: tuple[str, str] = ("hv step_px", "hv saturation")) -> None:
    """Raise ValueError unless step_px is a whole number >= 1 and saturation a finite number > 0
    (`HvSettings`); names: how the message calls them (a recipe's keys are hv_step_px, hv_saturation)."""
    if not isinstance(step_px, int) or isinstance(step_px, bool) or step_px < 1:
        raise ValueError(f"{names[0]} must be a whole number of pixels >= 1, got {step_px!r}")
    if not isinstance(saturation, (int, float)) or isinstance(saturation, bool) or not math.isfinite(saturation) \
            or saturation <= 0:
        raise ValueError(f"{names[1]} must be a number > 0, got {saturation!r}")


def fold_hv(maps: np.ndarray, hv: HvSettings) -> np.ndarray:
    """(B, 5, H, W) float32 probabilities (foreground, centre, distance, h, v as (1 + h) / 2) ->
    (B, 3, H, W) float32: foreground, centre and the distance cut by the edge strength of
    `HvSettings`.  The differences use the tile's own pixels only (edges repeated), so a pixel's
    value depends on its neighbourhood, not on the tile."""
    out = np.array(maps[:, :N_MAPS], dtype=np.float32)  # a copy: the input stays as it was
    k = hv.step_px
    # h = 2p - 1, so dh/dx = 2 dp/dx = (p[x + k] - p[x - k]) / k
    h = np.pad(maps[:, HORIZONTAL], ((0, 0), (0, 0), (k, k)), mode="edge")
    v = np.pad(maps[:, VERTICAL], ((0, 0), (k, k), (0, 0)), mode="edge")
    falling = np.minimum(h[:, :, 2 * k :] - h[:, :, : -2 * k], v[:, 2 * k :] - v[:, : -2 * k])
    edge = np.clip(falling, None, 0, out=falling)
    edge *= -1 / (k * hv.saturation)
    np.minimum(edge, 1, out=edge)
    out[:, DISTANCE] *= 1 - edge
    return out


#: the precisions a dense-map network runs at: "bf16" (bfloat16 autocast), "fp32", or "auto"
#: (bf16 where the device computes bfloat16 in hardware, `native_bf16`; fp32 elsewhere)
PRECISIONS = ("auto", "fp32", "bf16")
#: /proc/cpuinfo flags of x86 CPUs that compute bfloat16 dot products in hardware
#: (AVX512-BF16: Intel Cooper Lake and later, AMD Zen 4 and later; AMX-BF16: Intel Sapphire Rapids)
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class MapSettings:
    """How the network runs: precision, one of `PRECISIONS` (see `resolve_precision`); batch:
    tiles per forward pass, 0 for the device's default (see `DEFAULT_BATCH`); tta: test-time
    augmentation, the maps averaged over the tile and its three flips (`TTA_FLIPS`; four
    network passes)."""

    precision: str = "fp32"
    batch: int = 0
    tta: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch < 0:
            raise ValueError(f"batch must be >= 0 (0: the device's default), got {self.batch}")


#: the flips (tensor dims of a (B, C, H, W) batch) whose maps `MapSettings.tta` averages: none,
#: left-right, up-down, both; each map is flipped back before the mean of the probabilities
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))

#: tiles per forward pass when MapSettings.batch is 0: on CPU one 1152² tile at a time ran at
#: 0.39 s/Mpx against 0.63 s/Mpx for eight (the activations of eight fall out of cache;
#: benchmarks/README.md); a GPU wants large batches
DEFAULT_BATCH = {"cpu": 1, "cuda": 8}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU in Linux's /proc/cpuinfo; empty where there is none."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matrix products in hardware: a CUDA GPU of compute
    capability 8.0 or later (Ampere's bf16 tensor cores; older GPUs emulate bf16), or an x86 CPU
    with one of `BF16_CPU_FLAGS`.  Elsewhere bf16 is emulated: on a 2-core AVX2 CPU wsiseg-tiny
    ran 10x slower in bf16 than in fp32, while on a 2-core AVX512-BF16 CPU one 1152 px tile took
    0.13 s against 0.30 s."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """Whether this machine's CPU computes bfloat16 in hardware (one of `BF16_CPU_FLAGS`)."""
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for a `PRECISIONS` value: "auto" is bf16 where `native_bf16(device)`.
    Raises ValueError for other values."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def network_config(config: dict[str, Any]) -> UNetConfig:
    """The UNet shape of a wsiseg-tiny component config ({"levels": 5, "base_channels": 16})."""
    from wsiseg.models.prompters.unet import UNetConfig

    outputs = N_MAPS + 2 if config.get("hv") is not None else N_MAPS
    return UNetConfig(int(config.get("levels", 5)), int(config.get("base_channels", 16)), out_channels=outputs)


def build_network(config: dict[str, Any]) -> nn.Module:
    """The UNet of a wsiseg-tiny component config (`network_config`)."""
    from wsiseg.models.prompters.unet import UNet

    return UNet(network_config(config))


class DenseMapNet:
    """Runs the network on tiles; `predict_maps` gives (B, 3, H, W) float32 maps in [0, 1].
    hv: the settings that fold a five-output network's horizontal and vertical maps into its
    distance map (`fold_hv`); None for a three-output network."""

    def __init__(
        self,
        network: nn.Module,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        settings: MapSettings = MapSettings(),
        device: str = "cpu",
        weights_sha256: str | None = None,
        hv: HvSettings | None = None,
    ) -> None:
        import torch

        self.device = resolve_device(device)
        if hasattr(network, "fused_for_inference"):
            network = network.fused_for_inference()
        self.network = network.to(self.device).eval().to(memory_format=torch.channels_last)
        self.batch = settings.batch or DEFAULT_BATCH.get(self.device.type, 8)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.settings = settings
        #: the precision the network runs at: "fp32" or "bf16" (`resolve_precision`)
        self.precision = resolve_precision(settings.precision, self.device)
        self.multiple = int(network.config.multiple)
        self.outputs = int(network.config.out_channels)
        if self.outputs != (N_MAPS + 2 if hv is not None else N_MAPS):
            raise ValueError(f"a network with {self.outputs} outputs needs {'no ' if hv else ''}hv settings")
        self.hv = hv
        #: equal for two nets that give the same maps (same weights file, precision, tta); None: unknown
        tta = ":tta" if settings.tta else ""
        folded = f":hv{hv.step_px}/{hv.saturation}" if hv else ""
        self.map_key = f"{weights_sha256}:{self.precision}:{self.mean}:{self.std}{tta}{folded}" if weights_sha256 else None

    def predict_maps(self, tiles: np.ndarray, *, fold: bool = True) -> np.ndarray:
        """tiles: (B, H, W, 3) uint8 -> (B, 3, H, W) float32 (foreground, centre, distance);
        with `MapSettings.tta`, the mean of the maps of the tile and its flips (a flipped tile's
        h or v map is negated as it is flipped back); with hv settings, folded by `fold_hv`
        unless fold is False, which gives the network's own (B, 5, H, W) maps."""
        import torch

        tiles = tile_batches(tiles)
        b, height, width = tiles.shape[:3]
        out = np.zeros((b, self.outputs, height, width), np.float32)
        use_bf16 = self.precision == "bf16"
        for start in range(0, b, self.batch):
            chunk = tiles[start : start + self.batch]
            x = tiles_to_tensor(chunk, self.mean, self.std, self.multiple, self.device, min_size_px=self.multiple * 2)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if not self.settings.tta:
                    logits = self.network(x)
                    out[start : start + len(chunk)] = torch.sigmoid(logits[:, :, :height, :width].float()).cpu().numpy()
                    continue
                total = None
                for dims in TTA_FLIPS:
                    seen = x.flip(dims).contiguous(memory_format=torch.channels_last) if dims else x
                    probability = torch.sigmoid(self.network(seen).float())
                    probability = probability.flip(dims) if dims else probability
                    if self.hv is not None:
                        # a left-right flip negates h, an up-down one v: (1 + h) / 2 -> 1 - (1 + h) / 2
                        for dim, channel in ((3, HORIZONTAL), (2, VERTICAL)):
                            if dim in dims:
                                probability[:, channel] = 1 - probability[:, channel]
                    total = probability if total is None else total.add_(probability)
                assert total is not None
                mean = total[:, :, :height, :width] / len(TTA_FLIPS)
                out[start : start + len(chunk)] = mean.cpu().numpy()
        return fold_hv(out, self.hv) if self.hv is not None and fold else out

    @classmethod
    def from_bundle(
        cls, bundle: Bundle | str | Path, role: str, architecture: str, *, device: str = "cpu",
        precision: str | None = None, tta: bool = False,
    ) -> tuple[DenseMapNet, Bundle, Any]:
        """The network of a bundle's `role` component; returns (net, bundle, component).
        precision: one of `PRECISIONS`, None for the component's own ("fp32" when it names none);
        tta: see MapSettings.  Raises ValueError naming the bundle for an unknown precision."""
        bundle, component = open_component(bundle, role, architecture)
        where = f"bundle {bundle.path}"
        try:
            network = build_network(component.config)
            hv = HvSettings.from_config(component.config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: invalid {architecture} settings: {exc}") from exc
        load_state(network, bundle.load_weights(role), where=where)
        mean, std = manifest_normalisation(bundle.manifest)
        try:
            chosen = MapSettings(precision=precision or str(component.config.get("precision", "fp32")), tta=tta)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        net = cls(network, mean=mean, std=std, settings=chosen, device=device, weights_sha256=component.sha256, hv=hv)
        return net, bundle, component


def tile_batches(tiles: np.ndarray) -> np.ndarray:
    """Check and return tiles as a (B, H, W, 3) uint8 array."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be a (B, H, W, 3) uint8 array, got {tiles.shape} {tiles.dtype}")
    return tiles
