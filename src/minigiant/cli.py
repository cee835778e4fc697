"""``minigiant <verb>``: a thin layer over the Python API. Parses, calls a verb, prints; errors become one
line on stderr and a non-zero exit (``MINIGIANT_DEBUG=1`` shows the traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
from pathlib import Path

from .errors import MinigiantError

VERB_HELP = {
    "prune": "remove the least important decoder layers down to a parameter budget",
    "distill": "train a student against a teacher (KD on softened logits + cross-entropy)",
    "quantize": "weight-only quantization (rtn, gptq, awq, kmeans, ternary; 1-8 bits, GGUF grids, mixed precision), packed, run by CPU int4/int8 kernels",
}


OVERWRITE_HELP = {
    "model": "replace OUTPUT even if it is not an earlier output of this verb (a folder of other files, a file, another stage's model)",
    "run": "write into the run folder even if it is a folder of other files",
    "report": "write the report into OUTPUT even if it is a folder of other files",
}


def _config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One ``--field-name VALUE`` flag per config field; values use YAML rules (3, 0.5, true, null, [a, b])."""
    group = parser.add_argument_group(f"{config_cls.__name__} settings (same names as in a recipe)")
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest="cfg_" + f.name, metavar="VALUE", default=None,
            help=f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"),  # argparse formats help with %
        )


def _config_from_args(config_cls: type, args: argparse.Namespace, verb: str):
    from .config import from_dict, parse_scalar

    values = {f.name: parse_scalar(getattr(args, "cfg_" + f.name)) for f in dataclasses.fields(config_cls) if getattr(args, "cfg_" + f.name) is not None}
    return from_dict(config_cls, values, verb)


def _claim_output(output, kind: str, inputs, overwrite: bool, replaces=None) -> None:
    """Apply the output rule (``artifact.check_output``) before any slow work; show its note, if any."""
    from .artifact import check_output

    note = check_output(output, kind, inputs=inputs, overwrite=overwrite, replaces=replaces)
    if note:
        print(f"note: {note}", file=sys.stderr)


def _stage_command(verb: str, args: argparse.Namespace) -> None:
    from . import artifact
    from .context import Context
    from .data.text import text_paths
    from .models.loading import load, resolve_source
    from .stages import stage

    kind = stage(verb)
    config = _config_from_args(kind.config, args, verb)
    inputs = [resolve_source(args.model), *([resolve_source(args.teacher)] if getattr(args, "teacher", None) else []), *text_paths(config)]
    _claim_output(args.output, f"model/{verb}", inputs, args.overwrite)
    model, tokenizer = load(args.model)
    teacher = load(args.teacher)[0] if getattr(args, "teacher", None) else None
    output = Path(args.output)
    work_dir = output.parent / f".{output.name}.work"
    ctx = Context(tokenizer=tokenizer, teacher=teacher, seed=args.seed, work_dir=work_dir)
    model = kind.apply(model, config, ctx)
    artifact.save(model, tokenizer, output, overwrite=args.overwrite)
    from .hardware import process_rank

    if process_rank() != 0:  # under torchrun the first process writes and reports (distill/parallel.py)
        return
    import shutil

    shutil.rmtree(work_dir, ignore_errors=True)
    metrics = artifact.lineage(model)["stages"][-1]["metrics"]
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    print(f"{verb}: wrote {output}  " + "  ".join(f"{k}={v}" for k, v in shown.items()))


def cmd_run(args: argparse.Namespace) -> None:
    from .artifact import output_kind
    from .pipeline import recipe_inputs, run
    from .recipe import default_recipe_path, load_recipe, time_scale

    overrides = list(args.set or [])
    if args.output:
        overrides.append(f"output={args.output}")
    recipe_path = Path(args.recipe or default_recipe_path())
    recipe = load_recipe(recipe_path, overrides)
    scale = time_scale(recipe, args.minutes) if args.minutes is not None else 1.0
    out = Path(recipe.output)
    # Rerunning a run's own saved recipe (RUN/recipe.yaml) is how a run is reproduced; any other recipe file
    # inside the run folder is a user's file the run would overwrite.
    own_recipe = recipe_path.resolve() == (out / "recipe.yaml").resolve() and output_kind(out) == "run"
    _claim_output(out, "run", [*recipe_inputs(recipe), *([] if own_recipe else [recipe_path])], args.overwrite)
    run(recipe, time_scale=scale, overwrite=args.overwrite)


