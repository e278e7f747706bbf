"""XLA's TPU cost model for the programs a TPU user runs: compiled for a named TPU topology on
this CPU-only machine (no TPU needed), reporting flops, bytes accessed, per-chip memory, compile
time and the v5e compute- and bandwidth-bound times.

Set-up: ``pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"`` (libtpu,
~700 MB). Run from the project root:

    JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost TPU_ACCELERATOR_TYPE=v5litepod-4 \\
        python benchmarks/tpu_cost.py forward 800 1088 1 bf16     # H W batch dtype
    ... tpu_cost.py parts 800 1088 1 bf16 [fwd|bwd]              # Swin, pixel decoder, decoder
    ... tpu_cost.py loss 1024 50 bf16                             # crop, target masks: one example
    ... tpu_cost.py train 1024 2 50 bf16                          # crop, images per chip, masks
    ... tpu_cost.py table                                         # the README's rows, one JSON each
    ... tpu_cost.py floor 800 1088 bf16                           # deformable attention's floor

**The program a TPU user gets.** Every program is traced for the "tpu" platform (the "xla"
variant of ``m2f_jax.modeling.variants``: no custom_vjp/custom_vmap, one vmap over the batch, no
CPU compiler options); the benchmark asserts it on the traced jaxpr.

**Scanned and unrolled layers.** ``forward``, ``train`` and ``table`` compile each program twice,
with the model's ``scan_layers`` on (the default of the "xla" variant: the repeated layers as
``lax.scan``s, ``m2f_jax.modeling.variants``) and off (unrolled), and print one row each, with
its compile seconds. Run with an empty compilation cache (``JAX_COMPILATION_CACHE_DIR`` unset, or
a fresh folder) for the time a user's first compile takes.

**Loops are counted as often as they run.** XLA's cost analysis counts a loop body once (a
16-step scan of matmuls reports 1/16 of its flops), so the benchmark checks every ``while`` in
the compiled program. The unrolled model and the loss have none on this variant. The scanned
model's loops are the model's scans of the traced program (checked by count): each scan body is
compiled alone, with the shapes of one chip's share of the batch, and added for its further
trips (its trip count - 1). A figure of a looped program as XLA reports it is never printed.
The only other loops allowed (by count: as many as the matcher compiled alone has) are the
Hungarian matcher's (optax's
``hungarian_algorithm``: a scan over the min(Q, M) rows, each with a search and a backtrack of at
most max(Q, M) + 1 steps), whose trip count depends on the data. Their worst case is added: the
matcher of one loss level is compiled alone (every loop body counted once), and each loop body,
compiled alone, is added for its further worst-case trips (the scan body min(Q, M) - 1 times,
each while body min(Q, M) (max(Q, M) + 1) - 1 times). XLA:TPU's own "wide" loops (one
elementwise op, such as the random draws, streamed over a large array in chunks) are counted as
one pass over the arrays they carry. Any other loop fails the run.

Roofline of one v5e chip: 197 TFLOP/s bf16, 819 GB/s HBM, 16 GiB HBM.
"""
from __future__ import annotations

import json
import re
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2f_jax.config import Mask2FormerConfig, SwinConfig
from m2f_jax.modeling import variants
from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation

V5E = dict(flops=197e12, bandwidth=819e9, hbm=16 * 2**30)
TOPOLOGY = "v5e:2x2"
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def swin_t_config() -> Mask2FormerConfig:
    swin = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                      out_features=["stage1", "stage2", "stage3", "stage4"], drop_path_rate=0.3)
    return Mask2FormerConfig(backbone_config=swin, id2label={i: str(i) for i in range(133)})


def assert_tpu_program(fn, *args) -> None:
    """The traced program is the "xla" variant: no CPU machinery (custom_vjp / custom_vmap)."""
    assert variants.current() == "xla", variants.current()
    cpu_only = variants.cpu_machinery(fn, *args)
    assert not cpu_only, f"the traced program holds CPU-variant machinery: {sorted(cpu_only)}"


