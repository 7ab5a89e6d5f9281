"""Graphs of the joint forward + activation-gradient computation: tracing, ONNX export, on-disk cache."""

from wcam.export.decompositions import UnsupportedOpError
from wcam.export.onnx_graph import GRAPHS, GraphInfo, OnnxFormatError, export_onnx, read_info

__all__ = ["GRAPHS", "GraphInfo", "OnnxFormatError", "UnsupportedOpError", "export_onnx", "read_info"]
