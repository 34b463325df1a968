"""The checkpoint contract, read ONCE: `read_contract(dir)` turns a checkpoint's config + tensor index into one
typed description per quantized module and per decoder layer's KV cache (`CheckpointContract`). The vLLM plugin
(validation at engine start, KV bits, the tied lm_head's table), the evaluation reference (served numerics, KV
fake quant), QAT (its student's codes and scales) and the size report all read checkpoints through it.

Two front ends, one contract:
- ours: compressed-tensors `pack-quantized` + `quantization_config.gemma_mobile` (docs/checkpoint-format.md),
  read from the safetensors headers plus the small tensors (scales, `weight_shape`) only;
- Google's `quant_method: "gemma"`: translated by `convert.google_to_ct(lazy=True)` (the code `gemma-mobile
  convert --to ct` runs), whose large tensors stay `Deferred` with a known header, then read like ours.

Rules, each in one place (this module or the one it imports):
- weights: bits in `bitpack.SUPPORTED_BITS`, symmetric int, `channel` (one scale per output row) everywhere,
  `group` (per row and block of `group_size` columns) only for Gemma 4's per-layer-embedding table; packed as
  compressed-tensors does (`I32 [N, ceil(K * bits / 32)]`, `weight_shape = [N, K]`);
- activations: static symmetric int8 per-tensor scales on the input (always) and output (optional) of every
  quantized linear; embedding tables are weight-only (the tied lm_head's SRQ lives in `gemma_mobile.lm_head`);
- scale values: `kernels.scales` (finite and > 0);
- target matching: compressed-tensors' `match_name` (`re:` regex or exact name), `matches` below;
- KV: `gemma_mobile.kv_cache` (metadata.py) with per-tensor `layers.i.self_attn.{k,v}_scale`; KV-shared Gemma 4
  layers (`scheme.spec.kv_sharing`) own no cache and no scales and read their source layer's;
- shapes: `expected_shapes` from the model config (Gemma 3 / Gemma 4: sliding vs global head dims, double-wide
  MLPs in KV-shared layers, no k/v projections there, PLE table width `layers * hidden_size_per_layer_input`).
Every violation raises `ContractError` naming the config field or tensor.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, PrivateAttr

from kernels import bitpack
from vllm_gemma_mobile.metadata import LMHeadScales, MetadataError, MobileMetadata, parse_metadata

Role = Literal["linear", "embedding", "per_layer_embedding"]
EMBEDDINGS = ("embed_tokens", "embed_tokens_per_layer")


class ContractError(ValueError):
    """A checkpoint that breaks the contract (the message names the config field or tensor)."""


# ---------------------------------------------------------------------------------------------- tensor index
class TensorIndex:
    """Tensor names -> (safetensors dtype name, shape), plus a loader for the small tensors the contract reads.
    Built from a directory's safetensors headers (`from_dir`) or from a translated mapping (`from_tensors`:
    tensors, or `convert.Deferred` values that carry their header)."""

    def __init__(self, headers: dict[str, tuple[str, list[int]] | None], load: Callable[[str], Any]):
        self.headers = headers
        self._load = load

    def __contains__(self, name: str) -> bool:
        return name in self.headers

    def header(self, name: str) -> tuple[str, list[int]]:
        h = self.headers[name]
        if h is None:
            raise ContractError(f"{name}: header unknown (translated tensor without one)")
        return h

    def load(self, name: str):
        return self._load(name)

    @classmethod
    def from_dir(cls, model_dir: Path) -> "TensorIndex":
        from safetensors import safe_open

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ContractError(f"{model_dir}: no *.safetensors files")
        headers: dict[str, tuple[str, list[int]] | None] = {}
        where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    headers[k] = (sl.get_dtype(), list(sl.get_shape()))
                    where[k] = f

        def load(name: str):
            with safe_open(str(where[name]), "pt") as fh:
                return fh.get_tensor(name)

        return cls(headers, load)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any]) -> "TensorIndex":
        import torch

        from vllm_gemma_mobile.convert import ST_DTYPES

        names = {v: k for k, v in ST_DTYPES.items()}

        def header(v) -> tuple[str, list[int]] | None:
            if isinstance(v, torch.Tensor):
                return names[v.dtype], list(v.shape)
            return getattr(v, "header", None)

        def load(name: str):
            v = tensors[name]
            return v if isinstance(v, torch.Tensor) else v()

        return cls({k: header(v) for k, v in tensors.items()}, load)


# ------------------------------------------------------------------------------------------------- contract
class ModuleContract(BaseModel):
    """One quantized module: `W[n, k] = q * weight_scale`, q symmetric `bits`-bit; for linears the served op is
    `y = SRQ_out(SRQ_in(x) @ W^T)` with the static int8 scales below (`output_scale` None = bf16 output)."""

    model_config = ConfigDict(frozen=True)

    name: str                          # as stored in the checkpoint (HF name)
    role: Role
    bits: int
    strategy: Literal["channel", "group"]
    group_size: Optional[int] = None   # only for strategy "group"
    shape: tuple[int, int]             # (N, K) = weight_shape
    weight_scale_dtype: str            # safetensors dtype name (ours F32; Google's -ct conversions BF16)
    input_scale: Optional[float] = None
    output_scale: Optional[float] = None

    @property
    def text_name(self) -> str:
        return text_module_name(self.name)


class KVLayerContract(BaseModel):
    """The KV cache decoder layer `layer` reads: `source`'s (itself unless KV-shared), `bits`-bit with static
    per-tensor scales; `bits` None = the checkpoint carries no KV quantization (cache in the model dtype)."""

    model_config = ConfigDict(frozen=True)

    layer: int
    source: int
    bits: Optional[int] = None
    k_scale: Optional[float] = None
    v_scale: Optional[float] = None


class CheckpointContract(BaseModel):
    """What a checkpoint promises, parsed once (see module docstring)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    path: str
    layout: Literal["ct", "google"]
    config: dict[str, Any]                  # config.json (Google's: as translated into ours)
    metadata: MobileMetadata
    modules: dict[str, ModuleContract]      # by checkpoint name
    kv: list[KVLayerContract]               # one per decoder layer; empty when the checkpoint has no KV bits
    _index: TensorIndex | None = PrivateAttr(None)

    @property
    def quantization_config(self) -> dict[str, Any]:
        return self.config["quantization_config"]

    @property
    def lm_head(self) -> LMHeadScales | None:
        return self.metadata.lm_head

    @property
    def kv_layer_bits(self) -> list[Optional[int]]:
        return [k.bits for k in self.kv]

    def role(self, role: Role) -> ModuleContract | None:
        """The (single) module of an embedding role, or None."""
        return next((m for m in self.modules.values() if m.role == role), None)

    def load(self, name: str):
        """A tensor of this checkpoint (our layout's name), read on demand."""
        if self._index is None:
            raise RuntimeError("this contract has no tensor index (it was unpickled: the index stays in the "
                               "process that read the checkpoint)")
        return self._index.load(name)

    def __getstate__(self) -> dict[str, Any]:
        # vLLM pickles the quantization config (and this contract with it) into its worker processes; the tensor
        # index holds open-file closures, so it stays behind
        state = super().__getstate__()
        state["__pydantic_private__"] = {**(state.get("__pydantic_private__") or {}), "_index": None}
        return state

    def summary(self) -> dict[str, Any]:
        """Counts per bit width: {"linear": {bits: n}, "embedding": bits | None[, "per_layer_embedding": bits]}."""
        out: dict[str, Any] = {"linear": {}, "embedding": None}
        for m in self.modules.values():
            if m.role == "linear":
                out["linear"][m.bits] = out["linear"].get(m.bits, 0) + 1
            else:
                out[m.role] = m.bits
        return out


