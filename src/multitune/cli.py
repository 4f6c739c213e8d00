"""`multitune train|evaluate|predict|serve|export|...`: parse arguments, then call the recipe (training)
or runs/ (finished runs). User errors exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from multitune.errors import ConfigError, MultitunError

RUN_DIR_HELP = "a run directory: the folder `multitune train` printed after 'saved to'"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless there is none to show (None, a flag's False) or the
    help already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_compare(commands: Any) -> None:
    """`multitune compare`: its budget options (equal rows, or to convergence) and its seeds."""
    compare = commands.add_parser("compare", help="multi-task against one model per task, on the same budget")
    compare.add_argument("config", nargs="?", help="YAML config file (or --from-run)")
    compare.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    compare.add_argument(
        "--from-run",
        metavar="RUN_DIR",
        help="compare this finished multi-task run instead of training one from a config",
    )
    compare.add_argument(
        "--baseline-budget",
        type=float,
        default=1.0,
        metavar="F",
        help="each baseline trains on F times the rows the multi-task model saw of its task (default 1: equal)",
    )
    compare.add_argument(
        "--converge",
        action="store_true",
        help="train each side to convergence instead: early stopping on its validation score, best checkpoint",
    )
    compare.add_argument(
        "--patience", type=int, default=None, metavar="N", help="--converge: validations without a gain (default 3)"
    )
    compare.add_argument(
        "--max-steps", type=int, default=None, metavar="N", help="--converge: the step limit (default training.steps)"
    )
    compare.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        metavar="13,14,15",
        help="one comparison per seed, and their mean and spread in OUTPUT_DIR/NAME-seeds/",
    )
    compare.add_argument(
        "--merge",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        metavar="M1,M2",
        help="also merge the single-task baselines by these methods (e.g. ties,task_arithmetic) and compare each",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multitune", description="Fine-tune one pretrained model on several tasks.", formatter_class=HelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND --help: its arguments)"
    )

    train = commands.add_parser("train", help="train a multi-task model from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")

    evaluate = commands.add_parser("evaluate", help="score a finished run on a split")
    evaluate.add_argument("run_dir", help=RUN_DIR_HELP)
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test"], help="the split to score")

    _add_compare(commands)

    affinity = commands.add_parser("affinity", help="train and measure which tasks help or hurt each other")
    affinity.add_argument("config", help="YAML config file")
    affinity.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")

    report = commands.add_parser("report", help="(re)write RUN_DIR/report.html")
    report.add_argument("run_dir", help=RUN_DIR_HELP)

    resume = commands.add_parser("resume", help="continue a run from its newest loadable checkpoint")
    resume.add_argument("run_dir", help=RUN_DIR_HELP)

    predict = commands.add_parser("predict", help="predict one task: JSONL in, JSONL out")
    predict.add_argument("run_dir", help=RUN_DIR_HELP)
    predict.add_argument("--task", required=True, help="the task to predict, by its name in the config")
    predict.add_argument("--input", default="-", help="JSONL file, or - for stdin")
    predict.add_argument("--output", default="-", help="JSONL file, or - for stdout")

    serve = commands.add_parser("serve", help="serve every task of a run over HTTP (JSON API, micro-batched)")
    serve.add_argument("run_dir", help=RUN_DIR_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on /v1 (default: $MULTITUNE_SERVE_TOKEN)")
    serve.add_argument(
        "--admin-token",
        help="turn on /v1/admin/tasks (load and unload tasks at run time) behind this bearer token "
        "(default: $MULTITUNE_ADMIN_TOKEN; off when neither is set)",
    )
    serve.add_argument("--max-inputs", type=int, default=64, help="records per request")
    serve.add_argument("--max-chars", type=int, default=10_000, help="characters of text per record")
    serve.add_argument("--max-batch-rows", type=int, default=64, help="rows gathered into one model call")
    serve.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="how long a lone request waits for company (default: none)"
    )
    serve.add_argument("--max-queue", type=int, default=512, help="queued requests before 503")
    serve.add_argument("--threads", type=int, help="torch CPU threads for inference (default: torch's choice)")
    serve.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers (408)")
    serve.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request's body (408)")
    serve.add_argument("--max-connections", type=int, default=1000, help="open connections before 503")
    serve.add_argument("--keep-alive", type=int, default=30, help="seconds an idle connection stays open")

    export = commands.add_parser("export", help="write one task as a standalone Hugging Face model folder")
    export.add_argument("run_dir", help=RUN_DIR_HELP)
    export.add_argument("--task", help="the task to export, by its name in the config (format hf)")
    export.add_argument(
        "--format",
        choices=["hf", "vllm"],
        default="hf",
        help="hf: one task as a Hugging Face folder; vllm: every generation task as a base model and per-task "
        "LoRA adapters that vllm serve loads (default: hf)",
    )
    export.add_argument("out", help="new folder to write")
    export.add_argument("--onnx", action="store_true", help="also write model.onnx (encoder tasks; needs onnx)")

    merge = commands.add_parser("merge", help="merge single-task runs of one backbone into one model")
    merge.add_argument("runs", nargs="+", help="finished runs fine-tuned from the same backbone (two or more)")
    merge.add_argument("--method", default="ties", help="a merge method (`multitune list`; default: ties)")
    merge.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a method setting, e.g. density=0.2"
    )
    merge.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="settings to choose on validation, e.g. scaling=0.3,0.5,1.0",
    )
    merge.add_argument("--output-dir", default="runs", help="where the merged run's folder goes (default: runs)")
    merge.add_argument("--name", default="merged", help="the merged run's name (default: merged)")

    sweep = commands.add_parser("sweep", help="train one config under several settings and compare them")
    sweep.add_argument("config", help="YAML config file")
    sweep.add_argument(
        "assignments", nargs="+", metavar="key=a,b,c", help="an axis (several values) or a fixed override"
    )

    listing = commands.add_parser(
        "list",
        help="list every registered method (samplers, schedules, balancers, architectures, adapters...)",
    )
    listing.add_argument("--markdown", action="store_true", help="print the README's methods table")
    for command in commands.choices.values():
        command.formatter_class = HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse leaves `key=value` overrides unmatched when an option comes before the config
    # (`multitune compare --baseline-budget 2 CONFIG k=v`): they still belong to the overrides
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    from multitune.core.processes import end_process_group

    ended_well = False
    try:
        code = _dispatch(args)
        ended_well = True
        return code
    except MultitunError as error:
        print(f"multitune: error: {error}", file=sys.stderr)
        return int(getattr(error, "exit_code", 2))
    except KeyboardInterrupt:
        print("multitune: interrupted", file=sys.stderr)
        return 130
    finally:  # launched as several processes: leave their group before exiting (after an error, at once)
        end_process_group(wait=ended_well)


def _dispatch(args: argparse.Namespace) -> int:
    from multitune import catalogue
    from multitune.recipe import train
    from multitune.runs import evaluate, predict

    if args.command == "train":
        from multitune.catalogue import load_config

        train.train_run(load_config(args.config, args.overrides))
    elif args.command == "compare":
        from multitune.compare import Budget, compare, compare_run

        if not args.converge and (args.patience is not None or args.max_steps is not None):
            flag = "--patience" if args.patience is not None else "--max-steps"
            raise ConfigError(f"{flag} sets the rule of --converge: add --converge, or leave it out", field=flag)
        if args.converge and args.baseline_budget != 1.0:
            message = "--baseline-budget sets the equal-rows budget; --converge trains each side to convergence"
            raise ConfigError(message, field="--baseline-budget")
        patience = 3 if args.patience is None else args.patience
        budget = Budget(args.baseline_budget, args.converge, patience, args.max_steps)
        if args.from_run is not None:
            if args.config is not None or args.overrides or args.seeds:
                raise ConfigError(
                    "--from-run compares one finished run as it was trained: no config, overrides or --seeds",
                    field="--from-run",
                )
            compare_run(args.from_run, budget, args.merge or ())
        elif args.config is None:
            raise ConfigError("name a config to train and compare, or a finished run with --from-run", field="config")
        else:
            compare(args.config, args.overrides, budget, args.seeds, args.merge or ())
    elif args.command == "affinity":
        from multitune.catalogue import load_config

        train.train_run(load_config(args.config, [*args.overrides, "analysis.task_affinity=true"]))
    elif args.command == "report":
        from pathlib import Path

        from multitune.evaluation.report import write_report

        if not (Path(args.run_dir) / "metrics.json").is_file():
            raise MultitunError("not a finished multitune run: metrics.json is missing", file=args.run_dir)
        print(write_report(Path(args.run_dir)))
    elif args.command == "resume":
        train.resume_run(args.run_dir)
    elif args.command == "sweep":
        from multitune.sweep import sweep

        sweep(args.config, args.assignments, train.train_run)
    elif args.command == "evaluate":
        evaluate.evaluate_run(args.run_dir, args.split)
    elif args.command == "predict":
        name = "<stdin>" if args.input == "-" else args.input
        predictions = predict.predict_run(args.run_dir, args.task, sys.stdin, name)
        lines = "".join(jsonl_line(r) for r in predictions)
        if args.output == "-":
            sys.stdout.write(lines)
        else:
            from pathlib import Path

            from multitune.core.files import write_text

            write_text(Path(args.output), lines)
    elif args.command == "serve":
        from multitune.serving.app import ADMIN_TOKEN_VARIABLE, TOKEN_VARIABLE, ServeSettings, serve

        settings = ServeSettings(
            token=args.token or os.environ.get(TOKEN_VARIABLE) or None,
            admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_VARIABLE) or None,
            max_inputs=args.max_inputs,
            max_chars=args.max_chars,
            max_batch_rows=args.max_batch_rows,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            threads=args.threads,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            max_connections=args.max_connections,
            keep_alive=args.keep_alive,
        )
        serve(args.run_dir, args.host, args.port, settings)
    elif args.command == "merge":
        from multitune.runs.merge import merge_runs

        given = dict(_number_setting(item, "--set") for item in args.set)
        grid = {key: list(value) for key, value in (_number_setting(item, "--grid", many=True) for item in args.grid)}
        print(merge_runs(args.runs, args.method, given, grid, args.output_dir, args.name))
    elif args.command == "export":
        from multitune.export import export_task, export_vllm

        if args.format == "vllm":
            if args.task is not None or args.onnx:
                raise ConfigError(
                    "--format vllm exports every generation task, as peft adapters: --task and --onnx are for "
                    "--format hf",
                    field="--task" if args.task is not None else "--onnx",
                )
            print(export_vllm(args.run_dir, args.out))
        elif args.task is None:
            raise ConfigError("name the task to export with --task (or use --format vllm)", field="--task")
        else:
            print(export_task(args.run_dir, args.task, args.out, onnx=args.onnx))
    elif args.command == "list":
        if args.markdown:
            print(catalogue.methods_markdown())
        else:
            for method in catalogue.describe_methods():
                print(f"{method['kind']:20} {method['name']:22} {method['summary']}")
    return 0


def seed_list(text: str) -> list[int]:
    """`13,14,15` -> [13, 14, 15] (argparse turns the ValueError into a one-line usage error)."""
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds:
        raise ValueError(text)
    return seeds


# Characters that str.splitlines (and other readers) take as line breaks, though JSON keeps them raw in strings
LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def jsonl_line(value: Any) -> str:
    """One JSON Lines record: text stays readable (no ASCII escapes), but a line break inside a string is
    escaped, so every reader sees one record per line."""
    text = json.dumps(value, ensure_ascii=False)
    for raw, escaped in LINE_BREAKS.items():
        text = text.replace(raw, escaped)
    return text + "\n"


def _number_setting(item: str, flag: str, many: bool = False) -> tuple[str, Any]:
    """KEY=VALUE (a number, or a word such as `layer`) or, with `many`, KEY=V1,V2,... (numbers); ConfigError
    naming the flag."""
    key, sep, value = item.partition("=")
    parts = value.split(",") if sep and value else []
    numbers = []
    for part in parts:
        try:
            numbers.append(float(part))
        except ValueError:
            numbers = []
            break
    if any(not math.isfinite(number) for number in numbers):
        raise ConfigError(f"settings are finite numbers, got {item!r}", field=flag)
    if many and key and numbers:
        return key, numbers
    if not many and key and len(parts) == 1:
        if not numbers:
            return key, value
        return key, int(value) if re.fullmatch(r"[+-]?\d+", value.strip()) else numbers[0]  # 1e38 stays a float
    raise ConfigError(f"expected KEY={'V1,V2 (numbers)' if many else 'VALUE'}, got {item!r}", field=flag)
