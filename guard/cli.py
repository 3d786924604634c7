"""The ``hguard`` console script: serve, score, and the offline ``probes`` commands.

This is the only module of ``guard`` that may import ``probes``, lazily, inside the
``probes`` subcommands, so the runtime never depends on the training code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guard.errors import GuardError

log = logging.getLogger("hguard")
PROBE_HELP = "shipped probe name (default, smollm2-135m-triviaqa, gemma3-270m-triviaqa) or dir"
MODELS_PROBE = "the shipped probe of --model, or 'default'"


def _serve(args: argparse.Namespace) -> int:
    from guard.api.server import run_server
    from guard.settings import GuardSettings

    settings = GuardSettings(**_model_and_probe(args))
    return run_server(settings, host=args.host, port=args.port, engine=args.engine)


def _model_and_probe(args: argparse.Namespace) -> dict[str, Any]:
    """``--model`` / ``--probe`` as settings overrides (unset: the GUARD_* environment)."""
    return {
        key: value
        for key, value in (("model", args.model), ("probe", args.probe))
        if value is not None
    }


def _score(args: argparse.Namespace) -> int:
    from guard.api.bodies import guard_object
    from guard.loading import load_guarded
    from guard.settings import GuardSettings

    guarded = load_guarded(GuardSettings(**_model_and_probe(args)))
    result = guarded.score(question=args.question, answer=args.answer)
    print(guard_object(result).model_dump_json(indent=2))
    return 0


def _export_model(args: argparse.Namespace) -> int:
    from guard.export import export_model

    fingerprint = export_model(args.spec, args.out)
    print(f"exported {args.spec} to {args.out}: {fingerprint.model_dump_json()}")
    return 0


def _probes_build(args: argparse.Namespace) -> int:
    from probes.build import build
    from probes.config import BuildConfig
    from probes.scope import ScopeConfig

    config = BuildConfig(
        dataset=args.dataset,
        out=args.out,
        **({"model": args.model} if args.model is not None else {}),
        prompt=_recipe(args.prompt),
        limit=args.limit,
        samples=args.samples,
        batch_size=args.batch_size,
        work_dir=args.work_dir,
        scope=None if args.no_scope_gate else ScopeConfig(),
    )
    build(config)
    return 0


def _recipe(path: Path | None) -> Any:
    from guard.prompts import PromptRecipe

    return None if path is None else PromptRecipe.model_validate_json(path.read_bytes())


def _probes_evaluate(args: argparse.Namespace) -> int:
    from probes.evaluate import EvaluateConfig, evaluate_probe

    config = EvaluateConfig(
        probe=args.probe,
        dataset=args.dataset,
        out=args.out,
        limit=args.limit,
        split=args.split,
        batch_size=args.batch_size,
    )
    evaluate_probe(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hguard", description="Hallucination guard: neuron probes for language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the guarded model over HTTP")
    serve.add_argument("--model", help="model spec (default: GUARD_MODEL or the probe's model)")
    serve.add_argument("--probe", help=f"{PROBE_HELP} (default: GUARD_PROBE, else {MODELS_PROBE})")
    serve.add_argument(
        "--engine", choices=["transformers", "vllm"], default="transformers",
        help="who generates: our decode loop, or vLLM (needs .venv-vllm: make install-vllm)",
    )  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    score = commands.add_parser("score", help="risk of a given answer, as the guard JSON object")
    score.add_argument("--question", required=True)
    score.add_argument("--answer", required=True)
    score.add_argument("--probe", help=f"{PROBE_HELP} (default: {MODELS_PROBE})")
    score.add_argument("--model", help="model spec (default: the probe's model)")
    score.set_defaults(func=_score)

    export = commands.add_parser(
        "export-model", help="save a model spec as a float32 safetensors directory (for vLLM)"
    )
    export.add_argument("spec", help="model spec: smollm2, a .gguf file or a model directory")
    export.add_argument("out", type=Path, help="directory to create (must be empty)")
    export.set_defaults(func=_export_model)

    probes = commands.add_parser("probes", help="offline probe training and evaluation")
    probe_commands = probes.add_subparsers(dest="probes_command", required=True)

    build = probe_commands.add_parser("build", help="collect, judge, extract, train, save")
    build.add_argument("--dataset", required=True, type=Path, help="QA JSONL or parquet")
    build.add_argument("--out", required=True, type=Path, help="probe artifact directory")
    build.add_argument("--model", help="model spec (default: the embedded SmolLM2)")
    build.add_argument(
        "--prompt", type=Path, help="prompt recipe JSON (default: from the model's tokenizer)"
    )
    build.add_argument("--limit", type=int, help="use the first N questions")
    build.add_argument("--samples", type=int, default=0, help="extra sampled answers per question")
    build.add_argument("--batch-size", type=int, default=32)
    build.add_argument("--work-dir", type=Path, help="answers, features (default: OUT-work)")
    build.add_argument(
        "--no-scope-gate", action="store_true", help="judge every prompt (no scope gate)"
    )
    build.set_defaults(func=_probes_build)

    evaluate = probe_commands.add_parser("evaluate", help="evaluate a probe against baselines")
    evaluate.add_argument("--probe", required=True, help=PROBE_HELP)
    evaluate.add_argument("--dataset", required=True, type=Path)
    evaluate.add_argument("--out", required=True, type=Path, help="report JSON path")
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--split", choices=["train", "val", "test", "all"], default="all")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.set_defaults(func=_probes_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        code: int = args.func(args)
    except GuardError as exc:
        print(f"hguard: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
