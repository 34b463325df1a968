"""Synthetic gemma-mobile checkpoints (docs/checkpoint-format.md) written without llmcompressor, plus a small
contract-exact fake-quant reference, for the vLLM plugin tests.

`write_mobile_checkpoint(base, out, ...)` quantizes a bf16 Gemma 3 directory: weights symmetric per channel
(`scale = absmax / ((qmax - qmin) / 2)`, `q = clamp(round(w / scale))`), static int8 input/output scales from
a calibration forward pass (`absmax / 127`), KV scales from k/v projections, tied 2-bit embedding, and the
`gemma_mobile` marker. `corrupt=` variants produce the bad inputs of the validation tests.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

def checkpoint_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (all safetensors shards), by name."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


GOOGLE_TOWERS = ("model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio")


def google_multimodal(text_dir: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """Google's `Gemma4ForConditionalGeneration` wrapper of the Google-layout Gemma 4 TEXT checkpoint `text_dir`.

    The text part is `text_dir`'s tensors, byte for byte, under the nested names (`model.X` ->
    `model.language_model.X`; `lm_head` stays); the tiny random vision / audio towers and their embedders
    (`models.tiny.tiny_gemma4_multimodal_config`) are stored in float, and `quantization_config` is `text_dir`'s
    with every pattern re-anchored at `model.language_model.` and the towers in `modules_to_not_convert` (as
    prefixes: transformers' `should_convert_module` skips everything below them)."""
    from safetensors.torch import save_file
    from transformers import Gemma4ForConditionalGeneration

    from vllm_gemma_mobile.models.tiny import tiny_gemma4_multimodal_config

    text_dir, out = Path(text_dir), Path(out)
    cfg = json.loads((text_dir / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    if qc.get("quant_method") != "gemma":
        raise ValueError(f"{text_dir}: not a Google-layout (quant_method 'gemma') checkpoint")
    mm = tiny_gemma4_multimodal_config(cfg)
    torch.manual_seed(seed)
    towers = {k: v for k, v in Gemma4ForConditionalGeneration(mm).to(torch.bfloat16).state_dict().items()
              if k.startswith(tuple(t + "." for t in GOOGLE_TOWERS))}

    def nest(pattern: str) -> str:
        if pattern.startswith(r"^model\."):
            return r"^model\.language_model\." + pattern[len(r"^model\."):]
        if pattern.startswith(r"^lm_head"):
            return pattern
        raise ValueError(f"{text_dir}: pattern {pattern!r} is not anchored at a module name of the text model")

    qc["module_quant_configs"] = {nest(p): v for p, v in (qc.get("module_quant_configs") or {}).items()}
    qc["modules_to_not_convert"] = [nest(p) for p in qc.get("modules_to_not_convert") or []] + list(GOOGLE_TOWERS)
    text = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
            for k, v in checkpoint_tensors(text_dir).items()}
    config = {**mm.to_dict(), "architectures": ["Gemma4ForConditionalGeneration"], "dtype": "bfloat16",
              "quantization_config": qc}
    out.mkdir(parents=True, exist_ok=True)
    for f in text_dir.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model.safetensors"):
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in sorted({**text, **towers}.items())}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


LINEAR_RE = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
QMAX = {2: 1, 4: 7, 8: 127}


def default_bits(name: str) -> int:
    """Mixed map used by the tests: attention 4-bit (even layers) / 8-bit (odd), MLP 2-bit in layers 1 and 3, else 4-bit."""
    m = re.search(r"layers\.(\d+)\.", name)
    i = int(m.group(1)) if m else 0
    if "self_attn" in name:
        return 4 if i % 2 == 0 else 8
    return 2 if i in (1, 3) else 4


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmax, qmin = QMAX[bits], -QMAX[bits] - 1
    scale = w.float().abs().amax(dim=1, keepdim=True) / ((qmax - qmin) / 2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w.float() / scale), qmin, qmax).to(torch.int8)
    return q, scale