_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def while_loops(compiled) -> list:
    """(name, op_name, body, bytes of the carried arrays) of every while loop in the compiled HLO."""
    loops = []
    for line in compiled.as_text().splitlines():
        if " while(" in line:
            op_name = re.search(r'op_name="([^"]*)"', line)
            body = re.search(r"body=%([\w.\-]+)", line)
            carried = sum(_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
                          for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", line.split(" while(")[0]))
            loops.append((line.strip().split(" ", 1)[0], op_name.group(1) if op_name else "?",
                          body.group(1) if body else "?", carried))
    return loops


def costs(compiled) -> dict:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    return dict(flops=float(ca.get("flops", 0.0)), bytes=float(ca.get("bytes accessed", 0.0)))


def _loop_bodies(jaxpr):
    """(loop depth, primitive, body ClosedJaxpr) of every scan / while in ``jaxpr``."""
    bodies = {"while": "body_jaxpr", "scan": "jaxpr"}
    return [(depth, eqn.primitive.name, eqn.params[bodies[eqn.primitive.name]])
            for depth, eqn in variants.equations(jaxpr) if eqn.primitive.name in bodies]


def matcher_worst_case(problems: int, num_queries: int, num_targets: int, device, instances: int = 1) -> dict:
    """Worst-case cost of ``instances`` Hungarian matchers (one per loss level) of ``problems``
    (Q, M) assignments each (the examples, vmapped): the matcher compiled alone (every loop body
    counted once) plus each loop body compiled alone times its further worst-case trips. optax's
    algorithm scans the min(Q, M) rows; per row, its search and its backtrack each run at most
    max(Q, M) + 1 times."""
    from m2f_jax.modeling.matcher import hungarian_assignment

    sharding = NamedSharding(Mesh(np.array([device]), ("d",)), P())
    cost = jax.ShapeDtypeStruct((problems, num_queries, num_targets), jnp.float32, sharding=sharding)
    valid = jax.ShapeDtypeStruct((problems, num_targets), jnp.bool_, sharding=sharding)
    compiled = jax.jit(hungarian_assignment).lower(cost, valid).compile()
    total = costs(compiled)
    rows, cols = min(num_queries, num_targets), max(num_queries, num_targets)
    bodies = _loop_bodies(jax.make_jaxpr(hungarian_assignment)(cost, valid).jaxpr)
    assert [(d, p) for d, p, _ in bodies] == [(0, "scan"), (1, "while"), (1, "while")], bodies
    for depth, _, body in bodies:
        trips = rows if depth == 0 else rows * (cols + 1)
        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, sharding=sharding) for v in body.jaxpr.invars]
        one = costs(jax.jit(jax.extend.core.jaxpr_as_fun(body)).lower(*avals).compile())
        total = {k: total[k] + one[k] * (trips - 1) for k in total}
    return dict(flops=total["flops"] * instances, bytes=total["bytes"] * instances,
                loops=len(while_loops(compiled)) * instances)


def _has_loop(jaxpr) -> bool:
    return any(eqn.primitive.name in ("scan", "while") for _, eqn in variants.equations(jaxpr))


def scanned_layers_cost(fn, *args, device) -> dict:
    """The model's layer scans in ``fn(*args)`` as traced (the outermost scans without loops
    inside; the matcher's scan holds while loops): each body compiled alone on ``device``, times
    its trips beyond the one the whole program's cost analysis counts. ``args`` are abstract, with
    the shapes one chip computes."""
    sharding = NamedSharding(Mesh(np.array([device]), ("d",)), P())
    total = dict(flops=0.0, bytes=0.0, loops=0)
    for depth, eqn in variants.equations(jax.make_jaxpr(fn)(*args)):
        body = eqn.params.get("jaxpr") if eqn.primitive.name == "scan" else None
        if depth or body is None or _has_loop(body):
            continue
        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, sharding=sharding) for v in body.jaxpr.invars]
        one = costs(jax.jit(jax.extend.core.jaxpr_as_fun(body)).lower(*avals).compile())
        total = dict(flops=total["flops"] + one["flops"] * (eqn.params["length"] - 1),
                     bytes=total["bytes"] + one["bytes"] * (eqn.params["length"] - 1), loops=total["loops"] + 1)
    return total


