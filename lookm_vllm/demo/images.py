"""Real test photos that ship inside installed packages (no network, no hub).

The photos come from scikit-image's bundled sample data (``skimage.data``; a test dependency) and,
when matplotlib is installed, its ``grace_hopper`` sample. Every function returns fresh PIL RGB
images, so callers may modify them freely.

``test_images(n)`` is deterministic: the same ``n`` always gives the same images in the same order,
and all ``n`` images have distinct content (beyond the real photos available, it adds flipped,
rotated and cropped variants of them, which are still distinct pixel content).
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable

import numpy as np
from PIL import Image

__all__ = [
    "PHOTO_NAMES",
    "image_to_bytes",
    "image_to_data_url",
    "load_photo",
    "test_images",
]

# Bundled with scikit-image's wheel (no pooch download needed); grayscale ones become RGB.
# Order matters: ``test_images`` hands them out in this order (colour photos first).
_SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "clock",
    "brick",
    "grass",
    "gravel",
    "page",
    "text",
)

# Max side length of a returned photo: keeps preprocessing cheap (retina is 1411x1411).
_MAX_SIDE = 640


def _skimage_loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        if name == "motorcycle":
            left, _right, _disp = data.stereo_motorcycle()
            return left
        return getattr(data, name)()

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def _available_photos() -> dict[str, Callable[[], np.ndarray]]:
    photos = {name: _skimage_loader(name) for name in _SKIMAGE_PHOTOS}
    try:
        import matplotlib  # noqa: F401

        # insert after the colour photos, before the grayscale ones
        items = list(photos.items())
        items.insert(8, ("grace_hopper", _grace_hopper))
        photos = dict(items)
    except ImportError:
        pass
    return photos


PHOTO_NAMES: tuple[str, ...] = tuple(_available_photos())


@functools.cache
def _load_array(name: str) -> np.ndarray:
    loaders = _available_photos()
    if name not in loaders:
        raise KeyError(f"unknown photo {name!r}; available: {', '.join(PHOTO_NAMES)}")
    arr = np.asarray(loaders[name]())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    img = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)), mode="RGB")
    if max(img.size) > _MAX_SIDE:
        scale = _MAX_SIDE / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.BICUBIC,
        )
    out = np.asarray(img)
    out.setflags(write=False)
    return out


def load_photo(name: str) -> Image.Image:
    """One named real photo as a new PIL RGB image (longest side at most 640 px)."""
    return Image.fromarray(_load_array(name).copy(), mode="RGB")


# Variants used when more images are asked for than there are photos. Each produces new pixel
# content from the same photo (mirror, rotation, centre crop, corner crops).
def _variant(img: Image.Image, k: int) -> Image.Image:

    def crop(im: Image.Image, x0: float, y0: float, x1: float, y1: float) -> Image.Image:
        w, h = im.size
        return im.crop((int(w * x0), int(h * y0), int(w * x1), int(h * y1)))

    ops: list[Callable[[Image.Image], Image.Image]] = [
        lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        lambda im: im.transpose(Image.Transpose.ROTATE_90),
        lambda im: crop(im, 0.25, 0.25, 0.75, 0.75),
        lambda im: crop(im, 0.0, 0.0, 2 / 3, 2 / 3),
        lambda im: crop(im, 1 / 3, 1 / 3, 1.0, 1.0),
        lambda im: im.transpose(Image.Transpose.ROTATE_270),
    ]
    # k >= 1: apply op (k-1) % len(ops), and for later rounds compose with a further op so each
    # round gives new content.
    out = img
    k -= 1
    out = ops[k % len(ops)](out)
    rounds = k // len(ops)
    for r in range(rounds):
        out = ops[(k + r + 1) % len(ops)](out)
    return out


def test_images(n: int) -> list[Image.Image]:
    """``n`` distinct real photos (PIL RGB), deterministic: same ``n`` -> same images, and the
    first ``m`` images of ``test_images(n)`` equal ``test_images(m)``."""
    if n < 0:
        raise ValueError("n must be >= 0")
    names = PHOTO_NAMES
    out: list[Image.Image] = []
    for i in range(n):
        base = load_photo(names[i % len(names)])
        k = i // len(names)
        out.append(base if k == 0 else _variant(base, k))
    return out


# pytest would try to collect a module-level function named test_*: tell it not to.
test_images.__test__ = False  # type: ignore[attr-defined]


def image_to_bytes(img: Image.Image, fmt: str = "PNG", *, quality: int = 90) -> bytes:
    """Encode an image as PNG or JPEG bytes."""
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def image_to_data_url(img: Image.Image, fmt: str = "PNG", *, quality: int = 90) -> str:
    """A ``data:image/...;base64,...`` URL, usable as an OpenAI ``image_url`` in HTTP tests."""
    fmt_u = "JPEG" if fmt.upper() in ("JPG", "JPEG") else fmt.upper()
    mime = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}.get(
        fmt_u, f"image/{fmt_u.lower()}"
    )
    payload = base64.b64encode(image_to_bytes(img, fmt_u, quality=quality)).decode("ascii")
    return f"data:{mime};base64,{payload}"
