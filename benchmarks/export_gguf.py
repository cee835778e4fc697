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
LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M"}


THREADS = 1  # --threads: llama.cpp's threads (1 unless the machine is quiet: spinning threads collapse beside a busy process)


def llama(path: Path, n_ctx: int = 1024, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=THREADS, n_threads_batch=THREADS, logits_all=logits_all, verbose=False)


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
    from minigiant.generate import cache_keyword

    x = torch.tensor([ids])
    out_ = model(input_ids=x, use_cache=True)
    past, token = out_.past_key_values, int(out_.logits[0, -1].argmax())
    out, start = [token], time.perf_counter()
    while len(out) < n and token != eos:
        step = model(input_ids=torch.tensor([[token]]), use_cache=True, **{cache_keyword(model): past})
        past, token = step.past_key_values, int(step.logits[0, -1].argmax())
        out.append(token)
    return out, time.perf_counter() - start


def greedy_check(model, tokenizer, gguf_paths: dict[str, Path], n: int) -> list[dict]:
    """Greedy tokens of each GGUF in llama.cpp against (a) the float model in torch and (b) the same GGUF
    loaded into torch (transformers dequantizes it): (b) compares the engines on identical weights, (a) adds
    the export's rounding."""
    from minigiant.generate import prompt_ids
    from minigiant.models.loading import load

    rows = []
    eos = tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, p)[0].tolist() for p in PROMPTS]
    float_out = [torch_greedy(model, ids, n, eos)[0] for ids in prompts]
    for kind, path in gguf_paths.items():
        same_model = load(path)[0]
        # teacher-forced on the float model's answers: how often the two engines' top tokens agree, and by how much
        # the logits differ, on identical weights
        engine = llama(path, n_ctx=512, logits_all=True)
        agree = positions = 0
        max_diff = 0.0
        for ids, ours in zip(prompts, float_out):
            seq = ids + ours
            engine.reset()
            engine.eval(seq)
            theirs = np.asarray(engine.scores[: len(seq)])
            with torch.inference_mode():
                mine = same_model(input_ids=torch.tensor([seq])).logits[0].numpy()
            agree += int((theirs.argmax(-1) == mine.argmax(-1)).sum())
            positions += len(seq)
            max_diff = max(max_diff, float(np.abs(theirs - mine).max()))
        del engine
        engine = llama(path, n_ctx=512)
        same_float = same_weights = 0
        for prompt, ids, ours in zip(PROMPTS, prompts, float_out):
            theirs, _ = llama_greedy(engine, ids, n, eos)
            mirrored, _ = torch_greedy(same_model, ids, n, eos)
            same_float += ours == theirs
            same_weights += mirrored == theirs
            if ours != theirs:
                print(f"  {kind}: differs from the float model on {prompt!r}:\n    torch float: {tokenizer.decode(ours)!r}\n    llama.cpp:   {tokenizer.decode(theirs)!r}")
        del engine, same_model
        rows.append({"check": "greedy", "type": kind, "prompts": len(PROMPTS), "tokens": n,
                     "identical_to_torch_float": same_float, "identical_to_torch_same_gguf": same_weights,
                     "top1_agreement_same_gguf": round(agree / positions, 4), "positions": positions, "max_logit_diff_same_gguf": round(max_diff, 3)})
        print(f"greedy {kind}: {same_float}/{len(PROMPTS)} prompts give the float model's {n} tokens in llama.cpp; "
              f"{same_weights}/{len(PROMPTS)} those of the same GGUF run in torch; top-1 agreement {agree / positions:.4f} "
              f"over {positions} positions, max logit difference {max_diff:.3f}")
    return rows