def report(name, compiled, seconds, matcher=None, scanned=None, **extra) -> dict:
    c = costs(compiled)
    loops = while_loops(compiled)
    # XLA:TPU's own "wide" loops stream one elementwise op (here the random draws) over a large
    # array in chunks: counted as one pass over their carried arrays (read and written once).
    wide = [loop for loop in loops if loop[2].startswith("wide.body")]
    c["bytes"] += sum(2 * loop[3] for loop in wide)
    # The only other loops allowed are the matcher's (as many as the matcher compiled alone has)
    # and the model's layer scans (as many as the traced program has); the TPU program's loops
    # carry no source file, so they are checked by count.
    rest = [loop for loop in loops if loop not in wide]
    allowed = (matcher["loops"] if matcher else 0) + (scanned["loops"] if scanned else 0)
    assert len(rest) == allowed, f"{name}: {len(rest)} loops, {allowed} of them the matcher's and scans': {rest}"
    for added in (matcher, scanned):
        if added:
            c = dict(flops=c["flops"] + added["flops"], bytes=c["bytes"] + added["bytes"])
    ma = compiled.memory_analysis()
    per_chip = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    row = dict(program=name, **extra, compile_s=round(seconds, 1), gflops=round(c["flops"] / 1e9, 1),
               gbytes=round(c["bytes"] / 1e9, 2), while_loops=len(loops), wide_loops=len(wide),
               matcher_worst_gbytes=round(matcher["bytes"] / 1e9, 2) if matcher else 0.0,
               scan_trips_gbytes=round(scanned["bytes"] / 1e9, 2) if scanned else 0.0,
               temp_gib=round(ma.temp_size_in_bytes / 2**30, 2), per_chip_gib=round(per_chip / 2**30, 2),
               fits_v5e=per_chip <= V5E["hbm"],
               v5e_compute_ms=round(c["flops"] / V5E["flops"] * 1e3, 2),
               v5e_memory_ms=round(c["bytes"] / V5E["bandwidth"] * 1e3, 2))
    print(json.dumps(row), flush=True)
    return row


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _params(module):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])


SCAN_SETTINGS = (True, False)  # each program with the layers scanned, then unrolled


def forward(h, w, b, dt, scan=True):
    topo = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu")
    rep = NamedSharding(Mesh(np.array(topo.devices[:1]), ("d",)), P())
    module = Mask2FormerForUniversalSegmentation(swin_t_config(), dtype=DTYPES[dt], variant="xla", scan_layers=scan)
    params = _abstract(_params(module), rep)
    x = jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32, sharding=rep)

    def fwd(p, x):
        out = module.apply({"params": p}, x)
        return out.class_queries_logits, out.masks_queries_logits

    with variants.use("xla"):
        assert_tpu_program(fwd, params, x)
    t = time.time()
    compiled = jax.jit(fwd).lower(params, x).compile()
    seconds = time.time() - t
    scanned = scanned_layers_cost(fwd, params, x, device=topo.devices[0])
    return report("forward", compiled, seconds, scanned=scanned, H=h, W=w, B=b, dtype=dt, scan_layers=scan)


def parts(h, w, b, dt, grad=False):
    from m2f_jax.modeling.decoder import TransformerModule
    from m2f_jax.modeling.pixel_decoder import PixelDecoder
    from m2f_jax.modeling.swin import SwinBackbone

    topo = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu")
    rep = NamedSharding(Mesh(np.array(topo.devices[:1]), ("d",)), P())
    cfg, dtype = swin_t_config(), DTYPES[dt]
    rows = []

    def part(name, module, *inputs):
        params = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a)["params"], *inputs)
        if grad:
            def f(p, *x):
                def scalar(p, x):
                    out = module.apply({"params": p}, *x, deterministic=False, rngs={"dropout": jax.random.key(1)})
                    return sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(out))
                return jax.grad(scalar, argnums=(0, 1))(p, x)
        else:
            f = lambda p, *x: module.apply({"params": p}, *x)  # noqa: E731
        args = (_abstract(params, rep), *_abstract(inputs, rep))
        assert_tpu_program(f, *args)
        t = time.time()
        compiled = jax.jit(f).lower(*args).compile()
        rows.append(report(name, compiled, time.time() - t, H=h, W=w, B=b, dtype=dt,
                           mode="fwd+bwd" if grad else "fwd"))
        return jax.eval_shape(lambda p, *x: module.apply({"params": p}, *x), params, *inputs)

    with variants.use("xla"):
        feats = part("swin", SwinBackbone(cfg.backbone_config, dtype), jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32))
        mask_features, multi = part("pixel_decoder", PixelDecoder(cfg, dtype), list(feats))
        part("transformer_decoder", TransformerModule(cfg, dtype), list(multi), mask_features)
    return rows


