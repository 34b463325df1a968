"""Triton int2/int4/int8 x int8 kernels with torch references (usable without vLLM)."""
