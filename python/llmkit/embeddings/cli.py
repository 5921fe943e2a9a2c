"""`llmkit word2vec|glove train|eval|bias` and `llmkit embeddings bias`.

    llmkit word2vec train --corpus PATH -o VECTORS [--binary] [--model FILE] [--device D] [gensim's parameters]
    llmkit glove train --corpus PATH -o VECTORS [--binary] [--model FILE] [Stanford GloVe's parameters]
    llmkit word2vec eval VECTORS [--binary] [--analogies FILE] [--pairs FILE]   (= llmkit glove eval)
    llmkit word2vec bias VECTORS [--binary] [-n 10]      (= llmkit embeddings bias)

VECTORS are word2vec.c / gensim files (text, or binary with --binary), or an
llmkit file written by ``KeyedVectors.save`` / ``Word2Vec.save`` /
``GloVe.save`` (``train --model``), recognised by its content.
``-o/--output`` was ``--out`` (still accepted). ``llmkit word2vec train``
trains skip-gram unless ``--sg 0`` (the command's documented default since its
first release; gensim's Python ``Word2Vec`` defaults to CBOW, and so does
llmkit's). --analogies / --pairs default to gensim's questions-words.txt /
wordsim353.tsv when gensim is installed.

User mistakes (a missing corpus, an unreadable or wrongly formatted vectors
file, a bad option value) raise exceptions with a message saying what was
wrong; the ``llmkit`` command prints them as one line.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from llmkit.utils.cliargs import add_device_argument, add_output_argument, resolve_device


def add_train_eval_bias(commands, algorithm: str = "word2vec") -> None:
    train = commands.add_parser("train", help=f"train {algorithm} on a text file or folder and save the vectors")
    train.set_defaults(algorithm=algorithm)
    train.add_argument("--corpus", required=True, help="UTF-8 text file (one sentence a line) or a folder of them")
    add_output_argument(train, required=True, aliases=("--out",), metavar="VECTORS",
                        help="where to write the vectors (word2vec format; --out is the older spelling)")
    train.add_argument("--binary", action="store_true", help="write the binary word2vec format")
    train.add_argument("--model", metavar="FILE",
                       help=f"also save the whole model ({'Word2Vec' if algorithm == 'word2vec' else 'GloVe'}"
                            ".load reads it and can train further)")
    if algorithm == "word2vec":
        options = [("vector-size", int, 100, None), ("window", int, 5, None), ("min-count", int, 5, None),
                   ("negative", int, 5, None), ("epochs", int, 5, None),
                   ("workers", int, None, "threads (default: all of torch.get_num_threads())"),
                   ("sg", int, 1, "1: skip-gram (this command's default), 0: CBOW (gensim's Python default)"),
                   ("seed", int, 1, None), ("sample", float, 1e-3, None), ("alpha", float, 0.025, None),
                   ("min-alpha", float, 1e-4, None), ("ns-exponent", float, 0.75, None),
                   ("max-vocab-size", int, None, None), ("max-final-vocab", int, None, None)]
    else:  # Stanford GloVe's defaults (x_max 100, alpha 0.75, eta 0.05), window 10
        options = [("vector-size", int, 100, None), ("window", int, 10, None), ("min-count", int, 5, None),
                   ("epochs", int, 25, None), ("workers", int, None, "threads (default: all of torch's)"),
                   ("seed", int, 1, None), ("x-max", float, 100.0, None), ("alpha", float, 0.75, None),
                   ("learning-rate", float, 0.05, None), ("max-vocab-size", int, None, None)]
    for name, kind, default, text in options:
        train.add_argument(f"--{name}", type=kind, default=default,
                           help=(text + " " if text else "") + "(default: %(default)s)")
    if algorithm == "word2vec":
        train.add_argument("--per-pair-negatives", action="store_true",
                           help="skip-gram with fresh negatives for every (context, word) pair, as word2vec.c "
                                "(default: one draw per window, as pWord2Vec)")
        add_device_argument(train, default="cpu",
                            help="cpu (C++ threads), cuda / cuda:N (the CUDA trainer), or auto (CUDA when "
                                 "available) (default: %(default)s)")
    else:
        _add_cpu_device(train)
    evaluate = commands.add_parser("eval", help="analogy accuracy and word-pair correlation of saved vectors")
    evaluate.add_argument("vectors")
    evaluate.add_argument("--binary", action="store_true", help="VECTORS is in the binary word2vec format")
    evaluate.add_argument("--analogies", help="questions-words.txt style file (default: gensim's)")
    evaluate.add_argument("--pairs", help="wordsim353.tsv style file (default: gensim's)")
    _add_cpu_device(evaluate)
    add_bias(commands)


def add_bias(commands) -> None:
    bias = commands.add_parser("bias", help="Bolukbasi et al.'s gender direction, extreme occupations, DirectBias")
    bias.add_argument("vectors")
    bias.add_argument("--binary", action="store_true", help="VECTORS is in the binary word2vec format")
    bias.add_argument("-n", type=int, default=10, help="occupations per column (default: %(default)s)")
    _add_cpu_device(bias)


def _add_cpu_device(parser) -> None:
    add_device_argument(parser, help="cpu or auto (this command runs on the CPU: numpy and C++ threads; cuda is "
                                     "refused) (default: %(default)s)")


def _cpu_only(args: argparse.Namespace, what: str) -> None:
    if args.device not in ("auto", "cpu"):
        raise ValueError(f"--device {args.device}: {what} runs on the CPU only (no CUDA implementation); "
                         "use --device cpu or auto")


def _gensim_test_file(name: str) -> str | None:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        return None
    path = datapath(name)
    return path if Path(path).is_file() else None


def _check_output(path: str, what: str) -> None:
    """Fail before training, not after, when the result could not be written."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory; give a file name")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {what} {path}: directory {parent} is not writable")


