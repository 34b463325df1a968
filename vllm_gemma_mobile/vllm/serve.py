"""`gemma-mobile serve MODEL`: `vllm serve` semantics on 127.0.0.1 with CPU-friendly defaults.

Runs `python -m vllm.entrypoints.openai.api_server` (the server module behind `vllm serve`) in its own process
group; the plugin is picked up through the `vllm.general_plugins` entry point, so mobile checkpoints need no
`--quantization` flag. Defaults (each overridable by `extra_args` or the environment): the served model name
is the checkpoint directory's name (`gemma3-270m-mobile`, not its full path; `--served-model-name` wins), both
cores compute (VLLM_CPU_OMP_THREADS_BIND=0-<n-1>, VLLM_CPU_NUM_OF_RESERVED_CPU=0), VLLM_CPU_KVCACHE_SPACE=2 GiB,
`--max-model-len 2048`, spawned workers, and a minimal Gemma chat template when the tokenizer has none (base
models). Waits for /health, prints a curl and an OpenAI-client example using the served name, forwards
SIGINT/SIGTERM to the server's process group and reaps it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from vllm_gemma_mobile.vllm.bench import cpu_env

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (m['content'] if m['content'] is string else "
    "m['content'] | map(attribute='text') | join('')) | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def has_chat_template(model: str) -> bool:
    d = Path(model)
    if (d / "chat_template.jinja").exists() or (d / "chat_template.json").exists():
        return True
    tc = d / "tokenizer_config.json"
    return tc.exists() and bool(json.loads(tc.read_text()).get("chat_template"))


def _flag(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def served_model_name(model: str, extra_args: list[str] = ()) -> str:
    """The name clients put in `"model"`: the first `--served-model-name` if given, else the checkpoint
    directory's name for a local directory, else `model` itself (a hub id, as vLLM does)."""
    extra = list(extra_args)
    for i, a in enumerate(extra):
        if a.startswith("--served-model-name="):
            return a.split("=", 1)[1]
        if a == "--served-model-name" and i + 1 < len(extra) and not extra[i + 1].startswith("-"):
            return extra[i + 1]
    return Path(model).resolve().name if Path(model).is_dir() else model


def server_command(model: str, extra_args: list[str], host: str, port: int) -> list[str]:
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", host, "--port", str(port)]
    extra = list(extra_args)
    if not _flag(extra, "--served-model-name") and Path(model).is_dir():
        extra += ["--served-model-name", served_model_name(model)]
    if not _flag(extra, "--max-model-len"):
        extra += ["--max-model-len", "2048"]
    if not _flag(extra, "--chat-template") and Path(model).is_dir() and not has_chat_template(model):
        f = Path(tempfile.gettempdir()) / "gemma_mobile_chat_template.jinja"
        f.write_text(GEMMA_CHAT_TEMPLATE)
        extra += ["--chat-template", str(f)]
    return args + extra


def launch(model: str, extra_args: list[str] = (), host: str = "127.0.0.1", port: int = 8000,
           env: dict[str, str] | None = None, log: object = None) -> subprocess.Popen:
    """Start the API server in a new process group; returns immediately."""
    e = cpu_env(env)
    e.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    return subprocess.Popen(server_command(model, list(extra_args), host, port), env=e,
                            start_new_session=True, stdout=log, stderr=subprocess.STDOUT if log else None)


def wait_healthy(proc: subprocess.Popen, host: str, port: int, timeout: float = 900) -> None:
    url = f"http://{host}:{port}/health"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with code {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30) -> int:
    """Signal the server's process group, wait, escalate to SIGKILL; returns the exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    try:  # reap stragglers of the group (engine core / workers) if any survived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def usage_text(model: str, host: str, port: int, path: str | None = None) -> str:
    """Examples for clients; `model` is the served model name, `path` the checkpoint it was loaded from."""
    base = f"http://{host}:{port}/v1"
    source = f" ({path})" if path and path != model else ""
    return f"""
gemma-mobile: serving {model}{source} at {base}  (Ctrl-C to stop)

  curl {base}/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="EMPTY")
  r = client.chat.completions.create(model="{model}", max_tokens=32,
                                     messages=[{{"role": "user", "content": "Hello!"}}])
  print(r.choices[0].message.content)
"""


def serve(model: str, extra_args: list[str], host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve `model` until Ctrl-C / SIGTERM; returns the server's exit code (0 on a clean stop)."""
    proc = launch(model, extra_args, host, port)
    stopping = {"sig": None}

    def forward(signum, _frame):
        stopping["sig"] = signum
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            wait_healthy(proc, host, port)
        except (RuntimeError, TimeoutError) as e:
            if stopping["sig"] is not None:
                stop(proc)
                return 0
            print(f"gemma-mobile: {e}", file=sys.stderr)
            return stop(proc) or 1
        print(usage_text(served_model_name(model, extra_args), host, port, path=model), flush=True)
        while proc.poll() is None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        rc = stop(proc)
        return 0 if stopping["sig"] is not None else rc
    finally:
        if proc.poll() is None:
            stop(proc)
        for s, h in old.items():
            signal.signal(s, h)
