import sys, torch
from vllm_gemma_mobile.evaluate.reference import load_reference
m, tok = load_reference(sys.argv[1])
for p in ["The capital of France is", "Once upon a time", "To be, or not to be,", "Water boils at"]:
    ids = tok(p, return_tensors="pt").input_ids
    out = m.generate(ids, max_new_tokens=24, do_sample=False)
    print(repr(p), "->", repr(tok.decode(out[0, ids.shape[1]:])), flush=True)
