"""Side outputs of ``wcam video``: per-frame JSON lines and the heatmaps as an .npz, written as frames come
(the .npz is a zip of one ``frame_NNNNNN.npy`` per frame, so memory stays bounded on long videos)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


class Sidecars:
    """Writes the JSON lines (``jsonl``) and heatmap (``npz``) outputs, either of which may be None."""

    def __init__(self, jsonl: Path | None, npz: Path | None, categories: list[str] | None) -> None:
        self.categories = categories
        self.jsonl = open(jsonl, "w", encoding="utf-8") if jsonl is not None else None
        self.npz = zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_STORED) if npz is not None else None

    def write(
        self,
        records: list[dict[str, Any]],
        maps: torch.Tensor,
        size: tuple[int, int],
        heatmaps: Callable[[], torch.Tensor],
    ) -> None:
        """One record per frame; ``maps`` are the frames' normalised maps at the layer size, ``size`` the
        output frame's (height, width), ``heatmaps()`` the maps at the network input size (for the .npz)."""
        if self.jsonl is not None:
            centres = centre_of_mass(maps.float(), size)
            for record, centre in zip(records, centres):
                label = self.categories[record["class"]] if self.categories else None
                self.jsonl.write(json.dumps({**record, "label": label, "center_of_mass": centre}) + "\n")
            self.jsonl.flush()
        if self.npz is not None:
            for record, heat in zip(records, heatmaps().to(torch.float16).cpu().numpy()):
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, heat)
                self.npz.writestr(f"frame_{record['frame']:06d}.npy", buffer.getvalue())

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.npz is not None:
            self.npz.close()


def centre_of_mass(maps: torch.Tensor, size: tuple[int, int]) -> list[list[float] | None]:
    """The heat-weighted mean pixel ``[x, y]`` of each ``B x h x w`` map, in the pixel coordinates of a
    ``size`` = (height, width) frame (pixel centres mapped as by align_corners=False); None for an empty map."""
    _, h, w = maps.shape
    ys = (torch.arange(h, dtype=maps.dtype, device=maps.device) + 0.5) * (size[0] / h) - 0.5
    xs = (torch.arange(w, dtype=maps.dtype, device=maps.device) + 0.5) * (size[1] / w) - 0.5
    total = maps.sum(dim=(1, 2))
    cy = (maps.sum(dim=2) * ys).sum(dim=1) / total.clamp(min=1e-12)
    cx = (maps.sum(dim=1) * xs).sum(dim=1) / total.clamp(min=1e-12)
    return [[float(x), float(y)] if float(t) > 0 else None for x, y, t in zip(cx.cpu(), cy.cpu(), total.cpu())]
