"""The README's Python examples run, and its trainable_summary line is what the code prints."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
    for claimed in re.findall(r"# (trainable params: .*)", BLOCKS[index]):
        assert claimed in capsys.readouterr().out


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2
