"""Every python block of docs/pde.md runs as written (warnings are errors)."""

import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "pde.md").read_text(), flags=re.S)


def test_docs_have_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_docs_block_runs(index, capsys):
    exec(compile(textwrap.dedent(BLOCKS[index]), f"docs/pde.md[{index}]", "exec"), {})
