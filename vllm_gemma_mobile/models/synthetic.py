"""Gemma 4 E2B / E4B text checkpoints at real size with random weights, for load-time, memory and speed tests.

`write_synthetic(kind, out, layout)` writes, without any download and without a full bf16 copy in memory:

* the real text config (`Gemma4TextConfig`, model_type `gemma4_text`, `Gemma4ForCausalLM`; docs/reference
  gemma.md): E2B 35 layers / hidden 1536 / intermediate 6144 (12288 in the 20 KV-shared layers), 8 heads / 1 KV
  head, head_dim 256 / global 512, full attention every 5th layer; E4B 42 / 2560 / 10240, 8 / 2 heads, full every
  6th layer, 18 KV-shared layers, no double-wide MLP; both: sliding window 512, PLE 256, vocab 262144, softcap 30;
* `layout="ct"`: our compressed-tensors mobile checkpoint (docs/checkpoint-format.md) with Google's bit map
  (presets `gemma4-e2b` / `gemma4-e4b`): uniformly random codes on each module's grid, per-row weight scales
  chosen so that W has an RMS of about 0.02, static input/output scales such that a unit-RMS activation uses
  about a third of the int8 range, k/v scales for every layer that owns a KV cache, the PLE table with one scale
  per (row, 256-block), static int8 input / output scales of the tied lm_head (`gemma_mobile.lm_head`; Google's
  lm_head carries its own, google-format.md). `per_layer_model_projection` stays bf16, as in Google's checkpoints
  (format.md) and the presets (`model_projection_bits`);
* `layout="google"`: the same codes and scales in Google's `quant_method: "gemma"` layout (what
  `gemma-mobile convert --to google` would make of the ct checkpoint with the same seed, tensor for tensor);
* `layout="bf16"`: the dense twin (same shapes, N(0, 0.02) bf16 weights, tied embedding).

Tensors are generated in row chunks and streamed straight into safetensors shards (with an index), so peak
memory stays at a chunk plus a few small scale tensors whatever the model size. Packing is `kernels/bitpack.py`.
`scale_down` overrides config fields (e.g. layers, hidden size, vocab) for tests; the layer pattern (full
attention every 5th / 6th layer, last layer full), KV sharing, double-wide MLPs and PLE keep their structure.
The directory gets the real Gemma tokenizer (same 262144 ids) when the model has that vocabulary and the
project's Gemma 3 270M base is cached, the tiny test tokenizer for a scaled-down vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from kernels import bitpack

logger = logging.getLogger(__name__)

Kind = Literal["e2b", "e4b"]
SynthLayout = Literal["ct", "google", "bf16"]
KINDS = ("e2b", "e4b")
LAYOUTS = ("ct", "google", "bf16")

WEIGHT_RMS = 0.02          # RMS of every dequantized (or bf16) weight matrix, ~ a normal init
ACT_RANGE_SIGMAS = 3.0     # static scales: a unit-RMS tensor uses 1/3 of the int range (absmax = 3 RMS)
SCALE_JITTER = 0.1         # per-row / per-tensor scales vary by exp(N(0, 0.1)) around their target
CHUNK_ELEMENTS = 1 << 22   # generated per step (int64 temporaries of bitpack: ~32 MB each)
SHARD_BYTES = 1 << 30      # target shard size (a larger single tensor gets its own shard)

# config fields of the real text models (gemma.md); `full_every` -> layer_types
REAL_CONFIGS: dict[str, dict] = {
    "e2b": dict(num_hidden_layers=35, hidden_size=1536, intermediate_size=6144, num_attention_heads=8,
                num_key_value_heads=1, num_kv_shared_layers=20, use_double_wide_mlp=True, full_every=5),
    "e4b": dict(num_hidden_layers=42, hidden_size=2560, intermediate_size=10240, num_attention_heads=8,
                num_key_value_heads=2, num_kv_shared_layers=18, use_double_wide_mlp=False, full_every=6),
}
COMMON_CONFIG = dict(vocab_size=262144, vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256,
                     head_dim=256, global_head_dim=512, sliding_window=512, max_position_embeddings=131072,
                     final_logit_softcapping=30.0, tie_word_embeddings=True, attention_k_eq_v=False,
                     enable_moe_block=False, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                     bos_token_id=2, eos_token_id=1, pad_token_id=0)
PRESET_OF = {"e2b": "gemma4-e2b", "e4b": "gemma4-e4b"}


def _tokenizer_source() -> Path:
    base = Path(os.environ.get("GEMMA_MOBILE_CACHE", Path.home() / ".cache" / "vllm-gemma-mobile"))
    return base / "gemma3-270m-bf16"


# ------------------------------------------------------------------------------------------------ config

def synthetic_config(kind: Kind, scale_down: dict | None = None):
    """The `Gemma4TextConfig` of Gemma 4 `kind` ("e2b" | "e4b"), optionally with fields overridden by
    `scale_down` (any Gemma4TextConfig field, plus `full_every`). `vocab_size_per_layer_input` follows
    `vocab_size` and `layer_types` follows `num_hidden_layers` / `full_every` unless given explicitly."""
    from transformers import Gemma4TextConfig

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")
    fields = {**COMMON_CONFIG, **REAL_CONFIGS[kind]}
    over = dict(scale_down or {})
    if "vocab_size" in over and "vocab_size_per_layer_input" not in over:
        over["vocab_size_per_layer_input"] = over["vocab_size"]
    fields.update(over)
    full_every = fields.pop("full_every")
    n = int(fields["num_hidden_layers"])
    if "layer_types" not in fields:
        types = ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention" for i in range(n)]
        types[-1] = "full_attention"  # transformers forces it (and warns otherwise)
        fields["layer_types"] = types
    config = Gemma4TextConfig(**fields, dtype="bfloat16")
    config.architectures = ["Gemma4ForCausalLM"]
    return config


def _skeleton(config):
    """The Gemma4ForCausalLM transformers builds for `config`, on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model


