"""ONNX export of the client half, fp32 and calibrated int8 (`sfl-export` command)."""
