"""Producing mobile checkpoints: llmcompressor modifiers, recipe runner, upstream workarounds."""