@torch.no_grad()
def calibrate(model, input_ids: torch.Tensor) -> dict[str, tuple[float, float]]:
    """absmax of input and output of every targeted linear over one forward pass."""
    stats: dict[str, list[float]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and LINEAR_RE.search(name):
            def hook(m, inp, out, name=name):
                s = stats.setdefault(name, [0.0, 0.0])
                s[0] = max(s[0], float(inp[0].float().abs().max()))
                s[1] = max(s[1], float(out.float().abs().max()))
            hooks.append(mod.register_forward_hook(hook))
    model(input_ids=input_ids)
    for h in hooks:
        h.remove()
    return {k: (v[0] / 127.0, v[1] / 127.0) for k, v in stats.items()}


def write_mobile_checkpoint(base: str | Path, out: str | Path, *, bits: Callable[[str], int] = default_bits,
                            embed_bits: int = 2, seed: int = 0, shard_scale_jitter: bool = True,
                            scale_dtype: torch.dtype = torch.float32, kv: bool = True,
                            corrupt: dict[str, Any] | None = None) -> Path:
    """Write a gemma-mobile checkpoint of the bf16 Gemma 3 model in `base` to `out`.

    shard_scale_jitter: give k_proj/up_proj input scales and v_proj/gate_proj output scales that differ from
    their fused siblings (exercises per-shard scales in qkv_proj / gate_up_proj).
    corrupt: {"config": fn(cfg)->None} and/or {"tensors": fn(dict)->None} applied before saving.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base, out = Path(base), Path(out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(cfg.vocab_size, 20000), (2, 48), generator=g)
    ids[:, 0] = cfg.bos_token_id or 2
    act = calibrate(model, ids)
    sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[int, list[str]] = {}
    for name, t in sd.items():
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        if name == "lm_head.weight":
            continue  # tied
        if mod is not None and mod in act:
            b = bits(mod)
            groups.setdefault(b, []).append(mod)
            q, s = quantize_weight(t, b)
            tensors[f"{mod}.weight_packed"] = pack_to_int32(q, b)
            tensors[f"{mod}.weight_scale"] = s.to(scale_dtype)
            tensors[f"{mod}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            sx, sy = act[mod]
            if shard_scale_jitter and mod.endswith(("k_proj", "up_proj")):
                sx *= 1.37
            if shard_scale_jitter and mod.endswith(("v_proj", "gate_proj")):
                sy *= 0.71
            tensors[f"{mod}.input_scale"] = torch.tensor([sx], dtype=torch.float32)
            tensors[f"{mod}.output_scale"] = torch.tensor([sy], dtype=torch.float32)
        elif name.endswith("embed_tokens.weight"):
            q, s = quantize_weight(t, embed_bits)
            mod = name[: -len(".weight")]
            tensors[f"{mod}.weight_packed"] = pack_to_int32(q, embed_bits)
            tensors[f"{mod}.weight_scale"] = s.to(scale_dtype)
            tensors[f"{mod}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        else:
            tensors[name] = t.contiguous()
    layer_types = list(cfg.layer_types)
    layer_bits = [4 if lt == "full_attention" else 8 for lt in layer_types] if kv else None
    if kv:
        for i, b in enumerate(layer_bits):
            for kind in ("k", "v"):
                absmax = act[f"model.layers.{i}.self_attn.{kind}_proj"][1] * 127.0
                tensors[f"model.layers.{i}.self_attn.{kind}_scale"] = torch.tensor(
                    [absmax / QMAX[b]], dtype=torch.float32)
    act_args = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    config_groups: dict[str, Any] = {}
    for b, mods in sorted(groups.items()):
        config_groups[f"w{b}a8o8"] = {
            "targets": [f"re:^{re.escape(m)}$" for m in mods],
            "weights": {"num_bits": b, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": dict(act_args), "output_activations": dict(act_args),
            "format": "pack-quantized"}
    config_groups[f"embed_w{embed_bits}"] = {
        "targets": ["re:.*embed_tokens$"],
        "weights": {"num_bits": embed_bits, "type": "int", "symmetric": True, "strategy": "channel",
                    "dynamic": False},
        "format": "pack-quantized"}
    qcfg = {
        "quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": ["lm_head"], "kv_cache_scheme": None,
        "gemma_mobile": {"version": 1, "kv_cache": {
            "layer_bits": layer_bits,
            "bits_by_layer_type": {"sliding_attention": 8, "full_attention": 4} if kv else None}},
    }
    corrupt = corrupt or {}
    if "tensors" in corrupt:
        corrupt["tensors"](tensors)
    if "config" in corrupt:
        corrupt["config"](qcfg)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((base / "config.json").read_text())
    hf["quantization_config"] = qcfg
    hf["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    for f in base.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out


# ------------------------------------------------------------------ contract-exact fake-quant reference

class FQLinear(torch.nn.Module):
    """Contract numerics in exact arithmetic: int8 x, int products, f32 epilogue, int8 output requant."""

    def __init__(self, q: torch.Tensor, ws: torch.Tensor, sx: float, sy: float | None):
        super().__init__()
        self.register_buffer("q", q.to(torch.float64))
        self.register_buffer("ws", ws.reshape(-1).to(torch.float32))
        self.sx, self.sy = torch.tensor(sx, dtype=torch.float32), None if sy is None else torch.tensor(sy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = torch.clamp(torch.round(x.float() / self.sx), -128, 127)
        acc = (xq.double() @ self.q.t()).float()  # exact integers
        y = acc * (self.sx * self.ws)
        if self.sy is not None:
            y = torch.clamp(torch.round(y / self.sy), -128, 127) * self.sy
        return y.to(x.dtype)


def fake_quant_reference(ckpt: str | Path):
    """HF Gemma 3 model whose quantized linears / embedding follow the contract exactly (KV unquantized); a tied
    lm_head with `gemma_mobile.lm_head` scales is the same exact int8 linear over the table's codes."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vllm_gemma_mobile.vllm.cpu_ops import unpack_codes

    ckpt = Path(ckpt)
    cfg = AutoConfig.from_pretrained(ckpt)
    qcfg = cfg.quantization_config
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    t = load_file(str(ckpt / "model.safetensors"))
    bits_of: dict[str, int] = {}
    for gname, grp in qcfg["config_groups"].items():
        for mod in {k.rsplit(".", 1)[0] for k in t if k.endswith(".weight_packed")}:
            if mod not in bits_of and any(re.match(x[3:], mod) if x.startswith("re:") else x == mod
                                          for x in grp["targets"]):
                bits_of[mod] = grp["weights"]["num_bits"]
    plain = {k: v for k, v in t.items() if not k.rsplit(".", 1)[-1] in
             ("weight_packed", "weight_scale", "weight_shape", "input_scale", "output_scale", "k_scale", "v_scale")}
    missing, _ = model.load_state_dict(plain, strict=False)
    for mod, b in bits_of.items():
        n, k = t[f"{mod}.weight_shape"].tolist()
        q = unpack_codes(t[f"{mod}.weight_packed"], b, k)
        ws = t[f"{mod}.weight_scale"].float()
        if mod.endswith("embed_tokens"):
            emb = model.get_submodule(mod)
            emb.weight.data.copy_((q.float() * ws).to(torch.bfloat16))
            continue
        parent, child = mod.rsplit(".", 1)
        sy = t.get(f"{mod}.output_scale")
        setattr(model.get_submodule(parent), child,
                FQLinear(q, ws, float(t[f"{mod}.input_scale"]), None if sy is None else float(sy)))
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    head = (qcfg.get("gemma_mobile") or {}).get("lm_head")
    if head is not None:
        emb = "model.embed_tokens"
        n, k = t[f"{emb}.weight_shape"].tolist()
        assert head.get("input_scale") is not None, "lm_head SRQ without an input scale: not covered here"
        model.lm_head = FQLinear(unpack_codes(t[f"{emb}.weight_packed"], bits_of[emb], k),
                                 t[f"{emb}.weight_scale"].float(), head["input_scale"], head.get("output_scale"))
    tok = AutoTokenizer.from_pretrained(ckpt) if (ckpt / "tokenizer.json").exists() else None
    return model, tok


@torch.no_grad()
@torch.no_grad()
def teacher_forced(model, seqs: list[list[int]]) -> list[list[float]]:
    """log p(seq[i] | seq[:i]) for i >= 1, per sequence (f32 log-softmax of the model's logits)."""
    out = []
    for seq in seqs:
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        out.append([float(lp[i - 1, seq[i]]) for i in range(1, len(seq))])
    return out


def greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(prompt_ids):].tolist()


