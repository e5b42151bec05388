"""Offline byte-level text corpora for the recipes, built from text that ships with Python.

Nothing is downloaded. Two sources with different styles, so fine-tuning sees a shifted task:

* ``"stdlib_source"``: the source code (code, comments, docstrings) of a fixed list of standard
  library modules, read with :func:`inspect.getsource`; pre-training corpus.
* ``"pydoc_topics"``: the English help texts of ``pydoc_data.topics`` (what ``help("if")`` shows);
  fine-tuning corpus (prose about the language instead of code).

Both are deterministic for a given Python version (sorted keys, fixed module list). Text is
encoded as UTF-8 bytes (vocabulary 256). The last ``val_fraction`` of a corpus is the
validation split.
"""
from __future__ import annotations

import importlib
import inspect

import torch

__all__ = ["VOCAB_SIZE", "load_corpus", "split", "get_batch", "CORPORA"]

VOCAB_SIZE = 256

#: pre-training modules: plain-Python stdlib modules present in every CPython build
STDLIB_MODULES = (
    "collections", "functools", "argparse", "textwrap", "string", "heapq", "bisect", "fractions",
    "statistics", "dataclasses", "enum", "typing", "json.decoder", "json.encoder", "csv",
    "calendar", "difflib", "shlex", "glob", "fnmatch", "pathlib", "tempfile", "shutil",
    "configparser", "logging", "pprint", "reprlib", "copy", "contextlib", "abc", "random",
    "datetime", "decimal", "ipaddress", "inspect", "ast", "tokenize", "zipfile", "tarfile",
    "gzip", "base64", "uuid", "queue", "threading", "subprocess", "email.message", "http.client",
    "urllib.parse", "html.parser", "xml.dom.minidom", "unittest.case", "doctest", "pdb", "cmd",
    "locale", "gettext", "optparse", "operator", "numbers", "weakref", "selectors", "sched",
)

CORPORA = ("stdlib_source", "pydoc_topics")


def _stdlib_source() -> str:
    parts = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
            parts.append(f"# ---- {name} ----\n" + inspect.getsource(mod))
        except (ImportError, OSError, TypeError):  # a build without the .py file: skip it
            continue
    if not parts:
        raise RuntimeError("no standard-library source found (is this a Python without .py files?)")
    return "\n".join(parts)


def _pydoc_topics() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(f"== {k} ==\n{topics[k]}" for k in sorted(topics))


def load_corpus(name: str, max_bytes: int | None = None) -> torch.Tensor:
    """The corpus ``name`` as a 1-D uint8 tensor of UTF-8 bytes (first ``max_bytes`` if given)."""
    if name == "stdlib_source":
        text = _stdlib_source()
    elif name == "pydoc_topics":
        text = _pydoc_topics()
    else:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
    data = text.encode("utf-8")
    if max_bytes is not None:
        data = data[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def split(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)``: the last ``val_fraction`` of the bytes is the validation split."""
    n = int(len(data) * (1.0 - val_fraction))
    return data[:n], data[n:]


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows ``(x, y)`` of shape ``(batch_size, block_size)`` (int64), ``y`` shifted by one."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    offs = torch.arange(block_size + 1)
    win = data[ix[:, None] + offs].long()
    return win[:, :-1].to(device), win[:, 1:].to(device)
