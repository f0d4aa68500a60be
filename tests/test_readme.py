"""Every ```python block of README.md runs as written, each in a fresh interpreter, so the README cannot rot."""
import os
import pathlib
import re
import resource
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# The README promises each example runs in under a minute. CPU seconds are the measure (wall time on a shared,
# loaded machine says little); the wall-clock limit only ends a hung example.
CPU_SECONDS = 60
WALL_SECONDS = 600


def blocks():
    """(heading above the block, code) for every python block of README.md."""
    text = README.read_text()
    found = []
    for match in FENCE.finditer(text):
        headings = re.findall(r"^#+ (.*)$", text[: match.start()], re.M)
        found.append((headings[-1] if headings else "top", match.group(1)))
    return found


BLOCKS = blocks()


def test_readme_has_its_examples():
    # a broken fence (```Python, an indented fence) would silently drop a block from the test below
    assert len(BLOCKS) >= 4
    assert len(BLOCKS) == README.read_text().count("```python")


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[heading for heading, _ in BLOCKS])
def test_readme_example_runs(code, tmp_path):
    # one thread: CPU time then counts work, not OpenMP threads spinning while they wait for a shared core
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # a fresh interpreter in an empty directory: no name leaks in from the tests, files land in tmp_path
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=WALL_SECONDS)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, f"README example failed:\n{code}\n--- stderr:\n{proc.stderr[-4000:]}"
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < CPU_SECONDS, f"README example took {cpu:.0f} CPU seconds (the README promises under a minute)"
