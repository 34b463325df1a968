import sys; sys.path.insert(0, __import__("os").path.dirname(__file__))
from harness import *
s = student()
W = teacher().get_input_embeddings().weight.detach()
s.gm_table._frozen = (W.float(), torch.ones(W.shape[0], 1))
kinds = sorted({n.split(".", 4)[-1] for n, _ in sites(s)})
print(kinds)
from vllm_gemma_mobile.evaluate.reference import kv_fake_quant_enabled
for n, q in sites(s): q.off = True
kv_fake_quant_enabled(s, False)
print("acts off, kv off", evaluate(s), flush=True)
kv_fake_quant_enabled(s, True)
# collect stats with all acts off
for n, q in sites(s): q.off = True
stats = {}
hooks = []
for n, q in sites(s):
    def h(m, args, n=n):
        x = args[0].detach().float().abs().flatten()
        stats.setdefault(n, []).append(x[torch.randperm(x.numel())[:200000]])
    hooks.append(q.register_forward_pre_hook(h))
# StaticInt8 forward is not called by QATLinear.inp (codes()) -> patch codes instead
for h in hooks: h.remove()
_c = fq.StaticInt8.codes
def rec(self, x):
    n = getattr(self, '_name', None)
    if n is None: return _c(self, x)
    v = x.detach().float().abs().flatten()
    stats.setdefault(n, []).append(v[torch.randperm(v.numel())[:100000]])
    return _c(self, x)
for n, q in sites(s): q._name = n
fq.StaticInt8.codes = rec
with torch.no_grad():
    for ids in calibration_token_ids(tok, 16, 512):
        s(torch.tensor([ids]))
fq.StaticInt8.codes = _c
torch.save({n: torch.cat(v) for n, v in stats.items()}, "/tmp/exp/stats.pt")
for n, q in list(sites(s))[:12]:
    v = torch.cat(stats[n]); print(n, "scale*127", float(q.scale)*127, "max", float(v.max()), "p9999", float(torch.quantile(v[:1<<24], 0.9999)))
