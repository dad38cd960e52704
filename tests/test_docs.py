"""The documentation runs: every ```python block of README.md and docs/*.md is executed.

Each block runs in a fresh namespace after ``torch.manual_seed(0)``, and the test id is
``file:index``, so a failure names the block. Tracebacks point at the Markdown file's own line
numbers. A block preceded by the line ``<!-- skip -->`` is reported as skipped (code quoted for
contrast, e.g. Keras or MXNet). Examples state their claims with ``assert``, so a wrong example
fails here, not only a broken one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import actsparse

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOC_FILES = [README, *sorted(DOCS.glob("*.md"))]

SKIP_MARKER = "<!-- skip -->"
OPEN_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)")

#: The two quick-start commands. They are a contract with users and CI (.ci/run), so they must
#: appear in README.md character for character.
QUICK_START = [
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    'pip install -e ".[cli]" && actsparse train',
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" && pytest',
]

#: One guide per user question (the seeds 000..004).
SEEDS = ["000", "001", "002", "003", "004"]


def fenced_blocks(path: Path) -> list[tuple[str, int, str, bool]]:
    """``(language, first code line (1-based), code, skipped)`` for every fenced block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = OPEN_FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        start = i + 1
        j = start
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        if j == len(lines):
            raise ValueError(f"{path.name}:{i + 1}: unclosed code fence")
        blocks.append((lang, start + 1, "\n".join(lines[start:j]), prev == SKIP_MARKER))
        i = j + 1
    return blocks


def doc_blocks(name: str, marker: str) -> list:
    """The ```python blocks of ``docs/NAME`` whose code contains ``marker``, as ``(line, code)``
    params: blocks that need an optional extra are skipped here and run by that extra's test."""
    return [pytest.param(line, code, id=f"{name}:{line}")
            for lang, line, code, _ in fenced_blocks(DOCS / name) if lang == "python" and marker in code]


def run_doc_block(name: str, line: int, code: str) -> None:
    """Run one block with the Markdown file's line numbers in tracebacks."""
    exec(compile("\n" * (line - 1) + code, f"docs/{name}", "exec"), {"__name__": "__main__"})


def python_blocks() -> list:
    params = []
    for path in DOC_FILES:
        if not path.exists():
            continue
        rel = path.relative_to(ROOT).as_posix()
        index = 0
        for lang, line, code, skipped in fenced_blocks(path):
            if lang not in ("python", "py"):
                continue
            marks = [pytest.mark.skip(reason=f"{SKIP_MARKER} before {rel}:{line}")] if skipped else []
            params.append(pytest.param(path, line, code, id=f"{rel}:{index}", marks=marks))
            index += 1
    return params


@pytest.fixture
def torch_state():
    """Run on one thread, and undo global torch settings that a block might change.

    The examples use tiny tensors, which gain nothing from intra-op threads. With two threads
    on a two-core machine, any other busy process makes OpenMP's spinning threads contend, and
    a 100-step loop that takes 0.2 s can take 10 s.
    """
    dtype, grad, threads = torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("path", "line", "code"), python_blocks())
def test_python_block_runs(path: Path, line: int, code: str, torch_state) -> None:
    # Pad with blank lines so that tracebacks show the Markdown file's line numbers.
    compiled = compile("\n" * (line - 1) + code, str(path), "exec")
    torch.manual_seed(0)
    namespace = {"__name__": "__main__"}
    exec(compiled, namespace)


def test_there_are_python_blocks() -> None:
    assert len(python_blocks()) >= 10


@pytest.mark.parametrize("seed", SEEDS)
def test_every_seed_has_a_guide(seed: str) -> None:
    guides = sorted(DOCS.glob(f"{seed}-*.md"))
    assert len(guides) == 1, f"expected exactly one docs/{seed}-*.md, found {guides}"
    text = guides[0].read_text(encoding="utf-8")
    assert "```python" in text, f"{guides[0].name} has no runnable example"
    assert "## The pitfall" in text, f"{guides[0].name} has no 'The pitfall' section"
    assert f"docs/{guides[0].name}" in README.read_text(encoding="utf-8"), "README does not link the guide"
    assert guides[0].name in (DOCS / "index.md").read_text(encoding="utf-8"), "docs/index.md does not list it"


@pytest.mark.parametrize("command", QUICK_START)
def test_readme_has_quick_start_commands_verbatim(command: str) -> None:
    lines = [ln.strip() for ln in README.read_text(encoding="utf-8").splitlines()]
    assert command in lines, f"README.md lacks the quick-start line:\n{command}"
    bash = [code for lang, _, code, _ in fenced_blocks(README) if lang in ("bash", "sh", "shell")]
    assert any(code.strip() == command for code in bash), "the command must be alone in a ```bash block"


def test_api_reference_lists_every_public_name() -> None:
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    public = list(actsparse.__all__) + [f"functional.{n}" for n in actsparse.functional.__all__]

    def described(qualname: str) -> bool:
        name = re.escape(qualname.split(".")[-1])
        return re.search(rf"`(actsparse\.)?(functional\.)?{name}[`(\[]", text) is not None

    missing = [n for n in public if not described(n)]
    assert not missing, f"docs/index.md does not describe: {missing}"


def test_relative_links_resolve() -> None:
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    code = re.compile(r"^(`{3,}).*?^\1\s*$|`[^`\n]*`", re.S | re.M)  # fenced blocks, inline code
    broken = []
    for path in DOC_FILES:
        prose = code.sub("", path.read_text(encoding="utf-8"))
        for target in link.findall(prose):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, f"broken links: {broken}"
