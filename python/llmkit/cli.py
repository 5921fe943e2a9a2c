"""The `llmkit` command.

    llmkit --version
    llmkit bench                 the list of benchmarks
    llmkit bench NAME ... | all  [--quick] [-o DIR] [--repeats N] [--device D]
    llmkit info     build of llmkit (backends, torch, CUDA archs) as JSON
    llmkit demo [--quick] [--section NAME ...]   NF4, QLoRA, attention, word2vec, models, pretraining
    llmkit adapter info ADAPTER_DIR
    llmkit adapter merge --model MODEL_DIR --adapter ADAPTER_DIR -o OUT_DIR [--device D]
    llmkit word2vec train|eval|bias ...   (see llmkit.embeddings.cli)
    llmkit glove train|eval|bias ...
    llmkit embeddings bias VECTORS
    llmkit models list | info DIR         model presets, Hugging Face checkpoints
    llmkit generate MODEL_DIR PROMPT ...  text generation (streamed)
    llmkit corpus prepare [SOURCE] --out DIR   tokenizer + packed token shards
    llmkit pretrain --model PRESET [--objective clm|mlm|span] [--data PATH] [--steps N] ...
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# A user's mistake (a missing file, a bad value) is one line on stderr and exit status 2, as
# argparse does for a bad flag; anything else is a bug or the machine (exit 1), still one line
# unless LLMKIT_DEBUG=1 asks for the traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, NotImplementedError, ImportError)


def _bench(args: argparse.Namespace) -> int:
    from llmkit import bench

    return bench.run_from_args(args)


def _info(args: argparse.Namespace) -> int:
    import llmkit

    print(json.dumps(llmkit.build_info(), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from llmkit import demo

    return demo.run_from_args(args)


def _adapter(args: argparse.Namespace) -> int:
    from llmkit.adapt import cli

    return cli.run(args)


def _embeddings(args: argparse.Namespace) -> int:
    from llmkit.embeddings import cli

    return cli.run(args)


def _models(args: argparse.Namespace) -> int:
    from llmkit.models import cli

    return cli.run_models(args)


def _generate(args: argparse.Namespace) -> int:
    from llmkit.models import cli

    return cli.run_generate(args)


def _pretrain(args: argparse.Namespace) -> int:
    from llmkit.train import cli

    return cli.run(args)


def _corpus(args: argparse.Namespace) -> int:
    from llmkit.train import cli

    return cli.run_corpus(args)


def build_parser() -> argparse.ArgumentParser:
    from llmkit.bench import add_arguments

    parser = argparse.ArgumentParser(prog="llmkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llmkit {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages from the library")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = commands.add_parser("bench", help="run benchmarks side by side with their peers")
    add_arguments(bench)
    bench.set_defaults(handler=_bench)

    info = commands.add_parser("info", help="print build_info() as JSON")
    info.set_defaults(handler=_info)

    from llmkit.demo import add_arguments as add_demo_arguments

    demo = commands.add_parser("demo", help="NF4 round trip, a QLoRA fine-tune, attention, word2vec, transformer "
                                            "models, GPT + BERT pretraining; quick benchmarks")
    add_demo_arguments(demo)
    demo.set_defaults(handler=_demo)

    from llmkit.adapt.cli import add_arguments as add_adapter_arguments

    adapter = commands.add_parser("adapter", help="inspect a PEFT adapter directory or merge one into a model")
    add_adapter_arguments(adapter)
    adapter.set_defaults(handler=_adapter)

    from llmkit.embeddings import cli as embeddings_cli

    word2vec = commands.add_parser("word2vec", help="train word2vec, evaluate or inspect bias of saved vectors")
    embeddings_cli.add_train_eval_bias(word2vec.add_subparsers(dest="action", metavar="ACTION", required=True))
    word2vec.set_defaults(handler=_embeddings)
    glove = commands.add_parser("glove", help="train GloVe, evaluate or inspect bias of saved vectors")
    embeddings_cli.add_train_eval_bias(glove.add_subparsers(dest="action", metavar="ACTION", required=True),
                                       algorithm="glove")
    glove.set_defaults(handler=_embeddings)
    embeddings = commands.add_parser("embeddings", help="embedding analyses (bias)")
    embeddings_cli.add_bias(embeddings.add_subparsers(dest="action", metavar="ACTION", required=True))
    embeddings.set_defaults(handler=_embeddings)

    from llmkit.models import cli as models_cli

    models = commands.add_parser("models", help="model presets (parameter counts) and Hugging Face checkpoints")
    models_cli.add_models_arguments(models)
    models.set_defaults(handler=_models)
    generate = commands.add_parser("generate", help="generate text from a checkpoint directory, streamed")
    models_cli.add_generate_arguments(generate)
    generate.set_defaults(handler=_generate)
    from llmkit.train.cli import add_arguments as add_pretrain_arguments

    pretrain = commands.add_parser("pretrain", help="pretrain a model preset (CLM / MLM / span corruption); "
                                                    "works under torchrun")
    add_pretrain_arguments(pretrain)
    pretrain.set_defaults(handler=_pretrain)
    from llmkit.train.cli import add_corpus_arguments

    corpus = commands.add_parser("corpus", help="prepare a pretraining corpus: tokenizer and token shards")
    add_corpus_arguments(corpus)
    corpus.set_defaults(handler=_corpus)
    return parser


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("llmkit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _configure_logging(args: argparse.Namespace) -> None:
    """Library messages (``llmkit.*`` loggers) to stderr: INFO by default, DEBUG with -v, WARNING with -q."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if level > logging.DEBUG else "%(name)s: %(message)s"))
    logger = logging.getLogger("llmkit")
    logger.addHandler(handler)
    logger.setLevel(level)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split())


def _stdout_gone() -> int:
    # `llmkit ... | head`: the reader left. Point stdout at /dev/null so the interpreter's
    # final flush does not raise again, and exit as a process killed by SIGPIPE would.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    debug = os.environ.get("LLMKIT_DEBUG", "") not in ("", "0")
    where = f"llmkit {args.command}"
    try:
        status = args.handler(args)
        sys.stdout.flush()
        return 0 if status is None else status
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{where}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the command line's last word: one line, not a traceback
        if debug:
            raise
        print(f"{where}: error: {type(exc).__name__}: {_one_line(exc)} "
              "(LLMKIT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
