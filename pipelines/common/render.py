"""A decoded image on its way to the host, as every family's pipeline hands it over (``pipelines.family.Rendered``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class PendingPixels:
    """The decoded image on its way to the host: ``wait()`` waits for it and gives the uint8 pixels.

    On CUDA the device-to-host copy is queued right after the decode (into pinned memory, with an event), so the
    caller can queue the next replay at once and finish this one's pixels, PNG and scores on another thread; on
    the CPU the image is already there. ``to_pixels`` is the family's host-side conversion (float32, *255, round).
    """

    def __init__(self, image: torch.Tensor, to_pixels: Callable[[torch.Tensor], np.ndarray]):
        self._event = None
        self._to_pixels = to_pixels
        if image.is_cuda:
            self._host = torch.empty(image.shape, dtype=image.dtype, pin_memory=True)
            self._host.copy_(image, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = image
        self._pixels: np.ndarray | None = None

    def wait(self) -> np.ndarray:
        if self._pixels is None:
            if self._event is not None:
                self._event.synchronize()
            self._pixels = self._to_pixels(self._host)
            self._host = None
        return self._pixels
