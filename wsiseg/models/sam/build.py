"""SAM architectures (a registry of sizes) and the network wsiseg runs, with official state-dict keys.

The network is SAM's own ImageEncoderViT, PromptEncoder and MaskDecoder from the installed
`segment_anything` package.  It runs at any input size that is a multiple of 16 (256 by
default, the PromptNucSeg setting) from 1024-format weights:

- `image_encoder.pos_embed` stays (1, 64, 64, C) and is resized bicubically
  (align_corners=False) to the token grid in forward;
- the global-attention blocks keep their (127, head_dim) relative-position tables, which
  SAM's `get_rel_pos` interpolates to 2 * grid - 1 at run time;
- the prompt encoder works in the input frame (input_image_size = (S, S), embedding
  grid S / 16).

So the state dict has exactly the keys and shapes of the official checkpoints, and a stock
SAM or a PromptNucSeg fine-tuned segmentor loads strictly at any input size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.models.sam.loading import import_sam_modeling

_modeling = import_sam_modeling()

#: SAM's pixel normalisation (0-255 RGB); numerically ImageNet mean/std x 255.
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

PATCH_SIZE_PX = 16
#: the input size SAM checkpoints are trained at; sets the pos-embed and global rel-pos shapes.
PRETRAIN_SIZE_PX = 1024


@dataclass(frozen=True)
class SamArchitecture:
    """Hyper-parameters of one SAM size (an architecture: weights are random until loaded).

    The shared ones follow the official release: patch 16, window 14, relative positions,
    qkv bias, LayerNorm eps 1e-6, MLP ratio 4, prompt encoder mask_in_chans 16, mask
    decoder with 3 multimask outputs, 2 two-way layers and an IoU head of depth 3.
    """

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    #: encoder output channels = prompt embedding = mask-decoder transformer width.
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    window_size: int = 14

    def __post_init__(self) -> None:
        if self.embed_dim <= 0 or self.depth <= 0 or self.num_heads <= 0:
            raise ValueError(f"SamArchitecture sizes must be positive, got {self}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(f"global_attn_indexes {self.global_attn_indexes} outside 0..{self.depth - 1}")
        if self.prompt_dim % 32 or (self.prompt_dim // 2) % self.decoder_num_heads:
            raise ValueError(
                f"prompt_dim {self.prompt_dim} must be a multiple of 32 and its half divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


#: SAM sizes by name.  vit_b/l/h are the official ones (Kirillov et al. 2023, `build_sam.py`);
#: vit_tiny is a small CPU-friendly encoder with the official decoder, vit_test a toy for tests.
SAM_ARCHITECTURES: dict[str, SamArchitecture] = {
    "vit_b": SamArchitecture(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArchitecture(1280, 32, 16, (7, 15, 23, 31)),
    "vit_tiny": SamArchitecture(192, 4, 3, (1, 3)),
    "vit_test": SamArchitecture(32, 2, 2, (1,), prompt_dim=32, decoder_mlp_dim=64, decoder_num_heads=2),
}


def resize_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, H0, W0, C) absolute position embedding to (1, h, w, C), bicubic, align_corners=False."""
    if tuple(pos_embed.shape[1:3]) == tuple(grid_hw):
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2), size=grid_hw, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


