"""The network and its loss, as Flax linen modules and pure functions, in the order data flows:
``swin`` (backbone) -> ``pixel_decoder`` (multi-scale ``deformable`` attention encoder, FPN) ->
``decoder`` (masked-attention transformer decoder) -> ``mask2former`` (heads, the whole model);
``criterion`` and ``matcher`` (transformers' loss and Hungarian matching); ``dense``, ``conv``
and ``activations`` (layers); ``variants`` (the program each platform gets)."""