def bit_map(kind: Kind, config) -> tuple[dict[str, int], object, object]:
    """(module -> bits, MobileScheme, Expanded) of the preset for `kind` (Google's bit map, format.md)."""
    from vllm_gemma_mobile.scheme import expand, preset

    model = _skeleton(config)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    scheme = preset(PRESET_OF[kind], config)
    expanded = expand(scheme, config, names)
    return dict(expanded.module_bits), scheme, expanded


# ------------------------------------------------------------------------------------------------ tensors

@dataclass
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], Iterator[torch.Tensor]]  # yields row chunks (along dim 0) in `dtype`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))


def _rows_per_chunk(k: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, k))


def _code_chunks(seed: int, name: str, n: int, k: int, bits: int) -> Iterator[torch.Tensor]:
    """Uniform random int8 codes on the `bits` grid, [rows, k] per chunk; the same for every layout."""
    g = _gen(seed, name + ":codes")
    lo, hi = bitpack.code_range(bits)
    step = _rows_per_chunk(k)
    for r in range(0, n, step):
        yield torch.randint(lo, hi + 1, (min(step, n - r), k), generator=g, dtype=torch.int8)


def _code_rms(bits: int) -> float:
    lo, hi = bitpack.code_range(bits)
    return math.sqrt(sum(q * q for q in range(lo, hi + 1)) / (hi - lo + 1))


def _weight_scales(seed: int, name: str, n: int, groups: int, bits: int) -> torch.Tensor:
    """f32 [n, groups]: W = q * scale has RMS ~WEIGHT_RMS, jittered per row (and block)."""
    g = _gen(seed, name + ":scale")
    jitter = torch.exp(SCALE_JITTER * torch.randn((n, groups), generator=g))
    return (WEIGHT_RMS / _code_rms(bits) * jitter).to(torch.float32)


