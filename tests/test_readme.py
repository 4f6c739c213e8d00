"""The README stays true: its two set-up commands, its methods table, its quickstart figures."""

import re

from multitune.catalogue import methods_markdown
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_setup_commands():
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_methods_table_matches_the_registries():
    table = README.split("<!-- methods:start -->\n", 1)[1].split("\n<!-- methods:end -->", 1)[0]
    assert table == methods_markdown()


def test_quickstart_figures_are_filled_in():
    assert "QUICKSTART_RESULTS" not in README
    assert re.search(r"trec\s+test\s+500\s+accuracy\s+0\.\d{4}", README)


def test_makefile_and_ci_use_the_readme_commands():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "torch==2.13.0" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_any_backbone_snippet_runs(capsys):
    import torch

    section = README.split("## Any PyTorch backbone\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert re.search(r"digit\s+test\s+397\s+accuracy\s+0\.[3-9]", out) and "'prediction'" in out
