"""Docs are tests: every ```bash/```sh and ```python block of README.md and docs/*.md runs, in document order.

Bash blocks run with ``bash -euo pipefail`` from the repository root, Python blocks with the repository's
``.venv/bin/python`` (also from the root), each in a fresh process. One pytest test per block, named after the
document and the line of its opening fence (``docs/power.md:57``), so a failure says where to look.

Markers, HTML comments on the lines right before a block (invisible when the Markdown is rendered):

    <!-- docs-test: skip: <reason> -->              not run (GPU or network only); the reason is reported
    <!-- docs-test: env NAME=VALUE ... -->          extra environment variables for this block
    <!-- docs-test: replace "<old>" "<new>" -->     reduced sizes for CI (repeatable); <old> must occur
    <!-- docs-test: timeout <seconds> -->           default 120

Every block also gets ``$DOCS_TEST_TMP``, an empty directory of its own (write outputs there, e.g.
``replace "--out results/" "--out $DOCS_TEST_TMP"``), and runs offline (``HF_HUB_OFFLINE=1``,
``HF_DATASETS_OFFLINE=1``: CI has no hub) with one CPU thread per process (``OMP_NUM_THREADS=1``), as the rest of
the suite does. ```text blocks (and unlabeled ones) are output or examples, never run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
        *sorted((REPO_ROOT / "packages").glob("*/README.md"))]
PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
DEFAULT_TIMEOUT = 120
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")


class DocsMarkerError(ValueError):
    """A docs-test marker that cannot be read (a typo must fail, not silently run the full-size command)."""


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    language: str  # "bash" or "python"; other fences are not collected
    code: str
    skip: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    replacements: list[tuple[str, str]] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT

    @property
    def name(self) -> str:
        try:
            return f"{self.doc.relative_to(REPO_ROOT)}:{self.line}"
        except ValueError:
            return f"{self.doc.name}:{self.line}"

    def script(self) -> str:
        """The code as CI runs it: every replacement applied (each must match, or the docs drifted)."""
        code = self.code
        for old, new in self.replacements:
            if old not in code:
                raise AssertionError(f"{self.name}: docs-test replace marker text {old!r} is not in the block; "
                                     f"update the marker with the command")
            code = code.replace(old, new)
        return code


def _apply_marker(block: Block, body: str, where: str) -> None:
    keyword, _, rest = body.partition(" ")
    keyword = keyword.rstrip(":")
    try:
        if keyword == "skip":
            block.skip = body.partition(":")[2].strip() or "no reason given"
        elif keyword == "env":
            for item in shlex.split(rest):
                name, sep, value = item.partition("=")
                if not sep or not name:
                    raise DocsMarkerError(f"{where}: env items are NAME=VALUE, got {item!r}")
                block.env[name] = value
        elif keyword == "replace":
            parts = shlex.split(rest)
            if len(parts) != 2:
                raise DocsMarkerError(f'{where}: replace takes two quoted strings, "<old>" "<new>"; got {rest!r}')
            block.replacements.append((parts[0], parts[1]))
        elif keyword == "timeout":
            block.timeout = float(rest)
        else:
            raise DocsMarkerError(f"{where}: unknown docs-test marker {keyword!r} (skip, env, replace, timeout)")
    except ValueError as error:
        if isinstance(error, DocsMarkerError):
            raise
        raise DocsMarkerError(f"{where}: cannot read docs-test marker {body!r} ({error})") from error


def extract_blocks(doc: Path) -> list[Block]:
    """The runnable fenced blocks of one Markdown file, with the markers written right above each."""
    lines = Path(doc).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], match["indent"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), len(lines))
        language = LANGUAGES.get(match["lang"].lower())
        if language is not None:
            body = textwrap.dedent("\n".join(line[len(indent):] if line.startswith(indent) else line
                                             for line in lines[i + 1:end]))
            block = Block(Path(doc), i + 1, language, body + "\n")
            markers = []
            k = i - 1
            while k >= 0 and _MARKER.match(lines[k]):
                markers.append((k + 1, _MARKER.match(lines[k])["body"]))
                k -= 1
            for lineno, marker in reversed(markers):
                _apply_marker(block, marker, f"{Path(doc).name}:{lineno}")
            blocks.append(block)
        i = end + 1
    return blocks


def run_block(block: Block, workdir: Path) -> subprocess.CompletedProcess:
    """Run one block from the repository root; AssertionError with the block, exit code and output on failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / ("block.sh" if block.language == "bash" else "block.py")
    script.write_text(block.script(), encoding="utf-8")
    command = (["bash", "-euo", "pipefail", str(script)] if block.language == "bash"
               else [str(PYTHON if PYTHON.exists() else sys.executable), str(script)])
    env = {**os.environ, **BASE_ENV, "DOCS_TEST_TMP": str(workdir / "tmp"), **block.env}
    (workdir / "tmp").mkdir(exist_ok=True)
    # A session of its own, so that a timeout also ends what the block started in the background (cmd &).
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=block.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{block.name}: the {block.language} block ran past its {block.timeout:.0f} s timeout "
                             f"(reduce it with a docs-test replace marker, or raise 'timeout')\n"
                             f"{_tail(stdout)}{_tail(stderr)}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the block left running in its session
            os.killpg(process.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if result.returncode != 0:
        raise AssertionError(f"{block.name}: the {block.language} block failed with exit code {result.returncode}\n"
                             f"--- as run ---\n{block.script()}--- stdout (end) ---\n{_tail(result.stdout)}\n"
                             f"--- stderr (end) ---\n{_tail(result.stderr)}")
    return result


def _tail(text: str | bytes | None, limit: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "")[-limit:]


def _collect() -> list:
    params = []
    for doc in DOCS:
        try:
            blocks = extract_blocks(doc)
        except DocsMarkerError as error:  # reported as a failing test of that document, not a collection crash
            params.append(pytest.param(error, id=f"{doc.relative_to(REPO_ROOT)}:markers"))
            continue
        params += [pytest.param(block, id=block.name) for block in blocks]
    return params


@pytest.mark.slow
@pytest.mark.parametrize("block", _collect())
def test_documented_block_runs(block, tmp_path):
    if isinstance(block, Exception):
        raise AssertionError(str(block))
    if block.skip:
        pytest.skip(f"{block.name}: {block.skip}")
    run_block(block, tmp_path)


# ------------------------------------------------------------------------------------------------ the harness


def test_the_harness_fails_a_broken_block_and_reads_its_markers(tmp_path):
    doc = tmp_path / "broken.md"
    doc.write_text(textwrap.dedent("""\
        # A page

        ```text
        not run
        ```

        <!-- docs-test: env GREETING=hello -->
        <!-- docs-test: replace "--size 1000" "--size 2" -->
        ```bash
        test "$GREETING" = hello && test -d "$DOCS_TEST_TMP" && echo "--size 1000" | grep -q -- "--size 2"
        ```

        ```python
        import sys
        sys.exit("a documented snippet that broke")
        ```

        - in a list:
          ```sh
          false
          echo never reached
          ```

        <!-- docs-test: skip: needs a GPU -->
        ```python
        raise SystemExit(1)
        ```
        """))
    blocks = extract_blocks(doc)
    assert [(b.line, b.language) for b in blocks] == [(9, "bash"), (13, "python"), (19, "bash"), (25, "python")]
    assert blocks[0].env == {"GREETING": "hello"} and blocks[0].replacements == [("--size 1000", "--size 2")]
    run_block(blocks[0], tmp_path / "0")  # markers applied: passes
    with pytest.raises(AssertionError, match=r"broken.md:13: the python block failed with exit code 1(.|\n)*"
                                             r"a documented snippet that broke"):
        run_block(blocks[1], tmp_path / "1")
    with pytest.raises(AssertionError, match=r"broken.md:19: the bash block failed"):  # -e: the first failure ends it
        run_block(blocks[2], tmp_path / "2")
    assert blocks[3].skip == "needs a GPU"


def test_the_harness_refuses_bad_markers_and_stale_replacements(tmp_path):
    doc = tmp_path / "markers.md"
    doc.write_text('<!-- docs-test: skp: typo -->\n```bash\ntrue\n```\n')
    with pytest.raises(DocsMarkerError, match=r"markers.md:1: unknown docs-test marker 'skp'"):
        extract_blocks(doc)
    doc.write_text('<!-- docs-test: replace "--n 105" "--n 2" -->\n```bash\necho --n 42\n```\n')
    with pytest.raises(AssertionError, match=r"replace marker text '--n 105' is not in the block"):
        extract_blocks(doc)[0].script()
    doc.write_text('<!-- docs-test: timeout 1 -->\n```bash\nsleep 5\n```\n')
    with pytest.raises(AssertionError, match=r"ran past its 1 s timeout"):
        run_block(extract_blocks(doc)[0], tmp_path / "t")


def test_every_doc_is_collected():
    names = {doc.name for doc in DOCS}
    assert {"README.md", "eval.md", "tasks.md", "power.md"} <= names
    assert all(block.language in ("bash", "python") for doc in DOCS for block in extract_blocks(doc))
