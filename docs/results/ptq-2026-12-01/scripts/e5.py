import sys; sys.path.insert(0, __import__("os").path.dirname(__file__))
from harness import *
s = student(ptq="/tmp/exp/mobile-old")
W = teacher().get_input_embeddings().weight.detach()
t = s.gm_table
T2 = t._codes_scale()
F = (W.float(), torch.ones(W.shape[0], 1))
orig_embed = t.embed
# embed role float, head role 2-bit
def embed_float(ids):
    return W.float().index_select(0, ids.reshape(-1)).reshape(*ids.shape, -1)
t.embed = embed_float
print("embed float, head 2-bit", evaluate(s), flush=True)
t.embed = orig_embed
t._frozen = T2
orig_head = t.head
def head_float(h):
    return torch.nn.functional.linear(h.float(), W.float())
s.get_output_embeddings().forward = head_float
print("embed 2-bit, head float", evaluate(s), flush=True)
