"""Quantization-aware training of mobile checkpoints (issue 9): `qat.train.run_qat`."""
