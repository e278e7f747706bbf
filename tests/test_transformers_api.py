"""transformers' API where a transformers user reaches for it: the top-level names, the config's
``num_labels``, the processor's legacy ``size_divisibility`` keyword, ``encode_inputs`` and the
``post_process_*`` methods; and the persistent compilation cache. Oracles: transformers (configs,
post-processing), hand-computed sizes and arrays, the cache directory's files."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import transformers

import m2f_jax
from m2f_jax.cli import build_parser
from m2f_jax.config import Mask2FormerConfig
from m2f_jax.processing import post_processing
from m2f_jax.processing.image_processor import Mask2FormerImageProcessor
from tests import TORCH_REASON

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_top_level_names_are_the_models_and_the_processor():
    from m2f_jax import hub

    assert m2f_jax.Mask2FormerImageProcessor is Mask2FormerImageProcessor
    # the loaded-model classes (as transformers' Flax models: module + params), not linen modules
    assert m2f_jax.Mask2FormerForUniversalSegmentation is hub.Mask2Former is m2f_jax.Mask2Former
    assert issubclass(m2f_jax.Mask2FormerModel, hub.Mask2Former)
    assert set(m2f_jax.__all__) >= {"Mask2FormerImageProcessor", "Mask2FormerModel", "enable_compilation_cache"}


# an explicit backbone: transformers' default one needs torch
_SWIN = {"model_type": "swin", "out_features": ["stage1", "stage2", "stage3", "stage4"]}


@pytest.mark.parametrize("kwargs", [dict(num_labels=5), dict(), dict(id2label={0: "cat", 1: "dog", 2: "sky"})])
@pytest.mark.parametrize("from_dict", [False, True])
def test_num_labels_and_label_names_match_transformers(kwargs, from_dict):
    def make(cls):
        args = dict(kwargs, backbone_config=dict(_SWIN))
        return cls.from_dict(args) if from_dict else cls(**args)

    theirs, ours = make(transformers.Mask2FormerConfig), make(Mask2FormerConfig)
    assert ours.num_labels == theirs.num_labels
    assert ours.id2label == {int(k): v for k, v in theirs.id2label.items()}
    assert "num_labels" not in ours.to_dict()  # transformers does not write it either
    assert Mask2FormerConfig.from_dict(ours.to_dict()).num_labels == theirs.num_labels


def test_num_labels_that_contradict_id2label_or_are_not_positive_are_errors():
    with pytest.raises(ValueError, match="num_labels=3 but id2label has 2 labels"):
        Mask2FormerConfig(num_labels=3, id2label={0: "a", 1: "b"})
    with pytest.raises(ValueError, match="num_labels must be a positive int, got 0"):
        Mask2FormerConfig(num_labels=0)


_FILE = {"size": {"shortest_edge": 100, "longest_edge": 1333}, "size_divisor": 32,
         "image_processor_type": "Mask2FormerImageProcessor"}


def test_size_divisibility_keyword_replaces_the_files_divisor_as_transformers_4(tmp_path):
    """A 100x150 image: the shortest edge is already 100, so the resize size is (100, 150),
    rounded up to multiples of the divisor: (128, 160) for the file's 32, (104, 152) for 8."""
    image = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    assert Mask2FormerImageProcessor.from_dict(_FILE)(image)["pixel_values"].shape == (1, 128, 160, 3)
    processor = Mask2FormerImageProcessor.from_dict(_FILE, size_divisibility=8)
    assert processor.size_divisor == 8
    assert processor(image)["pixel_values"].shape == (1, 104, 152, 3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(_FILE))
    assert Mask2FormerImageProcessor.from_pretrained(tmp_path, size_divisibility=8).size_divisor == 8


