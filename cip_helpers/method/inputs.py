"""Input hardening at the public API boundary: what a defended API accepts as a batch of
images, and an error that says how to fix anything else (fail closed: nothing is guessed)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _shape_hint(shape: tuple[int, ...], want: tuple[int, int, int] | None) -> str:
    """What to do about a batch of the wrong rank or layout (empty if nothing specific applies)."""
    if want is None:
        if len(shape) == 3:
            return ("; one image (C, H, W): add the batch axis with x.unsqueeze(0); a batch of "
                    "grayscale images (N, H, W): add the channel axis with x.unsqueeze(1)")
        if len(shape) == 2:
            return "; flat rows (N, C*H*W): reshape them to (N, C, H, W) with x.reshape(-1, C, H, W)"
        if len(shape) > 4:
            return "; remove the extra axes (e.g. x.squeeze(k) for a size-1 axis k)"
        return ""
    c, h, w = want
    size = c * h * w
    if len(shape) > 4:
        kept = tuple(s for s in shape if s != 1)
        if kept[-3:] == want or kept[-2:] == (h, w):
            return f"; remove the extra size-1 axes, e.g. x.reshape(-1, {c}, {h}, {w})"
        return "; remove the extra axes: the API takes one batch axis, then (C, H, W)"
    if len(shape) == 4 and shape[1:] == (h, w, c):
        return "; these look channels-last (N, H, W, C): use x.permute(0, 3, 1, 2) (numpy: x.transpose(0, 3, 1, 2))"
    if len(shape) == 4 and shape[1:3] == (h, w) and shape[3] in (1, 3, 4) and shape[3] != c:
        fix = "x.mean(1, keepdim=True)" if c == 1 else f"x.expand(-1, {c}, -1, -1)"
        return (f"; these look channels-last with {shape[3]} channels (N, H, W, C): use x.permute(0, 3, 1, 2), "
                f"then match the victim's {c} channel(s), e.g. {fix}")
    if len(shape) == 4 and shape[2:] == (h, w) and shape[1] != c:
        if c == 1:
            return (f"; the victim takes 1 channel (grayscale), these have {shape[1]} channels: "
                    "convert them, e.g. x.mean(1, keepdim=True)")
        return (f"; the victim takes {c} channels, these have {shape[1]}: repeat the channel, "
                f"e.g. x.expand(-1, {c}, -1, -1)")
    if len(shape) == 4 and shape[2:] != (h, w):
        return (f"; the victim takes {h}x{w} images: resize them, e.g. "
                f"torch.nn.functional.interpolate(x, size=({h}, {w}), mode='bilinear')")
    if len(shape) == 3 and shape == (c, h, w):
        return "; this is ONE image (C, H, W): add the batch axis with x.unsqueeze(0) (numpy: x[None])"
    if len(shape) == 3 and shape[1:] == (h, w) and c == 1:
        return ("; the channel axis is missing (N, H, W): add it with x.unsqueeze(1) "
                "(numpy: x[:, None])")
    if len(shape) == 2 and shape == (h, w) and c == 1:
        return f"; this is ONE grayscale image (H, W): use x.reshape(1, 1, {h}, {w})"
    if len(shape) == 2 and shape[1] == size:
        return f"; these are flat rows (N, {size}): use x.reshape(-1, {c}, {h}, {w})"
    if len(shape) == 1 and shape[0] == size:
        return f"; this is ONE flat image ({size},): use x.reshape(1, {c}, {h}, {w})"
    return ""


def as_images(x: Tensor | np.ndarray, shape: tuple[int, ...] | None = None) -> Tensor:
    """Validate a batch of raw images and return it as a float32 tensor (N, C, H, W) in [0, 1],
    detached from any autograd graph.

    Accepts a ``torch.Tensor`` or a ``numpy.ndarray`` (read-only arrays are copied, others shared).
    Float64/float16/bfloat16 images are cast to float32, the dtype every model here computes in
    (values in [0, 1] move by at most 3e-8); nothing else is changed. ``shape`` is the expected
    per-image shape (C, H, W).

    Raises ``TypeError`` for anything but a tensor/array, and ``ValueError`` (saying what to do,
    in numpy terms for numpy input) for: a wrong rank or layout (one image without a batch axis,
    a missing channel axis, flat rows, extra axes, channels-last, a wrong channel count or image
    size), integer or bool dtype, NaN/inf values (with how many images hold them), and values
    outside [0, 1] (0..255 pixel values, normalised inputs, or values just outside by rounding)."""
    is_numpy = isinstance(x, np.ndarray)
    if is_numpy:
        if x.dtype.kind not in "biuf":
            raise TypeError(f"expected numeric images, got a numpy array of dtype {x.dtype}")
        x = torch.from_numpy(np.require(x, requirements=["C", "W"]))  # copies only if it must
    elif not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy.ndarray of images, got {type(x).__name__}")
    x = x.detach()
    want = None if shape is None else tuple(int(s) for s in shape)
    got = tuple(x.shape)
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (N, C, H, W), got rank {x.ndim} shape {got}"
                         + (_shape_hint(got, want) or "; add a batch dimension with x.unsqueeze(0)"))
    if want is not None and got[1:] != want:
        raise ValueError(f"expected images of shape (C, H, W) = {want}, got {got[1:]}"
                         + _shape_hint(got, want))
    if not x.is_floating_point():
        dtype = str(x.numpy().dtype) if is_numpy else str(x.dtype)
        fix = "x.astype(np.float32) / 255" if is_numpy else "x.float() / 255"
        raise ValueError(f"expected float images in [0, 1], got dtype {dtype}; use {fix}")
    if x.dtype != torch.float32:
        x = x.float()
    if len(x):
        lo, hi = (float(v) for v in torch.aminmax(x))  # NaN anywhere makes both NaN
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = ~torch.isfinite(x).flatten(1).all(1)
            raise ValueError(f"{int(bad.sum())} of {len(x)} images contain NaN or inf values (first: "
                             f"{torch.nonzero(bad).flatten()[:5].tolist()}); the API answers only "
                             "finite images: drop or repair them")
        if lo < 0 or hi > 1:
            if lo >= -1e-3 and hi <= 1 + 1e-3:
                hint = "; just outside [0, 1] (rounding?): clip them with x.clamp(0, 1)"
            elif lo >= 0 and hi <= 255:
                hint = "; these look like 0..255 pixel values: divide by 255"
            elif lo < 0:
                hint = "; these look normalised (mean/std): the API takes raw images, undo the normalisation"
            else:
                hint = ""
            raise ValueError(f"images must be in [0, 1], got range [{lo:.9g}, {hi:.9g}]{hint}")
    return x
