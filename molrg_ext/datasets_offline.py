"""Small real image data sets that ship with scikit-learn / scikit-image (no download).

Images are returned as float32 ``[N, C, H, W]`` scaled to [-1, 1] (EDM convention).
"""
from __future__ import annotations

import numpy as np
import torch

from ._args import as_int

__all__ = ["digits_images", "camera_patches"]

# The 2-D grey and H x W x 3 colour sample images that ship with scikit-image (logo is RGBA, fully
# opaque). The other loaders of skimage.data return stacks, volumes, file names or need a download.
CAMERA_IMAGES = (
    "astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea",
    "clock", "coffee", "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
    "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
    "shepp_logan_phantom", "text",
)


def digits_images() -> torch.Tensor:
    """scikit-learn's 1797 handwritten digits, ``[1797, 1, 8, 8]`` in [-1, 1]."""
    from sklearn.datasets import load_digits

    img = load_digits().images.astype(np.float32) / 16.0
    return torch.from_numpy(img * 2 - 1)[:, None]


def camera_patches(N: int, size: int = 8, seed: int = 0, image: str = "camera") -> torch.Tensor:
    """``N`` random ``size x size`` grey patches of a scikit-image sample image, ``[N, 1, size, size]``
    in [-1, 1], drawn with a seeded generator. ``image``: one of ``CAMERA_IMAGES``."""
    where = "camera_patches"
    try:
        import skimage.data
        from skimage.color import rgb2gray
    except ImportError as e:
        raise ImportError(f"{where} needs scikit-image: pip install scikit-image (the package's "
                          "'images' extra)") from e

    N, size = as_int(N, "N", where, 1), as_int(size, "size", where, 1)
    seed = as_int(seed, "seed", where, 0)
    if not isinstance(image, str):
        raise TypeError(f"{where}: image must be a str, got {type(image).__name__}")
    if image not in CAMERA_IMAGES:
        raise ValueError(f"{where}: scikit-image has no sample image {image!r} of those this "
                         f"takes (2-D grey or colour): image must be one of "
                         f"{', '.join(CAMERA_IMAGES)}")
    loader = getattr(skimage.data, image)
    # binary_blobs draws its image: seed it too, so that a seed gives the same patches
    img = loader(rng=seed) if image == "binary_blobs" else loader()
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    if img.max() > 1.0:
        img = img / 255.0
    H, W = img.shape
    if size > min(H, W):
        raise ValueError(f"camera_patches: size {size} exceeds the image ({H} x {W})")
    rng = np.random.default_rng(seed)
    r = rng.integers(0, H - size + 1, N)
    c = rng.integers(0, W - size + 1, N)
    patches = np.stack([img[i:i + size, j:j + size] for i, j in zip(r, c)]).astype(np.float32)
    return torch.from_numpy(patches * 2 - 1)[:, None]