def test_encode_inputs_pads_processed_images_and_builds_targets():
    """Already processed (float, normalised) images are only padded to the batch's largest size;
    targets are one binary mask per class present (hand-built)."""
    rng = np.random.default_rng(1)
    images = [rng.normal(size=(3, 4, 5)).astype(np.float32), rng.normal(size=(3, 6, 3)).astype(np.float32)]
    maps = [np.array([[0, 0, 1, 1, 1]] * 4), np.array([[2, 2, 2]] * 6)]
    out = Mask2FormerImageProcessor().encode_inputs(images, maps, ignore_index=255, input_data_format="channels_first")
    assert out["pixel_values"].shape == (2, 6, 5, 3)
    expected = np.zeros((2, 6, 5, 3), np.float32)
    expected[0, :4, :5] = images[0].transpose(1, 2, 0)
    expected[1, :6, :3] = images[1].transpose(1, 2, 0)
    np.testing.assert_array_equal(out["pixel_values"], expected)
    mask = np.zeros((2, 6, 5), np.int64)
    mask[0, :4, :5] = 1
    mask[1, :6, :3] = 1
    np.testing.assert_array_equal(out["pixel_mask"], mask)
    np.testing.assert_array_equal(out["class_labels"][0], [0, 1])
    np.testing.assert_array_equal(out["class_labels"][1], [2])
    first = np.full((2, 6, 5), 255.0, np.float32)  # padding carries ignore_index, as transformers
    first[:, :4, :5] = 0
    first[0, :4, :2] = 1
    first[1, :4, 2:5] = 1
    np.testing.assert_array_equal(out["mask_labels"][0], first)


# transformers 4.56's documented encode_inputs parameters, in order (the model page; 5.x removed it)
_ENCODE_INPUTS_PARAMETERS = ["pixel_values_list", "segmentation_maps", "instance_id_to_semantic_id", "ignore_index",
                             "do_reduce_labels", "return_tensors", "input_data_format", "pad_size"]


def test_encode_inputs_takes_the_documented_keywords():
    """``encode_inputs(..., return_tensors="np")`` as the model page writes it (a TypeError
    before); the documented parameters in their order, ``return_channels_first`` keyword-only
    after them. Oracle: hand-built padding and targets, as the test above."""
    import inspect

    processor = Mask2FormerImageProcessor()
    parameters = list(inspect.signature(processor.encode_inputs).parameters.values())
    assert [p.name for p in parameters] == _ENCODE_INPUTS_PARAMETERS + ["return_channels_first"]
    assert parameters[-1].kind is inspect.Parameter.KEYWORD_ONLY
    rng = np.random.default_rng(3)
    images = [rng.normal(size=(4, 5, 3)).astype(np.float32), rng.normal(size=(6, 3, 3)).astype(np.float32)]
    maps = [np.array([[1, 1, 2, 2, 255]] * 4), np.array([[0, 3, 3]] * 6)]
    out = processor.encode_inputs(images, segmentation_maps=maps, instance_id_to_semantic_id=None, ignore_index=255,
                                  do_reduce_labels=True, return_tensors="np", input_data_format="channels_last",
                                  pad_size={"height": 7, "width": 8})
    assert out["pixel_values"].shape == (2, 7, 8, 3)
    np.testing.assert_array_equal(out["pixel_values"][0, :4, :5], images[0])
    np.testing.assert_array_equal(out["pixel_values"][1, :6, :3], images[1])
    assert out["pixel_values"][0, 4:].sum() == 0 and out["pixel_mask"].sum() == 4 * 5 + 6 * 3
    # reduced labels: 1, 2, 3 -> 0, 1, 2; 0 and 255 ignored
    np.testing.assert_array_equal(out["class_labels"][0], [0, 1])
    np.testing.assert_array_equal(out["class_labels"][1], [2])
    np.testing.assert_array_equal(out["mask_labels"][1][0, :6, :3], [[0, 1, 1]] * 6)
    assert out["mask_labels"][0].shape == (2, 7, 8)
    positional = processor.encode_inputs(images, maps, None, 255, True, "np", "channels_last", {"height": 7, "width": 8})
    np.testing.assert_array_equal(positional["pixel_values"], out["pixel_values"])
    with pytest.raises(ValueError, match="return_tensors='np' or None"):
        processor.encode_inputs(images, return_tensors="pt")
    first = processor.encode_inputs(images, return_channels_first=True)["pixel_values"]
    assert first.shape == (2, 3, 6, 5)


