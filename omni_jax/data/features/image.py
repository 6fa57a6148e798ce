"""SigLIP pixel front end on the host: channel handling, PIL resize, rescale + normalize, NHWC.

Matches transformers' `SiglipImageProcessorPil` (the PIL/NumPy backend; transformers 5's
default `SiglipImageProcessor` is the torchvision backend, which needs torchvision): PIL
bicubic resize of the uint8 image to (size, size), x * (1/255) in float64 cast to float32,
then (x - mean) / std in float32. We apply the last two steps as a per-channel 256-entry
lookup table computed with exactly those operations, so the result is bit-identical.
Output is NHWC float32 (our SigLIP encoder takes [batch, h, w, 3]).

Channels: (H, W) / (H, W, 1) grayscale is replicated to RGB, (H, W, 4) RGBA is composited on
white (transformers' convert_to_rgb rule); with strict_channels=True both raise instead.

Also: any-res tiling (Capybara / LLaVA-NeXT style, rule in `select_grid`) and Ola's low-res /
high-res view sizing.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image

from omni_jax.data.features.config import ImageConfig

__all__ = ["to_rgb", "decode_image", "resize", "normalize", "preprocess", "select_grid",
           "TiledImage", "tile_image", "ola_lowres_size", "ola_highres_size", "OlaViews",
           "ola_views", "OLA_PAD_VALUE", "fit_within", "ola_canvas_views"]
OLA_PAD_VALUE = 127  # Ola pads its views with gray (127, 127, 127)

_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def to_rgb(image: np.ndarray, strict: bool = False) -> np.ndarray:
    """Validate a uint8 image and return it as [H, W, 3] uint8. Gray (H, W) or (H, W, 1) is
    replicated, RGBA is composited on white; strict=True rejects both."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype must be uint8 (0..255), got {image.dtype}; convert "
                         f"(e.g. decode_image or np.clip(x * 255, 0, 255).astype(np.uint8))")
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image: shape {image.shape}; expected height, width >= 1")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 3:
        return image
    if channels not in (1, 4):
        raise ValueError(f"image has {channels} channels; expected 3 (RGB), or 1 (gray) / "
                         f"4 (RGBA) to be converted")
    if strict:
        raise ValueError(f"image has {channels} channel(s) but 3 (RGB) are expected "
                         f"(strict_channels=True: no gray/RGBA conversion)")
    if channels == 1:
        gray = image.reshape(image.shape[0], image.shape[1], 1)
        return np.repeat(gray, 3, axis=2)
    alpha = image[..., 3:4] / 255.0  # [H, W, 1] float64
    composite = alpha * image[..., :3] + (1.0 - alpha) * 255.0  # blend onto white
    return np.round(composite).astype(np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (PNG/JPEG/...) -> uint8 [H, W, C] with C = 1 (gray), 3 or 4
    (any transparency kept as alpha, for to_rgb to composite)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"decode_image: expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("decode_image: empty image bytes; expected an encoded PNG/JPEG")
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()
            if img.mode == "L":
                arr = np.asarray(img)[..., None]
            elif "A" in img.getbands() or img.info.get("transparency") is not None:
                arr = np.asarray(img.convert("RGBA"))
            else:
                arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image: {e}") from e
    return np.ascontiguousarray(arr)


def resize(image: np.ndarray, height: int, width: int, config: ImageConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3] with PIL (config.resample filter)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"resize: target size must be positive, got ({height}, {width})")
    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image).resize((width, height), resample=_PIL_FILTERS[config.resample])
    return np.asarray(pil)


@functools.lru_cache(maxsize=8)
def _lut(scale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    values = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)  # rescale
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return np.ascontiguousarray(((values[:, None] - m) / s).T)  # [3, 256] float32


