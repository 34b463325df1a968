"""Getting models: the real Gemma 3 270M base (from PyPI GGUF) and tiny random Gemma 3 / Gemma 4 for tests."""