def test_linen_module_signature_puts_pixel_values_first_and_takes_keywords(tiny_checkpoint):
    """transformers' ``test_forward_signature`` reads ``pixel_values`` first; the module is
    applied by keyword as users write it. Oracle: transformers' forward signature and the
    torch model's outputs (fp32, atol 1e-4)."""
    import inspect

    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation as Module
    from tests.hf_models import nchw_to_nhwc, run_hf

    folder, torch_model = tiny_checkpoint
    model = m2f_jax.load(folder)
    assert isinstance(model.module, Module)
    names = list(inspect.signature(model.module.__call__).parameters)
    assert names[:1] == ["pixel_values"]
    theirs_names = list(inspect.signature(transformers.Mask2FormerForUniversalSegmentation.forward).parameters)
    assert theirs_names[1:2] == ["pixel_values"]  # after self
    assert set(names) - {"deterministic"} <= set(theirs_names)
    assert list(inspect.signature(Module.__call__).parameters)[:2] == ["self", "pixel_values"]

    pixels = _pixels(4)
    out = model.module.apply({"params": model.params}, pixel_values=jax.numpy.asarray(pixels), deterministic=True,
                             output_hidden_states=True)
    theirs = run_hf(torch_model, pixels)
    np.testing.assert_allclose(np.asarray(out.class_queries_logits), theirs.class_queries_logits.numpy(), atol=1e-4)
    assert len(out.encoder_hidden_states) == len(theirs.encoder_hidden_states) == 4
    for ours_map, their_map in zip(out.encoder_hidden_states, theirs.encoder_hidden_states):
        np.testing.assert_allclose(np.asarray(ours_map), nchw_to_nhwc(their_map), atol=1e-4)
    assert out.attentions is None and out.auxiliary_logits is None


def test_post_process_methods_match_transformers():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    rng = np.random.default_rng(2)
    class_logits = rng.normal(size=(1, 6, 4)).astype(np.float32) * 3
    mask_logits = rng.normal(size=(1, 6, 12, 10)).astype(np.float32) * 3
    ours_out = {"class_queries_logits": class_logits, "masks_queries_logits": mask_logits}
    theirs_out = transformers.models.mask2former.modeling_mask2former.Mask2FormerForUniversalSegmentationOutput(
        class_queries_logits=torch.from_numpy(class_logits), masks_queries_logits=torch.from_numpy(mask_logits))
    ours, theirs = Mask2FormerImageProcessor(), transformers.Mask2FormerImageProcessorPil()
    sizes = [(24, 20)]
    np.testing.assert_array_equal(ours.post_process_semantic_segmentation(ours_out, target_sizes=sizes)[0],
                                  theirs.post_process_semantic_segmentation(theirs_out, target_sizes=sizes)[0].numpy())
    a = ours.post_process_instance_segmentation(ours_out, 0.1, target_sizes=sizes)[0]
    b = theirs.post_process_instance_segmentation(theirs_out, 0.1, target_sizes=sizes)[0]
    # the same instances; their order differs (README, deliberate difference 5)
    assert sorted((s["label_id"], round(s["score"], 5)) for s in a["segments_info"]) == sorted(
        (s["label_id"], round(float(s["score"]), 5)) for s in b["segments_info"])
    a = ours.post_process_panoptic_segmentation(ours_out, 0.1, target_sizes=sizes)[0]
    b = theirs.post_process_panoptic_segmentation(theirs_out, 0.1, target_sizes=sizes)[0]
    assert [s["label_id"] for s in a["segments_info"]] == [s["label_id"] for s in b["segments_info"]]
    assert a["segmentation"].shape == tuple(b["segmentation"].shape) == sizes[0]
    # the methods are the module's functions
    np.testing.assert_array_equal(ours.post_process_semantic_segmentation(ours_out)[0],
                                  post_processing.post_process_semantic_segmentation(ours_out)[0])


