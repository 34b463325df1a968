import math, os, sys, time, torch, logging
from pathlib import Path
from vllm_gemma_mobile.qat.train import build_student, QATOptions
from vllm_gemma_mobile.qat import fakequant as fq
from vllm_gemma_mobile.quantize.run import calibration_token_ids
from vllm_gemma_mobile.evaluate.quality import make_windows, _resolve_text
from transformers import AutoModelForCausalLM, AutoTokenizer
C = Path.home() / ".cache/vllm-gemma-mobile"
BASE, MOBILE = C / "gemma3-270m-bf16", C / "gemma3-270m-mobile"
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(BASE)

# StaticInt8 switch: .off -> identity (x / s * s without rounding/clamp)
_orig_codes = fq.StaticInt8.codes
def _codes(self, x):
    if getattr(self, "off", False):
        s = self.scale
        return x.float() / s, s
    return _orig_codes(self, x)
fq.StaticInt8.codes = _codes

def windows(n_tokens=1024):
    body, _ = _resolve_text(None)
    ids = tok(body[: n_tokens * 16 + 1024], add_special_tokens=False).input_ids
    return make_windows(ids, tok.bos_token_id, n_tokens, 512)

_teacher = None
def teacher():
    global _teacher
    if _teacher is None:
        _teacher = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    return _teacher

_tcache = {}
@torch.no_grad()
def evaluate(model, n_tokens=1024):
    ws = windows(n_tokens)
    nll = kl = 0.0; agree = n = 0
    for i, w in enumerate(ws):
        x = torch.tensor([w]); tgt = x[0, 1:]
        if (n_tokens, i) not in _tcache:
            _tcache[(n_tokens, i)] = torch.log_softmax(teacher()(x).logits[0, :-1].float(), -1)
        lr = _tcache[(n_tokens, i)]
        lm = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        nll += float(-lm.gather(1, tgt[:, None]).sum())
        kl += float((lr.exp() * (lr - lm)).sum())
        agree += int((lr.argmax(-1) == lm.argmax(-1)).sum()); n += tgt.numel()
    return {"ppl": round(math.exp(nll / n), 2), "kl": round(kl / n, 4), "agree": round(100 * agree / n, 1)}

def student(ptq=MOBILE, **kw):
    opts = QATOptions(train_table=False, **kw)
    seqs = calibration_token_ids(tok, 2, 256)
    m, _ = build_student(BASE, Path(ptq), opts, [torch.tensor(seqs)])
    return m.eval()

def sites(model):
    for n, m in model.named_modules():
        if isinstance(m, fq.QATLinear):
            yield n + ".inp", m.inp
            if m.out is not None:
                yield n + ".out", m.out
