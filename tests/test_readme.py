"""The README's Python examples run as written (in a fresh process, from an empty folder), on
whichever torch the tests run with."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 2  # the pure core and the Brain


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_example_runs(index, tmp_path):
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"README example {index}:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"
