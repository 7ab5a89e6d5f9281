"""Explaining video: a decode -> explain -> encode pipeline over PyAV (``wcam video``)."""

from wcam.video.codec import VideoError
from wcam.video.pipeline import VideoOptions, VideoSummary, explain_video

__all__ = ["VideoError", "VideoOptions", "VideoSummary", "explain_video"]
