"""QAT of a Gemma 3 or Gemma 4 mobile checkpoint: PTQ initialisation, distillation from the bf16 teacher, export in
the same compressed-tensors layout (served by the plugin unchanged): QAT's codes and scales, the lm_head scales, and
every other trained parameter (norms) in the checkpoint's dtype. Gemma 4's per-layer table is frozen at its served
rows.

    gemma-mobile qat BASE --init PTQ_DIR --out DIR [--recipe recipes/gemma3_mobile_qat.yaml] [--set KEY=VALUE]
    (Gemma 4: --recipe recipes/gemma4_mobile_qat.yaml)

Student: BASE's float model with every quantized linear of PTQ_DIR replaced by `QATLinear` (latent weights
initialised to PTQ's dequantized `q * s`, so the first forward is PTQ's model; weight, input and output scales
learned, LSQ), the tied table by `QATTable` (both roles: gathered rows and the lm_head, whose static int8 input
scale (and optionally output scale) is initialised from the observed range and learned), and the KV cache's
int8 / int4 fake quant with PTQ's static k/v scales (straight-through, scales fixed). Loss: KL(teacher || student)
of the next-token distributions, teacher = BASE in f32. Data: the calibration plays only. Deterministic for a
seed; resumable (`qat_state.pt` in DIR every `save_every` steps; rerun the same command to continue, with a larger
`time_budget_min` to extend a run its budget stopped).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_gemma_mobile.qat.fakequant import QATLinear, QATTable, kv_fake_quant_ste

logger = logging.getLogger(__name__)


@dataclass
class QATOptions:
    """Recipe options (`recipes/gemma3_mobile_qat.yaml`, `--set KEY=VALUE`)."""
    steps: int = 200
    time_budget_min: float | None = 30.0  # stop (and export) after this long; None: run all steps
    batch: int = 2
    seq_len: int = 256
    lr_weights: float = 1e-4
    lr_scales: float = 1e-2          # relative: scales are learned as multipliers of their initial value
    lr_norms: float = 1e-4
    warmup_steps: int = 10
    lm_head_scales: str = "input"     # "input" | "both" | "none": static int8 SRQ learned for the lm_head
    head_init_percentile: float = 0.9999
    temperature: float = 1.0
    seed: int = 0
    save_every: int = 25
    train_table: bool = True             # False: the table's codes/scales stay PTQ's (fake-quantized, both roles)
    eval_every: int = 10                 # KL on a fixed held-out calibration batch (monitor), every N steps
    n_sequences: int = 256               # distinct calibration sequences cycled through (tests: one batch)
    threads: int | None = None
    device: str = "auto"                 # "auto": the GPU when torch sees one, else the CPU; or "cpu", "cuda[:N]"
    head_chunk: int = 128                # tokens per lm_head + loss chunk (`distill_backward`); 0: the whole batch
                                         # (a trained table is fake-quantized once per chunk)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QATOptions":
        known = {f for f in cls.__dataclass_fields__}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown QAT option(s) {bad}; known: {sorted(known)}")
        opts = cls(**d)
        if opts.lm_head_scales not in ("input", "both", "none"):
            raise ValueError(f"lm_head_scales={opts.lm_head_scales!r}: expected input, both or none")
        if opts.steps <= 0 or opts.batch <= 0 or opts.seq_len < 8:
            raise ValueError("steps and batch must be positive, seq_len >= 8")
        if opts.head_chunk < 0:
            raise ValueError(f"head_chunk={opts.head_chunk}: expected 0 (whole batch) or a positive token count")
        opts.torch_device()  # validates `device`
        return opts

    def torch_device(self) -> torch.device:
        """The device training runs on (`device`); a GPU asked for but absent is an error, not a CPU run."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu or cuda[:N]")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r}: torch sees no CUDA device here")
        return dev