def _act_scale(seed: int, name: str, rms: float, bits: int = 8) -> float:
    """A static symmetric scale for a tensor of this RMS: absmax = ACT_RANGE_SIGMAS * rms, compressed-tensors'
    rule `absmax / ((qmax - qmin) / 2)`, jittered."""
    lo, hi = bitpack.code_range(bits)
    g = _gen(seed, name + ":act")
    jitter = math.exp(SCALE_JITTER * float(torch.randn((), generator=g)))
    return float(torch.tensor(ACT_RANGE_SIGMAS * rms / ((hi - lo) / 2) * jitter, dtype=torch.float32))


def lm_head_scales(config, seed: int) -> dict[str, float]:
    """Static int8 input / output scales of the tied lm_head, as real Google checkpoints carry them (google-format.md):
    input = the final norm's unit-RMS output, output = logits of a unit-RMS input through the WEIGHT_RMS table."""
    return {"input_scale": _act_scale(seed, "lm_head.input", 1.0),
            "output_scale": _act_scale(seed, "lm_head.output", WEIGHT_RMS * math.sqrt(config.hidden_size))}


def _one(t: torch.Tensor) -> Callable[[], Iterator[torch.Tensor]]:
    return lambda: iter([t])


def _packed(seed: int, name: str, n: int, k: int, bits: int, layout: str) -> TensorSpec:
    """The packed codes of module `name` ([n, k] at `bits`) as `weight_packed` (ct) / `weight`-like (google)."""
    if layout == "ct":
        shape, dtype = (n, bitpack.ct_packed_width(k, bits)), torch.int32
        pack = lambda c: bitpack.ct_pack(c, bits)  # noqa: E731
    else:
        shape, dtype = (n, bitpack.google_packed_width(k, bits)), bitpack.google_dtype(bits)
        pack = lambda c: bitpack.google_pack(c, bits)  # noqa: E731
    return TensorSpec("", dtype, shape, lambda: (pack(c) for c in _code_chunks(seed, name, n, k, bits)))


def _normal_bf16(seed: int, name: str, n: int, k: int) -> Callable[[], Iterator[torch.Tensor]]:
    def make():
        g = _gen(seed, name + ":bf16")
        step = _rows_per_chunk(k)
        for r in range(0, n, step):
            yield (torch.randn((min(step, n - r), k), generator=g) * WEIGHT_RMS).to(torch.bfloat16)
    return make


