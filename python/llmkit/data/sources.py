"""Documents for pretraining: read text, Markdown and JSONL files (optionally
xz / gzip / bz2 compressed), folders of them, or the shipped corpus.

A *document* is the unit a tokenized corpus keeps boundaries for (and the
unit of the train / validation split): a blank-line-separated paragraph of a
text file, or one JSONL record's ``"text"``.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from pathlib import Path
from typing import Iterator

from llmkit.utils import get_logger

_log = get_logger(__name__)

# Paragraphs of the shipped corpus (as iter_documents splits it): only a
# progress-bar hint, so a stale value after a corpus update is harmless.
ENGLISH_CORPUS_DOCUMENTS = 74_667

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
JSONL_SUFFIXES = (".jsonl",)
COMPRESSED_SUFFIXES = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def _builtin() -> Path:
    from . import ENGLISH_CORPUS  # at call time: llmkit.data imports this module

    return ENGLISH_CORPUS


def _kind(path: Path) -> tuple[str | None, object]:
    """(\"text\" | \"jsonl\" | None, opener) from the file name: data.jsonl.gz -> jsonl, gzip."""
    name = path.name.lower()
    opener = open
    for suffix, compressed_open in COMPRESSED_SUFFIXES.items():
        if name.endswith(suffix):
            name, opener = name[: -len(suffix)], compressed_open
            break
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", opener
    if name.endswith(TEXT_SUFFIXES):
        return "text", opener
    return None, opener


def source_files(source) -> list[Path]:
    """The files `source` names, in reading order: the shipped corpus for None,
    the file itself, or every readable file (.txt/.md/.jsonl, optionally
    .xz/.gz/.bz2; hidden entries skipped) below a folder, sorted by path.

    Symbolic links are followed, each real file and folder once (see
    :func:`_walk`). Raises FileNotFoundError for a missing path and ValueError
    for a folder holding no such file, so errors surface before any work starts."""
    if source is None:
        return [_builtin()]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path (str or Path) or None for the shipped corpus, "
                        f"got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus source {str(path)!r} does not exist")
    if path.is_file():
        return [path]  # named explicitly: read it whatever its suffix (as text unless .jsonl)
    if not path.is_dir():
        raise ValueError(f"corpus source {str(path)!r} is neither a file nor a folder")
    files = _walk(path)
    if not files:
        raise ValueError(f"empty corpus: folder {str(path)!r} holds no readable files (expected "
                         f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, optionally compressed as "
                         f"{', '.join(COMPRESSED_SUFFIXES)})")
    return files


def _walk(folder: Path) -> list[Path]:
    """The readable files below `folder`, sorted by path, each real file once.

    Symbolic links are followed (a corpus is often a folder of links), but a
    folder is entered only once per real folder and a file is listed only
    once per real file (the first of its paths in sorted order): a link loop
    (``a/loop -> ..``) ends, and two links to one file read it once. Broken
    links are skipped with a warning; an unreadable folder is an error (a
    silently missing part of a corpus would be a wrong result).
    """
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    files: list[Path] = []

    def visit(directory: Path) -> None:
        try:
            stat = directory.stat()
        except OSError as err:
            raise _unreadable(directory, err) from None
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            return  # a loop, or a second link to a folder already read
        seen_dirs.add((stat.st_dev, stat.st_ino))
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            raise _unreadable(directory, err) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files and folders (.git, editor backups)
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
            except OSError:
                is_dir = is_file = False
            if is_dir:
                visit(path)
                continue
            if _kind(path)[0] is None:
                continue
            if not is_file:
                if entry.is_symlink():
                    _log.warning("corpus folder %s: skipping broken link %s", folder, path)
                continue
            try:
                target = path.stat()
            except OSError as err:
                raise _unreadable(path, err) from None
            if (target.st_dev, target.st_ino) in seen_files:
                continue
            seen_files.add((target.st_dev, target.st_ino))
            files.append(path)

    visit(folder)
    # Sorted by full path (as before): "a.md" < "b/z.txt" < "c.jsonl". The walk
    # went folder by folder in sorted order too, so the path kept for a file
    # linked twice is the first of its paths in this order.
    return sorted(files)


def _unreadable(path: Path, err: OSError) -> OSError:
    if isinstance(err, PermissionError):
        return PermissionError(f"corpus source: cannot read {str(path)!r} (permission denied)")
    return OSError(f"corpus source: cannot read {str(path)!r}: {err.strerror or err}")


def source_identity(source) -> dict:
    """What a cache of the corpus built from `source` depends on: the files'
    resolved paths, sizes and modification times ("builtin" and the size for
    the shipped corpus, which moves with each install)."""
    if source is None:
        return {"builtin": _builtin().name, "size": _builtin().stat().st_size}
    files = []
    for file in source_files(source):
        stat = file.stat()
        files.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return {"files": files}


def describe_source(source) -> str:
    """A short human-readable name of `source` (for meta.json and logs)."""
    if source is None:
        return f"builtin:{_builtin().name}"
    return str(Path(source).expanduser().resolve())


def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
    paragraph: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl_texts(lines: Iterator[str], file: Path) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{number}: not valid JSON ({err.msg}); expected one JSON object "
                             f"with a \"text\" string per line") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f"{file}:{number}: expected a JSON object with a \"text\" field, "
                             f"got {type(record).__name__}"
                             + (f" with keys {sorted(record)[:5]}" if isinstance(record, dict) else ""))
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f"{file}:{number}: the \"text\" field must be a string, "
                             f"got {type(text).__name__}")
        if text.strip():
            yield text


def _file_documents(file: Path) -> Iterator[str]:
    kind, opener = _kind(file)
    try:
        with opener(file, "rt", encoding="utf-8") as f:
            if kind == "jsonl":
                yield from _jsonl_texts(f, file)
            else:
                yield from _paragraphs(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, OSError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{file}: cannot decompress/read it ({err})") from None


def iter_documents(source=None, *, max_documents: int | None = None) -> Iterator[str]:
    """The documents of `source`, in order.

    Args:
        source: a text file (.txt/.md: blank-line-separated paragraphs, the
            lines of a paragraph joined with "\\n"), a .jsonl file (one
            document per line, its "text" field), either optionally .xz/.gz/.bz2;
            a folder (every such file below it, sorted by path); or None for
            the shipped English corpus (:data:`llmkit.data.ENGLISH_CORPUS`).
        max_documents: stop after this many documents (quick runs and tests).

    Empty / whitespace-only documents are skipped. The path is checked now
    (FileNotFoundError / ValueError); a source yielding no document raises
    ValueError("empty corpus ...") when the iteration ends.
    """
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
        raise ValueError(f"max_documents must be a positive int or None, got {max_documents!r}")
    files = source_files(source)
    return _iter_documents(files, source, max_documents)


def _iter_documents(files: list[Path], source, max_documents: int | None) -> Iterator[str]:
    count = 0
    for file in files:
        for document in _file_documents(file):
            yield document
            count += 1
            if max_documents is not None and count >= max_documents:
                return
    if count == 0:
        raise ValueError(f"empty corpus: {describe_source(source)} holds no non-empty document")


def document_count_hint(source=None, max_documents: int | None = None) -> int | None:
    """The number of documents `source` yields when known without reading it
    (the shipped corpus, or max_documents), else None: a progress-bar total."""
    known = ENGLISH_CORPUS_DOCUMENTS if source is None else None
    if max_documents is None:
        return known
    return max_documents if known is None else min(known, max_documents)


__all__ = ["iter_documents", "source_files", "source_identity", "describe_source", "document_count_hint",
           "ENGLISH_CORPUS_DOCUMENTS"]