def kquant_agreement(f16_path: Path, llama_path: Path) -> list[dict]:
    """Our k-quant packing of the very f16 weights llama.cpp quantized: fraction of identical bytes and
    values, and both reconstruction errors (llama.cpp sums floats in another order, so a few codes differ),
    for every k-quant type in ``llama_path``."""
    import gguf

    from minigiant.export.kquants import KQUANTS

    source = {t.name: t for t in gguf.GGUFReader(f16_path).tensors}
    rows = []
    for kind, pack in KQUANTS.items():
        same = values = total = 0
        err_ours = err_llama = 0.0
        for t in gguf.GGUFReader(llama_path).tensors:
            if t.tensor_type.name != kind:
                continue
            x = np.asarray(source[t.name].data).astype(np.float32)
            ours, theirs = pack(x)[0], np.asarray(t.data)
            a, b = gguf.quants.dequantize(ours, t.tensor_type), gguf.quants.dequantize(theirs, t.tensor_type)
            same += int((ours == theirs).sum())
            total += ours.size
            values += int((a == b).sum())
            err_ours += float(((a - x) ** 2).sum())
            err_llama += float(((b - x) ** 2).sum())
        if total:
            rows.append({"check": "kquant_bytes", "type": kind, "bytes_identical": round(same / total, 6),
                         "sq_error_ours_over_llama": round(err_ours / err_llama, 6)})
            print(f"{kind}: {same / total:.4%} of bytes identical to llama.cpp's; squared error ours/llama.cpp {err_ours / err_llama:.5f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("student", help="float model directory (e.g. runs/baseline/02-distill)")
    parser.add_argument("--teacher", help="float model for the greedy-text check (e.g. runs/baseline/00-teacher)")
    parser.add_argument("--work", default="runs/export-bench", help="where the GGUF files go")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--greedy-only", action="store_true", help="only the teacher's greedy-text check")
    parser.add_argument("--rounding", default="llama.cpp", choices=["search", "llama.cpp"], help="ExportConfig.rounding of our exports")
    parser.add_argument("--ours-only", action="store_true", help="only export and score our GGUFs (no llama.cpp quantize, no speed)")
    parser.add_argument("--types", default="q8_0,q4_0,q4_k_m", help="GGUF types to export and compare with llama.cpp's quantize")
    parser.add_argument("--planned", default="", help="also quantize the student with these methods (e.g. gptq,awq) onto each type's own GGUF "
                        "grids (QuantizeConfig.gguf) and export those codes unchanged")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads for perplexity and decode (1 on a shared machine)")
    parser.add_argument("--kquant-bytes", metavar="MODEL", help="only compare our k-quant bytes with llama.cpp's on MODEL's f16 export "
                        "(q3_k_m, q4_k_m, q5_k_m; use the teacher: the student's 576/704-wide rows send every k-quant to its fallback)")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
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
    types = args.types.split(",")
    if args.kquant_bytes:
        model, tok = load(args.kquant_bytes)
        f16 = work / "kquant-f16.gguf"
        export(model, tok, f16, ExportConfig(type="f16", modelfile=False))
        for kind in ("q3_k_m", "q4_k_m", "q5_k_m"):
            theirs = work / f"kquant-llamacpp-{kind}.gguf"
            llama_quantize(f16, theirs, kind)
            rows += [dict(r, mixture=kind) for r in kquant_agreement(f16, theirs)]
        _save(rows, args.kquant_bytes, stamp)
        return

    if args.teacher:
        teacher, tok = load(args.teacher)
        paths = {}
        for kind in ("f16", "q8_0"):
            paths[kind] = work / f"teacher-{kind}.gguf"
            if args.greedy_only and paths[kind].is_file():  # reuse the full run's export
                continue
            export(teacher, tok, paths[kind], ExportConfig(type=kind, modelfile=False))
        rows += [dict(r, model=args.teacher) for r in greedy_check(teacher, tok, paths, 32)]
        del teacher

    if args.greedy_only:
        _save(rows, args.student, stamp)
        return
    model, tokenizer = load(args.student)
    ids = tokenize_documents(tokenizer, load_documents(str(wikitext2_test())), max_tokens=args.window * args.windows + 1)
    float_ppl = perplexity(model, ids, args.window, args.windows)["ppl"]
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows.append({"engine": "torch", "format": "float32 (ours)", "bytes": float_bytes, "bits_per_weight": 32.0, "ppl": round(float_ppl, 3)})
    print(f"torch float32: ppl {float_ppl:.3f}")

    ggufs = {}
    for kind in types if args.ours_only else ["f16", *types]:
        path = work / f"student-{kind}-{args.rounding}.gguf"
        start = time.perf_counter()
        report = export(model, tokenizer, path, ExportConfig(type=kind, rounding=args.rounding, modelfile=kind == types[-1]))
        label = f"ours {kind}" if kind == "f16" else f"ours {kind} ({args.rounding} rounding)"
        ggufs[label] = (path, report["bits_per_weight"], round(time.perf_counter() - start, 1))
    for method in [m for m in args.planned.split(",") if m]:
        import copy

        from minigiant.context import Context
        from minigiant.quantize import QuantizeConfig, quantize

        for kind in types:
            start = time.perf_counter()
            torch.set_num_threads(os.cpu_count() or 1)  # calibration is the slow part; the machine is ours here
            planned = quantize(copy.deepcopy(model), QuantizeConfig(method=method, gguf=kind, ppl_text=None), Context(tokenizer=tokenizer))
            torch.set_num_threads(1)
            path = work / f"student-{method}-{kind}.gguf"
            report = export(planned, tokenizer, path, ExportConfig(type=kind, modelfile=False))
            assert not report["rerounded_tensors"], report["rerounded_tensors"]
            ggufs[f"ours {kind} ({method} on its GGUF grids)"] = (path, report["bits_per_weight"], round(time.perf_counter() - start, 1))
            del planned
    for kind in types if not args.ours_only else ():
        path = work / f"student-llamacpp-{kind}.gguf"
        start = time.perf_counter()
        llama_quantize(ggufs["ours f16"][0], path, kind)
        from gguf import GGUFReader

        reader = GGUFReader(path)
        bpw = 8 * sum(int(t.n_bytes) for t in reader.tensors) / sum(int(t.n_elements) for t in reader.tensors)
        ggufs[f"llama.cpp {kind}"] = (path, round(bpw, 4), round(time.perf_counter() - start, 1))

    for kind in types if not args.ours_only else ():
        rows += [dict(r, mixture=kind) for r in kquant_agreement(ggufs["ours f16"][0], ggufs[f"llama.cpp {kind}"][0])]
    for name, (path, bpw, seconds) in ggufs.items():
        ppl = llama_perplexity(path, ids, args.window, args.windows)
        row = {"engine": "llama.cpp", "format": name, "bytes": path.stat().st_size, "bits_per_weight": bpw, "ppl": round(ppl, 3),
               "ppl_change": round(ppl - float_ppl, 3), "quantize_seconds": seconds}
        rows.append(row)
        print(f"{name:18s} {path.stat().st_size / 2**20:7.1f} MiB  {bpw:6.3f} bpw  ppl {ppl:.3f} ({ppl - float_ppl:+.3f})")

    if args.ours_only:
        _save(rows, args.student, stamp)
        return
    # decode speed, THREADS threads in both engines, same prompt and number of tokens; none stops early at EOS
    prompt = prompt_ids(tokenizer, PROMPTS[1])[0].tolist()
    torch.set_num_threads(THREADS)
    _, seconds = torch_greedy(model, prompt, args.decode_tokens, None)
    torch_tps = (args.decode_tokens - 1) / seconds
    rows.append({"engine": "torch", "format": "float32 (ours)", "decode_tok_s": round(torch_tps, 2), "threads": 1})
    print(f"decode torch float32: {torch_tps:.1f} tok/s")
    for name in [n for n in ggufs if n.startswith("ours")] + [n for n in ggufs if n.startswith("llama.cpp")]:
        engine = llama(ggufs[name][0], n_ctx=512)
        llama_greedy(engine, prompt, 4, None)  # warm up
        out, seconds = llama_greedy(engine, prompt, args.decode_tokens, None)
        tps = (len(out) - 1) / seconds
        del engine
        rows.append({"engine": "llama.cpp", "format": name, "decode_tok_s": round(tps, 2), "threads": THREADS, "vs_torch_float": round(tps / torch_tps, 2)})
        print(f"decode {name}: {tps:.1f} tok/s ({tps / torch_tps:.2f}x torch float32)")

    _save(rows, args.student, stamp)


def _save(rows: list[dict], model: str, stamp: str) -> None:
    from minigiant.hardware import describe_cpu

    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    for row in rows:
        row.setdefault("model", model)
        row["time"] = stamp
        row.setdefault("note", f"{THREADS} thread(s): timings are ratios within this run only")
        row.setdefault("cpu", describe_cpu())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(existing + rows, indent=1) + "\n")
    print(f"wrote {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
