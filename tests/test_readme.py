"""The README runs as written: every ```python block of README.md, and the headline command
``python -m m2f_jax``. Each runs in a new interpreter, in an empty folder, offline. The only
changes to an example: a Hub id becomes the embedded model's folder, and the embedded example
images are put under the image file names it reads; everything else it uses, it defines.
Oracles: the exit status, the files each example says it writes, and for the headline command
the file names, sizes and table rows that follow from the three 96x96 example images."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ASSETS = ROOT / "m2f_jax" / "assets"
DEFAULT_MODEL = ASSETS / "default_model"
EXAMPLE_IMAGES = sorted((ASSETS / "examples").iterdir())

# a fenced block, possibly indented (inside a list item); its closing fence has the same indent
_PYTHON_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```$", re.S | re.M)
_HUB_ID = re.compile(r"([\"'])[\w.-]+/mask2former-[\w.-]+\1")
_IMAGE_NAME = re.compile(r"[\"']([\w./-]+\.(?:jpe?g|png))[\"']", re.I)
_SAVED = re.compile(r"\.save\([\"']([^\"']+)[\"']\)")


def _python_examples():
    text = README.read_text(encoding="utf-8")
    blocks = [textwrap.dedent(m.group(2)) for m in _PYTHON_BLOCK.finditer(text)]
    assert len(blocks) == text.count("```python"), "a ```python block the pattern does not read"
    return blocks


def _env():
    # offline: the examples must not reach the Hub; the tests' compilation cache is inherited
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


@pytest.mark.parametrize("index", range(len(_python_examples())))
def test_python_example_runs_as_written(index, tmp_path):
    source = _python_examples()[index]
    code = _HUB_ID.sub(lambda m: repr(str(DEFAULT_MODEL)), source)
    outputs = set(_SAVED.findall(code))
    inputs = sorted(set(_IMAGE_NAME.findall(code)) - outputs)
    for number, name in enumerate(inputs):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLE_IMAGES[number % len(EXAMPLE_IMAGES)], tmp_path / name)
    (tmp_path / "example.py").write_text(code)
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, f"README example {index}:\n{source}\n{r.stderr[-3000:]}"
    for name in outputs:  # what it says it writes is a readable image
        with Image.open(tmp_path / name) as written:
            written.verify()


def test_headline_command_segments_the_embedded_examples(tmp_path):
    """``python -m m2f_jax`` with no arguments, in an empty folder: a table row per example
    image, an overlay PNG (96x96 drawn 3x: the smallest integer factor to a short side of 256)
    and a JSON per image in m2f_out/, and a last line saying so."""
    r = subprocess.run([sys.executable, "-m", "m2f_jax"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["image", "segments", "top", "segments", "(label", "score", "area)"]
    assert lines[-1] == "wrote 6 files to m2f_out"
    stems = [p.stem for p in EXAMPLE_IMAGES]
    assert sorted(os.listdir(tmp_path)) == ["m2f_out"]
    assert sorted(os.listdir(tmp_path / "m2f_out")) == sorted(f"{s}_panoptic.{e}" for s in stems for e in ("json", "png"))
    rows = lines[1:-1]
    assert [row.split()[0] for row in rows] == [p.name for p in EXAMPLE_IMAGES]
    for image, row in zip(EXAMPLE_IMAGES, rows):
        written = json.loads((tmp_path / "m2f_out" / f"{image.stem}_panoptic.json").read_text())
        assert written["image"] == str(image) and written["task"] == "panoptic"
        assert int(row.split()[1]) == len(written["segments"]) > 0
        assert sum(s["area"] for s in written["segments"]) <= 96 * 96
        with Image.open(tmp_path / "m2f_out" / f"{image.stem}_panoptic.png") as overlay:
            assert overlay.size == (288, 288)
