"""`gemma-mobile convert`: our compressed-tensors mobile checkpoint <-> Google's `quant_method: "gemma"` layout.

Google's layout is specified by what transformers' `integrations/gemma_quant.py` + `quantizers/quantizer_gemma.py`
read (docs/checkpoint-format.md, "Google's layout"). The mapping, module by module (HF names):

| ours (compressed-tensors)                          | Google                                                |
|----------------------------------------------------|-------------------------------------------------------|
| `P.weight_packed` int32 + `P.weight_shape`         | `P.weight` uint8 (2/4-bit) / int8 (8-bit)             |
| `P.weight_scale` [N, 1]                            | `P.weight_scale` f32 [N, 1]                           |
| `P.input_scale` / `P.output_scale` [1]             | `P.input_activation_scale` / `output_activation_scale` f32 [] |
| embedding `E.weight_packed` + `E.weight_scale` [V, G] | `E.embedding_quantized` + `E.embedding_scale` f32 [V, G] |
| `layers.i.self_attn.k_scale` / `v_scale` [1]       | `layers.i.self_attn.k_cache_scale` / `v_cache_scale` f32 [] |
| tied lm_head (no tensors) + `gemma_mobile.lm_head` {input_scale, output_scale} (absent/null = weight-only) | separate `lm_head` QuantizedLinear, byte-identical to `embed_tokens`, `input/output_activation_scale` (0 = identity), `tie_word_embeddings: false` |
| `config_groups` (bits per module)                  | `module_quant_configs`: ordered, anchored regexes, one per module set, each module matched by exactly one |
| modules without `weight_packed` (dense)            | `modules_to_not_convert` (anchored exact names)       |
| `gemma_mobile.kv_cache` (int8 sliding / int4 full) | implicit (Google's layout has no KV bit widths)       |

Anything one side cannot express faithfully raises `ConvertError` naming the tensor or field; nothing is dropped
silently. Both directions check their own output (every module resolves to the intended bits under transformers'
matching rules). Scales are written as f32 (a bf16 scale widens exactly).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Literal

import torch

from kernels import bitpack
from kernels.scales import invalid_scales
from vllm_gemma_mobile.contract import ContractError, read_contract

logger = logging.getLogger(__name__)

Layout = Literal["ct", "google"]
SKIP_FILES = ("config.json", "model.safetensors.index.json", ".gemma_mobile_build_key")
GOOGLE_DEFAULT_BITS = 4  # GemmaQuantizationConfig's num_bits default
KV_BITS_BY_TYPE = {"sliding_attention": 8, "full_attention": 4}  # the only KV map Google's layout implies
_KV = re.compile(r"^(?P<prefix>.*)layers\.(?P<layer>\d+)\.self_attn\.(?P<kind>[kv])_(?:cache_)?scale$")


class ConvertError(ValueError):
    """The source cannot be expressed faithfully in the target layout; the message names the tensor/field."""


# ------------------------------------------------------------------------------------------------ helpers

def detect_layout(config: dict) -> Layout:
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "gemma":
        return "google"
    if method == "compressed-tensors":
        if "gemma_mobile" not in qc:
            raise ConvertError("quantization_config.gemma_mobile is missing: not a mobile checkpoint of this "
                               "project (docs/checkpoint-format.md)")
        return "ct"
    raise ConvertError(f"quantization_config.quant_method = {method!r}: expected 'compressed-tensors' "
                       "(with gemma_mobile) or 'gemma'")


def load_tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{src}: no *.safetensors")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "BOOL": torch.bool}


class LazyTensors:
    """The tensors of a checkpoint directory, read one at a time on access (`t[key]`), with dtype and shape
    from the safetensors headers alone (`meta`): translating a real-size checkpoint never holds it all."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        files = sorted(Path(src).glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{src}: no *.safetensors")
        self._handles = [safe_open(str(f), "pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def keys(self):
        return self._where.keys()

    def __iter__(self):
        return iter(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def get(self, key: str, default=None):
        return self[key] if key in self._where else default

    def meta(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        sl = self._where[key].get_slice(key)
        return ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape())

    def rows(self, key: str, start: int, end: int) -> torch.Tensor:
        return self._where[key].get_slice(key)[start:end]


class Deferred:
    """A translated tensor computed when the loader asks for it (`value()`), so that the whole translation of a
    real-size checkpoint is never in memory at once."""

    __slots__ = ("fn", "header")

    def __init__(self, fn, header: tuple[str, list[int]] | None = None):
        self.fn = fn
        self.header = header  # (safetensors dtype name, shape) of the value, when known without computing it

    def __call__(self) -> torch.Tensor:
        return self.fn()


def materialize(tensors: dict) -> dict[str, torch.Tensor]:
    return {k: (v() if isinstance(v, Deferred) else v) for k, v in tensors.items()}


ROW_CHUNK = 16384  # rows repacked at a time: transient memory ~ ROW_CHUNK * K bytes


def _repack_google_to_ct(t: LazyTensors, key: str, bits: int, n: int, k: int) -> torch.Tensor:
    """Google uint8/int8 packed rows -> compressed-tensors int32 packed rows, ROW_CHUNK rows at a time."""
    try:
        parts = [bitpack.ct_pack(bitpack.google_unpack(t.rows(key, a, min(n, a + ROW_CHUNK)), bits, k), bits)
                 for a in range(0, n, ROW_CHUNK)]
    except ValueError as e:
        raise ConvertError(f"{key}: {e}") from None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _skeleton(src: Path):
    """The model `AutoModelForCausalLM` builds for SRC, on the meta device (no memory, no weights): returns
    (transformers config, model, {name: nn.Linear | nn.Embedding}, lm_head name, input embedding name,
    names of its parameters and buffers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if "gemma4" in getattr(c, "model_type", ""):
            c.allow_global_per_layer_attribute_access = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or id(head) not in names:
        raise ConvertError(f"{type(model).__name__} has no lm_head")
    dense_params = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return config, model, mods, names[id(head)], names[id(emb)], dense_params


def _nk(m: torch.nn.Module) -> tuple[int, int]:
    if isinstance(m, torch.nn.Linear):
        return m.out_features, m.in_features
    return m.num_embeddings, m.embedding_dim


def _scalar_scale(name: str, t: torch.Tensor | None, *, allow_zero: bool = False) -> torch.Tensor:
    if t is None:
        raise ConvertError(f"{name}: missing")
    if t.numel() != 1:
        raise ConvertError(f"{name}: expected one per-tensor scale, got shape {list(t.shape)}")
    f = t.detach().to(torch.float32).reshape(())
    if invalid_scales(f, allow_zero=allow_zero):
        raise ConvertError(f"{name} = {float(f)}: invalid scale (must be finite and > 0"
                           + (" or 0" if allow_zero else "") + ")")
    return f


def _scale_table(name: str, t: torch.Tensor | None, rows: int, dim: int) -> torch.Tensor:
    if t is None:
        raise ConvertError(f"{name}: missing")
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] < 1 or dim % t.shape[1]:
        raise ConvertError(f"{name}: shape {list(t.shape)} is not [{rows}, G] with G dividing {dim}")
    f = t.detach().to(torch.float32).contiguous()
    bad = invalid_scales(f)
    if bad:
        raise ConvertError(f"{name}: invalid scales {bad} (must be finite and > 0)")
    return f


def _layer_regex(names: list[str]) -> list[str]:
    """Anchored regexes (`^...$`) that match exactly `names`: one per (prefix, suffix) with the layer set."""
    by_key: dict[tuple[str, str], list[int]] = {}
    out: list[str] = []
    for n in names:
        m = re.fullmatch(r"(.*?layers\.)(\d+)(\..+)", n)
        if m:
            by_key.setdefault((m.group(1), m.group(3)), []).append(int(m.group(2)))
        else:
            out.append("^" + re.escape(n) + "$")
    for (prefix, suffix), layers in sorted(by_key.items()):
        alt = "|".join(str(i) for i in sorted(set(layers)))
        out.append("^" + re.escape(prefix) + "(?:" + alt + ")" + re.escape(suffix) + "$")
    return sorted(out)


def _write_checkpoint(src: Path, out: Path, config: dict, tensors: dict[str, torch.Tensor], force: bool) -> Path:
    from safetensors.torch import save_file

    if out.resolve() == src.resolve():
        raise ConvertError(f"--out {out} is the source directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConvertError(f"{out} exists and is not empty (use --force to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in SKIP_FILES and f.suffix != ".safetensors":
            shutil.copy(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _set_tie(config: dict, tie: bool) -> None:
    config["tie_word_embeddings"] = tie
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = tie


def _expected_kv(hf_config) -> dict:
    """Our `gemma_mobile` metadata for a checkpoint whose KV bits follow the layer type (int8 sliding, int4 full),
    derived by the scheme code the recipes use (KV sharing included)."""
    from vllm_gemma_mobile.scheme import MobileScheme, expand

    scheme = MobileScheme(name="google", embed_bits=None, ple_bits=None, per_layer_bits=None,
                          kv_bits=dict(KV_BITS_BY_TYPE))
    return expand(scheme, hf_config, []).metadata(scheme)


# ------------------------------------------------------------------------------------- Google-side matching

def google_module_bits(qc: dict, mods: dict[str, torch.nn.Module], model=None) -> tuple[dict[str, int], list[str]]:
    """Which modules transformers converts for quantization_config `qc`, and their bits.

    Returns ({converted module: bits}, [not converted Linear/Embedding]). Raises ConvertError for an unknown
    option or bit width, a pattern that matches no converted module, or a module matched by two patterns
    (transformers' joined alternation and an ordered loop could then disagree)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    default = qc.get("num_bits", GOOGLE_DEFAULT_BITS)
    if default not in bitpack.SUPPORTED_BITS:
        raise ConvertError(f"quantization_config.num_bits = {default!r}: expected one of {bitpack.SUPPORTED_BITS}")
    mqc = qc.get("module_quant_configs") or {}
    if not isinstance(mqc, dict):
        raise ConvertError("quantization_config.module_quant_configs must be a mapping regex -> {num_bits}")
    patterns = []
    for p, opts in mqc.items():
        if not isinstance(opts, dict) or set(opts) - {"num_bits"}:
            raise ConvertError(f"quantization_config.module_quant_configs[{p!r}] = {opts!r}: only "
                               "{'num_bits': 2|4|8} is understood")
        bits = opts.get("num_bits", default)
        if bits not in bitpack.SUPPORTED_BITS:
            raise ConvertError(f"quantization_config.module_quant_configs[{p!r}].num_bits = {bits!r}: "
                               f"expected one of {bitpack.SUPPORTED_BITS}")
        try:
            patterns.append((p, re.compile(p), bits))
        except re.error as e:
            raise ConvertError(f"quantization_config.module_quant_configs: bad regex {p!r}: {e}") from None
    skip = qc.get("modules_to_not_convert")
    if skip is None:
        if model is None:
            raise ConvertError("quantization_config.modules_to_not_convert is missing")
        from transformers.quantizers.base import HfQuantizer

        skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    else:
        skip = list(skip) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    quant_emb = bool(qc.get("quantize_embeddings", False))
    bits: dict[str, int] = {}
    dense: list[str] = []
    hits = Counter()
    for name, m in mods.items():
        converted = should_convert_module(name, skip) and (isinstance(m, torch.nn.Linear) or quant_emb)
        if not converted:
            dense.append(name)
            continue
        found = [(p, b) for p, rx, b in patterns if rx.search(name)]
        if len(found) > 1:
            raise ConvertError(f"module {name} is matched by {len(found)} module_quant_configs patterns "
                               f"{[p for p, _ in found]}: each module must match exactly one")
        for p, _ in found:
            hits[p] += 1
        bits[name] = found[0][1] if found else default
    unused = [p for p, _, _ in patterns if not hits[p]]
    if unused:
        raise ConvertError(f"quantization_config.module_quant_configs patterns match no quantized module: {unused}")
    return bits, dense


def google_quant_config(qbits: dict[str, int], mods: dict[str, torch.nn.Module], model) -> dict:
    """Google's `quantization_config` for the converted modules `qbits` ({module: bits}; every other Linear /
    Embedding of `mods` goes to `modules_to_not_convert`): anchored regexes, self-checked under transformers' own
    matching rules (`google_module_bits`)."""
    dense = sorted(n for n in mods if n not in qbits)
    module_quant_configs: dict[str, dict] = {}
    for bits in sorted(set(qbits.values())):
        for p in _layer_regex([n for n, b in qbits.items() if b == bits]):
            module_quant_configs[p] = {"num_bits": bits}
    gqc = {
        "quant_method": "gemma",
        "num_bits": GOOGLE_DEFAULT_BITS,
        "quantize_embeddings": any(isinstance(mods[n], torch.nn.Embedding) for n in qbits),
        "module_quant_configs": dict(sorted(module_quant_configs.items())),
        "modules_to_not_convert": ["^" + re.escape(n) + "$" for n in dense],
    }
    got, _ = google_module_bits(gqc, mods, model)
    if got != qbits:
        diff = {n: (got.get(n), qbits.get(n)) for n in set(got) | set(qbits) if got.get(n) != qbits.get(n)}
        raise AssertionError(f"generated bit map does not resolve to the source's bits: {diff}")
    return gqc


# ------------------------------------------------------------------------------------------- ct -> Google

def ct_to_google(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((src / "config.json").read_text())
    if detect_layout(config) != "ct":
        raise ConvertError(f"{src} is not a compressed-tensors mobile checkpoint")
    qc = config["quantization_config"]
    hf_config, model, mods, head_name, emb_name, dense_params = _skeleton(src)
    text = config.get("text_config", config)
    if not (config.get("tie_word_embeddings", True) and text.get("tie_word_embeddings", True)):
        raise ConvertError("tie_word_embeddings is false: our layout has a tied lm_head (docs/checkpoint-format.md)")
    expected = _expected_kv(hf_config)["kv_cache"]
    kv = (qc["gemma_mobile"] or {}).get("kv_cache") or {}
    if list(kv.get("layer_bits") or []) != expected["layer_bits"]:
        raise ConvertError(f"gemma_mobile.kv_cache.layer_bits = {kv.get('layer_bits')}: Google's layout has no KV "
                           f"bit widths, it implies int8 sliding / int4 full = {expected['layer_bits']}")
    if {str(k): int(v) for k, v in (kv.get("kv_sharing") or {}).items()} != expected["kv_sharing"]:
        raise ConvertError(f"gemma_mobile.kv_cache.kv_sharing = {kv.get('kv_sharing')}: the model's KV-shared "
                           f"layers read {expected['kv_sharing']}")

    try:  # bits, strategies, scales, shapes and KV of every module: the one contract reader
        contract = read_contract(src)
    except ContractError as e:
        raise ConvertError(str(e)) from None
    t = load_tensors(src)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    qbits: dict[str, int] = {}
    for name, spec in sorted(contract.modules.items()):
        m = mods.get(name)
        if m is None:
            raise ConvertError(f"{name}.weight_packed: {type(model).__name__} has no Linear/Embedding {name}")
        if head_name == name:
            raise ConvertError(f"{name}.weight_packed: our layout has no separate lm_head (it is tied)")
        bits = spec.bits
        n, k = _nk(m)
        if spec.shape != (n, k):
            raise ConvertError(f"{name}.weight_shape = {list(spec.shape)}: expected {[n, k]}")
        codes = bitpack.ct_unpack(t[f"{name}.weight_packed"], bits, k)
        scale = _scale_table(f"{name}.weight_scale", t[f"{name}.weight_scale"], n, k)
        used |= {f"{name}.{s}" for s in ("weight_packed", "weight_shape", "weight_scale")}
        if isinstance(m, torch.nn.Linear):
            if spec.role != "linear" or spec.output_scale is None:
                raise ConvertError(f"{name}: {spec.role} without a static int8 output scale: Google linears need "
                                   "static per-tensor symmetric int8 input and output")
            for kind in ("input", "output"):
                out[f"{name}.{kind}_activation_scale"] = torch.tensor(getattr(spec, f"{kind}_scale"),
                                                                      dtype=torch.float32)  # f32: exact
                used.add(f"{name}.{kind}_scale")
            out[f"{name}.weight"] = bitpack.google_pack(codes, bits)
            out[f"{name}.weight_scale"] = scale
        else:
            out[f"{name}.embedding_quantized"] = bitpack.google_pack(codes, bits)
            out[f"{name}.embedding_scale"] = scale
        for key in t:
            if key.startswith(name + ".") and key not in used and key != f"{name}.bias":
                raise ConvertError(f"{key}: not part of our layout (Google has no place for it)")
        qbits[name] = bits

    # KV scales: k_scale / v_scale -> k_cache_scale / v_cache_scale
    for key, val in t.items():
        if (mk := _KV.match(key)) and key.endswith(("k_scale", "v_scale")):
            i = int(mk.group("layer"))
            if expected["layer_bits"][i] is None:
                raise ConvertError(f"{key}: layer {i} reads another layer's KV cache and must not carry KV scales")
            out[f"{mk.group('prefix')}layers.{i}.self_attn.{mk.group('kind')}_cache_scale"] = \
                _scalar_scale(key, val).clone()
            used.add(key)
    for i, b in enumerate(expected["layer_bits"]):
        for kind in ("k", "v"):
            if b is not None and not any(k.endswith(f"layers.{i}.self_attn.{kind}_cache_scale") for k in out):
                raise ConvertError(f"layers.{i}.self_attn.{kind}_scale: missing (layer {i} owns a KV cache)")

    # dense tensors: copied as they are
    for key, val in t.items():
        if key in used or key.endswith(("weight_packed", "weight_shape")):
            continue
        if key.startswith(head_name + "."):
            raise ConvertError(f"{key}: our lm_head is tied to {emb_name}, a separate lm_head tensor is not our layout")
        if key not in dense_params:
            raise ConvertError(f"{key}: not a parameter of {type(model).__name__} nor a tensor of our layout")
        out[key] = val

    # the tied lm_head becomes its own, byte-identical, weight-only (activation scales 0 = identity) linear
    if emb_name in qbits:
        if out[f"{emb_name}.embedding_scale"].shape[1] != 1:
            raise ConvertError(f"{emb_name}.weight_scale: a tied lm_head needs one scale per vocab row")
        out[f"{head_name}.weight"] = out[f"{emb_name}.embedding_quantized"].clone()
        out[f"{head_name}.weight_scale"] = out[f"{emb_name}.embedding_scale"].clone()
        head = contract.lm_head
        for kind in ("input", "output"):  # the lm_head's own SRQ scales; 0 = identity (weight-only side)
            v = getattr(head, f"{kind}_scale") if head is not None else None
            out[f"{head_name}.{kind}_activation_scale"] = torch.tensor(0.0 if v is None else v, dtype=torch.float32)
        qbits[head_name] = qbits[emb_name]
    else:
        if contract.lm_head is not None:
            raise ConvertError("gemma_mobile.lm_head: activation scales for an lm_head whose table is not quantized")
        out[f"{head_name}.weight"] = t[f"{emb_name}.weight"].clone()

    gqc = google_quant_config(qbits, mods, model)
    new = json.loads(json.dumps(config))
    new["quantization_config"] = gqc
    _set_tie(new, False)
    return new, out


# ------------------------------------------------------------------------------------------- Google -> ct

def google_to_ct(src: Path, lazy: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """Google layout at SRC -> (our config, our tensors). Every check runs (headers, scales, the lm_head's identity
    with the table); with `lazy=True` the large tensors come back as `Deferred` (repacked on demand, row chunk by
    row chunk), which is how the vLLM plugin loads a Google directory without holding it twice."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from compressed_tensors.utils.match import is_match

    from vllm_gemma_mobile.scheme import MobileScheme
    from vllm_gemma_mobile.scheme.spec import _targets, activation_args, weight_args

    config = json.loads((src / "config.json").read_text())
    if detect_layout(config) != "google":
        raise ConvertError(f"{src} is not a quant_method 'gemma' checkpoint")
    qc = config["quantization_config"]
    hf_config, model, mods, head_name, emb_name, dense_params = _skeleton(src)
    qbits, dense = google_module_bits(qc, mods, model)
    meta = _expected_kv(hf_config)
    kv_bits = meta["kv_cache"]["layer_bits"]
    sharing = {int(k): v for k, v in meta["kv_cache"]["kv_sharing"].items()}
    t = LazyTensors(src)
    used: set[str] = set()
    out: dict[str, torch.Tensor | Deferred] = {}
    kinds: dict[str, tuple] = {}  # module -> group key

    def get(key: str) -> torch.Tensor:
        if key not in t:
            raise ConvertError(f"{key}: missing (transformers would leave it at its init value)")
        used.add(key)
        return t[key]

    def header(key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if key not in t:
            raise ConvertError(f"{key}: missing (transformers would leave it at its init value)")
        used.add(key)
        return t.meta(key)

    head_q = head_name in qbits
    for name, bits in qbits.items():
        m = mods[name]
        n, k = _nk(m)
        lin = isinstance(m, torch.nn.Linear)
        wkey, skey = (f"{name}.weight", f"{name}.weight_scale") if lin else \
            (f"{name}.embedding_quantized", f"{name}.embedding_scale")
        pdtype, pshape = header(wkey)
        if pshape != (n, bitpack.google_packed_width(k, bits)) or pdtype != bitpack.google_dtype(bits):
            raise ConvertError(f"{wkey}: {pdtype} {list(pshape)}, expected {bitpack.google_dtype(bits)} "
                               f"{[n, bitpack.google_packed_width(k, bits)]} for {bits}-bit {[n, k]}")
        scale = _scale_table(skey, get(skey), n, k)
        if name == head_name:
            continue  # checked against embed_tokens below
        if lin:
            if scale.shape[1] != 1:
                raise ConvertError(f"{skey}: shape {list(scale.shape)}, expected [{n}, 1]")
            for kind in ("input", "output"):
                key = f"{name}.{kind}_activation_scale"
                s = _scalar_scale(key, t.get(key, torch.zeros(())), allow_zero=True)
                used.add(key)
                if s == 0:
                    raise ConvertError(f"{key} = 0 (uncalibrated: identity in Google's semantics): our layout "
                                       "requires a calibrated static int8 scale on every quantized linear")
                out[f"{name}.{kind}_scale"] = s.reshape(1).clone()
            kinds[name] = ("linear", bits, None)
        else:
            g = scale.shape[1]
            is_ple = name.endswith("embed_tokens_per_layer")
            if g != 1 and not is_ple:
                raise ConvertError(f"{skey}: {g} scales per row; our layout has one scale per row for {name} "
                                   "(blocks only for the per-layer embedding table)")
            kinds[name] = ("ple" if is_ple else "embed", bits, None if g == 1 else k // g)
        out[f"{name}.weight_packed"] = Deferred(lambda wkey=wkey, bits=bits, n=n, k=k:
                                                _repack_google_to_ct(t, wkey, bits, n, k),
                                                ("I32", [n, bitpack.ct_packed_width(k, bits)]))
        out[f"{name}.weight_scale"] = scale
        out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)

    # lm_head: ours is the tied embedding table, weight-only
    if head_q:
        if emb_name not in qbits:
            raise ConvertError(f"{head_name}.weight is quantized but {emb_name} is not: our lm_head is the tied table")
        for a, b in (("weight", "embedding_quantized"), ("weight_scale", "embedding_scale")):
            x, y = t[f"{head_name}.{a}"], t[f"{emb_name}.{b}"]
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y) or qbits[head_name] != qbits[emb_name]:
                raise ConvertError(f"{head_name}.{a} is not byte-identical to {emb_name}.{b}: our layout has one "
                                   "table serving embed_tokens and the tied lm_head")
        head_scales = {}
        for kind in ("input", "output"):
            key = f"{head_name}.{kind}_activation_scale"
            s = _scalar_scale(key, t.get(key, torch.zeros(())), allow_zero=True)
            used.add(key)
            head_scales[f"{kind}_scale"] = float(s) if s != 0 else None  # 0 = identity (Google) = null (ours)
        if any(v is not None for v in head_scales.values()):
            meta["lm_head"] = head_scales  # static int8 SRQ of the tied lm_head (metadata.LMHeadScales)
    elif f"{head_name}.weight" in t:
        used.add(f"{head_name}.weight")
        if emb_name in qbits or not torch.equal(t[f"{head_name}.weight"], t.get(f"{emb_name}.weight", torch.empty(0))):
            raise ConvertError(f"{head_name}.weight is not identical to {emb_name}: our layout has a tied lm_head")

    # KV cache scales
    for key in list(t.keys()):
        mk = _KV.match(key)
        if not (mk and "_cache_scale" in key):
            continue
        val = t[key]
        used.add(key)
        i, kind, prefix = int(mk.group("layer")), mk.group("kind"), mk.group("prefix")
        s = _scalar_scale(key, val)
        if i in sharing:  # redundant copy of the source layer's scale: accepted only if identical
            src_key = f"{prefix}layers.{sharing[i]}.self_attn.{kind}_cache_scale"
            if src_key not in t or not torch.equal(s, _scalar_scale(src_key, t[src_key])):
                raise ConvertError(f"{key}: layer {i} reads layer {sharing[i]}'s KV cache but its scale differs "
                                   f"from {src_key}; our layout has one scale per cache")
            logger.info("%s: KV-shared layer, same scale as %s (kept once)", key, src_key)
            continue
        out[f"{prefix}layers.{i}.self_attn.{kind}_scale"] = s.reshape(1).clone()
    for i, b in enumerate(kv_bits):
        for kind in ("k", "v"):
            if b is not None and not any(k.endswith(f"layers.{i}.self_attn.{kind}_scale") for k in out):
                raise ConvertError(f"layers.{i}.self_attn.{kind}_cache_scale: missing (layer {i} owns a KV cache; "
                                   "our layout needs its static scale)")

    for key in list(t.keys()):
        if key in used:
            continue
        if key not in dense_params:
            raise ConvertError(f"{key}: not understood (no parameter of {type(model).__name__} and not part of "
                               "Google's layout as transformers reads it)")
        owner = key.rsplit(".", 1)[0]
        if owner in qbits and not key.endswith(".bias"):
            raise ConvertError(f"{key}: dense tensor of quantized module {owner}")
        out[key] = Deferred(lambda key=key: t[key])

    # config groups: one per (kind, bits, group size), explicit targets
    base = MobileScheme()
    by_key: dict[tuple, list[str]] = {}
    for name, key in kinds.items():
        by_key.setdefault(key, []).append(name)
    groups: dict[str, QuantizationScheme] = {}
    group_of: dict[str, str] = {}
    for (kind, bits, gsize), names in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        targets = _targets(names)
        if kind == "linear":
            groups[f"w{bits}a8o8"] = QuantizationScheme(
                targets=targets, weights=weight_args(bits, base.weight_observer),
                input_activations=activation_args(base.activation_observer),
                output_activations=activation_args(base.activation_observer), format="pack-quantized")
        else:
            strategy = "group" if gsize else "channel"
            groups[f"{kind}_w{bits}" + (f"_g{gsize}" if gsize else "")] = QuantizationScheme(
                targets=targets, weights=weight_args(bits, base.weight_observer, strategy, gsize),
                format="pack-quantized")
        group_of.update({n: next(reversed(groups)) for n in names})
    for name, m in mods.items():  # self-check: every module in exactly its group, dense ones in none
        hit = [g for g, s in groups.items() if is_match(name, m, s.targets, ["lm_head"])]
        want = [group_of[name]] if name in group_of else []
        if hit != want:
            raise AssertionError(f"generated config_groups match {name} as {hit}, expected {want}")
    ct = QuantizationConfig(config_groups=groups, quantization_status="compressed", format="pack-quantized",
                            ignore=_ct_ignore(model, set(group_of)), kv_cache_scheme=None).model_dump(mode="json")
    ct.update({"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
               "sparsity_config": {}, "transform_config": {}, "gemma_mobile": meta})
    new = json.loads(json.dumps(config))
    new["quantization_config"] = ct
    _set_tie(new, True)
    return new, (out if lazy else materialize(out))


def _ct_ignore(model: torch.nn.Module, quantized: set[str]) -> list[str]:
    """The `ignore` list compressed-tensors itself writes (`QuantizationConfig.from_pretrained`): every module not
    quantized whose class is quantized somewhere, grouped by class in order of first appearance -- e.g.
    `per_layer_model_projection` and `lm_head` -- so that ct -> google -> ct gives back the recipe's config."""
    qtypes = {type(m).__name__ for n, m in model.named_modules() if n in quantized}
    by_type: dict[str, list[str]] = {}
    for n, m in model.named_modules():
        if type(m).__name__ in qtypes and n not in quantized:
            by_type.setdefault(type(m).__name__, []).append(n)
    return [n for names in by_type.values() for n in names]


# ---------------------------------------------------------------------------------------------- entry point

def convert(src: str | Path, out: str | Path, to: Layout | None = None, *, force: bool = False) -> Path:
    """Convert the checkpoint at SRC into the other layout (or `to`) at OUT; returns OUT."""
    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    have = detect_layout(config)
    to = to or ("google" if have == "ct" else "ct")
    if to not in ("ct", "google"):
        raise ConvertError(f"--to {to!r}: expected 'ct' or 'google'")
    if to == have:
        raise ConvertError(f"{src} is already in the {have!r} layout")
    new_config, tensors = ct_to_google(src) if to == "google" else google_to_ct(src)
    path = _write_checkpoint(src, out, new_config, tensors, force)
    logger.info("converted %s (%s) -> %s (%s): %d tensors", src, have, out, to, len(tensors))
    return path
