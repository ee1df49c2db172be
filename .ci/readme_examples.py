"""Run every ```python block of a README, each in a fresh process from an empty folder, so that
what runs is the installed fbrain, not the checkout's. CI's bare-install check calls it.

    python .ci/readme_examples.py README.md
"""
import pathlib
import re
import subprocess
import sys
import tempfile

blocks = re.findall(r"```python\n(.*?)```", pathlib.Path(sys.argv[1]).read_text(), flags=re.S)
if not blocks:
    sys.exit(f"{sys.argv[1]}: no ```python blocks found")
for index, block in enumerate(blocks):
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-c", block], cwd=folder)
    if done.returncode != 0:
        sys.exit(f"{sys.argv[1]}: example {index + 1} of {len(blocks)} failed (exit {done.returncode}):\n{block}")
    print(f"{sys.argv[1]}: example {index + 1} of {len(blocks)} ran")