_CACHE_RUN = """
import sys, jax, m2f_jax
print(m2f_jax.enable_compilation_cache(*sys.argv[1:2], min_compile_time_secs=0))
jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()
"""


def test_compilation_cache_writes_to_the_chosen_or_environment_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "from_env"))
    for args, folder in (([str(tmp_path / "given")], tmp_path / "given"), ([], tmp_path / "from_env")):
        run = subprocess.run([sys.executable, "-c", _CACHE_RUN, *args], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == str(folder)
        assert len(os.listdir(folder)) >= 1  # the compiled program


def test_command_line_compilation_cache_switch():
    parser = build_parser()
    assert parser.parse_args(["segment", "--no-compilation-cache"]).no_compilation_cache is True
    assert parser.parse_args(["eval", "--data", "d", "--format", "semantic"]).no_compilation_cache is False


# ----------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained, the bare model, the loss from the call (transformers' oracle)
# ----------------------------------------------------------------------------------------------


def _pixels(seed=0, size=(64, 96)):
    return np.random.default_rng(seed).normal(size=(2, *size, 3)).astype(np.float32)


def test_from_pretrained_and_save_pretrained_round_trip(tiny_checkpoint, tmp_path):
    """save_pretrained writes the checkpoint's own weights back (transformers loading such a folder
    with the same outputs: tests/test_model_parity.py's round trip), its processor too."""
    from convert.checkpoint import read_state_dict

    folder, _ = tiny_checkpoint
    model = m2f_jax.Mask2FormerForUniversalSegmentation.from_pretrained(folder)
    assert isinstance(model, m2f_jax.Mask2Former) and model.path == folder
    model.processor = Mask2FormerImageProcessor(size={"height": 64, "width": 64})
    saved = model.save_pretrained(str(tmp_path / "saved"))
    before, after = read_state_dict(folder), read_state_dict(saved)
    assert sorted(before) == sorted(after)
    for name in before:
        if "swin.layernorm" not in name:  # unused by Mask2Former, written as ones / zeros
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert transformers.Mask2FormerConfig.from_pretrained(saved).num_labels == model.config.num_labels
    assert Mask2FormerImageProcessor.from_pretrained(saved).size == {"height": 64, "width": 64}
    # random weights from a config alone, as transformers' Flax models: the loaded tree, other values
    fresh = m2f_jax.Mask2FormerForUniversalSegmentation(model.config, seed=3)
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, tree)
    assert shapes(fresh.params) == shapes(model.params)
    assert not np.allclose(fresh.params["class_predictor"]["kernel"], model.params["class_predictor"]["kernel"])


def test_bare_model_gives_transformers_model_output_fields(tiny_checkpoint):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    folder, _ = tiny_checkpoint
    theirs_model = transformers.Mask2FormerModel.from_pretrained(folder).eval()
    ours_model = m2f_jax.Mask2FormerModel.from_pretrained(folder)
    pixels = _pixels(1)
    with torch.no_grad():
        theirs = theirs_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True,
                              output_attentions=True)
    ours = ours_model(pixels, output_hidden_states=True, output_attentions=True)
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    batch_first = lambda t: t.numpy().transpose(1, 0, 2)  # transformers' decoder states are (Q, B, C)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-4)
    close(ours.encoder_last_hidden_state, nhwc(theirs.encoder_last_hidden_state))
    close(ours.pixel_decoder_last_hidden_state, nhwc(theirs.pixel_decoder_last_hidden_state))
    close(ours.transformer_decoder_last_hidden_state, theirs.transformer_decoder_last_hidden_state.numpy())
    for field, convert in (("encoder_hidden_states", nhwc), ("pixel_decoder_hidden_states", nhwc),
                           ("transformer_decoder_hidden_states", batch_first),
                           ("transformer_decoder_intermediate_states", batch_first),
                           ("masks_queries_logits", lambda t: t.numpy()), ("attentions", lambda t: t.numpy())):
        a, b = getattr(ours, field), getattr(theirs, field)
        assert len(a) == len(b), field
        for x, y in zip(a, b):
            close(x, convert(y))
    plain = ours_model(pixels)
    assert plain.encoder_hidden_states is None and plain.attentions is None