def _check_input(path: str, what: str) -> None:
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if target.is_dir():
        raise ValueError(f"{what} {path} is a directory, not a file")


def load_vectors(path: str, binary: bool = False):
    """The KeyedVectors of `path`: an llmkit file (KeyedVectors / Word2Vec / GloVe ``save``),
    else word2vec.c's binary (`binary`) or text format; a ValueError that says which format
    was expected and how to ask for the other when the file does not parse."""
    from . import _storage
    from .keyed_vectors import KeyedVectors

    _check_input(path, "vectors file")
    kind = _storage.sniff(path)
    if kind == "KeyedVectors":
        return KeyedVectors.load(path)
    if kind == "Word2Vec":
        from .word2vec import Word2Vec

        return _vectors_of(Word2Vec.load(path, progress=False), path)
    if kind == "GloVe":
        from .glove import GloVe

        return _vectors_of(GloVe.load(path, progress=False), path)
    try:
        return KeyedVectors.load_word2vec_format(path, binary=binary)
    except ValueError as err:  # UnicodeDecodeError included
        hint = ("is it a text file? then drop --binary" if binary
                else "is it a binary file? then pass --binary")
        raise ValueError(f"cannot read {path} as word2vec {'binary' if binary else 'text'} vectors ({hint}): "
                         f"{err}") from None


def _vectors_of(model, path):
    if model.wv is None:
        raise ValueError(f"{path} holds a model without a vocabulary (saved before build_vocab)")
    return model.wv


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return _train(args)
    if args.action == "eval":
        _cpu_only(args, "evaluation")
        analogies = args.analogies or _gensim_test_file("questions-words.txt")
        pairs = args.pairs or _gensim_test_file("wordsim353.tsv")
        if analogies is None and pairs is None:
            raise FileNotFoundError("give --analogies and/or --pairs (gensim's test files are not installed: "
                                    "pip install 'llmkit[embeddings]')")
        for path, what in ((args.analogies, "analogy file"), (args.pairs, "word-pair file")):
            if path:
                _check_input(path, what)
        kv = load_vectors(args.vectors, args.binary)
        report = {"vocabulary": len(kv)}
        if analogies:
            score, _ = kv.evaluate_word_analogies(analogies)
            report["analogy_accuracy"] = score
        if pairs:
            pearson, spearman, oov = kv.evaluate_word_pairs(pairs)
            report.update({"pearson": float(pearson[0]), "spearman": float(spearman[0]), "oov_percent": oov})
        print(json.dumps(report, indent=2))
        return 0
    from .bias import bias_report

    _cpu_only(args, "the bias report")
    if args.n < 0:
        raise ValueError(f"-n must be >= 0, got {args.n}")
    print(bias_report(load_vectors(args.vectors, args.binary), n=args.n))
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    _check_output(args.output, "vectors file")
    if args.model:
        _check_output(args.model, "model file")
    workers = args.workers if args.workers is not None else max(1, torch.get_num_threads())
    if args.algorithm == "glove":
        from .glove import GloVe

        _cpu_only(args, "GloVe training")
        model = GloVe(corpus_file=args.corpus, vector_size=args.vector_size, window=args.window,
                      min_count=args.min_count, max_vocab_size=args.max_vocab_size, epochs=args.epochs,
                      workers=workers, seed=args.seed, x_max=args.x_max, alpha=args.alpha,
                      learning_rate=args.learning_rate)
    else:
        from .word2vec import Word2Vec

        model = Word2Vec(corpus_file=args.corpus, vector_size=args.vector_size, window=args.window,
                         min_count=args.min_count, max_vocab_size=args.max_vocab_size, negative=args.negative,
                         epochs=args.epochs, workers=workers, sg=args.sg, seed=args.seed, sample=args.sample,
                         alpha=args.alpha, min_alpha=args.min_alpha, ns_exponent=args.ns_exponent,
                         max_final_vocab=args.max_final_vocab, compute_loss=True,
                         shared_negatives=not args.per_pair_negatives, device=resolve_device(args.device))
    model.wv.save_word2vec_format(args.output, binary=args.binary)
    written = {"vectors": args.output}
    if args.model:
        model.save(args.model)
        written["model"] = args.model
    print(json.dumps({**written, "vocabulary": len(model.wv), **model.training_stats[-1]}, indent=2))
    return 0
