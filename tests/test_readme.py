"""README's promises: the embedding example runs, and it holds exactly two set-up commands that .ci/run uses."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str, lang: str) -> str:
    match = re.search(re.escape(marker) + r".*?\n```" + lang + r"\n(.*?)```", README, re.S)
    assert match, f"README has no ```{lang} block after {marker!r}"
    return match.group(1)


def test_embedding_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the data module's cache and Lightning's files go here
    namespace: dict = {}
    exec(compile(_block_after("<!-- example:", "python"), "README.md", "exec"), namespace)
    assert namespace["trainer"].global_step == 3
    assert namespace["logits"].shape == (2, 16, 100)
    assert namespace["o"].shape == (2, 16, 4, 32)
    mass = namespace["depth_mass"]
    assert ((mass > 0) & (mass < 1)).all()


def test_exactly_two_setup_commands():
    commands = [line for line in _block_after("<!-- setup:", "bash").splitlines() if line.strip()]
    assert len(commands) == 2
    assert "pip install" in commands[0] and "moda fit --config configs/default.yaml" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- setup:" in ci, ".ci/run must take its commands from README's set-up block"
