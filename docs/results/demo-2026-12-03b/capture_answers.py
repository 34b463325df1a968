"""Capture `make demo`'s answers over HTTP: serve MODEL as `gemma-mobile serve` does (127.0.0.1, free port,
compiled mode), 4 completions + 1 chat, 24 tokens, temperature 0; print JSON. Usage: python capture_answers.py MODEL"""
import json
import socket
import sys
import tempfile
import urllib.request

from vllm_gemma_mobile.vllm.serve import launch, served_model_name, stop, wait_healthy

PROMPTS = ["The capital of France is", "Once upon a time", "To be, or not to be,", "Water boils at"]


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=300))


model = sys.argv[1]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
log = tempfile.NamedTemporaryFile("w", prefix="capture_answers_server_", suffix=".log", delete=False)
proc = launch(model, port=port, log=log)
try:
    wait_healthy(proc, "127.0.0.1", port)
    name = served_model_name(model)
    out = {p: post(port, "/v1/completions", {"model": name, "prompt": p, "max_tokens": 24,
                                             "temperature": 0})["choices"][0]["text"] for p in PROMPTS}
    chat = post(port, "/v1/chat/completions", {"model": name, "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    out["chat: What is the capital of France?"] = chat["choices"][0]["message"]["content"]
finally:
    stop(proc)
    log.close()
print(json.dumps(out, indent=1, ensure_ascii=False))
