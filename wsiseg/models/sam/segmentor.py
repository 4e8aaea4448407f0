"""SamSegmentor: SAM as wsiseg's Segmentor (each tile encoded once, its prompts decoded in batches).

Frames: tiles are (B, H, W, 3) uint8 RGB at the model's mpp with H, W <= input_size (smaller
tiles are zero-padded bottom/right after normalisation, as SAM does); points are continuous
tile pixels in the pixel-edge frame (centre of pixel (i, j) = (j + 0.5, i + 0.5)).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wsiseg.models.protocols import PromptBatch, TileMasks
from wsiseg.models.sam.build import SAM_ARCHITECTURES, SamModel, build_sam, load_sam_weights
from wsiseg.models.sam.lora import LoraConfig, apply_lora, merge_lora

if TYPE_CHECKING:
    from wsiseg.models.bundles import Bundle

logger = logging.getLogger(__name__)

NEGATIVES_MODES = ("with", "best_of_both")
_CPU_BATCH = (4, 64)  # encoder tiles, decoder prompts
_MAX_CUDA_BATCH = (64, 1024)


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as torch understands it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU; use device 'cpu' or 'auto' (--device cpu on the command line)")
    return dev


class SamSegmentor:
    """SAM turning point prompts (one positive + negatives) into one mask per prompt.

    model: a SamModel with weights loaded (eval mode is set here).
    negatives_mode: "with" decodes each prompt as given; "best_of_both" (PromptNucSeg with
        K > 0) also decodes every prompt that has negatives with them relabelled padding, and
        keeps whichever mask has the higher predicted IoU.
    encoder_batch_size / decoder_batch_size: tiles per encoder call / decoder rows per call;
        None picks them (from free memory on CUDA).  On CUDA out-of-memory the batch is halved
        and retried (and stays halved).
    bf16: on CUDA, run the encoder and mask decoder under bfloat16 autocast (the prompt
        encoder always runs in float32).  compile: torch.compile the image encoder.
    """

    def __init__(
        self,
        model: SamModel,
        *,
        name: str = "sam",
        mpp: float = 0.25,
        max_nucleus_diameter_px: int = 64,
        k_negatives: int = 0,
        negatives_mode: str = "with",
        device: str | torch.device = "cpu",
        encoder_batch_size: int | None = None,
        decoder_batch_size: int | None = None,
        bf16: bool = True,
        compile: bool = False,
    ) -> None:
        if not mpp > 0:
            raise ValueError(f"mpp must be > 0, got {mpp!r}")
        if max_nucleus_diameter_px <= 0:
            raise ValueError(f"max_nucleus_diameter_px must be > 0, got {max_nucleus_diameter_px!r}")
        if k_negatives < 0:
            raise ValueError(f"k_negatives must be >= 0, got {k_negatives!r}")
        if negatives_mode not in NEGATIVES_MODES:
            raise ValueError(f"negatives_mode must be one of {NEGATIVES_MODES}, got {negatives_mode!r}")
        for label, size in (("encoder_batch_size", encoder_batch_size), ("decoder_batch_size", decoder_batch_size)):
            if size is not None and size < 1:
                raise ValueError(f"{label} must be >= 1 or None, got {size!r}")
        self.name = name
        self.mpp = float(mpp)
        self.input_size_px: int | None = model.input_size
        self.max_nucleus_diameter_px = int(max_nucleus_diameter_px)
        self.k_negatives = int(k_negatives)
        self.negatives_mode = negatives_mode
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.bf16 = bool(bf16) and self.device.type == "cuda"
        auto_enc, auto_dec = self._default_batch_sizes()
        self.encoder_batch_size = encoder_batch_size or auto_enc
        self.decoder_batch_size = decoder_batch_size or auto_dec
        self._encoder: Callable[[torch.Tensor], torch.Tensor] = self.model.image_encoder
        if compile:
            self._encoder = torch.compile(self.model.image_encoder)  # type: ignore[assignment]

    def __repr__(self) -> str:
        arch = self.model.architecture
        return (
            f"SamSegmentor({self.name!r}, embed_dim={arch.embed_dim}, depth={arch.depth}, "
            f"input_size={self.input_size_px}, device={self.device})"
        )

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle | str | os.PathLike[str],
        *,
        input_size: int | None = None,
        device: str | torch.device = "cpu",
        k_negatives: int | None = None,
        **options: Any,
    ) -> SamSegmentor:
        """Build from a bundle's "sam" segmentor (config: variant, optional lora {rank, alpha},
        optional negatives_mode).  LoRA adapters are merged into the weights after loading."""
        from wsiseg.models.bundles import Bundle, BundleError, open_bundle

        if not isinstance(bundle, Bundle):
            bundle = open_bundle(bundle)
        manifest = bundle.manifest
        comp = bundle.component("segmentor")
        where = f"bundle {bundle.path}"
        if comp.architecture != "sam":
            raise BundleError(f"{where}: segmentor architecture is {comp.architecture!r}, not 'sam'")
        config = dict(comp.config)
        variant = config.get("variant")
        if variant not in SAM_ARCHITECTURES:
            raise BundleError(
                f"{where}: segmentor config variant {variant!r} is not one of {sorted(SAM_ARCHITECTURES)}"
            )
        mean, std = manifest.normalisation
        try:
            lora = LoraConfig.from_dict(config["lora"]) if config.get("lora") else None
            model = build_sam(
                variant, input_size=input_size or manifest.input_size or 256, pixel_mean=mean, pixel_std=std
            )
            if lora is not None:
                apply_lora(model, lora.rank, lora.alpha)
            load_sam_weights(model, bundle.load_weights("segmentor"), source=where)
        except ValueError as exc:
            raise BundleError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from exc
        merge_lora(model)
        options.setdefault("negatives_mode", config.get("negatives_mode", "with"))
        return cls(
            model,
            name=manifest.name,
            mpp=manifest.mpp,
            max_nucleus_diameter_px=manifest.max_nucleus_diameter_px,
            k_negatives=manifest.k_negatives if k_negatives is None else k_negatives,
            device=device,
            **options,
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        variant: str | None = None,
        *,
        input_size: int = 256,
        device: str | torch.device = "cpu",
        lora: LoraConfig | None = None,
        **options: Any,
    ) -> SamSegmentor:
        """Build from an official `sam_vit_*.pth` or a PromptNucSeg segmentor checkpoint
        (variant detected from the shapes when None).  Other options as the constructor."""
        from wsiseg.models.sam.convert import check_lora, read_sam_checkpoint, resolve_variant

        path = Path(path)
        source = f"SAM checkpoint {path}"
        state = read_sam_checkpoint(path)
        variant = resolve_variant(state, variant, source=source)
        model = build_sam(variant, input_size=input_size)
        if check_lora(state, lora, source=source) and lora is not None:
            apply_lora(model, lora.rank, lora.alpha)
        load_sam_weights(model, state, source=source)
        merge_lora(model)
        options.setdefault("name", path.stem)
        return cls(model, device=device, **options)

    @classmethod
    def from_architecture(
        cls, variant: str, *, input_size: int = 256, seed: int = 0, device: str | torch.device = "cpu", **options: Any
    ) -> SamSegmentor:
        """An UNTRAINED SAM of a registered size with random weights (benchmarks and tests only)."""
        torch.manual_seed(seed)
        model = build_sam(variant, input_size=input_size)
        options.setdefault("name", f"untrained-{variant}")
        return cls(model, device=device, **options)

    # ----------------------------------------------------------------------------- public API

    def predict(self, tile: np.ndarray, points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask logits and predicted IoU for P prompts on one tile.

        tile: (H, W, 3) uint8 RGB, H, W <= input_size.  points: (P, N, 2) float, x, y tile
        pixels (edge frame).  labels: (P, N), 1 positive, 0 negative, -1 padding.
        Returns logits (P, H, W) float32 (mask = logits > 0) and iou (P,) float32.
        """
        tiles = np.asarray(tile)[None]
        batch = PromptBatch(points, labels)
        self._check_inputs(tiles, [batch])
        height, width = tiles.shape[1:3]
        logits = np.zeros((len(batch), height, width), np.float32)
        iou = np.zeros(len(batch), np.float32)
        with torch.inference_mode():
            embeddings = self._encode(tiles)
            for start, stop, up, score in self._decode(embeddings, [batch], height, width):
                logits[start:stop] = up.cpu().numpy()
                iou[start:stop] = score.float().cpu().numpy()
        return logits, iou

    def segment_tiles(self, tiles: np.ndarray, prompts: Sequence[PromptBatch]) -> list[TileMasks]:
        """tiles (B, H, W, 3) uint8 + one PromptBatch per tile -> one TileMasks per tile.

        Masks are logits > 0 cropped to their boxes (tile pixels, end exclusive); iou is SAM's
        predicted IoU.  Tiles go through the encoder `encoder_batch_size` at a time; the
        prompts of those tiles through the decoder `decoder_batch_size` at a time.
        """
        tiles = np.asarray(tiles)
        self._check_inputs(tiles, prompts)
        height, width = tiles.shape[1:3]
        results: list[TileMasks] = []
        with torch.inference_mode():
            start = 0
            while start < len(tiles):
                stop, embeddings = self._encode_with_retry(tiles, start)
                chunk = prompts[start:stop]
                total = sum(len(p) for p in chunk)
                boxes = np.zeros((total, 4), np.int32)
                ious = np.zeros(total, np.float32)
                masks: list[np.ndarray] = []
                for first, last, up, score in self._decode(embeddings, chunk, height, width):
                    boxes[first:last], dense = _crop_boxes(up > 0)
                    ious[first:last] = score.cpu().numpy()
                    masks += [
                        np.ascontiguousarray(m[y0:y1, x0:x1]) for m, (x0, y0, x1, y1) in zip(dense, boxes[first:last])
                    ]
                offsets = np.cumsum([0] + [len(p) for p in chunk])
                results += [TileMasks(boxes[a:b], masks[a:b], ious[a:b]) for a, b in itertools.pairwise(offsets)]
                start = stop
        return results

    # ----------------------------------------------------------------------------- internals

    def _check_inputs(self, tiles: np.ndarray, prompts: Sequence[PromptBatch]) -> None:
        size = self.model.input_size
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be (B, H, W, 3) uint8 RGB, got {tiles.shape} {tiles.dtype}")
        if tiles.shape[1] > size or tiles.shape[2] > size:
            raise ValueError(
                f"tiles of {tiles.shape[2]}x{tiles.shape[1]} px exceed the SAM input size {size}; cut smaller tiles"
            )
        if len(prompts) != len(tiles):
            raise ValueError(f"got {len(prompts)} prompt batches for {len(tiles)} tiles; give one PromptBatch per tile")
        for batch in prompts:
            if batch.points.shape[1] == 0 and len(batch):
                raise ValueError("each prompt needs at least one point (points of shape (P, 0, 2) given)")
            if not np.isin(batch.labels, (-1, 0, 1)).all():
                raise ValueError(
                    f"prompt labels must be 1 (positive), 0 (negative) or -1 (padding), got {np.unique(batch.labels)}"
                )
            if not np.isfinite(batch.points).all():
                raise ValueError("prompt points contain NaN or Inf")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _encode(self, tiles: np.ndarray) -> torch.Tensor:
        """(b, H, W, 3) uint8 -> image embeddings (b, C, S / 16, S / 16) on the device."""
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
        images = self.model.preprocess(x)
        with self._autocast():
            return self._encoder(images)

    def _encode_with_retry(self, tiles: np.ndarray, start: int) -> tuple[int, torch.Tensor]:
        """Encode tiles[start : start + encoder_batch_size], halving the batch on CUDA OOM; (stop, embeddings)."""
        while True:
            stop = min(len(tiles), start + self.encoder_batch_size)
            try:
                return stop, self._encode(tiles[start:stop])
            except torch.cuda.OutOfMemoryError:
                self._halve("encoder_batch_size")

    def _decode(
        self, embeddings: torch.Tensor, prompts: Sequence[PromptBatch], height: int, width: int
    ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Decode every prompt of `prompts` (tile t uses embeddings[t]), in order.

        Yields (first, last, logits (p, height, width) float32, iou (p,) float32) for
        consecutive slices of the flattened prompts.  Consecutive tiles whose prompts have
        the same point count N share decoder calls; a different N starts a new call (padding
        to a common N would change SAM's output).
        """
        offset = 0
        tile = 0
        while tile < len(prompts):
            n_points = prompts[tile].points.shape[1]
            end = tile
            while end < len(prompts) and prompts[end].points.shape[1] == n_points:
                end += 1
            group = prompts[tile:end]
            counts = [len(p) for p in group]
            tile_index = torch.from_numpy(np.repeat(np.arange(tile, end), counts)).to(self.device)
            pts = torch.from_numpy(np.concatenate([p.points for p in group])).to(self.device)
            lab = torch.from_numpy(np.concatenate([p.labels for p in group]).astype(np.int64)).to(self.device)
            first = 0
            while first < len(pts):
                rows = self.decoder_batch_size // (2 if self.negatives_mode == "best_of_both" else 1)
                last = min(len(pts), first + max(1, rows))
                try:
                    up, iou = self._decode_rows(
                        embeddings, tile_index[first:last], pts[first:last], lab[first:last], height, width
                    )
                except torch.cuda.OutOfMemoryError:
                    self._halve("decoder_batch_size")
                    continue
                yield offset + first, offset + last, up, iou
                first = last
            offset += len(pts)
            tile = end

    def _decode_rows(
        self,
        embeddings: torch.Tensor,
        tidx: torch.Tensor,
        pts: torch.Tensor,
        lab: torch.Tensor,
        height: int,
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(pts)
        alt = torch.zeros(0, dtype=torch.int64, device=pts.device)
        if self.negatives_mode == "best_of_both":
            alt = torch.nonzero((lab == 0).any(dim=1))[:, 0]
            if len(alt):
                lab_alt = lab[alt].masked_fill(lab[alt] == 0, -1)
                tidx, pts, lab = torch.cat([tidx, tidx[alt]]), torch.cat([pts, pts[alt]]), torch.cat([lab, lab_alt])
        with self._autocast():
            low, iou = self.model.decode(embeddings, tidx, pts, lab)
        low, iou = low.float(), iou.float()
        if len(alt):
            better = iou[n:] > iou[alt]
            low_sel, iou_sel = low[:n].clone(), iou[:n].clone()
            low_sel[alt[better]] = low[n:][better]
            iou_sel[alt[better]] = iou[n:][better]
            low, iou = low_sel, iou_sel
        return self.model.upsample_logits(low, height, width), iou

    def _halve(self, attr: str) -> None:
        size = getattr(self, attr)
        if size <= 1:
            raise RuntimeError(
                f"CUDA ran out of memory with {attr} = 1 on {self.device}; free GPU memory (other processes?) "
                "or use a smaller SAM variant"
            )
        logger.warning("CUDA out of memory with %s = %d; retrying with %d", attr, size, size // 2)
        setattr(self, attr, size // 2)
        torch.cuda.empty_cache()

    def _default_batch_sizes(self) -> tuple[int, int]:
        if self.device.type != "cuda":
            return _CPU_BATCH
        free, _total = torch.cuda.mem_get_info(self.device)
        arch, size = self.model.architecture, self.model.input_size
        tokens = (size // 16) ** 2
        # Rough peak activation bytes (fp32 worst case): token tensors through a block plus the
        # global attention matrix; and per decoder row its image-sized tensors and logits.
        per_tile = 4 * (tokens * arch.embed_dim * 24 + arch.num_heads * tokens * tokens * 3)
        per_row = 4 * (tokens * arch.prompt_dim * 12 + (arch.prompt_dim // 8) * 16 * tokens * 2 + 3 * size * size)
        budget = 0.4 * free
        enc = int(min(_MAX_CUDA_BATCH[0], max(1, budget // per_tile)))
        dec = int(min(_MAX_CUDA_BATCH[1], max(1, budget // per_row)))
        logger.debug("SAM batch sizes from %.1f GiB free: encoder %d tiles, decoder %d prompts", free / 2**30, enc, dec)
        return enc, dec


def _crop_boxes(masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (p, 4) int32 x0, y0, x1, y1 (end exclusive; zeros when empty) and the masks as numpy bool.

    The boxes are computed on the device on the whole thresholded batch; only the crop copies
    happen on the host.
    """
    _, height, width = masks.shape
    rows = masks.any(dim=2).to(torch.uint8)
    cols = masks.any(dim=1).to(torch.uint8)
    y0 = rows.argmax(dim=1)
    y1 = height - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = width - cols.flip(1).argmax(dim=1)
    nonempty = rows.any(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1) * nonempty[:, None]
    return boxes.to(torch.int32).cpu().numpy(), masks.cpu().numpy()