def loss(crop, masks, dt):
    """The loss of one example (final + 9 auxiliary levels, matcher included), forward + backward
    w.r.t. the logits."""
    from m2f_jax.modeling.criterion import LossConfig, mask2former_loss

    topo = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu")
    rep = NamedSharding(Mesh(np.array(topo.devices[:1]), ("d",)), P())
    cfg = swin_t_config()
    loss_cfg = LossConfig.from_config(cfg)
    levels, q, h = cfg.decoder_layers, cfg.num_queries, crop // 4
    dtype = DTYPES[dt]
    s = lambda shape, d=dtype: jax.ShapeDtypeStruct(shape, d, sharding=rep)  # noqa: E731
    logits = dict(class_queries_logits=s((levels, 1, q, cfg.num_labels + 1)),
                  masks_queries_logits=s((levels, 1, q, h, h)))
    targets = (s((1, masks, crop, crop), jnp.float32), s((1, masks), jnp.int32), s((1, masks), jnp.bool_))

    def f(logits, mask_labels, class_labels, valid):
        def total(logits):
            final = {k: v[0] for k, v in logits.items()}
            aux = {k: v[1:] for k, v in logits.items()}
            out = mask2former_loss(final["class_queries_logits"], final["masks_queries_logits"], mask_labels,
                                   class_labels, valid, config=loss_cfg, auxiliary_logits=aux, key=jax.random.key(0))
            return out["loss"]
        return jax.value_and_grad(total)(logits)

    with variants.use("xla"):
        assert_tpu_program(f, logits, *targets)
        t = time.time()
        compiled = jax.jit(f).lower(logits, *targets).compile()
    matcher = matcher_worst_case(1, q, masks, topo.devices[0], instances=levels)
    return report("loss", compiled, time.time() - t, matcher=matcher, crop=crop, masks=masks, dtype=dt)


def train(crop, per_chip, masks, dt, scan=True):
    from m2f_jax.modeling.criterion import LossConfig
    from m2f_jax.training.optimizer import make_optimizer
    from m2f_jax.training.train_step import TrainState, make_train_step

    topo = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu")
    mesh = Mesh(np.array(topo.devices), ("data",))
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    batch_size = per_chip * len(topo.devices)
    cfg = swin_t_config()
    module = Mask2FormerForUniversalSegmentation(cfg, scan_layers=scan)
    params = _params(module)
    opt = make_optimizer(params, total_steps=1000)
    state = _abstract(jax.eval_shape(lambda p: TrainState.create(p, opt[0], 0), params), rep)
    step = make_train_step(module, LossConfig.from_config(cfg), opt, compute_dtype=DTYPES[dt],
                           platform=variants.platform_of(mesh))
    def batch_of(size, sharding):
        return dict(
            pixel_values=jax.ShapeDtypeStruct((size, crop, crop, 3), jnp.float32, sharding=sharding),
            mask_labels=jax.ShapeDtypeStruct((size, masks, crop, crop), jnp.float32, sharding=sharding),
            class_labels=jax.ShapeDtypeStruct((size, masks), jnp.int32, sharding=sharding),
            label_valid=jax.ShapeDtypeStruct((size, masks), jnp.bool_, sharding=sharding))

    batch = batch_of(batch_size, shard)
    with variants.use("xla"):
        assert_tpu_program(step, state, batch)
    t = time.time()
    compiled = jax.jit(step, in_shardings=(rep, shard), out_shardings=(rep, rep), donate_argnums=0).lower(
        state, batch).compile()
    seconds = time.time() - t
    matcher = matcher_worst_case(per_chip, cfg.num_queries, masks, topo.devices[0], instances=cfg.decoder_layers)
    # The scan bodies of one chip's share: the step traced for its per_chip examples.
    one_chip = NamedSharding(Mesh(np.array(topo.devices[:1]), ("data",)), P())
    with variants.use("xla"):
        scanned = scanned_layers_cost(step, _abstract(state, one_chip), batch_of(per_chip, one_chip),
                                      device=topo.devices[0])
    return report("train_step", compiled, seconds, matcher=matcher, scanned=scanned, chips=len(topo.devices),
                  crop=crop, per_chip=per_chip, masks=masks, dtype=dt, scan_layers=scan)


