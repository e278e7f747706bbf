"""Bad input and faults: a clear error or the right answer, never a silently wrong one. Oracles:
transformers' ``load_image`` (EXIF orientation), hand-computed pixel values (16-bit images), the
exact error types and words, and a checkpoint restored exactly."""
import os

import numpy as np
import pytest
from PIL import Image

from m2f_jax.inference import load_image
from m2f_jax.processing import post_processing

_POST = [
    post_processing.post_process_semantic_segmentation,
    post_processing.post_process_instance_segmentation,
    post_processing.post_process_panoptic_segmentation,
]


def _logits(queries=5):
    rng = np.random.default_rng(0)
    return {"class_queries_logits": rng.normal(size=(1, queries, 4)).astype(np.float32),
            "masks_queries_logits": rng.normal(size=(1, queries, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("post", _POST)
@pytest.mark.parametrize("key, value", [("class_queries_logits", np.nan), ("masks_queries_logits", np.inf),
                                        ("masks_queries_logits", -np.inf)])
def test_non_finite_logits_are_an_error_not_a_map(post, key, value):
    outputs = _logits()
    outputs[key][0, 1, 0] = value
    with pytest.raises(ValueError, match=f"{key} holds .* post-processing needs finite logits"):
        post(outputs)


@pytest.mark.parametrize("post", _POST)
def test_zero_queries_are_an_error(post):
    with pytest.raises(ValueError, match=r"the outputs hold no queries: class_queries_logits has shape \(1, 0, 4\)"):
        post(_logits(queries=0))


def test_exif_orientation_is_honoured_as_transformers_load_image(tmp_path):
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    path = str(tmp_path / "rotated.jpg")
    image.save(path, exif=exif, quality=95)
    ours = load_image(path)
    theirs = np.asarray(transformers.image_utils.load_image(path))
    assert ours.shape == (40, 24, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000], [32768, 65280, 65535]], np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)  # 0 1 4 / 128 254 255
    np.testing.assert_array_equal(load_image(path), np.repeat(expected[..., None], 3, axis=-1))


def test_checkpoint_manager_takes_a_relative_directory(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from m2f_jax.training.checkpoint import CheckpointManager, abstract_state

    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3)}
    manager = CheckpointManager("runs/relative/checkpoints", save_every=1, keep=1, async_save=False)
    manager.save(3, state, {"epoch": 1})
    manager.close()
    restored, extra = CheckpointManager("runs/relative/checkpoints").restore_latest(abstract_state(state))
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert extra == {"epoch": 1}
    assert (tmp_path / "runs" / "relative" / "checkpoints").is_dir()


def test_ambiguous_arrays_are_channels_last_unless_input_data_format_says_otherwise():
    """(3, 7, 3) is a 3-pixel-high RGB image (transformers would take it as channels-first);
    input_data_format, transformers' keyword (string or ChannelDimension), overrides."""
    from transformers.image_utils import ChannelDimension

    from m2f_jax.processing.image_processor import to_channels_last

    array = np.arange(63, dtype=np.uint8).reshape(3, 7, 3)
    np.testing.assert_array_equal(to_channels_last(array), array)
    for fmt in ("channels_first", ChannelDimension.FIRST):
        np.testing.assert_array_equal(to_channels_last(array, input_data_format=fmt), array.transpose(1, 2, 0))
    np.testing.assert_array_equal(to_channels_last(array[:, :, :1].transpose(2, 0, 1)), array[:, :, :1])  # (1, 3, 7)
    with pytest.raises(ValueError, match="input_data_format must be 'channels_first' or 'channels_last', got 'nchw'"):
        to_channels_last(array, input_data_format="nchw")


def test_one_pixel_and_grey_images_give_a_result_and_empty_ones_an_error():
    from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

    processor = Mask2FormerImageProcessor()
    pixel = np.array([[[200, 100, 50]]], np.uint8)  # (1, 1, 3)
    out = processor(pixel)["pixel_values"]
    assert out.shape == (1, 800, 800, 3)  # shortest edge 800, a multiple of 32
    expected = (np.array([200, 100, 50]) / 255 - np.array(processor.image_mean)) / np.array(processor.image_std)
    np.testing.assert_allclose(out[0, 400, 400], expected, atol=1e-5)
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(load_image(grey), np.repeat(grey[..., None], 3, axis=-1))
    assert processor(load_image(grey))["pixel_values"].shape == (1, 800, 1088, 3)  # 800 x 1066.7 -> /32
    with pytest.raises(ValueError, match=r"An image must have at least one pixel, got shape \(0, 0, 3\)"):
        processor(np.zeros((0, 0, 3), np.uint8))


