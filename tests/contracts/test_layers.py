"""The package's layers (pyproject.toml, [tool.importlinter]): lower layers never import upper ones, and no
module imports itself back through others."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    done = subprocess.run([sys.executable, "-c", command, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_import_circles():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from code_shape import circles
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert circles() == []
