"""`llmkit word2vec|glove train|eval|bias` and `llmkit embeddings bias`.

    llmkit word2vec train --corpus PATH --out VECTORS [--binary] [gensim's parameters]
    llmkit glove train --corpus PATH --out VECTORS [--binary] [Stanford GloVe's parameters]
    llmkit word2vec eval VECTORS [--binary] [--analogies FILE] [--pairs FILE]   (= llmkit glove eval)
    llmkit word2vec bias VECTORS [--binary] [-n 10]      (= llmkit embeddings bias)

Vectors are word2vec.c / gensim files (text, or binary with --binary).
--analogies / --pairs default to gensim's questions-words.txt / wordsim353.tsv
when gensim is installed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_train_eval_bias(commands, algorithm: str = "word2vec") -> None:
    train = commands.add_parser("train", help=f"train {algorithm} on a text file or folder and save the vectors")
    train.set_defaults(algorithm=algorithm)
    train.add_argument("--corpus", required=True, help="UTF-8 text file (one sentence a line) or a folder of them")
    train.add_argument("--out", required=True, help="where to write the vectors (word2vec format)")
    train.add_argument("--binary", action="store_true", help="write the binary word2vec format")
    if algorithm == "word2vec":
        options = [("vector-size", int, 100), ("window", int, 5), ("min-count", int, 5), ("negative", int, 5),
                   ("epochs", int, 5), ("workers", int, None), ("sg", int, 1), ("seed", int, 1),
                   ("sample", float, 1e-3), ("alpha", float, 0.025), ("min-alpha", float, 1e-4)]
    else:  # Stanford GloVe's defaults (x_max 100, alpha 0.75, eta 0.05), window 10
        options = [("vector-size", int, 100), ("window", int, 10), ("min-count", int, 5), ("epochs", int, 25),
                   ("workers", int, None), ("seed", int, 1), ("x-max", float, 100.0), ("alpha", float, 0.75),
                   ("learning-rate", float, 0.05)]
    for name, kind, default in options:
        train.add_argument(f"--{name}", type=kind, default=default)
    if algorithm == "word2vec":
        train.add_argument("--per-pair-negatives", action="store_true",
                           help="skip-gram with fresh negatives for every (context, word) pair, as word2vec.c "
                                "(default: one draw per window, as pWord2Vec)")
        train.add_argument("--device", default="cpu", help="cpu (C++ threads) or cuda")
    evaluate = commands.add_parser("eval", help="analogy accuracy and word-pair correlation of saved vectors")
    evaluate.add_argument("vectors")
    evaluate.add_argument("--binary", action="store_true")
    evaluate.add_argument("--analogies", help="questions-words.txt style file (default: gensim's)")
    evaluate.add_argument("--pairs", help="wordsim353.tsv style file (default: gensim's)")
    add_bias(commands)


def add_bias(commands) -> None:
    bias = commands.add_parser("bias", help="Bolukbasi et al.'s gender direction, extreme occupations, DirectBias")
    bias.add_argument("vectors")
    bias.add_argument("--binary", action="store_true")
    bias.add_argument("-n", type=int, default=10, help="occupations per column")


def _gensim_test_file(name: str) -> str | None:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        return None
    path = datapath(name)
    return path if Path(path).is_file() else None


def run(args: argparse.Namespace) -> int:
    from .keyed_vectors import KeyedVectors

    try:
        if args.action == "train" and args.algorithm == "glove":
            from .glove import GloVe

            model = GloVe(corpus_file=args.corpus, vector_size=args.vector_size, window=args.window,
                          min_count=args.min_count, epochs=args.epochs, workers=args.workers, seed=args.seed,
                          x_max=args.x_max, alpha=args.alpha, learning_rate=args.learning_rate)
        elif args.action == "train":
            from .word2vec import Word2Vec

            model = Word2Vec(corpus_file=args.corpus, vector_size=args.vector_size, window=args.window,
                             min_count=args.min_count, negative=args.negative, epochs=args.epochs,
                             workers=args.workers, sg=args.sg, seed=args.seed, sample=args.sample, alpha=args.alpha,
                             min_alpha=args.min_alpha, shared_negatives=not args.per_pair_negatives,
                             device=args.device)
        if args.action == "train":
            model.wv.save_word2vec_format(args.out, binary=args.binary)
            print(json.dumps({"vectors": args.out, "vocabulary": len(model.wv), **model.training_stats[-1]}, indent=2))
            return 0
        kv = KeyedVectors.load_word2vec_format(args.vectors, binary=args.binary)
        if args.action == "eval":
            analogies = args.analogies or _gensim_test_file("questions-words.txt")
            pairs = args.pairs or _gensim_test_file("wordsim353.tsv")
            if analogies is None and pairs is None:
                raise FileNotFoundError("give --analogies and/or --pairs (gensim's test files are not installed)")
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

        print(bias_report(kv, n=args.n))
        return 0
    except (FileNotFoundError, ValueError, KeyError, UnicodeDecodeError) as err:
        print(f"llmkit: {err}", file=sys.stderr)
        return 2
