"""`quantization_config.gemma_mobile`: the part of our checkpoint contract that compressed-tensors cannot say,
as ONE typed model parsed once (`parse_metadata`) by every reader — the vLLM plugin, the converter, the
evaluation reference and the report.

```
gemma_mobile:
  version: 1
  scheme: <preset name>
  kv_cache:
    layer_bits: [8 | 4 | null, ...]          # one per layer; null = the layer owns no cache (KV-shared)
    bits_by_layer_type: {sliding_attention: 8, full_attention: 4}
    symmetric: true
    strategy: tensor
    kv_sharing: {"<layer>": <source layer>}  # Gemma 4 KV-shared layers -> the layer whose cache they read
  lm_head:                                   # optional: static int8 SRQ of the tied lm_head (Google's answer)
    input_scale: <f32 > 0 | null>            #   logits = SRQ_out(SRQ_in(h) @ table^T); null = that side is
    output_scale: <f32 > 0 | null>           #   identity (Google's scale 0). Absent = weight-only lm_head.
```
Scales are stored as JSON numbers: an f32 widens exactly to a double and Python's shortest repr of a double
parses back to the same double, so the f32 value survives a config round trip bit for bit.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

FORMAT_VERSION = 1
KV_BITS = (4, 8)


class MetadataError(ValueError):
    """`quantization_config.gemma_mobile` is malformed; the message names the field."""


class KVCacheMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer_bits: list[Optional[int]]
    bits_by_layer_type: dict[str, int] = {}
    symmetric: bool = True
    strategy: Literal["tensor"] = "tensor"
    kv_sharing: dict[int, int] = {}

    @field_validator("layer_bits")
    @classmethod
    def _bits(cls, v: list[Optional[int]]) -> list[Optional[int]]:
        for i, b in enumerate(v):
            if b is not None and b not in KV_BITS:
                raise ValueError(f"[{i}] = {b}: expected 4, 8 or null")
        return v

    @field_validator("symmetric")
    @classmethod
    def _sym(cls, v: bool) -> bool:
        if not v:
            raise ValueError(" = false: the KV cache is symmetric (no zero point)")
        return v

    @model_validator(mode="after")
    def _sharing(self) -> "KVCacheMeta":
        n = len(self.layer_bits)
        for dst, src in self.kv_sharing.items():
            if not (0 <= dst < n and 0 <= src < n):
                raise ValueError(f".kv_sharing = {{{dst}: {src}}}: layer out of range 0..{n - 1}")
            if self.layer_bits[dst] is not None:
                raise ValueError(f".layer_bits[{dst}] = {self.layer_bits[dst]}: layer {dst} is KV-shared (reads "
                                 f"layer {src}'s cache); expected null")
            if self.layer_bits[src] is None:
                raise ValueError(f".kv_sharing = {{{dst}: {src}}}: layer {src} owns no cache (layer_bits null)")
        return self

    def bits_of(self, layer: int) -> Optional[int]:
        """KV bits used by `layer` (a KV-shared layer uses its source layer's)."""
        return self.layer_bits[self.kv_sharing.get(layer, layer)]


class LMHeadScales(BaseModel):
    """Static int8 SRQ scales of the tied lm_head; `None` = identity on that side."""

    model_config = ConfigDict(extra="forbid")

    input_scale: Optional[float] = None
    output_scale: Optional[float] = None

    @field_validator("input_scale", "output_scale")
    @classmethod
    def _pos(cls, v: Optional[float]) -> Optional[float]:
        from kernels.scales import invalid_scales  # lazy: keeps this module torch-free

        if v is not None and invalid_scales(v):
            raise ValueError(f" = {v}: a static scale must be finite and > 0 (null = no SRQ on that side)")
        return v

    @model_validator(mode="after")
    def _some(self) -> "LMHeadScales":
        if self.input_scale is None and self.output_scale is None:
            raise ValueError(": both scales null; omit `lm_head` for a weight-only lm_head")
        return self


class MobileMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    scheme: str = "custom"
    kv_cache: Optional[KVCacheMeta] = None
    lm_head: Optional[LMHeadScales] = None

    def dump(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude_none=True)
        if self.kv_cache is not None:
            d["kv_cache"]["kv_sharing"] = {str(k): v for k, v in self.kv_cache.kv_sharing.items()}
        return d

    @property
    def kv_layer_bits(self) -> list[Optional[int]]:
        return list(self.kv_cache.layer_bits) if self.kv_cache is not None else []


def parse_metadata(d: Any, where: str = "quantization_config.gemma_mobile") -> MobileMetadata:
    """Parse a `gemma_mobile` dict; MetadataError naming the first bad field."""
    if not isinstance(d, dict):
        raise MetadataError(f"{where}: missing marker (not a gemma-mobile checkpoint)")
    try:
        return MobileMetadata.model_validate(d)
    except ValidationError as e:
        err = e.errors()[0]
        loc = "".join(f".{x}" if isinstance(x, str) else f"[{x}]" for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" and msg[:1] in ("[", ".", " ", ":"):
            raise MetadataError(f"{where}{loc}{msg}") from None  # our messages continue the field path
        raise MetadataError(f"{where}{loc}: {msg} (got {err.get('input')!r})") from None


__all__ = ["FORMAT_VERSION", "KVCacheMeta", "LMHeadScales", "MetadataError", "MobileMetadata", "parse_metadata"]