def normalize(images: np.ndarray, config: ImageConfig, out: np.ndarray | None = None
              ) -> np.ndarray:
    """uint8 [..., 3] -> float32 [..., 3]: (x * rescale_factor - mean) / std per channel
    (a table gather; written into `out` when given)."""
    lut = _lut(config.rescale_factor, tuple(config.image_mean), tuple(config.image_std))
    if out is None:
        out = np.empty(images.shape, np.float32)
    if (lut == lut[0]).all():  # same mean/std for all channels (SigLIP): one table gather
        return np.take(lut[0], images, out=out, mode="clip")  # uint8: in range
    for c in range(3):
        np.take(lut[c], images[..., c], out=out[..., c], mode="clip")
    return out


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="omni_jax_resize")


def preprocess(images: Sequence[np.ndarray] | np.ndarray, config: ImageConfig,
               num_threads: int | None = None) -> np.ndarray:
    """Images (uint8 [H, W, C] each, any sizes) -> SigLIP pixels [batch, S, S, 3] float32,
    S = config.image_size (SiglipImageProcessorPil with size=S, channels last). PIL's resize
    and the table gather release the GIL, so a batch is processed image by image on
    num_threads threads (default: CPU count, at most 8; 1 = serial)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if len(images) == 0:
        raise ValueError("preprocess: empty batch; expected at least one image")
    rgb = [to_rgb(im, config.strict_channels) for im in images]  # validate all first
    s = config.image_size
    if num_threads is not None and num_threads <= 0:
        raise ValueError(f"preprocess: num_threads must be positive, got {num_threads}")
    workers = min(num_threads or os.cpu_count() or 1, 8, len(rgb))
    out = np.empty((len(rgb), s, s, 3), np.float32)  # [batch, S, S, 3]

    def work(i: int) -> None:  # resize + normalize of one image, straight into its slot
        normalize(resize(rgb[i], s, s, config), config, out=out[i])

    if workers == 1:
        for i in range(len(rgb)):
            work(i)
    else:
        list(_pool(workers).map(work, range(len(rgb))))
    return out


def _fit(height: int, width: int, rows: int, cols: int, tile: int, rounding: bool
         ) -> tuple[int, int]:
    """Size (h, w) of the image scaled (aspect kept) to fit a rows x cols canvas of tiles; the
    limiting side is exact, the other floored (rounding=False) or rounded, in integers."""
    ch, cw = rows * tile, cols * tile
    if cw * height <= ch * width:  # width-limited: scale = cw / width
        other = (2 * height * cw + width) // (2 * width) if rounding else height * cw // width
        return max(1, min(ch, other)), cw
    other = (2 * width * ch + height) // (2 * height) if rounding else width * ch // height
    return ch, max(1, min(cw, other))


def select_grid(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """Best (rows, cols) with rows * cols <= max_tiles for an image (LLaVA-NeXT rule).

    For each grid the image is scaled to fit the (rows * S, cols * S) canvas keeping its aspect
    ratio: scale = min(cols * S / width, rows * S / height). Effective resolution =
    min(floor(width * scale) * floor(height * scale), width * height) (upscaling adds nothing),
    in exact integer arithmetic; waste = rows * cols * S^2 - effective. Pick the largest
    effective resolution, then the least waste; remaining ties go to the first grid in
    (rows, cols) ascending order.
    """
    if height <= 0 or width <= 0 or tile_size <= 0 or max_tiles <= 0:
        raise ValueError(f"select_grid: height, width, tile_size, max_tiles must be positive, "
                         f"got {(height, width, tile_size, max_tiles)}")
    best, best_key = (1, 1), None
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            fh, fw = _fit(height, width, rows, cols, tile_size, rounding=False)
            effective = min(fh * fw, width * height)
            key = (effective, -(rows * cols * tile_size * tile_size - effective))
            if best_key is None or key > best_key:
                best, best_key = (rows, cols), key
    return best


class TiledImage(NamedTuple):
    """Sub-image tiles of one image (row-major), its thumbnail and the grid."""

    tiles: np.ndarray  # [rows * cols, S, S, 3] float32
    thumbnail: np.ndarray  # [S, S, 3] float32: the whole image resized to S x S
    grid: tuple[int, int]  # (rows, cols)

    def views(self) -> np.ndarray:
        """Tiles then thumbnail: [rows * cols + 1, S, S, 3] (Capybara: up to 9 + thumbnail)."""
        return np.concatenate([self.tiles, self.thumbnail[None]], axis=0)


def tile_image(image: np.ndarray, config: ImageConfig) -> TiledImage:
    """Any-res tiling: pick the grid (select_grid), resize keeping the aspect ratio so the image
    fits the canvas exactly on its limiting side (the other side rounded half up, >= 1 pixel),
    centre it on a pad_value canvas, split into S x S tiles; plus the S x S thumbnail."""
    rgb = to_rgb(image, config.strict_channels)
    s = config.image_size
    h, w = rgb.shape[:2]
    rows, cols = select_grid(h, w, s, config.max_tiles)
    ch, cw = rows * s, cols * s
    nh, nw = _fit(h, w, rows, cols, s, rounding=True)
    canvas = np.full((ch, cw, 3), config.pad_value, np.uint8)  # [rows*S, cols*S, 3]
    top, left = (ch - nh) // 2, (cw - nw) // 2
    canvas[top:top + nh, left:left + nw] = resize(rgb, nh, nw, config)
    tiles = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(-1, s, s, 3)
    both = normalize(np.concatenate([tiles, resize(rgb, s, s, config)[None]]), config)
    return TiledImage(tiles=both[:-1], thumbnail=both[-1], grid=(rows, cols))


def _round_multiple(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def ola_lowres_size(height: int, width: int, config: ImageConfig) -> tuple[int, int]:
    """Ola low-res view: scale to area ~ lowres_area keeping the aspect ratio, each side rounded
    to the nearest multiple of size_multiple (at least one multiple)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"ola_lowres_size: size must be positive, got ({height}, {width})")
    scale = math.sqrt(config.lowres_area / (height * width))
    m = config.size_multiple
    return _round_multiple(height * scale, m), _round_multiple(width * scale, m)


