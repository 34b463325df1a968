"""Tiny random Gemma 3 / Gemma 4 text models with the real architecture, for tests and examples.

They keep what the format touches: sliding + full attention layers (5:1), tied embeddings, Gemma 4 KV-shared
layers with double-wide MLPs and per-layer embeddings. Sizes are multiples of 32 so every CPU kernel applies;
`odd=True` makes K not a multiple of the 2-bit pack width (16) to exercise padding.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_gemma3_config(vocab_size: int = 1024, layers: int = 6, hidden: int = 64, intermediate: int = 128,
                       odd: bool = False):
    from transformers import Gemma3TextConfig

    if odd:
        hidden, intermediate = 72, 200
    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=16,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        torch_dtype="bfloat16",
    )


def tiny_gemma4_config(vocab_size: int = 1024, layers: int = 6, hidden: int = 64, intermediate: int = 128,
                       kv_shared: int = 2):
    """E2B-like: the last `kv_shared` layers read the KV of earlier layers and get double-wide MLPs."""
    from transformers import Gemma4TextConfig

    layer_types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(layers)]
    layer_types[-1] = "full_attention"
    return Gemma4TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=16,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        layer_types=layer_types, num_kv_shared_layers=kv_shared, use_double_wide_mlp=True,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=vocab_size, final_logit_softcapping=30.0,
        torch_dtype="bfloat16",
    )


def tiny_gemma4_multimodal_config(text_config, vocab_size: int | None = None):
    """`Gemma4Config` (the `Gemma4ForConditionalGeneration` wrapper Google ships) around the Gemma 4 text config
    `text_config` (a `Gemma4TextConfig` or its dict), with tiny vision and audio towers (one layer each) and the
    special token ids moved into the tiny vocabulary (its last ids)."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    if isinstance(text_config, dict):
        text_config = Gemma4TextConfig(**{k: v for k, v in text_config.items()
                                          if k not in ("architectures", "quantization_config", "model_type")})
    vocab = vocab_size or text_config.vocab_size
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, position_embedding_size=64)
    audio = Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              subsampling_conv_channels=[8, 4], output_proj_dims=32)
    ids = dict(zip(("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id", "boa_token_id",
                    "eoa_token_index", "audio_token_id"), range(vocab - 7, vocab)))
    return Gemma4Config(text_config=text_config, vision_config=vision, audio_config=audio,
                        tie_word_embeddings=text_config.tie_word_embeddings, **ids)


def tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer of exactly `vocab_size` ids (<unusedN> fillers, as in Gemma) with Gemma's special ids (pad 0, eos 1, bos 2; BOS added by default),
    trained deterministically on a small built-in English text; any text encodes (byte fallback)."""
    import codecs
    import this  # noqa: F401  (the Zen of Python, as training text)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = codecs.decode(this.s, "rot13").splitlines() * 4 + [
        "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
        "To be, or not to be, that is the question. Shall I compare thee to a summer's day?",
        "Once upon a time there was a small model that learned to speak in two bits.",
    ] * 8
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.add_tokens([f"<unused{i}>" for i in range(vocab_size - len(fast))], special_tokens=True)
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    return fast


def build_tiny(family: str, out: str | Path, *, seed: int = 0, tokenizer_from: str | Path | None = None,
               **config_kwargs) -> Path:
    """Write a random tiny `family` ("gemma3" | "gemma4") model (bf16) to `out`; returns `out`.

    The model gets a tokenizer: by default the tiny byte-level BPE above (vocab = its size); with
    `tokenizer_from`, the tokenizer of that model directory (e.g. the real Gemma tokenizer, vocab 262144).
    """
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma4ForCausalLM, GenerationConfig

    out = Path(out)
    if tokenizer_from is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_from)
    else:
        tok = tiny_tokenizer(config_kwargs.get("vocab_size", 1024))
    config_kwargs.setdefault("vocab_size", len(tok))
    if family == "gemma3":
        config, cls = tiny_gemma3_config(**config_kwargs), Gemma3ForCausalLM
    elif family == "gemma4":
        config, cls = tiny_gemma4_config(**config_kwargs), Gemma4ForCausalLM
    else:
        raise ValueError(f"unknown tiny family {family!r}: expected 'gemma3' or 'gemma4'")
    torch.manual_seed(seed)
    model = cls(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # larger-than-init weights so that quantization error is visible in tests
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
