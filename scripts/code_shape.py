"""The shape of multitune's source: longest functions, long files, import circles, whole-Config parameters.

    python scripts/code_shape.py [--top 15]

Import circles are found on the module graph of `src/multitune` (grimp, the graph import-linter builds), with
imports inside functions counted: a deferred import still ties the two modules together.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def functions(path: Path) -> list[tuple[int, str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            found.append((node.end_lineno - node.lineno + 1, node.name, node))
    return found


def takes_whole_config(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
    return any(a.annotation is not None and ast.unparse(a.annotation).strip("'\"") == "Config" for a in arguments)


def circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    import grimp

    graph = grimp.build_graph("multitune", cache_dir=None)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in edges[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    files = sorted((SRC / "multitune").rglob("*.py"))
    rows = []
    whole_config = []
    for path in files:
        name = str(path.relative_to(SRC))
        for length, function, node in functions(path):
            rows.append((length, f"{name}:{node.lineno} {function}"))
            if takes_whole_config(node):
                whole_config.append(f"{name}:{node.lineno} {function}")
    rows.sort(reverse=True)
    print(f"longest functions (lines, {len(rows)} functions):")
    for length, where in rows[: args.top]:
        print(f"  {length:4d}  {where}")
    print(f"functions over 80 lines: {sum(1 for length, _ in rows if length > 80)}")
    long_files = [(len(p.read_text(encoding="utf-8").splitlines()), p) for p in files]
    long_files = sorted(((n, p) for n, p in long_files if n > 400), reverse=True)
    print(f"files over 400 lines: {len(long_files)}")
    for n, path in long_files:
        print(f"  {n:5d}  {path.relative_to(SRC)}")
    found = circles()
    print(f"import circles: {len(found)}")
    for component in found:
        print(f"  {len(component)} modules: {', '.join(component)}")
    print(f"functions taking the whole Config: {len(whole_config)}")
    for where in whole_config:
        print(f"  {where}")


if __name__ == "__main__":
    main()