# Options a resumed run may change: they decide when to stop, save, monitor, and where and on how many threads it
# computes, not the trajectory (e.g. rerun with a larger `time_budget_min` to continue a run its budget stopped;
# another device continues the same math, equal up to that device's f32 rounding).
# `head_chunk` only regroups the f32 sums of the loss and of the lm_head's gradients (`distill_backward`).
_RESUME_FREE = frozenset({"time_budget_min", "save_every", "eval_every", "threads", "device", "head_chunk"})


def load_qat_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None) -> QATOptions:
    import yaml

    from vllm_gemma_mobile.quantize.run import _parse_value

    d: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        stage = data.get("mobile_qat_stage") or {}
        d = dict(stage.get("options") or {})
    for k, v in (overrides or {}).items():
        d[k] = _parse_value(v) if isinstance(v, str) else v
    return QATOptions.from_dict(d)


# ------------------------------------------------------------------------------------------------ student
def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@torch.no_grad()
def _head_init_scales(model, batches: list[torch.Tensor], percentile: float) -> tuple[float, float]:
    """Initial lm_head input / output scales: the `percentile` of |h| and |logits| over `batches` / 127."""
    seen: dict[str, list[torch.Tensor]] = {"h": [], "y": []}
    head = model.get_output_embeddings()

    def hook(m, args, out):
        seen["h"].append(args[0].detach().float().abs().flatten())
        seen["y"].append(out.detach().float().abs().flatten()[::97])

    hd = head.register_forward_hook(hook)
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        hd.remove()
    q = lambda t: float(torch.quantile(torch.cat(t)[: 1 << 24], percentile))  # noqa: E731
    return max(q(seen["h"]), 1e-6) / 127.0, max(q(seen["y"]), 1e-6) / 127.0


def build_student(base: Path, ptq: Path, opts: QATOptions, init_batches: list[torch.Tensor]):
    """(student, summary): BASE's f32 model with PTQ_DIR's quantized modules replaced by QAT modules."""
    from transformers import AutoModelForCausalLM

    from kernels import bitpack
    from vllm_gemma_mobile.contract import read_contract
    from vllm_gemma_mobile.evaluate.reference import (install_kv_fake_quant, kv_specs, mobile_metadata, read_config,
                                                      served_embedding_rows)

    cfg = read_config(ptq)
    if mobile_metadata(cfg) is None:
        raise ValueError(f"{ptq}: not a gemma-mobile checkpoint (quantization_config.gemma_mobile missing)")
    if not any(f in cfg.get("model_type", "") for f in ("gemma3", "gemma4")):
        raise ValueError(f"{ptq}: QAT supports Gemma 3 and Gemma 4 text checkpoints (model_type {cfg.get('model_type')!r})")
    contract = read_contract(ptq)  # bits, scales and KV of every module, validated (the plugin's reader)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    head_sx = head_sy = None
    if opts.lm_head_scales != "none":
        head_sx, head_sy = _head_init_scales(model, init_batches, opts.head_init_percentile)
        if opts.lm_head_scales == "input":
            head_sy = None
    names, frozen = [], []
    for name, mod in list(model.named_modules()):
        spec = contract.modules.get(name)
        if not isinstance(mod, torch.nn.Linear) or spec is None:
            continue
        codes = bitpack.ct_unpack(contract.load(f"{name}.weight_packed"), spec.bits, spec.shape[1])
        ws = contract.load(f"{name}.weight_scale").float().reshape(-1, 1)
        new = QATLinear(codes.float() * ws, ws, spec.bits, spec.input_scale, spec.output_scale,
                        None if mod.bias is None else mod.bias.detach())
        _set_module(model, name, new)
        names.append(name)
    emb = model.get_input_embeddings()
    ename = next(n for n, m in model.named_modules() if m is emb)
    for name, mod in model.named_modules():  # Gemma 4's per-layer table: the served rows, frozen (not trained)
        if isinstance(mod, torch.nn.Embedding) and mod is not emb and name in contract.modules:
            mod.weight.data = served_embedding_rows(contract, name).to(torch.bfloat16).float()
            mod.weight.requires_grad_(False)
            frozen.append(name)
    tspec = contract.modules.get(ename)
    if tspec is None:
        raise ValueError(f"{ptq}: the embedding table {ename} is not quantized; QAT expects the mobile table")
    tbits = tspec.bits
    tcodes = bitpack.ct_unpack(contract.load(f"{ename}.weight_packed"), tbits, tspec.shape[1])
    tscale = contract.load(f"{ename}.weight_scale").float().reshape(-1, 1)
    table = QATTable(tcodes.float() * tscale, tscale, tbits, head_sx, head_sy, trainable=opts.train_table)
    model.gm_table = table
    model.gm_table_name = ename
    scale = emb.embed_scale

    def embed_forward(input_ids, _t=table, _s=scale):
        return _t.embed(input_ids) * _s.to(torch.float32)

    emb.forward = embed_forward
    emb.weight.requires_grad_(False)
    model.get_output_embeddings().forward = table.head
    specs = kv_specs(contract)
    install_kv_fake_quant(model, specs, fake_quant=kv_fake_quant_ste)  # the reference's hook, STE gradient
    left = sorted(set(contract.modules) - set(names) - set(frozen) - {ename})
    if left:  # no silent float module: every quantized module of PTQ_DIR is trained or frozen at its served values
        raise ValueError(f"{ptq}: {left[0]} is quantized but QAT has no student module for it ({len(left)} in all)")
    summary = {"qat_linears": len(names), "frozen_tables": frozen, "table_bits": tbits, "kv_layers": len(specs),
               "lm_head_init": {"input_scale": head_sx, "output_scale": head_sy}}
    return model, summary


