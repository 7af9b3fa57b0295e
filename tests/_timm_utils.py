"""Helpers shared by tests that compare against the real timm CaiT (not a stand-in)."""

from __future__ import annotations

import numpy as np
import torch
from timm.models.cait import Cait


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Draw every parameter at random so that every block, head mix and bias matters.

    LayerScale gammas land in [0.1, 1] (not timm's 1e-5 init, behind which a wrong block would hide), weights
    are normal with a scale that keeps activations O(1), biases are non-zero.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gamma" in name:
                param.copy_(torch.rand(param.shape, generator=generator) * 0.9 + 0.1)
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1 or name in ("cls_token", "pos_embed"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = int(np.prod(param.shape[1:]))
                param.copy_(torch.randn(param.shape, generator=generator) / np.sqrt(fan_in))
    return model.eval()


def small_timm_cait(seed: int = 0, **kwargs) -> Cait:
    """A timm `Cait` of the given configuration with every parameter randomised (see `randomise_`)."""
    return randomise_(Cait(**kwargs), seed)


def timm_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
