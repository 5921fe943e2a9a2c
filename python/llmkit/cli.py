"""The `llmkit` command.

    llmkit bench [NAME ...] [--quick] [--out DIR] [--repeats N] [--device D]
    llmkit info     build of llmkit (backends, torch, CUDA archs) as JSON
    llmkit demo     NF4, QLoRA fine-tune, attention, word2vec, transformer models, pretraining, quick benchmarks
    llmkit adapter info ADAPTER_DIR
    llmkit adapter merge --model MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR
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
import sys


def _bench(args: argparse.Namespace) -> int:
    from llmkit import bench

    return bench.run_from_args(args)


def _info(args: argparse.Namespace) -> int:
    import llmkit

    print(json.dumps(llmkit.build_info(), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from llmkit import demo

    return demo.main()


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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = commands.add_parser("bench", help="run benchmarks side by side with their peers")
    add_arguments(bench)
    bench.set_defaults(handler=_bench)

    info = commands.add_parser("info", help="print build_info() as JSON")
    info.set_defaults(handler=_info)

    demo = commands.add_parser("demo", help="NF4 round trip, a QLoRA fine-tune, attention, word2vec, transformer models, GPT + BERT pretraining; quick benchmarks")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