# ------------------------------------------------------------------------------------------------ training
def _sequences(tokenizer, opts: QATOptions, n_seqs: int) -> list[list[int]]:
    from vllm_gemma_mobile.quantize.run import calibration_token_ids

    seqs = [s for s in calibration_token_ids(tokenizer, n_seqs, opts.seq_len) if len(s) == opts.seq_len]
    if not seqs:
        raise ValueError("no calibration sequence reached seq_len tokens")
    return seqs


def _param_groups(model: torch.nn.Module, opts: QATOptions) -> list[dict]:
    scales, weights, other = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(("_rel", ".rel")):  # scale multipliers (fakequant: scale = scale0 * rel)
            scales.append(p)
        elif name.endswith((".weight", ".latent")) and p.ndim == 2:
            weights.append(p)
        else:
            other.append(p)  # norms (served as floats), biases
    return [{"params": weights, "lr": opts.lr_weights, "base_lr": opts.lr_weights, "name": "weights"},
            {"params": scales, "lr": opts.lr_scales, "base_lr": opts.lr_scales, "name": "scales"},
            {"params": other, "lr": opts.lr_norms, "base_lr": opts.lr_norms, "name": "norms"}]


def _kd_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)) * T^2 of every token (last dim: the vocabulary)."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature ** 2


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(softmax(t / T) || softmax(s / T)) * T^2."""
    return _kd_per_token(student_logits, teacher_logits, temperature).mean()


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """transformers' Gemma `final_logit_softcapping` (Gemma3/4ForCausalLM.forward), same operations."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def distill_backward(student: torch.nn.Module, ids: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                     chunk: int) -> float:
    """`kd_loss(student(ids).logits, teacher_logits, T).backward()`, returning the loss, with the lm_head and the loss
    taken `chunk` tokens at a time (0: the whole batch, i.e. exactly that line). The decoder runs once; its last
    hidden state is cut from the graph, each chunk's logits -> KL -> backward runs and is freed before the next (the
    chunk's gradients accumulate into the hidden state and the head's scales), then the decoder's backward runs from
    the accumulated gradient. Why: the student's [tokens, 262144] f32 logits and their 5-6 same-sized autograd
    temporaries (~3 GB for 2 x 256 tokens) never exist at once, so the working set fits the cache and the heap stops
    growing (`vllm_gemma_mobile.memory`). Same mathematics: the loss and every gradient are the same sums, grouped
    by chunk (f32 rounding only; tests/test_qat.py bounds it); LSQ's gradient scales use the batch's shape."""
    if chunk <= 0:
        loss = kd_loss(student(input_ids=ids).logits, teacher_logits, temperature)
        loss.backward()
        return float(loss.detach())
    h = student.model(input_ids=ids).last_hidden_state
    hd = h.detach().requires_grad_(True)
    tokens_per_seq = h.shape[1]
    flat_h, flat_t = hd.reshape(-1, h.shape[-1]), teacher_logits.reshape(-1, teacher_logits.shape[-1])
    n = flat_h.shape[0]
    table, cap = student.gm_table, student.config.get_text_config().final_logit_softcapping
    total = 0.0
    for i in range(0, n, chunk):
        logits = _softcap(table.head(flat_h[i:i + chunk], tokens_per_sample=tokens_per_seq), cap)
        part = _kd_per_token(logits, flat_t[i:i + chunk], temperature).sum() / n
        part.backward()
        total += float(part.detach())
    h.backward(hd.grad)
    return total


