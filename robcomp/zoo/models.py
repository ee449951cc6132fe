"""Small default models (CNN, MLP, ViT) sized for the embedded digits set.

Every model takes images in [0, 1] and normalises them inside itself (a :class:`Normalize`
module registered first), so attacks work in pixel space with ``eps`` in [0, 1] units.
Every model's final classifier is an ``nn.Linear`` named ``head`` (``head_name = "head"``) so
compression can skip it by default. Only ``nn.Linear`` / ``nn.Conv2d`` carry weights, and the
ViT's attention is hand-written (``qkv`` and ``proj`` Linears) so module swapping reaches it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robcomp.inputs import check_float_input

__all__ = ["Normalize", "SmallCNN", "MLP", "WideMLP", "Attention", "Block", "TinyViT", "MODELS",
           "build_model"]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with mean/std as (non-trainable) buffers."""

    def __init__(self, mean: Sequence[float] | float = 0.5, std: Sequence[float] | float = 0.5,
                 channels: int = 1) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.numel() == 1:
            m = m.repeat(channels)
        if s.numel() == 1:
            s = s.repeat(channels)
        if m.numel() != channels or s.numel() != channels or bool((s <= 0).any()):
            raise ValueError(f"mean/std must have 1 or {channels} entries and std > 0")
        self.register_buffer("mean", m.view(1, channels, 1, 1))
        self.register_buffer("std", s.view(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        check_float_input(x, "model")  # an integer image would be promoted silently, unscaled
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU (w), conv3x3-BN-ReLU (2w), maxpool 2, conv3x3-BN-ReLU (2w), pool to
    4x4, Linear(2w*16, 4w), ReLU, head Linear(4w, classes). Default width: K = 512."""

    head_name = "head"

    def __init__(self, width: int = 16, in_channels: int = 1, num_classes: int = 10,
                 image_size: int = 8, mean: Sequence[float] | float = 0.5,
                 std: Sequence[float] | float = 0.5) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, in_channels)
        self.features = nn.Sequential(
            _conv_bn(in_channels, width, 3), _conv_bn(width, 2 * width, 3), nn.MaxPool2d(2),
            _conv_bn(2 * width, 2 * width, 3))
        # identity for 8x8 inputs; maps any other size to a 4x4 grid
        self.pool = nn.AdaptiveAvgPool2d(4) if image_size // 2 != 4 else nn.Identity()
        self.fc = nn.Linear(2 * width * 16, 4 * width)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(self.normalize(x)))
        return self.head(F.relu(self.fc(torch.flatten(x, 1))))


class MLP(nn.Module):
    """Flatten, ``depth`` x (Linear(width) + ReLU), head Linear(width, classes)."""

    head_name = "head"

    def __init__(self, width: int = 256, depth: int = 2, in_features: int = 64,
                 num_classes: int = 10, in_channels: int = 1,
                 mean: Sequence[float] | float = 0.5, std: Sequence[float] | float = 0.5) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.normalize = Normalize(mean, std, in_channels)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # already flat: normalise as one channel-major image
            x = x.view(x.shape[0], self.normalize.mean.shape[1], -1, 1)
        return self.head(self.body(torch.flatten(self.normalize(x), 1)))


class WideMLP(MLP):
    """The MLP at 2048 wide and 3 deep: two 2048 x 2048 hidden layers (32 MB of fp32 weights, more
    than a typical CPU's last-level cache), so a batch-1 forward is bound by memory traffic and a
    compressed copy, reading 2-8x fewer bytes, can beat dense (the default study's "memory" experiment)."""

    def __init__(self, width: int = 2048, depth: int = 3, **kwargs) -> None:
        super().__init__(width=width, depth=depth, **kwargs)


class Attention(nn.Module):
    """Multi-head self-attention with one ``qkv`` Linear (dim -> 3*heads*head_dim) and a
    ``proj`` Linear. ``num_heads``/``head_dim`` are plain attributes: a head pruner shrinks
    ``qkv`` rows, ``proj`` columns and updates them; the forward infers head_dim from shapes."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        out = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Vision transformer: Linear patch embedding, cls token, learned positions, ``depth``
    pre-LN blocks, final LayerNorm, head Linear on the cls token."""

    head_name = "head"

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, patch: int = 2,
                 mlp_ratio: int = 2, in_channels: int = 1, num_classes: int = 10,
                 image_size: int = 8, mean: Sequence[float] | float = 0.5,
                 std: Sequence[float] | float = 0.5) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} not divisible by patch {patch}")
        self.normalize = Normalize(mean, std, in_channels)
        self.patch = patch
        num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Linear(in_channels * patch * patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p]."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch_embed(self.patchify(self.normalize(x)))
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])


MODELS: dict[str, type[nn.Module]] = {"cnn": SmallCNN, "mlp": MLP, "wide_mlp": WideMLP, "vit": TinyViT}


def build_model(name: str, width: int | None = None, *,
                input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10) -> nn.Module:
    """Build ``MODELS[name]`` for inputs of shape (C, H, W); ``width`` only if given."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive int, got {width!r}")
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape!r}")
    c, h, w = (int(d) for d in input_shape)
    kwargs: dict = {"num_classes": num_classes, "in_channels": c}
    if width is not None:
        kwargs["width"] = width
    if issubclass(MODELS[name], MLP):
        kwargs["in_features"] = c * h * w
    else:
        if h != w:
            raise ValueError(f"model {name!r} needs square images, got {h}x{w}")
        kwargs["image_size"] = h
    return MODELS[name](**kwargs)
