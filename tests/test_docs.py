"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs as a script of its own in a subprocess (CPU only here; five minutes at most),
with this checkout on PYTHONPATH and the working directory a fresh folder that holds `CACHE`: a
small synthetic latent cache of the shape docs/data.md's example reads (256px, 4-channel
latents, 4096-wide text). That folder stands in for the reader's own files; a block must need
nothing else, and run on a CPU as well as on a GPU.

A block that cannot run without files only its reader has (their checkpoints) says so in its
info string, ```python no-run, and is listed in NO_RUN_BLOCKS with the reason (the inventory test
checks both lists against the documents). Every other block whose language looks like Python must be exactly ```python,
so no block escapes both the run and the skip list by its spelling. Shell blocks (```bash and the like) are not run: they install
packages and train for minutes. Of them, only the README's two main commands are checked, to be
there word for word.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NO_RUN = "no-run"
TIMEOUT_S = 300

# The ```python no-run blocks, (document, a line of the block): why it cannot run here. Kept
# short on purpose: a block that can be made to run should be.
NO_RUN_BLOCKS = {
    ("README.md", 'model = pixart_official.load("PixArt-XL-2-512x512.pth")'):
        "loads the reader's own diffusers folder, official PixArt-α .pth and DiT .pt files",
    ("docs/design.md", "class MyFamily(Family):"):
        "a sketch: MyConfig and MyDiT stand for the reader's own classes",
}

MAIN_COMMANDS = [
    "pip install torch==2.13.0 && pip install -e . && python -m train demo --out demo-run",
    'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q',
]


@dataclass
class Block:
    document: str  # path relative to the repository
    line: int      # of the opening fence
    info: str      # the fence's info string: "python", "python no-run", "bash", ...
    code: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def name(self) -> str:
        return f"{self.document}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The ``` fenced blocks of a Markdown file (top-level fences, as the docs write them)."""
    blocks, current = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = re.match(r"^```(.*)$", line)
        if current is None and fence:
            current = Block(str(path.relative_to(REPO)), number, fence.group(1).strip(), "")
        elif current is not None and line.strip() == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current.code += line + "\n"
    assert current is None, f"{path}: the block opened at line {current.line} is never closed"
    return blocks


def _is_python(block: Block) -> bool:
    return block.language.lower() in ("python", "py", "python3", "py3", "pycon", "ipython")


PYTHON_BLOCKS = [block for path in DOCUMENTS for block in fenced_blocks(path) if _is_python(block)]


def _matches(block: Block, document: str, marker: str) -> bool:
    return block.document == document and marker in block.code


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """256px, 4 x 32 x 32 latents, 4096-wide captions of 4 tokens: bench/data.py's synthetic cache."""
    import data as bench_data  # bench/data.py: tests/conftest.py puts bench/ on the path

    root = tmp_path_factory.mktemp("docs") / "CACHE"
    bench_data.build_synthetic_cache(root, samples=128, text_tokens=4, text_width=4096, shard_size=128)
    return root


def test_block_inventory():
    """Every Python block is run or marked no-run with a listed reason; the lists are current;
    the README's two main commands are there word for word."""
    assert PYTHON_BLOCKS, "no ```python block found: the extraction is broken"
    for block in PYTHON_BLOCKS:
        assert block.info in ("python", f"python {NO_RUN}"), (
            f"{block.name}: fence ```{block.info}: write ```python (run by this test) or ```python {NO_RUN} "
            f"(a block that needs the reader's own files, listed in NO_RUN_BLOCKS)")
    marked = [block for block in PYTHON_BLOCKS if block.info == f"python {NO_RUN}"]
    for block in marked:
        assert any(_matches(block, *key) for key in NO_RUN_BLOCKS), (
            f"{block.name} is marked {NO_RUN} but not listed in NO_RUN_BLOCKS with a reason")
    for key in NO_RUN_BLOCKS:
        assert any(_matches(block, *key) for block in marked), f"NO_RUN_BLOCKS {key}: no block marked {NO_RUN} matches"

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for command in MAIN_COMMANDS:
        assert command in readme, f"README.md lacks the command `{command}`"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.name) for b in PYTHON_BLOCKS if b.info == "python"])
def test_python_block_runs(block, cache, tmp_path):
    os.symlink(cache, tmp_path / "CACHE", target_is_directory=True)
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, (f"{block.name} exited {result.returncode}\n--- block:\n{block.code}"
                                    f"--- stderr:\n{result.stderr[-4000:]}")