def _bf16_ulp(v: float) -> float:
    import math

    return 2.0 ** (math.floor(math.log2(max(abs(v), 1e-30))) - 7)


@torch.no_grad()
def compare_greedy(model, cases: list[tuple[list[int], list[int], list[float]]], max_lp_diff: float,
                   max_ties: int | None = None) -> dict:
    """Check vLLM greedy outputs `cases` = [(prompt_ids, tokens, logprobs_of_tokens)] against a HF reference.

    Teacher-forced on vLLM's tokens, the reference's argmax must equal vLLM's token at every step, except at
    bf16 near-ties: reference logits of both tokens within 2 bf16 ulps (logits are bf16 on both sides: 0.125 to
    0.25 at |logit| 16-64). Chosen-token log-probs must agree within `max_lp_diff` nats. At most `max_ties`
    (default: one per prompt) tie flips in total."""
    ties, worst, first_diff = 0, 0.0, []
    for prompt, got, lps in cases:
        ids = torch.tensor([list(prompt) + list(got)])
        logits = model(ids).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        n = len(prompt)
        for step, tok in enumerate(got):
            row = logits[n - 1 + step]
            ref = int(row.argmax())
            if ref != tok:
                margin = float(row[ref] - row[tok])
                assert margin <= 2 * _bf16_ulp(float(row[ref])), (
                    f"prompt {prompt[:8]}... step {step}: vLLM {tok} vs reference {ref}, margin {margin:.3f}")
                ties += 1
                first_diff.append(step)
            worst = max(worst, abs(lps[step] - float(lp[n - 1 + step, tok])))
    assert worst < max_lp_diff, f"max |logprob diff| {worst:.3f} >= {max_lp_diff}"
    limit = len(cases) if max_ties is None else max_ties
    assert ties <= limit, f"{ties} near-tie flips in {len(cases)} prompts"
    return {"ties": ties, "tie_steps": first_diff, "max_logprob_diff": round(worst, 4)}