def cmd_load(args: argparse.Namespace) -> None:
    from . import artifact
    from .models.architecture import total_parameters
    from .models.loading import load, resolve_source

    _claim_output(args.output, "model/load", [resolve_source(args.source)], args.overwrite)
    model, tokenizer = load(args.source)
    artifact.record_stage(model, "load", {"source": args.source}, {"params": total_parameters(model)})
    artifact.save(model, tokenizer, args.output, overwrite=args.overwrite)
    print(f"load: wrote {args.output} ({total_parameters(model):,} parameters, float32)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .data.text import text_paths
    from .evaluate import EvaluateConfig, evaluate_dirs
    from .evaluate.report import summary_table
    from .models.loading import resolve_source
    from .progress import console

    config = _config_from_args(EvaluateConfig, args, "evaluate")
    models = {}
    for source in args.models:
        path = resolve_source(source)
        name = source if source == "default" else path.name
        while name in models:  # two directories with the same name (a/model, b/model) stay two rows
            name += "'"
        models[name] = path
    _claim_output(args.output, "report", [*models.values(), *text_paths(config)], args.overwrite, replaces=("report", "run"))
    results = evaluate_dirs(models, config, Path(args.output), overwrite=args.overwrite)
    console.print(summary_table(results))
    print(f"report: {Path(args.output) / 'report.md'}")


def cmd_select(args: argparse.Namespace) -> None:
    import json

    from .select import SelectConfig, load_candidates, markdown, select

    config = _config_from_args(SelectConfig, args, "select")
    answer = select(load_candidates(args.candidates, config, Path(args.output)), config)
    print(json.dumps(answer, indent=2) if args.json else markdown(answer), end="" if not args.json else "\n")


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import check_generation_settings, generate
    from .models.loading import load

    check_generation_settings(args.max_new_tokens, args.temperature)
    model, tokenizer = load(args.model)
    generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, chat=not args.raw, stream=sys.stdout)


def _sampling(args: argparse.Namespace):
    from .serve import Sampling

    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    sampling.check()
    return sampling


def cmd_chat(args: argparse.Namespace) -> None:
    from .serve import Engine
    from .serve.chat import chat_loop, terminal_lines

    sampling = _sampling(args)
    engine = Engine.load(args.model)
    chat_loop(engine, sampling, args.system, terminal_lines() if sys.stdin.isatty() else sys.stdin, sys.stdout)


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve import serve

    serve(args.model, args.host, args.port, args.name)


def cmd_export(args: argparse.Namespace) -> None:
    from .export import ExportConfig, export
    from .models.loading import load

    config = _config_from_args(ExportConfig, args, "export")
    model, tokenizer = load(args.model)
    report = export(model, tokenizer, args.output, config)
    types = "  ".join(f"{t}x{n}" for t, n in sorted(report["tensor_types"].items()))
    print(f"export: wrote {report['path']} ({report['type']}, {report['file_bytes'] / 2**20:.1f} MiB, {report['bits_per_weight']} bits/weight; {types})")
    if report["rerounded_tensors"]:
        print(f"export: {len(report['rerounded_tensors'])} quantized tensors are not on their {report['type']} block grid and were rounded again from their dequantized values; "
              f"quantize the float model with --gguf {report['type']} to have their codes written unchanged", file=sys.stderr)
    elif report["exact_tensors"]:
        print(f"export: {report['exact_tensors']} quantized tensors written code for code")
    if report.get("modelfile"):
        print(f"ollama: ollama create NAME -f {report['modelfile']}")


def cmd_info(args: argparse.Namespace) -> None:
    import json

    from .artifact import read_lineage
    from .models.loading import resolve_source

    path = resolve_source(args.model)
    lineage = read_lineage(path) if path.is_dir() else None
    if lineage is None:
        raise MinigiantError(f"{path} has no minigiant.json (it was not made by minigiant)")
    print(json.dumps(lineage, indent=2))


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    from .serve import Sampling

    defaults = Sampling()
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help=f"longest answer in tokens (default: {defaults.max_tokens})")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help=f"sampling temperature; 0 = greedy (default: {defaults.temperature})")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help=f"nucleus sampling mass (default: {defaults.top_p})")
    p.add_argument("--seed", type=int, help="sampling seed (default: a fresh one per answer)")


