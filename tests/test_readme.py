"""README.md and docs/*.md: every ```python block runs as written, offline, and every link resolves.

The blocks use the demo's paths (`outputs/demo/checkpoints/last/pretrained_model` and
`outputs/demo/dataset`, written by `python train.py`). Training the demo takes minutes, so the
tests build the same layout in a temporary directory instead: the tiny fixture policy (its VLM
given by absolute path, as the demo records its own, and the demo's `train_dataset.json` beside it)
and a small dataset written by data.write_dataset as the simulator records one (96x96 cameras
`top` and `wrist`, SO-100 feature names, the simulator's task). Each document gets a directory of
its own; its blocks run in a fresh namespace each, with that directory as the working directory,
in the document's order (a block may read what an earlier one wrote, as a reader following the
page would).
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

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY_POLICY, TINY_VLM = ROOT / "tests/fixtures/tiny/policy", ROOT / "tests/fixtures/tiny/vlm"
# As sim.py records them (sim.FEATURE_NAMES, sim.TASK), spelled out so that collecting this file
# does not need MuJoCo.
FEATURES = [f"{joint}.pos" for joint in
            ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]]
TASK = "Pick up the cube and place it in the box."


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of each ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


BLOCKS = [(name(doc), line, code) for doc in DOCUMENTS for line, code in python_blocks(doc.read_text())]


def test_the_block_extraction_finds_each_block_and_only_python():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (9, "b = 2\nc = 3\n")]
    # The README's quick look at the model, and the pages' own: the model, datasets (reading,
    # selecting, writing), the arm and the simulator.
    pages = {doc for doc, _, _ in BLOCKS}
    assert {"README.md", "docs/model.md", "docs/datasets.md", "docs/so100.md", "docs/simulation.md",
            "docs/metaworld.md"} <= pages
    assert len(BLOCKS) >= 7


def demo_episodes(count: int = 4, length: int = 12):
    """Short episodes in SO-100 units with two 96x96 cameras, as the demo records them."""
    rng = np.random.default_rng(0)
    for e in range(count):
        state = (np.array([0.0, -20.0, 30.0, 10.0, 0.0, 40.0]) + rng.normal(0, 5, (length, 6))).astype(np.float32)
        yield {"task": TASK, "observation.state": state,
               "action": np.roll(state, -1, axis=0),
               "observation.images.top": rng.integers(0, 256, (length, 96, 96, 3), dtype=np.uint8),
               "observation.images.wrist": rng.integers(0, 256, (length, 96, 96, 3), dtype=np.uint8)}


def demo_layout(root: Path) -> Path:
    """A directory laid out as after `python train.py`: the checkpoint and the dataset."""
    policy = root / "outputs/demo/checkpoints/last/pretrained_model"
    shutil.copytree(TINY_POLICY, policy)
    config = json.loads((policy / "config.json").read_text())
    config["vlm_model_name"] = str(TINY_VLM)  # the demo records its tiny VLM's directory the same way
    (policy / "config.json").write_text(json.dumps(config, indent=4))
    (policy / "train_dataset.json").write_text(json.dumps({"dataset": "outputs/demo/dataset", "revision": None,
                                                           "fps": 10}))
    data.write_dataset(root / "outputs/demo/dataset", demo_episodes(), fps=10, robot_type="so100_follower",
                       state_names=FEATURES, action_names=FEATURES)
    return root


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    """One demo-layout directory per document, made when its first block runs."""
    made: dict[str, Path] = {}

    def get(doc: str) -> Path:
        if doc not in made:
            made[doc] = demo_layout(tmp_path_factory.mktemp(re.sub(r"\W", "_", doc)))
        return made[doc]

    return get


@pytest.mark.parametrize("doc, line, code", BLOCKS, ids=[f"{doc}:{line}" for doc, line, _ in BLOCKS])
def test_python_block_runs(doc, line, code, demo_dirs, monkeypatch):
    monkeypatch.chdir(demo_dirs(doc))
    exec(compile(code, f"{doc} block at line {line}", "exec"), {"__name__": "readme_block"})


def test_links_between_documents_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists (anchors aside)."""
    broken = []
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or a place on the same page
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{name(doc)}: {target}")
    assert broken == []


def test_the_file_table_lists_every_module_once():
    """README's table of files names each module at the root exactly once, and nothing that is not
    there: a newcomer reads the files in its order."""
    table = re.findall(r"^\| `(\w+\.py)` \|", (ROOT / "README.md").read_text(), flags=re.M)
    assert sorted(table) == sorted(path.name for path in ROOT.glob("*.py"))
    assert len(table) == len(set(table))
