"""Reading user images with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tokensieve.errors import TokensieveError


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB; a missing or unreadable file is a ``TokensieveError``."""
    path = Path(path)
    if not path.is_file():
        raise TokensieveError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise TokensieveError(f"cannot read image {path}: {err.__class__.__name__}") from None
