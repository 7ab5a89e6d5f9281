"""ONNX export of the joint forward + activation-gradient graph (issue: export and compile). Empty so far."""
