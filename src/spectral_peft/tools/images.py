"""Images for classification, read and prepared by the model's image processor a batch at a time, so memory holds
one batch of pixels whatever the size of the data set (every file was checked before, by
``spectral_peft_cli.inputs.check_images``)."""

from __future__ import annotations

from typing import Sequence

from .errors import UsageError, first_line


def read_image(path: str):
    """The image at ``path``, in RGB (grayscale, palette and alpha images converted)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: cannot read the image ({first_line(error)})") from None


class LazyImages:
    """The ``pixel_values`` of a list of image files, read and prepared by ``processor`` when rows are taken
    (``images[3]``, ``images[2:10]``, ``images[tensor_of_rows]``: a tensor of pixel values)."""

    def __init__(self, paths: Sequence[str], processor):
        self.paths = list(paths)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows):
        import torch

        if isinstance(rows, slice):
            chosen = self.paths[rows]
        elif isinstance(rows, torch.Tensor):
            chosen = [self.paths[i] for i in rows.tolist()]
        else:
            chosen = [self.paths[rows]]
        images = [read_image(path) for path in chosen]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def first(self, count: int) -> "LazyImages":
        """The first ``count`` images, still unread."""
        return LazyImages(self.paths[:count], self.processor)


def encode_images(examples: Sequence[dict], processor) -> dict:
    """``[{"image": path, "label"}, ...]`` -> ``{"pixel_values": LazyImages, "labels": tensor}``."""
    import torch

    return {"pixel_values": LazyImages([e["image"] for e in examples], processor),
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


def first_rows(encoded: dict, count: int) -> dict:
    """The first ``count`` rows of an encoded split (images stay unread)."""
    return {key: value.first(count) if isinstance(value, LazyImages) else value[:count]
            for key, value in encoded.items()}
