"""The m2f-jax command line: outputs written, clear one-line errors, no tracebacks."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from m2f_jax.processing.image_processor import Mask2FormerImageProcessor


def _run(*args, cwd=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "m2f_jax", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_segment_writes_overlays_and_json_and_survives_a_bad_image(tiny_checkpoint, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint[0], model)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}, size_divisor=0).save_pretrained(str(model))
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = _run("segment", str(good), str(bad), "--model", str(model), "--task", "instance",
             "--threshold", "0", "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr  # one image failed, the other was written
    assert "Traceback" not in r.stderr and "bad.png" in r.stderr
    written = json.load(open(tmp_path / "out" / "good_instance.json"))
    assert written["segments"] and {"id", "label_id", "label", "score", "area"} <= set(written["segments"][0])
    # drawn enlarged 7x (the smallest integer factor giving a short side >= 256) for legible labels
    assert Image.open(tmp_path / "out" / "good_instance.png").size == (56 * 7, 40 * 7)


def test_overlay_upscaling_replicates_pixels():
    from m2f_jax.cli import _upscaled

    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = _upscaled(image, 5)  # short side 2 -> factor 3
    assert big.shape == (6, 9, 3)
    assert (big[::3, ::3] == image).all() and (big[2::3, 2::3] == image).all()
    assert _upscaled(image, 0) is image and _upscaled(image, 2) is image


def test_missing_model_and_bad_arguments_are_one_line_errors(tmp_path):
    r = _run("segment", "x.png", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = _run("eval", "--format", "semantic")
    assert r.returncode == 2 and "--data" in r.stderr and "Traceback" not in r.stderr


def test_segment_takes_folders_and_globs_and_reports_each_bad_input(tiny_checkpoint, tmp_path):
    """A folder (its images, sorted), a glob, a pattern and a file that name nothing, a bad file,
    two files with one name: every good image's outputs are written, each bad input gets one
    line on stderr, the exit status is 2."""
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint[0], model)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}, size_divisor=0).save_pretrained(str(model))
    rng = np.random.default_rng(1)
    photos, other = tmp_path / "photos", tmp_path / "other" / "deep"
    photos.mkdir(), other.mkdir(parents=True)
    for name, folder in (("a.png", photos), ("b.jpg", photos), ("a.png", other)):
        Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(folder / name)
    (photos / "notes.txt").write_text("not an image, not picked")
    (photos / "broken.png").write_text("not an image")
    r = _run("segment", str(photos), str(tmp_path / "other" / "**" / "*.png"), str(tmp_path / "nothing*.png"),
             str(tmp_path / "missing.jpg"), "--model", str(model), "--out", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors), errors
    assert any("broken.png" in e for e in errors) and any("nothing*.png" in e and "no file matches" in e for e in errors)
    assert any("missing.jpg" in e for e in errors)
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == ["a-2_panoptic.json", "a-2_panoptic.png", "a_panoptic.json", "a_panoptic.png",
                       "b_panoptic.json", "b_panoptic.png"]
    assert json.load(open(tmp_path / "out" / "a-2_panoptic.json"))["image"] == str(other / "a.png")


def test_train_val_size_sets_the_validation_and_export_resize(capsys):
    """``--val-size`` (README, "Training"): validation and the exported processor resize to
    VAL_SIZE x VAL_SIZE, by default to the crop size; a size below 1 is a usage error naming it.
    Oracle: the processed image's shape, known from the settings."""
    from m2f_jax.cli import build_parser, train_args
    from m2f_jax.training.run import validation_processor

    parser = build_parser()
    image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    for extra, side in ((["--val-size", "48"], 48), ([], 64)):
        targs = train_args(parser.parse_args(["train", "--data", "d", "--crop", "64", *extra]))
        assert targs.val_size == (48 if extra else None)
        processor = validation_processor(targs, num_labels=5)
        assert processor(images=[image], return_tensors="np")["pixel_values"].shape == (1, side, side, 3)
    try:
        parser.parse_args(["train", "--data", "d", "--val-size", "0"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--val-size 0 was accepted")
    assert "--val-size: expected a positive integer, got '0'" in capsys.readouterr().err