def ola_highres_size(height: int, width: int, config: ImageConfig
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Ola high-res view: native size, downscaled (aspect kept; sides rounded, floored if the
    rounded area would exceed the cap) if its area exceeds highres_max_area; then padded up
    to multiples of size_multiple. Returns ((resized_h, resized_w), (padded_h, padded_w))."""
    if height <= 0 or width <= 0:
        raise ValueError(f"ola_highres_size: size must be positive, got ({height}, {width})")
    rh, rw = height, width
    if height * width > config.highres_max_area:
        scale = math.sqrt(config.highres_max_area / (height * width))
        rh, rw = max(1, round(height * scale)), max(1, round(width * scale))
        if rh * rw > config.highres_max_area:
            rh, rw = max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
    m = config.size_multiple
    return (rh, rw), (-(-rh // m) * m, -(-rw // m) * m)


class OlaViews(NamedTuple):
    """Ola's two views of one image (float32, normalized, channels last)."""

    lowres: np.ndarray  # [h_low, w_low, 3]
    highres: np.ndarray  # [h_pad, w_pad, 3]; image at top-left, pad_value elsewhere
    highres_valid: tuple[int, int]  # (h, w) of the image inside the padded high-res view


def ola_views(image: np.ndarray, config: ImageConfig) -> OlaViews:
    """Low-res (ola_lowres_size) and padded high-res (ola_highres_size) views of one image."""
    rgb = to_rgb(image, config.strict_channels)
    h, w = rgb.shape[:2]
    low = resize(rgb, *ola_lowres_size(h, w, config), config)
    (rh, rw), (ph, pw) = ola_highres_size(h, w, config)
    high = np.full((ph, pw, 3), config.pad_value, np.uint8)
    high[:rh, :rw] = resize(rgb, rh, rw, config)
    return OlaViews(normalize(low, config), normalize(high, config), (rh, rw))


def fit_within(height: int, width: int, max_h: int, max_w: int) -> tuple[int, int]:
    """(height, width) if it fits max_h x max_w, else scaled down keeping the aspect ratio so
    the limiting side is exact (the other rounded half up, >= 1 pixel)."""
    if height <= max_h and width <= max_w:
        return height, width
    return _fit(height, width, max_h, max_w, 1, rounding=True)


def _on_canvas(rgb: np.ndarray, hw: tuple[int, int], canvas: tuple[int, int], pad_value: int,
               config: ImageConfig) -> np.ndarray:
    out = np.full((*canvas, 3), pad_value, np.uint8)  # [canvas_h, canvas_w, 3]
    top, left = (canvas[0] - hw[0]) // 2, (canvas[1] - hw[1]) // 2
    out[top:top + hw[0], left:left + hw[1]] = resize(rgb, *hw, config)
    return out


def ola_canvas_views(image: np.ndarray, config: ImageConfig, lowres_size: Sequence[int],
                     highres_size: Sequence[int], pad_value: int = OLA_PAD_VALUE
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Ola's two views of one image on two static canvases -> (low [h, w, 3], high [H, W, 3])
    float32, normalized. Each view is sized by Ola's rule, shrunk (aspect kept) if it still
    exceeds its canvas, and centred on a pad_value canvas (Ola pads with gray):
      high-res: native size, area capped at min(config.highres_max_area, H * W)
                (ola_highres_size; the padding to multiples of 32 is the canvas's);
      low-res:  area ~ h * w (the canvas's: ola_lowres_size with that area target), sides
                multiples of config.size_multiple.
    Both views are resized from the original image (Ola derives the low-res view from the
    padded high-res one: the same picture up to that <= 31 px padding)."""
    rgb = to_rgb(image, config.strict_channels)
    (lh, lw), (hh, hw) = (int(x) for x in lowres_size), (int(x) for x in highres_size)
    if min(lh, lw, hh, hw) < 1:
        raise ValueError(f"ola_canvas_views: canvases must be positive, got low "
                         f"{tuple(lowres_size)}, high {tuple(highres_size)}")
    h, w = rgb.shape[:2]
    cap = config.replace(highres_max_area=min(config.highres_max_area, hh * hw))
    high = fit_within(*ola_highres_size(h, w, cap)[0], hh, hw)
    low = fit_within(*ola_lowres_size(h, w, config.replace(lowres_area=lh * lw)), lh, lw)
    both = [_on_canvas(rgb, low, (lh, lw), pad_value, config),
            _on_canvas(rgb, high, (hh, hw), pad_value, config)]
    return normalize(both[0], config), normalize(both[1], config)


def ola_frame_size(height: int, width: int, config: ImageConfig) -> tuple[int, int]:
    """Ola's video frame size: aspect kept, area clamped to [video_min_area, video_max_area],
    each side a multiple of video_multiple (at least one): rounded up when the area was
    raised to the minimum, down when lowered to the maximum (so the clamp holds), else to
    the nearest multiple."""
    if height <= 0 or width <= 0:
        raise ValueError(f"ola_frame_size: size must be positive, got ({height}, {width})")
    area = min(max(height * width, config.video_min_area), config.video_max_area)
    scale = math.sqrt(area / (height * width))
    m = config.video_multiple
    if area > height * width:
        side = lambda x: max(m, math.ceil(x * scale / m) * m)  # noqa: E731
    elif area < height * width:
        side = lambda x: max(m, math.floor(x * scale / m) * m)  # noqa: E731
    else:
        side = lambda x: _round_multiple(x * scale, m)  # noqa: E731
    return side(height), side(width)


def ola_frames(frames: Sequence[np.ndarray], config: ImageConfig, canvas: Sequence[int],
               pad_value: int = OLA_PAD_VALUE) -> np.ndarray:
    """Video frames sized by Ola's rule (ola_frame_size), shrunk (aspect kept) to fit the
    static canvas if needed and centred on it (gray): [F, H, W, 3] float32, normalized."""
    ch, cw = (int(x) for x in canvas)
    out = []
    for f in frames:
        rgb = to_rgb(f, config.strict_channels)
        hw = fit_within(*ola_frame_size(*rgb.shape[:2], config), ch, cw)
        out.append(_on_canvas(rgb, hw, (ch, cw), pad_value, config))
    return normalize(np.stack(out), config)
