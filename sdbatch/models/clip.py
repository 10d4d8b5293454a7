"""CLIP ViT-L/14 text tower, the text encoder of SD v1 (`cond_stage_model.transformer.text_model.*`)."""

import torch
import torch.nn.functional as F
from torch import nn

from .common import namespace
from .configs import CLIPConfig


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i sees tokens <= i
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # QuickGELU, as CLIP was trained


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


# per batch row: (position, vectors [n, width]) whose vectors replace the token embeddings from position on
Fixes = list[list[tuple[int, torch.Tensor]]]


def _apply_fixes(x: torch.Tensor, fixes: Fixes) -> torch.Tensor:
    """Token embeddings with textual-inversion vectors written over them (A1111's EmbeddingsWithFixes).
    A fix may not touch the first (BOS) or last position: those frame the chunk."""
    if len(fixes) != x.shape[0]:
        raise ValueError(f"fixes for {len(fixes)} rows, but the batch has {x.shape[0]}")
    if not any(fixes):
        return x
    x = x.clone()
    for row, row_fixes in enumerate(fixes):
        for position, vectors in row_fixes:
            n = vectors.shape[0]
            if vectors.ndim != 2 or vectors.shape[1] != x.shape[2]:
                raise ValueError(f"a fix of shape {list(vectors.shape)} in a text encoder {x.shape[2]} wide")
            if not 1 <= position <= x.shape[1] - 1 - n:
                raise ValueError(f"a fix of {n} vectors at position {position} does not fit in {x.shape[1]} tokens")
            x[row, position : position + n] = vectors.to(x)
    return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.embeddings = namespace(
            token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
            position_embedding=nn.Embedding(cfg.max_positions, cfg.width),
        )
        self.encoder = namespace(layers=nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers)))
        self.final_layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, fixes: Fixes | None = None) -> torch.Tensor:
        # positions come from a slice, not a `position_ids` buffer: merged checkpoints often carry a
        # corrupted float copy of that buffer, and a buffer-free model loads straight from meta.
        layers = len(self.encoder.layers)
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip skip {clip_skip}: this text encoder has {layers} layers (1 to {layers} allowed)")
        x = self.embeddings.token_embedding(input_ids)
        if fixes is not None:
            x = _apply_fixes(x, fixes)
        x = x + self.embeddings.position_embedding.weight[: input_ids.shape[1]]
        for layer in self.encoder.layers[: layers - (clip_skip - 1)]:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTextEncoder(nn.Module):
    """Token ids (B, <=77) -> last hidden state (B, <=77, 768), the UNet's cross-attention context.

    `clip_skip` counts as A1111's "Clip skip" (`CLIP_stop_at_last_layers`): 1 is the last layer;
    N stops N - 1 layers early (transformers' `hidden_states[-N]`) and still applies the final
    LayerNorm, because the UNet was trained on normalised states. diffusers' `clip_skip=k` is N = k + 1.
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.transformer = namespace(text_model=CLIPTextTransformer(cfg))

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, fixes: Fixes | None = None) -> torch.Tensor:
        """`fixes`, one list per row (`Chunk.fixes`), puts textual-inversion vectors in place of the
        token embeddings at their positions, before the position embeddings are added: the prompt's
        placeholder ids stand for vectors that are in no vocabulary."""
        return self.transformer.text_model(input_ids, clip_skip, fixes)
