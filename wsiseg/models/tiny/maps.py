"""The dense maps of wsiseg-tiny: (B, H, W, 3) uint8 tiles -> foreground, centre, distance.

Map channels (all float32 in [0, 1], tile pixels): 0 nuclear foreground probability,
1 centre heatmap, 2 normalised distance to the nucleus boundary.  The network is a
`UNet(UNetConfig(levels, base_channels, out_channels=3))`; a bundle stores its config in the
component's "config" (levels, base_channels) and the normalisation in the manifest.
"""

from __future__ import annotations

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

    return UNetConfig(int(config.get("levels", 5)), int(config.get("base_channels", 16)), out_channels=N_MAPS)


def build_network(config: dict[str, Any]) -> nn.Module:
    """The UNet of a wsiseg-tiny component config (`network_config`)."""
    from wsiseg.models.prompters.unet import UNet

    return UNet(network_config(config))


class DenseMapNet:
    """Runs the network on tiles; `predict_maps` gives (B, 3, H, W) float32 maps in [0, 1]."""

    def __init__(
        self,
        network: nn.Module,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        settings: MapSettings = MapSettings(),
        device: str = "cpu",
        weights_sha256: str | None = None,
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
        #: equal for two nets that give the same maps (same weights file, precision, tta); None: unknown
        tta = ":tta" if settings.tta else ""
        self.map_key = f"{weights_sha256}:{self.precision}:{self.mean}:{self.std}{tta}" if weights_sha256 else None

    def predict_maps(self, tiles: np.ndarray) -> np.ndarray:
        """tiles: (B, H, W, 3) uint8 -> (B, 3, H, W) float32 (foreground, centre, distance);
        with `MapSettings.tta`, the mean of the maps of the tile and its flips."""
        import torch

        tiles = tile_batches(tiles)
        b, height, width = tiles.shape[:3]
        out = np.zeros((b, N_MAPS, height, width), np.float32)
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
                    total = probability if total is None else total.add_(probability)
                assert total is not None
                mean = total[:, :, :height, :width] / len(TTA_FLIPS)
                out[start : start + len(chunk)] = mean.cpu().numpy()
        return out

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
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: invalid {architecture} settings: {exc}") from exc
        load_state(network, bundle.load_weights(role), where=where)
        mean, std = manifest_normalisation(bundle.manifest)
        try:
            chosen = MapSettings(precision=precision or str(component.config.get("precision", "fp32")), tta=tta)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        net = cls(network, mean=mean, std=std, settings=chosen, device=device, weights_sha256=component.sha256)
        return net, bundle, component


def tile_batches(tiles: np.ndarray) -> np.ndarray:
    """Check and return tiles as a (B, H, W, 3) uint8 array."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be a (B, H, W, 3) uint8 array, got {tiles.shape} {tiles.dtype}")
    return tiles
