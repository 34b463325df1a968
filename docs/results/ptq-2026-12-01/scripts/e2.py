import sys; sys.path.insert(0, __import__("os").path.dirname(__file__))
from harness import *
from vllm_gemma_mobile.quantize.variants import quantize_table
from kernels import bitpack
s = student()
W = teacher().get_input_embeddings().weight.detach()
def set_table(bits):
    t = s.gm_table
    if bits is None:
        t._frozen = (W.float(), torch.ones(W.shape[0], 1)); return
    d = quantize_table(W.to(torch.bfloat16), bits)
    codes = bitpack.ct_unpack(d["weight_packed"], bits, W.shape[1]).float()
    t._frozen = (codes, d["weight_scale"].float().reshape(-1, 1))
for bits in (None, 8, 4):
    set_table(bits)
    for n, q in sites(s): q.off = False
    print("table", bits, "all on", evaluate(s), flush=True)
    for n, q in sites(s): q.off = True
    print("table", bits, "acts off", evaluate(s), flush=True)
