"""Models, layer discovery, backbone runners, preprocessing and the public :class:`Engine`."""

from wcam.engine.engine import Engine
from wcam.engine.explanation import Explanation
from wcam.engine.layers import UnknownLayerError
from wcam.engine.models import UnknownModelError, UnknownWeightsError, WeightsDownloadError, WeightsFileError
from wcam.engine.preprocess import ImageError, Preprocess
from wcam.engine.runner import TargetError

__all__ = ["Engine", "Explanation", "ImageError", "Preprocess", "TargetError", "UnknownLayerError", "UnknownModelError", "UnknownWeightsError",
           "WeightsDownloadError", "WeightsFileError"]
