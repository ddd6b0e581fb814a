"""The README's loader snippet runs as written (on test shards): load + DataLoader with collate."""
import re
from pathlib import Path

import pytest

from tests.fixtures.samples import build_shards

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str, n: int = 0) -> str:
    """The n-th ```python block under the README section `heading`."""
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[n]


def test_the_readme_loader_and_dataloader_snippet_runs(tmp_path):
    pytest.importorskip("torch")
    sd = build_shards(tmp_path / "shards")
    code = readme_block("Loading the shards from another project")
    assert "collate_fn=collate" in code and "DataLoader(" in code
    ns: dict = {}
    exec(compile(code.replace("work/demo/shards", str(sd)), "README.md", "exec"), ns)
    batch = next(iter(ns["loader"]))
    assert tuple(batch["lr"].shape) == (4, 3, 268, 268) and tuple(batch["hr"].shape) == (4, 3, 3, 268, 268)
    assert len(batch["meta"]) == 4 and isinstance(batch["meta"][0], dict)