def _dense_value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Norm weights (Gemma 4 RMSNorm multiplies by the weight itself) and layer scalars: ones."""
    return torch.ones(shape, dtype=torch.bfloat16)


def tensor_specs(kind: Kind, config, layout: SynthLayout, seed: int = 0) -> tuple[list[TensorSpec], dict]:
    """Every tensor of the checkpoint (name, dtype, shape, generator) in model order, and its
    `quantization_config` (None for bf16). Nothing is generated until a spec's `make()` is iterated."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    model = _skeleton(config)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    head = {id(m): n for n, m in model.named_modules()}[id(model.get_output_embeddings())]
    emb = {id(m): n for n, m in model.named_modules()}[id(model.get_input_embeddings())]
    qbits: dict[str, int] = {}
    expanded = scheme = None
    if layout != "bf16":
        qbits, scheme, expanded = bit_map(kind, config)
    from vllm_gemma_mobile.scheme import kv_sharing, layer_types

    sharing = kv_sharing(config)
    types = layer_types(config)
    kv_bits = {"sliding_attention": 8, "full_attention": 4}

    specs: list[TensorSpec] = []
    ple_group = int(config.hidden_size_per_layer_input)

    def add(name: str, spec: TensorSpec) -> None:
        spec.name = name
        specs.append(spec)

    for key, meta_t in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod == head and config.tie_word_embeddings:
            continue  # tied: ct/bf16 store one table; google gets its lm_head copy below
        if mod in mods and leaf == "weight":
            m = mods[mod]
            n, k = (m.out_features, m.in_features) if isinstance(m, torch.nn.Linear) else \
                (m.num_embeddings, m.embedding_dim)
            if mod not in qbits:
                add(key, TensorSpec("", torch.bfloat16, (n, k), _normal_bf16(seed, mod, n, k)))
                continue
            bits = qbits[mod]
            is_emb = isinstance(m, torch.nn.Embedding)
            groups = k // ple_group if mod.endswith("embed_tokens_per_layer") else 1
            scale = _weight_scales(seed, mod, n, groups, bits)
            if layout == "ct":
                add(f"{mod}.weight_packed", _packed(seed, mod, n, k, bits, "ct"))
                add(f"{mod}.weight_scale", TensorSpec("", torch.float32, (n, groups), _one(scale)))
                add(f"{mod}.weight_shape", TensorSpec("", torch.int64, (2,), _one(torch.tensor([n, k]))))
            else:
                add(f"{mod}.{'embedding_quantized' if is_emb else 'weight'}", _packed(seed, mod, n, k, bits, "google"))
                add(f"{mod}.{'embedding_scale' if is_emb else 'weight_scale'}",
                    TensorSpec("", torch.float32, (n, groups), _one(scale)))
            if not is_emb:  # wNa8o8: static int8 input/output scales
                out_rms = WEIGHT_RMS * math.sqrt(k)  # unit-RMS input through a WEIGHT_RMS matrix
                for which, rms in (("input", 1.0), ("output", out_rms)):
                    s = torch.tensor(_act_scale(seed, f"{mod}.{which}", rms), dtype=torch.float32)
                    if layout == "ct":
                        add(f"{mod}.{which}_scale", TensorSpec("", torch.float32, (1,), _one(s.reshape(1))))
                    else:
                        add(f"{mod}.{which}_activation_scale", TensorSpec("", torch.float32, (), _one(s)))
            continue
        shape = tuple(meta_t.shape)
        add(key, TensorSpec("", torch.bfloat16, shape, _one(_dense_value(key, shape))))

    if layout != "bf16":
        # static KV scales (after k_norm / v_norm and RoPE: unit RMS) for layers that own a cache
        prefix = emb.rsplit("embed_tokens", 1)[0]
        for i, t in enumerate(types):
            if i in sharing:
                continue
            for kv in ("k", "v"):
                s = torch.tensor(_act_scale(seed, f"layers.{i}.{kv}_cache", 1.0, kv_bits[t]), dtype=torch.float32)
                if layout == "ct":
                    add(f"{prefix}layers.{i}.self_attn.{kv}_scale", TensorSpec("", torch.float32, (1,),
                                                                                _one(s.reshape(1))))
                else:
                    add(f"{prefix}layers.{i}.self_attn.{kv}_cache_scale", TensorSpec("", torch.float32, (), _one(s)))
    head_scales = lm_head_scales(config, seed)
    if layout == "google":  # Google's lm_head: byte-identical copy of the table with its own activation scales
        n, k = mods[emb].num_embeddings, mods[emb].embedding_dim
        bits = qbits[emb]
        packed = _packed(seed, emb, n, k, bits, "google")
        add(f"{head}.weight", packed)
        add(f"{head}.weight_scale", TensorSpec("", torch.float32, (n, 1), _one(_weight_scales(seed, emb, n, 1, bits))))
        for which in ("input", "output"):
            add(f"{head}.{which}_activation_scale", TensorSpec("", torch.float32, (), _one(
                torch.tensor(head_scales[f"{which}_scale"], dtype=torch.float32))))

    qc = None
    if layout == "ct":
        qc = _ct_quant_config(scheme, expanded)
        qc["gemma_mobile"]["lm_head"] = head_scales  # the same SRQ as Google's lm_head (metadata.LMHeadScales)
    elif layout == "google":
        qc = _google_quant_config(qbits, head, emb, mods, model)
    return specs, qc


def _ct_quant_config(scheme, expanded) -> dict:
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    ct = QuantizationConfig(config_groups=expanded.config_groups, quantization_status="compressed",
                            format="pack-quantized", ignore=list(expanded.ignore),
                            kv_cache_scheme=None).model_dump(mode="json")
    ct.update({"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
               "sparsity_config": {}, "transform_config": {}, "gemma_mobile": expanded.metadata(scheme)})
    return ct


