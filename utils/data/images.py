"""Reading images robustly and preparing the CLIP and DINOv2 input streams.

Every loader and preprocessor reads images through :func:`load_rgb_image`, so EXIF rotation,
grayscale, palette, RGBA and 16-bit files behave the same everywhere, and a broken file gives one
clear :class:`ImageReadError` naming it instead of a stack trace from deep inside Pillow.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from segment_anything.utils.transforms import ResizeLongestSide
from transformers import CLIPImageProcessor

# Decompression-bomb guard: far above any dataset image (an 8000 px photo is 64 MP).
Image.MAX_IMAGE_PIXELS = 300_000_000


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def _to_uint8_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the used range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size else 0
        scale = 255.0 / (65535.0 if peak > 255 else 255.0)
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on black, as OpenCV's imread (upstream's reader) drops alpha to black-ish.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB, applying its EXIF orientation.

    Raises:
        ImageReadError: missing, empty, truncated or unrecognised files.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: image file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return _to_uint8_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path}: unreadable image ({error})") from error


def clip_image_processor(
    vision_tower_path: str | os.PathLike, image_size: int
) -> CLIPImageProcessor:
    """The vision tower's own preprocessing when its folder has one, else CLIP's defaults.

    CLIP's processing resizes the shortest side to ``image_size`` and centre-crops (as LISA and
    LLM-Seg use it), normalising with CLIP's mean and std.
    """
    folder = Path(vision_tower_path)
    if (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def preprocess_for_clip(processor: CLIPImageProcessor, image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, S, S)`` float32 CLIP input."""
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


# ImageNet statistics on the 0-255 scale, as upstream (and SAM) use them.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
DEFAULT_DINO_IMAGE_SIZE = 896


def preprocess_for_dinov2(
    image: np.ndarray, size: int = DEFAULT_DINO_IMAGE_SIZE
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize, normalise and pad one RGB image for DINOv2.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        size: output side; the longest image side is resized to it (SAM's ``ResizeLongestSide``
            rule and resampling), the rest is zero-padded bottom/right after normalisation.
    Returns:
        ``(pixels, (h, w))``: ``(3, size, size)`` float32 and the resized image's size inside it.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}"
        )
    resized = ResizeLongestSide(size).apply_image(image)
    height, width = resized.shape[:2]
    pixels = torch.from_numpy(resized).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    padded = torch.zeros(3, size, size)
    padded[:, :height, :width] = (pixels - mean) / std
    return padded, (height, width)


def mask_to_clip_grid(mask: np.ndarray, processor: CLIPImageProcessor, grid: int) -> torch.Tensor:
    """``(grid, grid)`` fraction of each CLIP patch covered by ``mask``, in CLIP's own frame.

    Mirrors :func:`preprocess_for_clip`: the shortest side resized to ``size["shortest_edge"]``
    and a centre crop of ``crop_size`` (a processor without them: the whole image resized to
    the crop), then an area average per patch, so pooling CLIP's patch grid with these weights
    pools the pixels of the mask.

    Args:
        mask: ``(H, W)`` bool or {0, 1} at the image resolution.
        processor: the CLIP image processor of the vision tower.
        grid: patches per side (``sqrt(num_image_tokens)``).
    """
    mask = np.asarray(mask, dtype=np.float32)
    height, width = mask.shape
    crop = processor.crop_size or {}
    crop_h, crop_w = int(crop.get("height", grid)), int(crop.get("width", grid))
    shortest = (processor.size or {}).get("shortest_edge") if processor.do_resize else None
    if shortest and processor.do_center_crop:
        new_h, new_w = (
            (shortest, int(shortest * width / height))
            if height <= width
            else (int(shortest * height / width), shortest)
        )
        resized = cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_AREA)
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        resized = resized[max(top, 0) : max(top, 0) + crop_h, max(left, 0) : max(left, 0) + crop_w]
    else:
        resized = cv2.resize(mask, (crop_w, crop_h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(cv2.resize(resized, (grid, grid), interpolation=cv2.INTER_AREA))


def mask_geometry(mask: np.ndarray) -> torch.Tensor:
    """``(5,)`` box ``x0, y0, x1, y1`` (``x1``/``y1`` exclusive) and area of a mask, each
    normalised to the image (width, height, pixels); an empty mask gives zeros."""
    mask = np.asarray(mask).astype(bool)
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return torch.zeros(5)
    box = [xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height]
    return torch.tensor([*box, mask.sum() / mask.size], dtype=torch.float32)


def masked_crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """SegLLM's view of a referenced object: the background zeroed, cropped to the mask's box,
    zero-padded to a square with the content at the top left.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool; an empty mask gives one black pixel.
    Returns:
        ``(S, S, 3)`` uint8.
    """
    mask = np.asarray(mask).astype(bool)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros((1, 1, 3), np.uint8)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], 0).astype(np.uint8)
    side = max(crop.shape[:2])
    square = np.zeros((side, side, 3), np.uint8)
    square[: crop.shape[0], : crop.shape[1]] = crop
    return square
