"""Image tasks' inputs: image folders read into rows, each row's image opened (a file, a Hugging Face Image
value, or base64 bytes sent to the server) and turned into pixel values by the backbone's image processor.

Images are decoded and processed once, before training, as text is tokenized once (data/encoding.py):
a split holds rows × 3 × height × width float32 values in memory (about 600 KB per 224 × 224 image), so
the `max_rows` of a task bounds what a large image set costs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from multitune.data.readers import Row
from multitune.errors import DataError

# what Pillow opens and an image folder is expected to hold; other files (a README, .DS_Store) are skipped
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb bound: a larger image is refused, not decoded


def read_image_folder(path: str) -> Iterator[Row]:
    """Rows {"image": file, "label": class} of a folder with one sub-folder of images per class (the
    layout of torchvision's ImageFolder and the Hugging Face `imagefolder` builder), classes and files in
    sorted order. Raises DataError for a missing folder, a folder without class sub-folders, or a class
    folder without images."""
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a folder of class sub-folders (imagefolder)", file=path)
    classes = sorted(child for child in root.iterdir() if child.is_dir() and not _hidden(child.name))
    if not classes:
        raise DataError("no class sub-folders: an imagefolder holds one folder of images per class", file=path)
    for folder in classes:
        files = sorted(
            f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not _hidden(f.name)
        )
        if not files:
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"class folder '{folder.name}' holds no images ({kinds})", file=str(folder))
        for file in files:
            yield Row({"image": str(file), "label": folder.name}, path, 0)  # an unreadable image names its own file


def _hidden(name: str) -> bool:
    """A file or folder no image set means: hidden (`.DS_Store`, macOS's `._x.png` forks) or `__MACOSX`."""
    return name.startswith(".") or name == "__MACOSX"


def image_reference(row: Row, value: Any, name: str | int) -> Any:
    """A row's image as something `open_image` takes: a file path (relative to the data file's folder when
    the row comes from a local file), a Hugging Face Image value (a PIL image, or a dict of bytes or path)."""
    if isinstance(value, str):
        if not value.strip():
            raise row.error("empty image path", name)
        if is_data_url(value):
            try:
                return decode_base64_image(value)
            except ValueError as error:
                raise row.error(str(error), name) from None
        path = Path(value)
        if not path.is_absolute() and row.file and Path(row.file).is_file():
            path = Path(row.file).parent / path
        return str(path)
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return value
    if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image (a decoded Hugging Face Image)
        return value
    raise row.error(f"expected an image (a file path or an Image column), got {type(value).__name__}", name)


def open_image(reference: Any, file: str = "", line: int = 0, field: str = "image") -> Any:
    """The image as an RGB PIL image, turned upright by its EXIF orientation (as Hugging Face datasets decodes
    an Image column, so a file reads the same in training, predict and serve), with 16-bit and floating-point
    grey levels scaled to 8 bits rather than clipped. Raises DataError naming the file (and line) when it
    cannot be read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    where = {"file": file or None, "line": line or None, "field": field}
    try:
        if isinstance(reference, dict):
            data = reference.get("bytes")
            image = Image.open(io.BytesIO(data)) if data else Image.open(reference["path"])
        elif isinstance(reference, str):
            where["file"], where["line"] = reference, None  # the image file itself, not the list that named it
            image = Image.open(reference)
        else:
            image = reference
        if image.width * image.height > MAX_PIXELS:
            raise DataError(f"image of {image.width} x {image.height} pixels is beyond {MAX_PIXELS:,}", **where)  # type: ignore[arg-type]
        return _eight_bit(ImageOps.exif_transpose(image)).convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file not found: {_shown(reference)}", **where) from None  # type: ignore[arg-type]
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"not a readable image: {error}", **where) from None  # type: ignore[arg-type]


def _eight_bit(image: Any) -> Any:
    """A 16-bit ("I;16"), 32-bit integer ("I") or floating-point ("F") grey image as 8 bits, scaled by the
    range its mode can hold (16-bit: /257; "I" holding values above 255: /257 up to 65535, else by its
    maximum; "F" in [0, 1]: ×255, else by its maximum); `convert("RGB")` would clip every level above 255.
    Other modes are returned as they are."""
    import numpy as np
    from PIL import Image

    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and 255 < top <= 65535):
        scale = 1 / 257
    elif image.mode == "F" and float(values.min()) >= 0 and top <= 1:
        scale = 255.0
    else:
        scale = 255 / top if top > 255 else 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


def _shown(reference: Any) -> str:
    text = str(reference)
    return text if len(text) <= 120 else text[:117] + "..."


def is_data_url(text: str) -> bool:
    return text[:5].lower() == "data:"


def decode_base64_image(text: str) -> dict[str, bytes]:
    """An image sent as base64 text (optionally a `data:image/...;base64,` URL, its prefix in any case) as an
    Image value of bytes. Line breaks and spaces in the text (MIME's 76-character lines) and missing `=`
    padding are accepted. Raises ValueError for text that is not base64."""
    payload = text.split(",", 1)[1] if is_data_url(text.strip()) and "," in text else text
    payload = "".join(payload.split())  # MIME line breaks, spaces around it
    payload += "=" * (-len(payload) % 4)
    try:
        return {"bytes": base64.b64decode(payload, validate=True)}
    except (binascii.Error, ValueError):
        raise ValueError("expected an image as base64 text (or a data: URL)") from None


def image_digest(reference: Any) -> str:
    """The sha256 of an image's bytes (a file's, a Hugging Face Image value's, or a decoded image's pixels),
    so that a changed image changes a run's data fingerprint (resume refuses it, compare retrains); a file that
    cannot be read digests its path (the read itself reports it)."""
    digest = hashlib.sha256()
    try:
        if isinstance(reference, str):
            digest.update(Path(reference).read_bytes())
        elif isinstance(reference, dict):
            digest.update(reference.get("bytes") or Path(reference["path"]).read_bytes())
        else:
            digest.update(f"{reference.mode}:{reference.size}".encode() + reference.tobytes())
    except OSError:
        digest.update(str(reference).encode())
    return digest.hexdigest()


def pixel_values(images: Sequence[Any], processor: Any) -> Any:
    """[N, C, H, W] float32 pixel values of RGB images, by the backbone's image processor."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"].float()