# ---------------------------------------------------------------------------------------------------- rules
def matches(name: str, targets: list[str]) -> bool:
    """compressed-tensors' own name rule (`re:` regex match or exact name), as its loader and our converter apply
    it; class-name targets need the module and cannot match a tensor name."""
    from compressed_tensors.utils.match import match_name

    return any(match_name(name, t) for t in targets)


def groups_of(name: str, groups: dict[str, dict[str, Any]], ignore: list[str] = ()) -> list[str]:
    """Names of the config groups targeting module NAME (none if it is in `ignore`); the contract wants one."""
    if matches(name, list(ignore)):
        return []
    return [k for k, g in groups.items() if matches(name, g.get("targets") or [])]


_TEXT_PREFIX = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|model\.)")


def text_module_name(mod: str) -> str:
    """Checkpoint module name relative to the text model: `model.layers.3.mlp.up_proj` -> `layers.3.mlp.up_proj`
    (also for the multimodal `model.language_model.` prefix)."""
    return _TEXT_PREFIX.sub("", mod, count=1)


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    return hf.get("text_config", hf) if hf.get("model_type") in ("gemma3", "gemma4") else hf


def kv_sharing_of(text: dict[str, Any]) -> dict[int, int]:
    """KV-shared layer -> layer whose cache it reads (Gemma 4; `scheme.spec.kv_sharing`, the recipe's rule)."""
    from types import SimpleNamespace

    from vllm_gemma_mobile.scheme.spec import kv_sharing

    n = text["num_hidden_layers"]
    types = text.get("layer_types") or ["full_attention"] * n
    return kv_sharing(SimpleNamespace(layer_types=types, num_kv_shared_layers=text.get("num_kv_shared_layers")))


