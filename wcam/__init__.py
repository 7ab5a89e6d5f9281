"""wcam: high-throughput Winsor-CAM explanations for CNNs."""

from wcam.allocator import tune_malloc
from wcam.engine import (
    Engine,
    Explanation,
    ImageError,
    Preprocess,
    TargetError,
    UnknownLayerError,
    UnknownModelError,
    UnknownWeightsError,
    WeightsDownloadError,
    WeightsFileError,
)

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "Explanation",
    "ImageError",
    "Preprocess",
    "TargetError",
    "UnknownLayerError",
    "UnknownModelError",
    "UnknownWeightsError",
    "WeightsDownloadError",
    "WeightsFileError",
    "__version__",
    "tune_malloc",
]