def test_class_ids_outside_the_labels_are_an_error_except_ignore_index():
    from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

    image = np.zeros((8, 8, 3), np.uint8)
    seg = np.array([[0, 1, 5, 255]] * 8, np.int64).repeat(2, axis=1)  # 5 is outside 4 labels
    processor = Mask2FormerImageProcessor(num_labels=4, ignore_index=255, size={"height": 8, "width": 8})
    with pytest.raises(ValueError, match=r"Segmentation map 0 has class ids \[5\] outside \[0, num_labels=4\)"):
        processor(image, seg)
    seg[seg == 5] = 3
    out = processor(image, seg)
    np.testing.assert_array_equal(out["class_labels"][0], [0, 1, 3])  # 255 is ignored, not a class
    with pytest.raises(ValueError, match=r"class ids \[-2\] outside >= 0"):
        Mask2FormerImageProcessor(size={"height": 8, "width": 8})(image, np.full((8, 8), -2))


# ----------------------------------------------------------------------------------------------
# Damaged or hostile checkpoint files, conversion that must not destroy the user's files
# ----------------------------------------------------------------------------------------------


def _copy(tiny_checkpoint, tmp_path, name="ckpt"):
    import shutil

    return shutil.copytree(tiny_checkpoint[0], tmp_path / name)