class ResizingImageEncoderViT(_modeling.ImageEncoderViT):  # type: ignore[misc,name-defined]
    """SAM's ViT image encoder whose forward resizes pos_embed to the token grid (any multiple of 16).

    forward: (B, 3, H, W) normalised float -> (B, out_chans, H / 16, W / 16).
    Identical to the official forward when H = W = 1024 (no resize happens).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, h, w, C)
        if self.pos_embed is not None:
            x = x + resize_pos_embed(self.pos_embed, (x.shape[1], x.shape[2]))
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class SamModel(nn.Module):
    """SAM (image encoder, prompt encoder, mask decoder) run at `input_size` px, single-mask output.

    State-dict keys are the official ones (`image_encoder.*`, `prompt_encoder.*`,
    `mask_decoder.*`); the normalisation mean/std are non-persistent buffers.
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        architecture: SamArchitecture,
        *,
        input_size: int = 256,
        pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = SAM_PIXEL_STD,
    ) -> None:
        super().__init__()
        if input_size < 2 * PATCH_SIZE_PX or input_size % PATCH_SIZE_PX:
            raise ValueError(f"SAM input_size must be a multiple of {PATCH_SIZE_PX} and >= 32, got {input_size}")
        if len(pixel_mean) != 3 or len(pixel_std) != 3 or min(pixel_std) <= 0:
            raise ValueError(f"normalisation needs 3 means and 3 positive stds, got {pixel_mean}, {pixel_std}")
        arch = architecture
        self.architecture = arch
        self.input_size = input_size
        grid = input_size // PATCH_SIZE_PX
        self.image_encoder = ResizingImageEncoderViT(
            img_size=PRETRAIN_SIZE_PX,
            patch_size=PATCH_SIZE_PX,
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            mlp_ratio=4.0,
            out_chans=arch.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=arch.window_size,
            global_attn_indexes=arch.global_attn_indexes,
        )
        self.prompt_encoder = _modeling.PromptEncoder(
            embed_dim=arch.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(input_size, input_size),
            mask_in_chans=16,
        )
        self.mask_decoder = _modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=_modeling.TwoWayTransformer(
                depth=2,
                embedding_dim=arch.prompt_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.prompt_dim,
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB, H, W <= input_size -> (B, 3, S, S) float32, normalised, zero-padded bottom/right."""
        x = (tiles.permute(0, 3, 1, 2).float() - self.pixel_mean.view(1, 3, 1, 1)) / self.pixel_std.view(1, 3, 1, 1)
        pad_h, pad_w = self.input_size - x.shape[2], self.input_size - x.shape[3]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> image embeddings (B, prompt_dim, S / 16, S / 16)."""
        return self.image_encoder(images)

    def decode(
        self,
        embeddings: torch.Tensor,
        tile_index: torch.Tensor,
        points_px: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode P prompts against the embeddings of the tiles they belong to.

        embeddings: (T, prompt_dim, h, w) from `encode`.
        tile_index: (P,) int64, which embedding each prompt uses.
        points_px: (P, N, 2) float32, x, y in input pixels, pixel-edge frame (centre of pixel
            (i, j) = (j + 0.5, i + 0.5)).
        labels: (P, N) 1 positive, 0 negative, -1 padding.
        Returns low-resolution mask logits (P, 4h, 4w) and predicted IoU (P,).

        The prompt encoder runs in float32 (outside any autocast).  Each prompt's image
        embedding is added to its dense prompt embedding and the decoder gets a zero image
        embedding: the decoder computes image + dense, so this is the same sum and lets one
        decoder call serve prompts from many tiles.
        """
        device_type = points_px.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            # SAM's prompt encoder adds 0.5 to pixel-index coordinates; ours are edge-frame.
            sparse, dense = self.prompt_encoder(
                points=(points_px.float() - 0.5, labels.to(torch.int64)), boxes=None, masks=None
            )
            image_pe = self.prompt_encoder.get_dense_pe()
        dense = embeddings.index_select(0, tile_index) + dense
        # (1, C, 1, 1): SAM repeats it per prompt and broadcasts it onto the dense embedding.
        zero_image = embeddings.new_zeros((1, embeddings.shape[1], 1, 1))
        masks, iou = self.mask_decoder(
            image_embeddings=zero_image,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks[:, 0], iou[:, 0]

    def upsample_logits(self, low_res: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(P, h4, w4) low-res logits -> (P, height, width) float32: bilinear (align_corners=False)
        to the input size, then cropped to the tile (tiles smaller than the input are padded)."""
        up = F.interpolate(
            low_res.float()[:, None], size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
        )
        return up[:, 0, :height, :width]


def build_sam(
    variant: str | SamArchitecture,
    *,
    input_size: int = 256,
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN,
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD,
) -> SamModel:
    """A randomly initialised SAM of a registered size ("vit_b", ...) or an explicit architecture, in eval mode."""
    if isinstance(variant, str):
        if variant not in SAM_ARCHITECTURES:
            raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(SAM_ARCHITECTURES)}")
        variant = SAM_ARCHITECTURES[variant]
    return SamModel(variant, input_size=input_size, pixel_mean=pixel_mean, pixel_std=pixel_std).eval()


def detect_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The registered SAM size whose official-format state dict has these shapes.

    Raises ValueError describing the shapes found when none matches.
    """
    try:
        embed_dim = int(state_dict["image_encoder.patch_embed.proj.weight"].shape[0])
        prompt_dim = int(state_dict["image_encoder.neck.0.weight"].shape[0])
        mlp_dim = int(state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0])
    except KeyError as exc:
        raise ValueError(f"not a SAM state dict: key {exc.args[0]!r} is missing") from None
    depth = 0
    while f"image_encoder.blocks.{depth}.attn.qkv.weight" in state_dict:
        depth += 1
    rel = [state_dict.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    head_dim = int(rel[0].shape[1]) if depth and rel[0] is not None else 0
    global_idx = tuple(i for i, r in enumerate(rel) if r is not None and r.shape[0] != 2 * 14 - 1)
    for name, arch in SAM_ARCHITECTURES.items():
        if (
            arch.embed_dim,
            arch.depth,
            arch.head_dim,
            arch.global_attn_indexes,
            arch.prompt_dim,
            arch.decoder_mlp_dim,
        ) == (
            embed_dim,
            depth,
            head_dim,
            global_idx,
            prompt_dim,
            mlp_dim,
        ):
            return name
    raise ValueError(
        f"the state dict matches no known SAM size (embed dim {embed_dim}, depth {depth}, head dim {head_dim}, "
        f"global blocks {list(global_idx)}, prompt dim {prompt_dim}); known: {sorted(SAM_ARCHITECTURES)}"
    )


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise ValueError (one line naming `source`) unless `state_dict` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{source} does not fit the SAM architecture: " + "; ".join(problems))


def load_sam_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strictly load official-format weights into `model` (after `check_state_dict`)."""
    check_state_dict(model, state_dict, source=source)
    model.load_state_dict(dict(state_dict), strict=True)
