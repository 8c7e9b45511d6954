"""ONNX export of the client half, fp32 and calibrated int8 (`sfl-export` command).

Who quantizes new weights: the device. After each round the agent receives float client
weights (the same message that training needs) and re-exports and re-quantizes them itself,
calibrated on its own recent eye crops (`splitfed.quantize.Requantizer`, in the core because
the agent uses it). The aggregator could publish an int8 model instead, but it holds no images
by design, so it could only calibrate on synthetic or someone else's crops, and it would need
one build per device type (uint8 QDQ for CPUs, symmetric int8 for TensorRT). Re-quantizing
costs a few seconds of one low-priority thread per round; `sfl-export` serves the first model
and offline deployments.
"""
