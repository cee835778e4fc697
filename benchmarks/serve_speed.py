"""What serving costs: the engine behind ``minigiant serve`` / ``chat`` / ``generate`` against transformers'
``model.generate`` (what ``minigiant generate`` used before), the same engine through the HTTP server (a real
uvicorn on 127.0.0.1, streamed), and JSON mode (lm-format-enforcer) against free text. Greedy, one request at a
time, the variants interleaved round by round so a busy machine slows all of them alike; medians of the rounds.

    PYTHONPATH=src .venv/bin/python benchmarks/serve_speed.py runs/default/04-int4 [more models] [--rounds 3]

Rows go to benchmarks/results/serve.json (kind "serve_speed"; replacing rows of the same model, variant and CPU).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
STOPS: dict[str, set[int]] = {}  # each engine's end tokens; the free-text variants run without them, so every variant makes MAX_TOKENS tokens
PROMPT = "Explain in three sentences why the sky is blue."
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 160}, "confident": {"type": "boolean"}},
          "required": ["answer", "confident"], "additionalProperties": False}
MAX_TOKENS = 96


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine):
    import uvicorn

    from minigiant.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def hf_generate(engine, ids):
    """transformers' generate, greedy (the way ``minigiant generate`` decoded before), ``MAX_TOKENS`` tokens."""
    start = time.perf_counter()
    out = engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=MAX_TOKENS,
                                min_new_tokens=MAX_TOKENS, do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=engine.pad)
    seconds = time.perf_counter() - start
    return {"tokens": out.shape[1] - len(ids), "seconds": seconds, "ttft": None}


def engine_stream(engine, ids, schema=None):
    from minigiant.serve import Sampling

    start = time.perf_counter()
    stops = engine.stops
    if schema is not None:  # JSON mode ends on the model's end token once the value is complete
        engine.stops = STOPS[engine.name]
    try:
        pieces = list(engine.stream(ids, Sampling(max_tokens=MAX_TOKENS, temperature=0, json=schema)))
    finally:
        engine.stops = stops
    text = "".join(p.text for p in pieces)
    row = {"tokens": pieces[-1].completion_tokens, "seconds": time.perf_counter() - start, "ttft": pieces[-1].seconds_to_first_token}
    if schema is not None:
        row["parsed"] = pieces[-1].finish_reason == "stop" and bool(json.loads(text))
    return row


def http_stream(url):
    import httpx

    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, ttft, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "ttft": ttft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model directories, .gguf files or 'default'")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from minigiant.hardware import describe_cpu
    from minigiant.serve import Engine

    rows = []
    for source in args.models:
        engine = Engine.load(source)
        STOPS[engine.name], engine.stops = engine.stops, set()
        ids = engine.chat_ids([{"role": "user", "content": PROMPT}])
        start = time.perf_counter()
        engine.stops = STOPS[engine.name]
        engine._allowed_tokens(SCHEMA)  # the tokenizer table JSON mode builds once, at its first request
        engine.stops = set()
        table_seconds = time.perf_counter() - start
        server, url = start_server(engine)
        variants = {
            "transformers generate": lambda: hf_generate(engine, ids),
            "engine": lambda: engine_stream(engine, ids),
            "engine over HTTP (streamed)": lambda: http_stream(url),
            "engine, JSON schema": lambda: engine_stream(engine, ids, SCHEMA),
        }
        runs = {name: [] for name in variants}
        for name, run in variants.items():  # warm-up
            run()
        for _ in range(args.rounds):
            for name, run in variants.items():
                runs[name].append(run())
        server.should_exit = True
        base = statistics.median(r["tokens"] / r["seconds"] for r in runs["transformers generate"])
        print(f"{source}: JSON tokenizer table {table_seconds:.1f} s")
        for name, results in runs.items():
            speed = statistics.median(r["tokens"] / r["seconds"] for r in results)
            ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
            row = {"kind": "serve_speed", "model": source, "name": name, "isa": describe_cpu()["isa"], "tokens": results[-1]["tokens"],
                   "tokens_per_second": round(speed, 2), "vs_transformers_generate": round(speed / base, 3),
                   "ttft_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
                   "json_table_seconds": round(table_seconds, 2) if "JSON" in name else None,
                   "parsed": all(r["parsed"] for r in results) if "JSON" in name else None,
                   "rounds": args.rounds, "max_tokens": MAX_TOKENS, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            rows.append(row)
            print(f"  {name}: {speed:.1f} tok/s ({speed / base:.2f}×), ttft {row['ttft_ms']} ms, {row['tokens']} tokens"
                  + (f", parsed {row['parsed']}" if row["parsed"] is not None else ""), flush=True)
        del engine
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    keys = {(r["model"], r["name"], r["isa"]) for r in rows}
    RESULTS.write_text(json.dumps([r for r in old if (r["model"], r["name"], r["isa"]) not in keys] + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