# ------------------------------------------------------------------ `gemma-mobile serve` / `vllm serve` in tests

def post(url: str, body: dict, stream: bool = False, timeout: float = 600):
    """POST JSON; with `stream`, the list of SSE `data:` chunks (without [DONE])."""
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        if not stream:
            return json.loads(r.read())
        chunks = []
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
        return chunks


def group_alive(pgid: int) -> bool:
    import os

    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@contextmanager
def served(model: str | Path, log_path: Path, max_model_len: int, health_timeout: float = 900,
           command: str = "gemma-mobile", extra_args: tuple[str, ...] = ()):
    """Serve MODEL on a free 127.0.0.1 port (own process group), wait for /health, yield (process, base URL);
    always stopped afterwards: SIGINT to the front process if still running, then SIGKILL to the group.

    command: "gemma-mobile" runs `gemma-mobile serve MODEL` (python -m vllm_gemma_mobile.cli); "vllm" runs
    vLLM's own `vllm serve MODEL` console script from this interpreter's bin directory (vLLM's defaults)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [str(model), "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
              "--max-model-len", str(max_model_len), *extra_args]
    if command == "gemma-mobile":
        argv = [sys.executable, "-m", "vllm_gemma_mobile.cli", "serve", *common]
    elif command == "vllm":
        argv = [str(Path(sys.executable).parent / "vllm"), "serve", *common]
    else:
        raise ValueError(f"command must be 'gemma-mobile' or 'vllm', not {command!r}")
    log = open(log_path, "w")
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    except BaseException:
        log.close()
        raise
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, Path(log_path).read_text()[-4000:]
            if time.monotonic() - t0 > health_timeout:  # a hang guard for CI, not a speed check
                raise TimeoutError(f"server not healthy after {health_timeout} s: {Path(log_path).read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


def kv_chunk_steps(chunks: list[list[int]], tables, block_size: int, q: list, k: list, v: list):
    """Mixed batches of a paged-KV test: at step i every request r with a chunk left processes its next
    `chunks[r][i]` tokens. Yields (reqs, q, k, v, slot_mapping, query_start_loc, seq_lens, spans): the batch's
    concatenated rows, vLLM-style metadata (slots through `tables`, `block_size`-token blocks) and, per request
    in the batch, its (first, end) positions."""
    import torch

    done = [0] * len(chunks)
    for step in range(max(len(c) for c in chunks)):
        reqs = [r for r in range(len(chunks)) if step < len(chunks[r])]
        qs, ks, vs, slots, qsl, seq, spans = [], [], [], [], [0], [], []
        for r in reqs:
            a, b = done[r], done[r] + chunks[r][step]
            qs.append(q[r][a:b]); ks.append(k[r][a:b]); vs.append(v[r][a:b])
            pos = torch.arange(a, b)
            slots.append(tables[r, pos // block_size] * block_size + pos % block_size)
            qsl.append(qsl[-1] + b - a); seq.append(b); spans.append((a, b))
            done[r] = b
        yield (reqs, torch.cat(qs), torch.cat(ks), torch.cat(vs), torch.cat(slots), torch.tensor(qsl),
               torch.tensor(seq), spans)