def _cli(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "m2f_jax", *args], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_truncated_safetensors_and_bad_config_json_name_the_file(tiny_checkpoint, tmp_path):
    import m2f_jax

    folder = _copy(tiny_checkpoint, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        m2f_jax.load(str(folder))
    (folder / "config.json").write_text('{"model_type": "mask2former",')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        m2f_jax.load(str(folder))
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object"):
        m2f_jax.load(str(folder))


def test_truncated_and_malicious_pytorch_pickles_are_refused_in_one_line(tiny_checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    import os
    import pickle

    folder = _copy(tiny_checkpoint, tmp_path)
    state = {k: torch.from_numpy(np.array(v)) for k, v in
             __import__("safetensors.numpy", fromlist=["load_file"]).load_file(str(folder / "model.safetensors")).items()}
    os.remove(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    r = _cli("segment", "--model", str(folder), str(tmp_path / "x.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "pytorch_model.bin is not a readable PyTorch checkpoint" in r.stderr

    class Exploit:  # unpickling it would run a shell command
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": Exploit()}, f)
    r = _cli("segment", "--model", str(folder), str(tmp_path / "x.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "refused" in r.stderr and not (tmp_path / "pwned").exists()


def test_wrong_shaped_weight_is_reported_in_the_checkpoints_own_layout(tiny_checkpoint):
    from convert.checkpoint import read_state_dict
    from convert.folders import param_shapes
    from convert.mapping import ConversionError, hf_to_flax
    from m2f_jax.config import Mask2FormerConfig

    folder = tiny_checkpoint[0]
    state = dict(read_state_dict(folder))
    name = "model.transformer_module.decoder.layers.0.fc1.weight"  # Linear (32, 64) [out, in]
    assert state[name].shape == (32, 64)
    state[name] = np.zeros((32, 65), np.float32)
    conv = "model.pixel_level_module.decoder.mask_projection.weight"  # Conv OIHW (64, 64, 1, 1)
    state[conv] = np.zeros((64, 64, 3, 3), np.float32)
    with pytest.raises(ConversionError) as err:
        hf_to_flax(state, param_shapes(Mask2FormerConfig.from_pretrained(folder)))
    text = str(err.value)
    assert f"{name}: checkpoint (32, 65), expected (32, 64)" in text
    assert f"{conv}: checkpoint (64, 64, 3, 3), expected (64, 64, 1, 1)" in text


def test_convert_keeps_the_users_files_and_refuses_its_own_source(tiny_checkpoint, tmp_path):
    src = _copy(tiny_checkpoint, tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "config.json").write_text("my own notes")
    (dst / "README.md").write_text("keep me")
    r = _cli("convert", str(src), str(dst))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "already has config.json" in r.stderr and "--overwrite" in r.stderr
    assert (dst / "config.json").read_text() == "my own notes" and sorted(p.name for p in dst.iterdir()) == [
        "README.md", "config.json"]  # nothing written, no staging folder left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m2f-convert-")]
    r = _cli("convert", str(src), str(dst), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (dst / "README.md").read_text() == "keep me" and (dst / "flax_model.msgpack").is_file()
    r = _cli("convert", str(src), str(src))
    assert r.returncode == 2 and "is the source folder" in r.stderr and "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_segment_and_train_to_an_unwritable_folder_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    for command in (["segment"], ["train", "--data", str(tmp_path)]):
        r = _cli(*command, "--out", str(blocker / "out"))
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "cannot write to the output folder" in r.stderr


def test_processes_checking_one_output_folder_at_once_all_pass(tmp_path, monkeypatch):
    """Every process of a multi-process ``train`` checks the same --out folder as it starts. Here a
    second check runs whole between the first one's creating and removing its probe file (the
    interleaving that once failed one process with "cannot write to the output folder"): both pass
    and leave the folder empty."""
    from m2f_jax import cli

    remove, nested = os.remove, []

    def remove_after_another_check(path):
        if not nested:
            nested.append(path)
            cli._writable_folder(str(tmp_path / "out"))  # the other process, start to end
        remove(path)

    monkeypatch.setattr(cli.os, "remove", remove_after_another_check)
    cli._writable_folder(str(tmp_path / "out"))
    assert nested and os.listdir(tmp_path / "out") == []


def test_eval_on_a_dataset_with_a_broken_image_is_one_line(tmp_path):
    """The embedded default model on a small synthetic dataset whose second validation image is
    not an image: one line naming it, exit status 2, no traceback."""
    from m2f_jax.data.synthetic import write_dataset

    write_dataset(str(tmp_path / "data"), num_train=2, num_val=3, image_size=(48, 48), seed=0, formats=("semantic",))
    broken = sorted((tmp_path / "data" / "images" / "validation").iterdir())[1]
    broken.write_text("not an image")
    r = _cli("eval", "--data", str(tmp_path / "data"), "--format", "semantic", "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and str(broken) in r.stderr and "is not a readable image" in r.stderr


def _spoiled_checkpoint(tiny_checkpoint, tmp_path, changes):
    """A copy of the tiny transformers checkpoint (save_pretrained) whose model.safetensors has
    ``changes`` applied: name -> a new array, or None to delete the key."""
    from safetensors.numpy import load_file, save_file

    folder = _copy(tiny_checkpoint, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    for name, value in changes.items():
        if value is None:
            del state[name]
        else:
            state[name] = value
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


_FC1 = "model.transformer_module.decoder.layers.0.fc1.weight"  # Linear [out, in] = (32, 64)
_IN_PROJ = "model.transformer_module.decoder.layers.0.cross_attn.in_proj_weight"  # q, k, v stacked: (192, 64)
_PREFIX = "The checkpoint does not match the model configuration: "


@pytest.mark.parametrize("command, changes, expected", [
    ("segment", {_FC1: np.zeros((32, 65), np.float32)},
     f"{_FC1} has shape (32, 65) in the checkpoint, the model expects (32, 64) (no other problem)."),
    # one mis-shaped fused key is one problem, not the three q/k/v weights it leaves unfilled
    ("eval", {_IN_PROJ: np.zeros((190, 64), np.float32), "class_predictor.bias": None},
     f"{_IN_PROJ} has shape (190, 64) in the checkpoint, the model expects (192, 64) (and 1 other problem)."),
    ("segment", {"class_predictor.bias": None, "model.extra.weight": np.zeros(3, np.float32)},
     "class_predictor.bias is missing from the checkpoint (and 1 other problem)."),
    ("train", {"model.extra.weight": np.zeros(3, np.float32)},
     "model.extra.weight is in the checkpoint but unknown to the model (no other problem)."),
], ids=["segment-shape", "eval-fused-shape", "segment-missing", "train-unexpected"])
def test_a_checkpoint_that_does_not_fit_is_one_line_naming_the_first_key(
        tiny_checkpoint, tmp_path, capsys, command, changes, expected):
    """segment, eval and train --init: exit status 2 and one line with the first offending key
    (a wrong shape first, with both shapes in the checkpoint's layout; else missing, else
    unexpected) and the count of the other problems. The shapes are the tiny config's (hidden 64,
    feed-forward 32, 4 labels)."""
    from m2f_jax import cli

    folder = _spoiled_checkpoint(tiny_checkpoint, tmp_path, changes)
    if command == "train":
        from m2f_jax.data.synthetic import write_dataset

        write_dataset(str(tmp_path / "data"), num_train=2, num_val=1, image_size=(48, 48), formats=("semantic",))
        argv = ["train", "--data", str(tmp_path / "data"), "--init", str(folder), "--out", str(tmp_path / "run")]
        expected = f"--init {folder}: {_PREFIX}{expected}"
    elif command == "eval":
        argv = ["eval", "--data", str(tmp_path / "data"), "--format", "semantic", "--model", str(folder)]
        expected = _PREFIX + expected
    else:
        argv = ["segment", str(tmp_path / "x.png"), "--model", str(folder), "--out", str(tmp_path / "out")]
        expected = _PREFIX + expected
    assert cli.main(argv + ["--no-compilation-cache"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {expected}"]


def test_train_init_that_names_nothing_is_one_line(tmp_path, capsys):
    from m2f_jax import cli
    from m2f_jax.data.synthetic import write_dataset

    write_dataset(str(tmp_path / "data"), num_train=2, num_val=1, image_size=(48, 48), formats=("semantic",))
    for init, reason in [("nonsense", "neither a preset (tiny, swin-t), a config .json file, nor a checkpoint "
                                      "folder / Hub id."),
                         (str(tmp_path / "missing.json"), "no such config file.")]:
        argv = ["train", "--data", str(tmp_path / "data"), "--init", init, "--out", str(tmp_path / "run"),
                "--no-compilation-cache"]
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: --init {init}: {reason}"]
