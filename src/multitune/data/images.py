"""Image tasks' inputs: image folders read into rows, each row's image opened (a file, a Hugging Face Image
value, or base64 bytes sent to the server) and turned into pixel values by the backbone's image processor.

Images are decoded and processed once, before training, as text is tokenized once (data/encoding.py):
a split holds rows × 3 × height × width float32 values in memory (about 600 KB per 224 × 224 image), so
the `max_rows` of a task bounds what a large image set costs.
"""

from __future__ import annotations

import base64
import binascii
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
    classes = sorted(child for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))
    if not classes:
        raise DataError("no class sub-folders: an imagefolder holds one folder of images per class", file=path)
    for folder in classes:
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"class folder '{folder.name}' holds no images ({kinds})", file=str(folder))
        for file in files:
            yield Row({"image": str(file), "label": folder.name}, path, 0)  # an unreadable image names its own file


def image_reference(row: Row, value: Any, name: str | int) -> Any:
    """A row's image as something `open_image` takes: a file path (relative to the data file's folder when
    the row comes from a local file), a Hugging Face Image value (a PIL image, or a dict of bytes or path)."""
    if isinstance(value, str):
        if not value.strip():
            raise row.error("empty image path", name)
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
    """The image as an RGB PIL image. Raises DataError naming the file (and line) when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

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
        return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file not found: {reference}", **where) from None  # type: ignore[arg-type]
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"not a readable image: {error}", **where) from None  # type: ignore[arg-type]


def decode_base64_image(text: str) -> dict[str, bytes]:
    """An image sent as base64 text (optionally a `data:image/...;base64,` URL) as an Image value of bytes.
    Raises ValueError for text that is not base64."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        return {"bytes": base64.b64decode(payload, validate=True)}
    except (binascii.Error, ValueError):
        raise ValueError("expected an image as base64 text (or a data: URL)") from None


def pixel_values(images: Sequence[Any], processor: Any) -> Any:
    """[N, C, H, W] float32 pixel values of RGB images, by the backbone's image processor."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"].float()