def _google_quant_config(qbits: dict[str, int], head: str, emb: str, mods: dict, model) -> dict:
    """`quant_method: gemma` config exactly as `convert.ct_to_google` builds it (the lm_head: a copy of the table)."""
    from vllm_gemma_mobile.convert import google_quant_config

    return google_quant_config({**qbits, head: qbits[emb]}, mods, model)


# ------------------------------------------------------------------------------------------------ writing

from vllm_gemma_mobile.convert import ST_DTYPES  # noqa: E402  (safetensors dtype name -> torch dtype)

_ST_DTYPES = {v: k for k, v in ST_DTYPES.items()}


def _shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    out: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if out[-1] and size + s.nbytes > shard_bytes:
            out.append([])
            size = 0
        out[-1].append(s)
        size += s.nbytes
    return out


def _write_shard(path: Path, specs: list[TensorSpec], bar) -> None:
    """A safetensors file written tensor by tensor, chunk by chunk (header first: offsets follow from shapes)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in specs:
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            written = 0
            for chunk in s.make():
                if chunk.dtype != s.dtype or tuple(chunk.shape[1:]) != tuple(s.shape[1:]):
                    raise AssertionError(f"{s.name}: chunk {chunk.dtype} {list(chunk.shape)} does not fit "
                                         f"{s.dtype} {list(s.shape)}")
                b = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(b))
                written += b.nbytes
            if written != s.nbytes:
                raise AssertionError(f"{s.name}: wrote {written} bytes, expected {s.nbytes}")
            bar.update(1)


def _write_tokenizer(out: Path, vocab_size: int) -> str:
    src = _tokenizer_source()
    if vocab_size == 262144 and (src / "tokenizer.json").exists():
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if (src / f).exists():
                shutil.copy(src / f, out / f)
        return str(src)
    if vocab_size < 262144:
        from vllm_gemma_mobile.models.tiny import tiny_tokenizer

        tiny_tokenizer(vocab_size).save_pretrained(out)
        return "tiny"
    logger.warning("no tokenizer written: %s has no tokenizer.json (run `gemma-mobile base gemma3-270m --out %s`)",
                   src, src)
    return "none"


def write_synthetic(kind: Kind, out: str | Path, layout: SynthLayout = "ct", seed: int = 0,
                    scale_down: dict | None = None, *, force: bool = False, progress: bool = True,
                    shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a random-weight Gemma 4 `kind` text checkpoint in `layout` to `out` (see the module doc); returns
    `out`. Refuses a non-empty `out` unless `force`. Written into `out`.tmp and renamed when complete."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use force=True / --force to replace it)")
    t0 = time.perf_counter()
    config = synthetic_config(kind, scale_down)
    specs, qc = tensor_specs(kind, config, layout, seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    cfg = config.to_dict()
    # transformers folds global_head_dim into per_layer_config; keep the field Google's config.json has too
    cfg["global_head_dim"] = int({**COMMON_CONFIG, **(scale_down or {})}["global_head_dim"])
    if qc is not None:
        cfg["quantization_config"] = qc
    if layout == "google":
        cfg["tie_word_embeddings"] = False  # transformers cannot tie packed tensors: lm_head is its own copy
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0, do_sample=False).save_pretrained(tmp)
    tok = _write_tokenizer(tmp, int(config.vocab_size))

    shards = _shards(specs, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(s.nbytes for s in specs)
    with tqdm(total=len(specs), unit="tensor", desc=f"synth {kind} {layout}", disable=not progress) as bar:
        for name, shard in zip(names, shards):
            _write_shard(tmp / name, shard, bar)
    index = {"metadata": {"total_size": total},
             "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (tmp / "synthetic.json").write_text(json.dumps(
        {"kind": kind, "layout": layout, "seed": seed, "scale_down": scale_down or {}, "tokenizer": tok,
         "weights": "random (vllm_gemma_mobile.models.synthetic): not a trained model"}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("wrote %s (%s %s, %d tensors, %.2f GB) in %.1f s", out, kind, layout, len(specs), total / 1e9,
                time.perf_counter() - t0)
    return out
