"""The precision switch: every matmul and convolution of the lowered program carries the chosen
precision (oracle: the StableHLO text of the lowered program, which is what XLA compiles), and a
bad value is a clear error. Lowering only: nothing is compiled."""
import re

import jax
import jax.numpy as jnp
import pytest

from m2f_jax.config import Mask2FormerConfig
from m2f_jax.modeling.mask2former import PRECISIONS, Mask2FormerForUniversalSegmentation
from tests.hf_models import TINY, hf_config

_OPS = ("stablehlo.dot_general", "stablehlo.convolution")


def _precisions(text: str) -> dict:
    """{op: [precision of each operand pair]} of every matmul and convolution in StableHLO text,
    outside ``jax.image.resize`` (its interpolation matmuls are always HIGHEST, exact); an op
    printed without a precision has the default one."""
    found = {op: [] for op in _OPS}
    function = ""
    for line in text.splitlines():
        if "func.func" in line:
            function = line.split("@")[1].split("(")[0]
        for op in _OPS:
            if op in line and not function.startswith("_resize"):
                names = re.findall(r"precision = \[(\w+), \w+\]", line) or re.findall(r"#stablehlo<precision (\w+)>", line)
                found[op].append(names[0] if names else "DEFAULT")
    return found


def _lowered(precision, variant, grad=False):
    config = Mask2FormerConfig.from_dict(hf_config(TINY["backbone"], TINY["model"], TINY["num_labels"]).to_dict())
    module = Mask2FormerForUniversalSegmentation(config, variant=variant, precision=precision)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]

    def forward(params, x):
        out = module.apply({"params": params}, x)
        return out.class_queries_logits, out.masks_queries_logits

    def scalar(params, x):
        return sum(jnp.sum(leaf) for leaf in forward(params, x))

    return jax.jit(jax.grad(scalar) if grad else forward).lower(params, x).as_text()


@pytest.mark.parametrize("precision, variant", [(p, "xla") for p in PRECISIONS] + [("highest", "cpu")])
def test_every_matmul_and_convolution_of_the_forward_has_the_chosen_precision(precision, variant):
    found = _precisions(_lowered(precision, variant))
    expected = (precision or "default").upper()
    # the tiny model: Swin's patch embedding and the pixel decoder's convolutions, and the
    # Linear layers and attention products everywhere
    assert len(found["stablehlo.convolution"]) >= 2 and len(found["stablehlo.dot_general"]) >= 50, found
    for op, names in found.items():
        assert set(names) == {expected}, (op, sorted(set(names)))


def test_the_xla_variant_gradient_keeps_highest_precision():
    """On the GPU/TPU program (JAX autodiff) the backward's matmuls inherit the precision."""
    found = _precisions(_lowered("highest", "xla", grad=True))
    assert len(found["stablehlo.dot_general"]) >= 150, found
    for op, names in found.items():
        assert set(names) == {"HIGHEST"}, (op, sorted(set(names)))


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match=r"precision must be one of \(None, 'default', 'high', 'highest'\); got 'fp32'"):
        _lowered("fp32", "xla")


def test_the_bare_model_object_honours_precision_and_variant(tiny_checkpoint):
    """``m2f_jax.Mask2FormerModel.from_pretrained(..., precision=, variant=)``: every matmul and
    convolution of its lowered forward has the precision, and "xla" traces none of the "cpu"
    variant's custom_vjp / custom_vmap machinery (which "cpu" does)."""
    import m2f_jax
    from m2f_jax.modeling import variants

    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    for precision, variant in (("highest", "xla"), ("high", "cpu")):
        model = m2f_jax.Mask2FormerModel.from_pretrained(str(tiny_checkpoint[0]), precision=precision,
                                                         variant=variant)
        found = _precisions(model._forward.lower(model.params, x, False, False).as_text())
        assert len(found["stablehlo.convolution"]) >= 2 and len(found["stablehlo.dot_general"]) >= 40, found
        for op, names in found.items():
            assert set(names) == {precision.upper()}, (op, variant, sorted(set(names)))
        machinery = variants.cpu_machinery(lambda p, x: model.module.apply({"params": p}, x, True), model.params, x)
        assert (machinery == set()) == (variant == "xla"), (variant, machinery)