def test_loss_from_the_call_matches_transformers_with_its_draws_replayed(tiny_checkpoint):
    """transformers' ``model(pixel_values, mask_labels=, class_labels=).loss`` with its torch.rand
    draws recorded, against ours with those points given; and with a key, the loss of the
    criterion on the forward's outputs."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from m2f_jax.modeling.criterion import LossConfig
    from tests.hf_models import points_from_torch_draws

    folder, torch_model = tiny_checkpoint
    model = m2f_jax.load(folder)
    pixels = _pixels(2)
    rng = np.random.default_rng(5)
    mask_labels = [(rng.random((n, 64, 96)) > 0.6).astype(np.float32) for n in (3, 1)]
    class_labels = [rng.integers(0, model.config.num_labels, n) for n in (3, 1)]
    draws, real_rand = [], torch.rand

    def recording_rand(*args, **kwargs):
        out = real_rand(*args, **kwargs)
        draws.append(out.numpy().copy())
        return out

    torch.manual_seed(0)
    torch.rand = recording_rand
    try:
        with torch.no_grad():
            theirs = torch_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                                 mask_labels=[torch.from_numpy(m) for m in mask_labels],
                                 class_labels=[torch.from_numpy(c).long() for c in class_labels])
    finally:
        torch.rand = real_rand
    config = LossConfig.from_config(model.config)
    given = points_from_torch_draws(draws, 2, model.config.decoder_layers, config)
    ours = model(pixels, mask_labels=mask_labels, class_labels=class_labels, given_points=given)
    np.testing.assert_allclose(float(ours.loss), float(theirs.loss), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.class_queries_logits), theirs.class_queries_logits.numpy(), atol=1e-4)
    assert ours.auxiliary_logits is None  # as asked (config default), though the loss used them

    # with a key (the default path): other random points, the same loss up to their sampling
    keyed = model(pixels, mask_labels=mask_labels, class_labels=class_labels, key=jax.random.key(7))
    assert float(keyed.loss) != float(ours.loss)
    np.testing.assert_allclose(float(keyed.loss), float(theirs.loss), rtol=0.05)
    with pytest.raises(ValueError, match="both mask_labels and class_labels"):
        model(pixels, mask_labels=mask_labels)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 4\)"):
        model(pixels, mask_labels=mask_labels, class_labels=[np.array([0, 1, 9]), np.array([0])])


@pytest.mark.parametrize("channels", [2, 5])
def test_images_with_the_backbones_channel_count_are_taken(channels):
    """A processor whose image_mean has 2 or 5 entries (a backbone with num_channels 2 or 5)
    takes such images channels-last or channels-first; hand-computed pixel values."""
    mean, std = [0.1 * (c + 1) for c in range(channels)], [0.2 + 0.05 * c for c in range(channels)]
    processor = Mask2FormerImageProcessor(do_resize=False, image_mean=mean, image_std=std, size_divisor=0)
    image = np.random.default_rng(channels).integers(0, 256, (6, 9, channels), dtype=np.uint8)
    expected = ((image / 255.0 - np.array(mean)) / np.array(std)).astype(np.float32)[None]
    np.testing.assert_allclose(processor(image)["pixel_values"], expected, atol=1e-6)
    np.testing.assert_allclose(processor(np.moveaxis(image, -1, 0))["pixel_values"], expected, atol=1e-6)
    np.testing.assert_allclose(processor(image, input_data_format="channels_last")["pixel_values"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="Cannot find the channel axis"):  # an RGB processor
        Mask2FormerImageProcessor(do_resize=False)(np.zeros((6, 9, 5), np.uint8))
