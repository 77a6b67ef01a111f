"""README.md as an entry point: every ```python block runs as written, offline.

The blocks use the demo's paths (`outputs/demo/checkpoints/last/pretrained_model` and
`outputs/demo/dataset`, written by `python train.py`). Training the demo takes minutes, so the
tests build the same layout in a temporary directory instead: the tiny fixture policy (its VLM
given by absolute path, as the demo records its own) and a small dataset written by
data.write_dataset with the policy's cameras. Each block then runs in a fresh namespace with that
directory as the working directory, in the README's order (a block may read what an earlier
one wrote, as a reader following the README would).
"""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

README = ROOT / "README.md"
TINY_POLICY, TINY_VLM = ROOT / "tests/fixtures/tiny/policy", ROOT / "tests/fixtures/tiny/vlm"
JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of each ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_the_block_extraction_finds_each_block_and_only_python():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (9, "b = 2\nc = 3\n")]
    # The README's own: the model, datasets (reading, selecting, writing) and the arm.
    assert len(BLOCKS) >= 5


def demo_episodes(count: int = 4, length: int = 12):
    """Short reaching episodes in SO-100 units with the tiny policy's two 48x64 cameras."""
    rng = np.random.default_rng(0)
    for e in range(count):
        state = (np.array([0.0, -20.0, 30.0, 10.0, 0.0, 40.0]) + rng.normal(0, 5, (length, 6))).astype(np.float32)
        yield {"task": "Move the arm to the red target.", "observation.state": state,
               "action": np.roll(state, -1, axis=0),
               "observation.images.top": rng.integers(0, 256, (length, 48, 64, 3), dtype=np.uint8),
               "observation.images.wrist": rng.integers(0, 256, (length, 48, 64, 3), dtype=np.uint8)}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A directory laid out as after `python train.py`: the checkpoint and the dataset."""
    root = tmp_path_factory.mktemp("readme")
    policy = root / "outputs/demo/checkpoints/last/pretrained_model"
    shutil.copytree(TINY_POLICY, policy)
    config = json.loads((policy / "config.json").read_text())
    config["vlm_model_name"] = str(TINY_VLM)  # the demo records its tiny VLM's directory the same way
    (policy / "config.json").write_text(json.dumps(config, indent=4))
    data.write_dataset(root / "outputs/demo/dataset", demo_episodes(), fps=10, robot_type="so100",
                       state_names=JOINTS, action_names=JOINTS)
    return root


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)
    exec(compile(code, f"README.md block at line {line}", "exec"), {"__name__": "readme_block"})


def test_the_project_stands_alone():
    """No file of the project points at material outside the repository."""
    outside = ["../" + "shared", "REFERENCE" + ".md"]  # spelled apart so this file does not match itself
    files = [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("tests/*.py")]
    cited = [f"{path.relative_to(ROOT)}: {word}" for path in files for word in outside if word in path.read_text()]
    assert cited == []
