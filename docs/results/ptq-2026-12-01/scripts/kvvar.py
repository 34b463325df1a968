import json, shutil, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src = Path.home() / ".cache/vllm-gemma-mobile/gemma3-270m-mobile"
out = Path(sys.argv[1]); f4 = float(sys.argv[2]); f8 = float(sys.argv[3])
shutil.rmtree(out, ignore_errors=True); shutil.copytree(src, out)
cfg = json.loads((src / "config.json").read_text())
bits = cfg["quantization_config"]["gemma_mobile"]["kv_cache"]["layer_bits"]
t = load_file(src / "model.safetensors")
for k in list(t):
    if k.endswith(("k_scale", "v_scale")):
        layer = int(k.split(".")[2])
        t[k] = (t[k].float() * (f4 if bits[layer] == 4 else f8)).to(t[k].dtype)
save_file(t, out / "model.safetensors", metadata={"format": "pt"})
