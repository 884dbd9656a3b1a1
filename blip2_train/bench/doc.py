"""Where benchmark figures go: blocks of docs/benchmarks.md between `<!-- bench:NAME -->` markers, each naming
its command and machine."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

BENCH_DOC = Path("docs/benchmarks.md")


def write_section(name: str, body: str, doc: Path = BENCH_DOC) -> None:
    """Replace (or append) the block between <!-- bench:NAME --> markers."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nFigures written by `blip2-bench`; each block names its command and machine.\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}"