def _gemma4_layer_dims(model_dir: Path | None, hf: dict[str, Any]) -> list[tuple[int, int]]:
    """(head_dim, num_kv_heads) per layer, from transformers' `per_layer_config` (what vLLM's gemma4.py reads;
    sliding layers `head_dim`, global ones `global_head_dim` / `num_global_key_value_heads`)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir) if model_dir is not None else AutoConfig.for_model(**hf)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return [(int(cfg.per_layer_config[i].head_dim), int(cfg.per_layer_config[i].num_key_value_heads))
            for i in range(cfg.num_hidden_layers)]


def expected_shapes(hf: dict[str, Any], model_dir: str | Path | None = None) -> dict[str, tuple[int, int]] | None:
    """(N, K) per module name relative to the text model (`text_module_name`), for Gemma 3 and Gemma 4 text
    configs; None for other architectures (no shape check)."""
    text = text_config(hf)
    mt = text.get("model_type")
    if mt not in ("gemma3_text", "gemma4_text"):
        return None
    h, inter, n_layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    out: dict[str, tuple[int, int]] = {"embed_tokens": (text["vocab_size"], h)}
    if mt == "gemma3_text":
        dims = [(text["head_dim"], text["num_key_value_heads"])] * n_layers
        first_shared, wide, k_eq_v = n_layers, False, False
    else:
        if text.get("enable_moe_block") or text.get("num_experts"):
            raise ContractError("config.json: Gemma 4 MoE (num_experts / enable_moe_block) is not supported "
                                "by the gemma_mobile plugin")
        dims = _gemma4_layer_dims(Path(model_dir) if model_dir else None, hf)
        first_shared = n_layers - int(text.get("num_kv_shared_layers") or 0)
        wide = bool(text.get("use_double_wide_mlp"))
        k_eq_v = bool(text.get("attention_k_eq_v"))
        ple = int(text.get("hidden_size_per_layer_input") or 0)
        if ple:
            out["embed_tokens_per_layer"] = (text.get("vocab_size_per_layer_input") or text["vocab_size"],
                                             n_layers * ple)
            out["per_layer_model_projection"] = (n_layers * ple, h)
    types = text.get("layer_types") or ["full_attention"] * n_layers
    for i, (hd, kvh) in enumerate(dims):
        p = f"layers.{i}."
        out[p + "self_attn.q_proj"] = (heads * hd, h)
        out[p + "self_attn.o_proj"] = (h, heads * hd)
        if i < first_shared:  # KV-shared layers have no k/v projections (vLLM drops them)
            out[p + "self_attn.k_proj"] = (kvh * hd, h)
            if not (k_eq_v and types[i] == "full_attention"):
                out[p + "self_attn.v_proj"] = (kvh * hd, h)
        li = inter * (2 if wide and 0 < first_shared <= i else 1)
        out[p + "mlp.gate_proj"] = (li, h)
        out[p + "mlp.up_proj"] = (li, h)
        out[p + "mlp.down_proj"] = (h, li)
        if mt == "gemma4_text" and ple:
            out[p + "per_layer_input_gate"] = (ple, h)
            out[p + "per_layer_projection"] = (h, ple)
    return out


def _args(group: dict, key: str) -> dict | None:
    a = group.get(key)
    return a if a else None


def _is_ple_target(target: str) -> bool:
    return "embed_tokens_per_layer" in target


def check_quant_config(cfg: dict[str, Any]) -> MobileMetadata:
    """Config-level rules (supported bits / types / strategies, static int8 activations, format, the
    `gemma_mobile` key); returns the parsed metadata."""
    if cfg.get("quant_method") != "compressed-tensors":
        raise ContractError(f"quantization_config.quant_method = {cfg.get('quant_method')!r}: expected "
                            "'compressed-tensors'")
    try:
        meta = parse_metadata(cfg.get("gemma_mobile"))
    except MetadataError as e:
        raise ContractError(str(e)) from None
    if cfg.get("kv_cache_scheme"):
        raise ContractError("quantization_config.kv_cache_scheme must be null in a gemma-mobile checkpoint "
                            "(per-layer KV bits live in quantization_config.gemma_mobile.kv_cache)")
    groups = cfg.get("config_groups") or {}
    if not groups:
        raise ContractError("quantization_config.config_groups: empty")
    for name, g in groups.items():
        where = f"quantization_config.config_groups.{name}"
        w = _args(g, "weights")
        if w is None:
            raise ContractError(f"{where}.weights: missing (activation-only groups are not supported)")
        if w.get("num_bits") not in bitpack.SUPPORTED_BITS:
            raise ContractError(f"{where}.weights.num_bits = {w.get('num_bits')}: supported "
                                f"{bitpack.SUPPORTED_BITS}")
        if w.get("type", "int") != "int":
            raise ContractError(f"{where}.weights.type = {w.get('type')!r}: expected 'int'")
        if not w.get("symmetric", True):
            raise ContractError(f"{where}.weights.symmetric = false: only symmetric weights are supported")
        targets = list(g.get("targets") or [])
        if w.get("strategy") == "group":
            if not targets or not all(_is_ple_target(t) for t in targets):
                raise ContractError(f"{where}.weights.strategy = 'group': supported only for the per-layer "
                                    f"embedding table (embed_tokens_per_layer), but the group targets {targets}")
            gs = w.get("group_size")
            if not isinstance(gs, int) or gs <= 0:
                raise ContractError(f"{where}.weights.group_size = {gs!r}: expected a positive integer")
            if _args(g, "input_activations") or _args(g, "output_activations"):
                raise ContractError(f"{where}: embedding tables are weight-only (no activation quantization)")
        elif w.get("strategy") != "channel":
            raise ContractError(f"{where}.weights.strategy = {w.get('strategy')!r}: expected 'channel' "
                                "('group' only for embed_tokens_per_layer)")
        if w.get("dynamic"):
            raise ContractError(f"{where}.weights.dynamic = {w.get('dynamic')!r}: expected false")
        fmt = g.get("format") or cfg.get("format")
        if fmt != "pack-quantized":
            raise ContractError(f"{where}.format = {fmt!r}: expected 'pack-quantized'")
        acts = [k for k in ("input_activations", "output_activations") if _args(g, k) is not None]
        if acts and acts != ["input_activations", "output_activations"] and acts != ["input_activations"]:
            raise ContractError(f"{where}: output_activations without input_activations is not supported")
        for key in acts:
            a = g[key]
            if a.get("dynamic", False) is not False:
                raise ContractError(f"{where}.{key}.dynamic = {a.get('dynamic')!r}: only static "
                                    "(calibrated) activation scales are supported")
            if a.get("num_bits") != 8 or a.get("type", "int") != "int" or not a.get("symmetric", True):
                raise ContractError(f"{where}.{key}: expected symmetric int 8-bit, got "
                                    f"num_bits={a.get('num_bits')} type={a.get('type')} "
                                    f"symmetric={a.get('symmetric')}")
            if a.get("strategy") != "tensor":
                raise ContractError(f"{where}.{key}.strategy = {a.get('strategy')!r}: expected 'tensor'")
    return meta


def _scalar(index: TensorIndex, name: str, what: str) -> float:
    """A per-tensor static scale: one element, finite and > 0."""
    from kernels.scales import invalid_scales

    t = index.load(name).float().reshape(-1)
    if t.numel() != 1:
        raise ContractError(f"{name}: shape {index.header(name)[1]}, expected a per-tensor scale [1]")
    v = float(t[0])
    if invalid_scales(v):
        raise ContractError(f"{name} = {v}: {what} must be finite and > 0")
    return v


# --------------------------------------------------------------------------------------------------- reader
def read_contract(model_dir: str | Path, cfg: dict[str, Any] | None = None) -> CheckpointContract:
    """The contract of the checkpoint directory MODEL_DIR (ours or Google's layout). `cfg` overrides its
    `quantization_config` (the plugin passes the one vLLM parsed). Raises `ContractError` (or the converter's
    `ConvertError` for Google's layout) naming the first bad field or tensor."""
    model_dir = Path(model_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    qc = cfg if cfg is not None else hf.get("quantization_config")
    if not isinstance(qc, dict):
        raise ContractError(f"{model_dir}/config.json: no quantization_config (a bf16 model)")
    if qc.get("quant_method") == "gemma":
        from vllm_gemma_mobile.convert import google_to_ct

        hf, tensors = google_to_ct(model_dir, lazy=True)  # headers + scales only: no large tensor is read
        return _read(model_dir, "google", hf, hf["quantization_config"], TensorIndex.from_tensors(tensors))
    return _read(model_dir, "ct", hf, qc, TensorIndex.from_dir(model_dir))


def _read(model_dir: Path, layout: str, hf: dict[str, Any], cfg: dict[str, Any],
          index: TensorIndex) -> CheckpointContract:
    from kernels.scales import invalid_scale_mask

    meta = check_quant_config(cfg)
    want = expected_shapes(hf, model_dir)
    named = dict(cfg.get("config_groups") or {})
    ignore = cfg.get("ignore") or []
    names = index.headers
    packed = sorted({k.rsplit(".", 1)[0] for k in names if k.endswith(".weight_packed")})
    plain = {k.rsplit(".", 1)[0] for k in names if k.endswith(".weight")}
    for mod in sorted(plain - set(packed)):
        if mod.endswith(("proj", "gate") + EMBEDDINGS) and groups_of(mod, named, ignore):
            raise ContractError(f"{mod}.weight: module is targeted by a quantization group but stored "
                                "unpacked (expected weight_packed / weight_scale / weight_shape)")
    modules: dict[str, ModuleContract] = {}
    for mod in packed:
        hits = groups_of(mod, named, ignore)
        if not hits:
            raise ContractError(f"{mod}.weight_packed: no quantization_config.config_groups entry targets it"
                                + (" (it is in quantization_config.ignore)" if matches(mod, ignore) else ""))
        if len(hits) > 1:
            raise ContractError(f"{mod}: matched by {len(hits)} quantization_config.config_groups {hits}, expected 1")
        group = named[hits[0]]
        w = group["weights"]
        bits = w["num_bits"]
        for suffix in ("weight_scale", "weight_shape"):
            if f"{mod}.{suffix}" not in index:
                raise ContractError(f"{mod}.{suffix}: missing tensor")
        shape = index.load(f"{mod}.weight_shape").tolist()
        if len(shape) != 2:
            raise ContractError(f"{mod}.weight_shape = {shape}: expected (N, K)")
        n, k = shape
        tname = text_module_name(mod)
        exp = want.get(tname) if want else None
        if want is not None and exp is None and tname.startswith("layers."):
            raise ContractError(f"{mod}.weight_packed: the model config (config.json) has no such module "
                                "(e.g. k/v projections of a KV-shared Gemma 4 layer)")
        if exp is not None and tuple(shape) != exp:
            raise ContractError(f"{mod}.weight_shape = {shape}: the model config (config.json) implies "
                                f"{list(exp)}")
        dt, pshape = index.header(f"{mod}.weight_packed")
        if dt != "I32" or pshape != [n, bitpack.ct_packed_width(k, bits)]:
            raise ContractError(f"{mod}.weight_packed: {dt} {pshape}, expected I32 "
                                f"{[n, bitpack.ct_packed_width(k, bits)]} for {bits}-bit weight_shape {shape}")
        sdt, sshape = index.header(f"{mod}.weight_scale")
        group_size = None
        if w.get("strategy") == "group":
            if not mod.endswith("embed_tokens_per_layer"):
                raise ContractError(f"{mod}: group-wise weight scales are supported only for "
                                    "embed_tokens_per_layer")
            group_size = w["group_size"]
            if k % group_size:
                raise ContractError(f"{mod}.weight_scale: group_size {group_size} does not divide the row width {k}")
            if sshape != [n, k // group_size]:
                raise ContractError(f"{mod}.weight_scale: shape {sshape}, expected [{n}, {k // group_size}] (one "
                                    f"scale per row and block of group_size={group_size})")
        elif sshape not in ([n, 1], [n]):
            raise ContractError(f"{mod}.weight_scale: shape {sshape}, expected [{n}, 1] (per output channel)")
        ws = index.load(f"{mod}.weight_scale").float().reshape(-1)
        bad = invalid_scale_mask(ws)
        if bad.any():
            i = int(bad.nonzero()[0])
            if not math.isfinite(float(ws[i])):
                raise ContractError(f"{mod}.weight_scale: contains NaN/inf")
            raise ContractError(f"{mod}.weight_scale[{i}] = {float(ws[i])}: must be > 0")
        common = dict(name=mod, bits=bits, strategy=w.get("strategy"), group_size=group_size, shape=(n, k),
                      weight_scale_dtype=sdt)
        if mod.endswith(EMBEDDINGS):
            if _args(group, "input_activations"):
                raise ContractError(f"{mod}: embedding group has input_activations (embeddings are weight-only)")
            role = "per_layer_embedding" if mod.endswith("embed_tokens_per_layer") else "embedding"
            modules[mod] = ModuleContract(role=role, **common)
            continue
        scales: dict[str, float] = {}
        for key, scale in (("input_activations", "input_scale"), ("output_activations", "output_scale")):
            if _args(group, key) is None:
                if key == "input_activations":
                    raise ContractError(f"{mod}: its group has no input_activations; gemma-mobile linears are "
                                        "wNa8o8 (static int8 input and output)")
                continue
            sname = f"{mod}.{scale}"
            if sname not in index:
                raise ContractError(f"{sname}: missing tensor (static {key} declared by its group)")
            scales[scale] = _scalar(index, sname, "static scales")
        modules[mod] = ModuleContract(role="linear", **common, **scales)
    contract = CheckpointContract(path=str(model_dir), layout=layout, config=hf, metadata=meta, modules=modules,
                                  kv=_read_kv(hf, meta, index))
    contract._index = index
    return contract


def _read_kv(hf: dict[str, Any], meta: MobileMetadata, index: TensorIndex) -> list[KVLayerContract]:
    text = text_config(hf)
    sharing = kv_sharing_of(text) if text.get("model_type") == "gemma4_text" else {}
    kv = meta.kv_cache
    where = "quantization_config.gemma_mobile.kv_cache"
    layer_bits = kv.layer_bits if kv is not None else []
    if kv is not None:
        n_layers = text.get("num_hidden_layers")
        if n_layers is not None and len(layer_bits) != n_layers:
            raise ContractError(f"{where}.layer_bits: {len(layer_bits)} entries for {n_layers} decoder layers")
        if "kv_sharing" in kv.model_fields_set and kv.kv_sharing != sharing:
            raise ContractError(f"{where}.kv_sharing = {kv.kv_sharing}: the model config implies {sharing}")
        quantized = any(b is not None for b in layer_bits)
        for i, b in enumerate(layer_bits):
            if i in sharing and b is not None:
                raise ContractError(f"{where}.layer_bits[{i}] = {b}: layer {i} is KV-shared (reads layer "
                                    f"{sharing[i]}'s cache); expected null")
            if i not in sharing and b is None and quantized:
                raise ContractError(f"{where}.layer_bits[{i}] = null: layer {i} owns a KV cache")
    by_text_name = {text_module_name(k): k for k in index.headers}  # `layers.i...` -> its name in this checkpoint
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in index.headers) \
        else "model."
    for i, src in sharing.items():
        for s in ("k_scale", "v_scale"):
            if (tname := by_text_name.get(f"layers.{i}.self_attn.{s}")) is not None:
                raise ContractError(f"{tname}: layer {i} is KV-shared (reads layer {src}'s cache and scales); "
                                    "it must not carry KV scales of its own")
    own: dict[int, KVLayerContract] = {}
    for i, b in enumerate(layer_bits):
        if i in sharing:
            continue
        scales: dict[str, float] = {}
        if b is not None:
            for s in ("k_scale", "v_scale"):
                tname = by_text_name.get(f"layers.{i}.self_attn.{s}")
                if tname is None:
                    raise ContractError(f"{prefix}layers.{i}.self_attn.{s}: missing ({where}.layer_bits[{i}] = {b})")
                scales[s] = _scalar(index, tname, "KV scales")
        own[i] = KVLayerContract(layer=i, source=i, bits=b, **scales)
    return [own[i] if i in own else own[sharing[i]].model_copy(update={"layer": i})
            for i in range(len(layer_bits))]


__all__ = ["CheckpointContract", "ContractError", "KVLayerContract", "ModuleContract", "TensorIndex",
           "check_quant_config", "expected_shapes", "groups_of", "kv_sharing_of", "matches", "read_contract",
           "text_config", "text_module_name"]
