"""Same engine, alternating: packed-kernel prefetch distance 0 vs 4 (torch.ops.gemma_mobile.packed_prefetch).
python prefetch_ab.py MODEL STREAMS[,STREAMS...] TOKENS REPS"""
import json, os, sys, time, statistics

if __name__ == "__main__":
    model, stream_list, tokens, reps = sys.argv[1], [int(v) for v in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
    from vllm_gemma_mobile.vllm.bench import cpu_env, PROMPTS
    os.environ.update(cpu_env())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    llm = LLM(model=model, max_model_len=1024, kv_cache_memory_bytes=2 * 1024**3, enable_prefix_caching=True)
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for streams in stream_list:
        prompts = (PROMPTS * 4)[:streams]
        res = {0: [], 4: []}
        outs = {}
        for rep in range(reps):
            for pd in (0, 4):
                torch.ops.gemma_mobile.packed_prefetch(pd)
                t = time.perf_counter(); o = llm.generate(prompts, sp, use_tqdm=False); dt = time.perf_counter() - t
                res[pd].append(streams * tokens / dt)
                outs[pd] = [x.outputs[0].token_ids for x in o]
        assert outs[0] == outs[4]
        print("RESULT", streams, json.dumps({pd: {"median": statistics.median(v), "max": max(v),
                                                  "all": [round(x, 1) for x in v]} for pd, v in res.items()}), flush=True)