def floor(h, w, dt):
    """A floor under the forward's deformable attention in XLA's own operations: for each pixel
    decoder level, the cheaper of (a) the gather alone of one 4 hd-lane corner row per sample
    (every sample's four corners x hd channels, nothing more read; no arithmetic counted) and (b)
    a dense formulation (the samples' bilinear weights spread into a (query, head, H_l W_l)
    matrix, multiplied with the value), times the encoder layers."""
    from m2f_jax.modeling.deformable import MultiscaleDeformableAttention

    topo = topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu")
    rep = NamedSharding(Mesh(np.array(topo.devices[:1]), ("d",)), P())
    cfg, dtype = swin_t_config(), DTYPES[dt]
    nh, hd = cfg.num_attention_heads, cfg.feature_size // cfg.num_attention_heads
    npt = MultiscaleDeformableAttention.n_points  # sampling points per head and level
    shapes = [(-(-h // s), -(-w // s)) for s in (32, 16, 8)]
    sq = sum(a * b for a, b in shapes)
    s = lambda shape, d=dtype: jax.ShapeDtypeStruct(shape, d, sharding=rep)  # noqa: E731
    total = 0.0
    for hl, wl in shapes:
        gather = lambda table, index: table.at[index].get(mode="promise_in_bounds")  # noqa: E731
        rows = (nh * (hl + 1) * (wl + 1), 4 * hd)
        g = costs(jax.jit(gather).lower(s(rows), s((npt, sq * nh), jnp.int32)).compile())["bytes"]

        def dense(wy, wx, value):  # (nh, Sq, P, H_l), (nh, Sq, P, W_l), (nh, H_l W_l, hd)
            a = (wy[..., :, None] * wx[..., None, :]).sum(2).reshape(nh, sq, hl * wl)
            return jnp.einsum("hqp,hpd->hqd", a, value)
        d = costs(jax.jit(dense).lower(s((nh, sq, npt, hl)), s((nh, sq, npt, wl)),
                                       s((nh, hl * wl, hd))).compile())["bytes"]
        total += min(g, d)
        print(json.dumps(dict(level=(hl, wl), samples=npt * sq * nh, gather_gbytes=round(g / 1e9, 2),
                              dense_gbytes=round(d / 1e9, 2))), flush=True)
    print(json.dumps(dict(program="deformable_floor", H=h, W=w, dtype=dt, layers=cfg.encoder_layers,
                          gbytes=round(total * cfg.encoder_layers / 1e9, 2))), flush=True)


def main(argv):
    mode, args = argv[0], argv[1:]
    if mode == "forward":
        for scan in SCAN_SETTINGS:
            forward(int(args[0]), int(args[1]), int(args[2]), args[3], scan)
    elif mode == "parts":
        parts(int(args[0]), int(args[1]), int(args[2]), args[3], grad=len(args) > 4 and args[4] == "bwd")
    elif mode == "loss":
        loss(int(args[0]), int(args[1]), args[2])
    elif mode == "train":
        for scan in SCAN_SETTINGS:
            train(int(args[0]), int(args[1]), int(args[2]), args[3], scan)
    elif mode == "floor":
        floor(int(args[0]), int(args[1]), args[2])
    elif mode == "table":
        for scan in SCAN_SETTINGS:
            for h, w in ((384, 384), (800, 1088)):
                for dt in ("bf16", "fp32"):
                    forward(h, w, 1, dt, scan)
            train(1024, 2, 50, "bf16", scan)
    else:
        raise SystemExit(f"unknown mode {mode!r}: forward | parts | loss | train | floor | table")


if __name__ == "__main__":
    main(sys.argv[1:])