def build_parser() -> argparse.ArgumentParser:
    from .distill import DistillConfig
    from .evaluate import EvaluateConfig
    from .export import ExportConfig
    from .prune import PruneConfig
    from .quantize import QuantizeConfig
    from .select import SelectConfig

    parser = argparse.ArgumentParser(
        prog="minigiant",
        description="Turn a large language model into a small one: prune → distill → quantize → evaluate. "
        "Every stage reads a model (an HF directory, a .gguf file, or 'default' = the embedded SmolLM2-135M-Instruct) "
        "and writes a plain Hugging Face directory with minigiant.json (its lineage).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run a YAML recipe (default: the built-in recipe on the default teacher)", description="Run every stage of a recipe and write a report.")
    p.add_argument("recipe", nargs="?", help="recipe YAML, or the name of one shipped with minigiant: default (the default), sparse")
    p.add_argument("--minutes", type=float, help="time for the whole run: the stages with a time budget (distillation) get what it adds to, or takes from, the recipe's `minutes`")
    p.add_argument("--output", help="run directory (overrides the recipe's `output`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value, e.g. --set stages.1.lr=1e-4 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP["run"])
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("load", help="convert a .gguf file or 'default' into a float Hugging Face directory", description="Load a model (GGUF is dequantized to float32) and save it as a Hugging Face directory.")
    p.add_argument("source", help="HF directory, .gguf file, or 'default'")
    p.add_argument("output", help="directory to write")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP["model"])
    p.set_defaults(func=cmd_load)

    for verb, config_cls in (("prune", PruneConfig), ("distill", DistillConfig), ("quantize", QuantizeConfig)):
        p = sub.add_parser(verb, help=VERB_HELP[verb], description=VERB_HELP[verb].capitalize() + ".")
        p.add_argument("model", help="input model: HF directory, .gguf file, or 'default'")
        p.add_argument("output", help="directory to write the result to (written atomically)")
        if verb == "distill":
            p.add_argument("--teacher", required=True, help="teacher model: HF directory, .gguf file, or 'default'")
        p.add_argument("--seed", type=int, default=0, help="random seed (data sampling, initialisation)")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP["model"])
        _config_flags(p, config_cls)
        p.set_defaults(func=lambda args, verb=verb: _stage_command(verb, args))

    p = sub.add_parser("evaluate", help="measure quality (perplexity, lm-eval tasks, teacher agreement, chat) and cost of models; write a report", description="Evaluate one or more models and write report.md, report.json, report.html and the Pareto plots.")
    p.add_argument("models", nargs="+", help="models to compare (the first is the reference for ratios)")
    p.add_argument("--output", default="evaluation", help="directory for the report (default: ./evaluation)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP["report"])
    _config_flags(p, EvaluateConfig)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("select", help="pick the best model under memory, disk, speed and quality constraints", description="Rank evaluated models under constraints, drop the ones that fail with the reason, and explain the pick.")
    p.add_argument("candidates", nargs="+", help="a report.json, a run directory, or model directories (evaluated first)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--output", default="selection", help="where model directories are evaluated (default: ./selection)")
    _config_flags(p, SelectConfig)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("generate", help="answer a prompt with a model, streaming to the terminal", description="Generate text with the chat template, streamed as it is produced.")
    p.add_argument("model", help="HF directory, .gguf file, or 'default'")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a model in the terminal (streamed answers, the conversation kept)", description="Chat with a model through its chat template. /reset forgets the conversation, /exit or Ctrl-D leaves; the oldest turns are dropped when the context is full.")
    p.add_argument("model", help="HF directory, minigiant directory, .gguf file, or 'default'")
    p.add_argument("--system", help="a system message")
    _sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (streaming, JSON mode)", description="Serve a model at /v1/chat/completions, /v1/completions and /v1/models, as OpenAI's API does; local and private (127.0.0.1) unless --host says otherwise.")
    p.add_argument("model", help="HF directory, minigiant directory, .gguf file, or 'default'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--name", help="the model id clients see (default: the directory's name)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a model as GGUF for llama.cpp / Ollama (with a Modelfile)", description="Write a float or quantized model as one GGUF file (llama architecture, tokenizer, chat template) and an Ollama Modelfile beside it.")
    p.add_argument("model", help="input model: HF directory, minigiant directory, .gguf file, or 'default'")
    p.add_argument("output", help="the .gguf file to write (written atomically)")
    _config_flags(p, ExportConfig)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="show how a model directory was made (its minigiant.json)")
    p.add_argument("model", help="a model directory written by minigiant")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MinigiantError as exc:
        if os.environ.get("MINIGIANT_DEBUG") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an output the checks could not foresee (e.g. the disk filled up half-way)
        if os.environ.get("MINIGIANT_DEBUG") == "1" or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: could not write {exc.filename}: {exc.strerror}; choose another output or fix its permissions / free space", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
