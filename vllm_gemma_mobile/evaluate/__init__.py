"""Evaluation: the fixed Shakespeare calibration/evaluation split (data), the transformers + compressed-tensors
fake-quant reference with per-layer KV quantization (reference), quality vs a reference (quality), and the size
report (report)."""
