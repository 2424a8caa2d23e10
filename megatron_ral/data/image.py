"""Image loading with PIL."""

from __future__ import annotations

import numpy as np
import torch

from megatron_ral.data.errors import MediaError
from megatron_ral.data.video.probe import check_file


def to_rgb(image) -> "PIL.Image.Image":  # noqa: F821
    """RGB copy of a PIL image; transparency is composited onto white (as the Qwen processors do)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pil_to_tensor(image) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, H, W] (RGB)."""
    return torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def load_image(path: str) -> torch.Tensor:
    """Read an image file -> uint8 tensor [3, H, W]. Raises MediaError on missing/empty/corrupt files."""
    from PIL import Image, UnidentifiedImageError

    check_file(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now so that truncated files fail here
            return pil_to_tensor(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError("corrupt_media", path, f"cannot decode image: {e}") from e