def run_qat(base: str | Path, init: str | Path, out: str | Path, opts: QATOptions,
            max_steps: int | None = None) -> dict[str, Any]:
    """Train, export to `out`, return a summary (also written to `out/qat.json`). `max_steps` caps this call
    (tests use it to stop early and resume)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_gemma_mobile.memory import retain_freed_memory

    base, init, out = Path(base), Path(init), Path(out)
    retain_freed_memory()  # ~4x faster steps on CPU: no page faults per freed block (vllm_gemma_mobile/memory.py)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    tok = AutoTokenizer.from_pretrained(base)
    seqs = _sequences(tok, opts, opts.n_sequences + opts.batch)
    monitor_ids = torch.tensor(seqs[-opts.batch:])  # held out from training
    seqs = seqs[:-opts.batch]
    order = list(range(len(seqs)))
    random.Random(opts.seed).shuffle(order)
    init_batches = [torch.tensor([seqs[i] for i in order[:opts.batch]])]
    dev = opts.torch_device()
    student, summary = build_student(base, init, opts, init_batches)
    teacher = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval().requires_grad_(False)
    student.to(dev)
    teacher.to(dev)
    monitor_ids = monitor_ids.to(dev)
    logger.info("QAT on %s", dev)
    groups = _param_groups(student, opts)
    optim = torch.optim.Adam(groups, betas=(0.9, 0.95))
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "qat_state.pt"
    step, losses, elapsed0, monitor = 0, [], 0.0, []
    if state_file.exists():
        st = torch.load(state_file, weights_only=False, map_location=dev)
        changed = sorted(k for k, v in asdict(opts).items() if k not in _RESUME_FREE and st["options"].get(k) != v)
        if changed:
            raise ValueError(f"{state_file} was written with other options ({', '.join(changed)}); "
                             "remove it to start over")
        student.load_state_dict(st["student"], strict=False)
        optim.load_state_dict(st["optim"])
        step, losses, elapsed0, monitor = st["step"], st["losses"], st["elapsed_s"], st["monitor"]
        logger.info("resuming QAT at step %d", step)

    def save_state():
        trainable = {k: v for k, v in student.state_dict().items()
                     if not k.endswith("embed_tokens.weight") and k != "lm_head.weight"}
        torch.save({"student": trainable, "optim": optim.state_dict(), "step": step, "losses": losses, "monitor": monitor,
                    "options": asdict(opts), "elapsed_s": elapsed0 + time.time() - t0}, state_file)

    with torch.no_grad():
        monitor_teacher = teacher(input_ids=monitor_ids).logits

    def check():
        with torch.no_grad():
            monitor.append([step, round(float(kd_loss(student(input_ids=monitor_ids).logits, monitor_teacher,
                                                      opts.temperature)), 5)])
        logger.info("QAT step %d: held-out KL %.4f", step, monitor[-1][1])

    if not monitor:
        check()
    t0 = time.time()
    stop_at = opts.steps if max_steps is None else min(opts.steps, step + max_steps)
    student.train()
    bar = tqdm(total=opts.steps, initial=step, desc="QAT", unit="step", dynamic_ncols=True)
    while step < stop_at:
        if opts.time_budget_min is not None and elapsed0 + time.time() - t0 > opts.time_budget_min * 60:
            logger.info("QAT time budget of %.1f min reached at step %d", opts.time_budget_min, step)
            break
        idx = [order[(step * opts.batch + j) % len(order)] for j in range(opts.batch)]
        ids = torch.tensor([seqs[i] for i in idx], device=dev)
        lr_mult = min(1.0, (step + 1) / max(opts.warmup_steps, 1)) * \
            0.5 * (1 + math.cos(math.pi * step / opts.steps))
        for g in optim.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        optim.zero_grad(set_to_none=True)
        loss = distill_backward(student, ids, t_logits, opts.temperature, opts.head_chunk)
        del t_logits
        optim.step()
        with torch.no_grad():  # scales must stay positive
            for pn, p in student.named_parameters():
                if pn.endswith(("_rel", ".rel")):
                    p.clamp_(min=1e-3)
        step += 1
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        if step % opts.eval_every == 0:
            check()
        if step % opts.save_every == 0:
            save_state()
    bar.close()
    if monitor[-1][0] != step:
        check()
    save_state()
    summary.update({"steps_done": step, "losses": losses, "heldout_kl": monitor, "train_s": round(elapsed0 + time.time() - t0, 1),
                    "options": asdict(opts)})
    if step >= opts.steps or max_steps is None:
        export(student.cpu(), init, out, summary)
    return summary


# ------------------------------------------------------------------------------------------------ export
@torch.no_grad()
def export(student: torch.nn.Module, init: Path, out: Path, summary: dict[str, Any]) -> Path:
    """Write the student as a mobile checkpoint: PTQ_DIR's files with the QAT codes / scales in place of PTQ's
    and `gemma_mobile.lm_head` scales; `qat.json` records the run."""
    from safetensors.torch import save_file

    from vllm_gemma_mobile.convert import load_tensors
    from vllm_gemma_mobile.metadata import parse_metadata

    t = load_tensors(init)
    for name, m in student.named_modules():
        if isinstance(m, QATLinear):
            for k, v in m.export().items():
                t[f"{name}.{k}"] = v
    table: QATTable = student.gm_table
    for k, v in table.export().items():
        t[f"{student.gm_table_name}.{k}"] = v
    qat_owned = {f"{n}." for n, m in student.named_modules() if isinstance(m, (QATLinear, QATTable))}
    for name, p in student.named_parameters():  # the rest that was trained (norms, biases): in the checkpoint's dtype
        if not p.requires_grad or name.startswith(tuple(qat_owned)):
            continue
        if name not in t:
            raise ValueError(f"QAT trained {name}, which {init} does not store: cannot export it")
        t[name] = p.detach().to(t[name].dtype)
    for f in init.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("qat_state.pt", "qat.json"):
            shutil.copy2(f, out / f.name)
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((init / "config.json").read_text())
    gm = cfg["quantization_config"]["gemma_mobile"]
    bf = lambda m: None if m is None else float(m.scale.detach().to(torch.bfloat16))  # noqa: E731
    if table.head_in is not None or table.head_out is not None:
        gm["lm_head"] = {"input_scale": bf(table.head_in), "output_scale": bf(table.head_out)}
    else:
        gm.pop("lm_head", None)
    parse_metadata(gm)  # the contract's own validation
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "qat.json").write_text(json.dumps({k: v for k, v in summary.items()}, indent=1))
    logger.info("QAT checkpoint written to %s", out)
    return out
