"""GGUF export through llama.cpp: size, bits per weight and WikiText-2 perplexity of our q8_0 / q4_0 / q4_k_m
exports against llama.cpp's own quantize of our f16 export; greedy text of the f16/q8_0 export in llama.cpp
against our torch path; decode speed in llama.cpp against the float model in torch.

    python benchmarks/export_gguf.py runs/baseline/02-distill --teacher runs/baseline/00-teacher

Perplexity: the same token ids as ``minigiant.evaluate`` (the text tokenized by our tokenizer, EOS appended,
8 non-overlapping windows of 1024 from the start, every window on its own), scored in llama.cpp with
``logits_all``. Speed: one thread everywhere (the machine's 2 cores are shared with other jobs; llama.cpp's
spinning threads collapse beside a busy process), so only ratios measured in the same run mean anything.
Needs ``pip install minigiant[llamacpp]``. Rows are appended to benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shared_data import wikitext2_test  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "export.json"
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain what a neural network is in one sentence."]
LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def llama(path: Path, n_ctx: int = 1024, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, n_threads_batch=1, logits_all=logits_all, verbose=False)


def llama_quantize(src: Path, dst: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[kind])
    params.nthread = 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        sys.exit(f"error: llama.cpp could not quantize {src} to {kind}")


def llama_perplexity(path: Path, ids: torch.Tensor, window: int, windows: int) -> float:
    """Same windows and predictions as minigiant.evaluate.perplexity, scored by llama.cpp."""
    model = llama(path, n_ctx=window, logits_all=True)
    nll = 0.0
    for i in range(windows):
        chunk = ids[i * window : (i + 1) * window].tolist()
        model.reset()
        model.eval(chunk)
        logits = np.asarray(model.scores[: window - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(window - 1), chunk[1:]].sum()
    del model
    return math.exp(nll / (windows * (window - 1)))


def llama_greedy(model, ids: list[int], n: int, eos: int | None) -> tuple[list[int], float]:
    """Greedy continuation of ``ids`` (token ids, so both engines see the same prompt); seconds of decoding
    after the first token."""
    model.reset()
    out, start = [], None
    for token in model.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if start is None:
            start = time.perf_counter()
        out.append(int(token))
        if len(out) >= n or token == eos:
            break
    return out, time.perf_counter() - start


@torch.inference_mode()
def torch_greedy(model, ids: list[int], n: int, eos: int | None) -> tuple[list[int], float]:
    """Greedy decoding with a KV cache, token by token; seconds after the first token."""
    x = torch.tensor([ids])
    out_ = model(input_ids=x, use_cache=True)
    past, token = out_.past_key_values, int(out_.logits[0, -1].argmax())
    out, start = [token], time.perf_counter()
    while len(out) < n and token != eos:
        step = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past, token = step.past_key_values, int(step.logits[0, -1].argmax())
        out.append(token)
    return out, time.perf_counter() - start


def greedy_check(model, tokenizer, gguf_paths: dict[str, Path], n: int) -> list[dict]:
    from minigiant.generate import prompt_ids

    rows = []
    eos = tokenizer.eos_token_id
    for kind, path in gguf_paths.items():
        engine = llama(path, n_ctx=512)
        same = 0
        for prompt in PROMPTS:
            ids = prompt_ids(tokenizer, prompt)[0].tolist()
            ours, _ = torch_greedy(model, ids, n, eos)
            theirs, _ = llama_greedy(engine, ids, n, eos)
            same += ours == theirs
            if ours != theirs:
                print(f"  {kind}: differs on {prompt!r}:\n    torch: {tokenizer.decode(ours)!r}\n    llama: {tokenizer.decode(theirs)!r}")
        del engine
        rows.append({"check": "greedy", "type": kind, "prompts": len(PROMPTS), "identical": same, "tokens": n})
        print(f"greedy {kind}: {same}/{len(PROMPTS)} prompts give the same {n} tokens in llama.cpp and torch")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student", help="float model directory (e.g. runs/baseline/02-distill)")
    parser.add_argument("--teacher", help="float model for the greedy-text check (e.g. runs/baseline/00-teacher)")
    parser.add_argument("--work", default="runs/export-bench", help="where the GGUF files go")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from minigiant.data.text import load_documents, tokenize_documents
    from minigiant.evaluate.perplexity import perplexity
    from minigiant.export import ExportConfig, export
    from minigiant.generate import prompt_ids
    from minigiant.models.loading import load

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    if args.teacher:
        teacher, tok = load(args.teacher)
        paths = {}
        for kind in ("f16", "q8_0"):
            paths[kind] = work / f"teacher-{kind}.gguf"
            export(teacher, tok, paths[kind], ExportConfig(type=kind, modelfile=False))
        rows += [dict(r, model=args.teacher) for r in greedy_check(teacher, tok, paths, 32)]
        del teacher

    model, tokenizer = load(args.student)
    ids = tokenize_documents(tokenizer, load_documents(str(wikitext2_test())), max_tokens=args.window * args.windows + 1)
    float_ppl = perplexity(model, ids, args.window, args.windows)["ppl"]
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows.append({"engine": "torch", "format": "float32 (ours)", "bytes": float_bytes, "bits_per_weight": 32.0, "ppl": round(float_ppl, 3)})
    print(f"torch float32: ppl {float_ppl:.3f}")

    ggufs = {}
    for kind in ("f16", "q8_0", "q4_0", "q4_k_m"):
        path = work / f"student-{kind}.gguf"
        start = time.perf_counter()
        report = export(model, tokenizer, path, ExportConfig(type=kind, modelfile=kind == "q4_k_m"))
        ggufs[f"ours {kind}"] = (path, report["bits_per_weight"], round(time.perf_counter() - start, 1))
    for kind in ("q8_0", "q4_0", "q4_k_m"):
        path = work / f"student-llamacpp-{kind}.gguf"
        start = time.perf_counter()
        llama_quantize(ggufs["ours f16"][0], path, kind)
        from gguf import GGUFReader

        reader = GGUFReader(path)
        bpw = 8 * sum(int(t.n_bytes) for t in reader.tensors) / sum(int(t.n_elements) for t in reader.tensors)
        ggufs[f"llama.cpp {kind}"] = (path, round(bpw, 4), round(time.perf_counter() - start, 1))

    for name, (path, bpw, seconds) in ggufs.items():
        ppl = llama_perplexity(path, ids, args.window, args.windows)
        row = {"engine": "llama.cpp", "format": name, "bytes": path.stat().st_size, "bits_per_weight": bpw, "ppl": round(ppl, 3),
               "ppl_change": round(ppl - float_ppl, 3), "quantize_seconds": seconds}
        rows.append(row)
        print(f"{name:18s} {path.stat().st_size / 2**20:7.1f} MiB  {bpw:6.3f} bpw  ppl {ppl:.3f} ({ppl - float_ppl:+.3f})")

    # decode speed, one thread, same prompt and number of tokens; none stops early at EOS
    prompt = prompt_ids(tokenizer, PROMPTS[1])[0].tolist()
    _, seconds = torch_greedy(model, prompt, args.decode_tokens, None)
    torch_tps = (args.decode_tokens - 1) / seconds
    rows.append({"engine": "torch", "format": "float32 (ours)", "decode_tok_s": round(torch_tps, 2), "threads": 1})
    print(f"decode torch float32: {torch_tps:.1f} tok/s")
    for name in ("ours f16", "ours q8_0", "ours q4_0", "ours q4_k_m", "llama.cpp q4_k_m"):
        engine = llama(ggufs[name][0], n_ctx=512)
        llama_greedy(engine, prompt, 4, None)  # warm up
        out, seconds = llama_greedy(engine, prompt, args.decode_tokens, None)
        tps = (len(out) - 1) / seconds
        del engine
        rows.append({"engine": "llama.cpp", "format": name, "decode_tok_s": round(tps, 2), "threads": 1, "vs_torch_float": round(tps / torch_tps, 2)})
        print(f"decode {name}: {tps:.1f} tok/s ({tps / torch_tps:.2f}x torch float32)")

    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    for row in rows:
        row.setdefault("model", args.student)
        row["time"] = stamp
        row["note"] = "1 thread; CPU shared with other jobs: timings are ratios within this run only"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(existing + rows, indent=1) + "\n")
    print(f"wrote {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
