"""Long natural English text for logit fidelity, built from what is installed: the docstrings of a
fixed list of Python standard-library modules (their prose paragraphs, code examples left out).
Deterministic for a given Python version; nothing is downloaded."""

from __future__ import annotations

import importlib
import inspect

MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "configparser", "contextlib", "csv",
           "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools",
           "heapq", "http.client", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox",
           "multiprocessing", "optparse", "pathlib", "pickle", "random", "sched", "shutil", "socket",
           "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
           "queue", "unittest", "urllib.request", "uuid", "warnings", "zipfile")


def stdlib_prose() -> str:
    """Paragraphs of the modules' docstrings (module first, then its classes and functions by name)."""
    seen: set[str] = set()
    paragraphs: list[str] = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for doc in _docstrings(module):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                if _is_prose(paragraph) and text not in seen:
                    seen.add(text)
                    paragraphs.append(text)
    return "\n\n".join(paragraphs)


def _docstrings(module: object) -> list[str]:
    docs = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
    return docs


def _is_prose(paragraph: str) -> bool:
    """Sentences, not code, tables or signatures: long enough, ends a sentence (a colon would lead into
    an example that is dropped), no indented, bulleted or prompt lines."""
    lines = paragraph.strip("\n").splitlines()
    return (len(paragraph) >= 120 and paragraph.rstrip().endswith(".")
            and not any(line.startswith((" ", "\t", ">>>", "-", "*", "=")) for line in lines))
