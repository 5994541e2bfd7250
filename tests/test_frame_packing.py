"""Frame packing (data/batch.py, docs/architecture.md "Frame packing"): only real frames go through
the ViT and the image Q-Former, and the loss and its gradients are those of the unpacked layout."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from test_generate import random_model

from ivcr_jax import cli, sharding
from ivcr_jax.data.batch import BatchLayout, slot_view
from ivcr_jax.data.pipeline import Batcher, RawVideos, SampleLoader, batch_layout, make_pipeline
from ivcr_jax.data.samples import enumerate_samples, prefix_videos
from ivcr_jax.experiment import Experiment
from ivcr_jax.models.params import trainable_filter
from ivcr_jax.train import losses as L

GROUPS = {"f4": (3, 4), "f8": (1, 8)}   # K = 3 x 4 + 8 = 20 slots per row


def _records(layout: BatchLayout, counts, seed=0):
    """One frame record per row: the first ``counts[i]`` slots of row i hold frames."""
    r = np.random.default_rng(seed)
    out = []
    for n in counts:
        rec = layout.frame_record(n)
        rec["slot"][:] = np.sort(r.choice(layout.slots_per_row, n, replace=False))
        rec["frames"][:] = r.integers(1, 255, rec["frames"].shape)
        rec["timestamp_ids"][:] = r.integers(3, 99, rec["timestamp_ids"].shape)
        rec["timestamp_mask"][:] = 1
        out.append(rec)
    return out


def test_the_pool_holds_the_real_frames_of_its_rows_and_the_index_finds_each_slot():
    packed = BatchLayout(GROUPS, 4, 3, pool_sizes=(4, 8, 12), pack_groups=2)
    recs = _records(packed, [5, 3, 20, 0])
    pool, index = packed.pack(recs, 4)
    # two pools of two rows; the fuller holds 20 frames: 2 rows x 12 frames per row (8 would not do)
    assert pool["frames"].shape == (2, 24, 4, 4, 3) and pool["timestamp_ids"].shape == (2, 24, 3)
    assert index["f4"].shape == (4, 3, 4) and index["f8"].shape == (4, 1, 8)
    # block 0 = rows 0, 1: their 8 frames first, in row order, then padding
    np.testing.assert_array_equal(pool["frames"][0, :5], recs[0]["frames"])
    np.testing.assert_array_equal(pool["frames"][0, 5:8], recs[1]["frames"])
    assert not pool["frames"][0, 8:].any() and not pool["timestamp_mask"][0, 8:].any()
    assert (pool["timestamp_ids"][0, 8:] == 2).all()
    # every slot's frame is where the index says; slots without a frame are -1
    flat = np.concatenate([index["f4"].reshape(4, -1), index["f8"].reshape(4, -1)], axis=1)   # [B, K]
    for i, rec in enumerate(recs):
        assert (flat[i] >= 0).sum() == len(rec["slot"])
        np.testing.assert_array_equal(pool["frames"][i // 2, flat[i, rec["slot"]]], rec["frames"])
    # unpacked: every slot has its row (the identity), frames at their slots, padding as zeros
    unpacked = dataclasses.replace(packed, pool_sizes=())
    upool, uindex = unpacked.pack(recs, 4)
    assert upool["frames"].shape == (2, 40, 4, 4, 3)
    uflat = np.concatenate([uindex["f4"].reshape(4, -1), uindex["f8"].reshape(4, -1)], axis=1)
    np.testing.assert_array_equal(uflat, (np.arange(4) % 2)[:, None] * 20 + np.arange(20))
    # both layouts show every slot the same frame
    videos = {"videos": {g: {"pool_index": index[g]} for g in GROUPS}, "pool": pool}
    uvideos = {"videos": {g: {"pool_index": uindex[g]} for g in GROUPS}, "pool": upool}
    a, b = slot_view(videos), slot_view(uvideos)
    for g in GROUPS:
        for k in ("frames", "timestamp_ids", "timestamp_mask"):
            np.testing.assert_array_equal(a[g][k], b[g][k])


def test_the_pool_is_the_smallest_size_that_holds_the_fullest_block():
    lay = BatchLayout(GROUPS, 4, 3, pool_sizes=(4, 8, 12, 32), pack_groups=4)
    assert lay.slots_per_row == 20 and lay.slot_offsets() == {"f4": 0, "f8": 12}
    assert [lay.pool_rows(n, 2) for n in (0, 8, 9, 16, 24, 25, 40)] == [8, 8, 16, 16, 24, 40, 40]  # 32 > K: K
    assert BatchLayout(GROUPS, 4, 3, pool_sizes=(4,)).pool_rows(30, 2) == 40   # beyond the sizes: every slot
    assert [lay.num_pools(b) for b in (1, 2, 6, 8)] == [1, 2, 2, 4]             # a divisor of the batch
    with pytest.raises(ValueError, match="increasing"):
        BatchLayout(GROUPS, 4, 3, pool_sizes=(8, 4))


def test_training_batches_reorder_their_rows_to_need_smaller_pools():
    lay = BatchLayout(GROUPS, 4, 3, pool_sizes=(4, 6, 8, 10, 12, 16, 20), pack_groups=2)
    assert lay.balanced_order([12, 10, 2, 0], 4).tolist() == [0, 3, 1, 2]   # blocks 12 + 0 and 10 + 2
    assert lay.balanced_order([12, 0, 2, 10], 4) is None                      # already balanced
    assert dataclasses.replace(lay, pack_groups=1).balanced_order([12, 10, 2, 0], 4) is None
    recs = _records(lay, [12, 10, 2, 0])
    rows = [{"input_ids": np.arange(3 + i, dtype=np.int32), "labels": np.full(3 + i, -100, np.int32),
             "video_token_index": np.full(3 + i, -1, np.int32), "frames": rec,
             "videos": {g: {k: np.zeros(f.shape, f.dtype) for k, f in lay.video_fields(g).items() if k != "pool_index"}
                        for g in GROUPS},
             "kind": np.int32(1), "target_index": np.int32(-1), "gt_span": np.full(2, -1, np.float32),
             "duration": np.float32(-1), "sample_id": np.int32(i), "weight": np.float32(1)}
            for i, rec in enumerate(recs)]
    plain = Batcher(lay, (16,), 4)(rows)
    balanced = Batcher(lay, (16,), 4, balance=True)(rows)
    assert plain["sample_id"].tolist() == [0, 1, 2, 3] and plain["pool"]["frames"].shape[1] == 2 * 12
    assert balanced["sample_id"].tolist() == [0, 3, 1, 2] and balanced["pool"]["frames"].shape[1] == 2 * 6
    # each row keeps its own text and frames
    assert balanced["attention_mask"].sum(1).tolist() == [3, 6, 4, 5]
    for q, i in enumerate([0, 3, 1, 2]):
        for g in GROUPS:
            np.testing.assert_array_equal(slot_view(balanced)[g]["frames"][q], slot_view(plain)[g]["frames"][i])
    # several processes agree the pool size (each packs its own rows): the largest is taken
    agreed = Batcher(lay, (16,), 4, agree=lambda F: max(F, 2 * 16))(rows)
    assert agreed["pool"]["frames"].shape[1] == 32
    np.testing.assert_array_equal(slot_view(agreed)["f4"]["frames"], slot_view(plain)["f4"]["frames"])


# ----------------------------------------------------------------------------- the model

TINY = "configs/paper.py:tiny"
# fp32; dropout in the video Q-Former and LoRA (their masks are the same in both layouts); the
# image Q-Former's dropout is off here: its masks are drawn over the pool's shape (its own test below)
EXACT = ("model.video_qformer.dropout=0.1", "model.lora.dropout=0.1")


@pytest.fixture(scope="module")
def rows(demo_corpus):
    """Frame records and text of 4 demo samples of different kinds (12 / 96 frames at 28 px)."""
    exp = Experiment.resolve(cli.resolve(TINY, (*EXACT, f"data.annotations={demo_corpus}/ivcr.json")))
    dialogues, _ = exp.dialogues("train")
    pc = exp.pipeline(4, video_root=exp.video_root(dialogues))
    refs = enumerate_samples(dialogues, pc.sample)
    frames_of = lambda r: sum(v.num_frames for v in prefix_videos(r.dialogue, r.turn_idx, pc.sample))  # noqa: E731
    want = [120, 96, 216, 240]   # a retrieval turn, a moment video, both, two retrieval turns
    chosen = [next(r for r in refs if frames_of(r) == n) for n in want]
    caps = {g: int(c) for g, c in pc.sample.group_capacity().items()}
    loader = SampleLoader(pc, exp.tokenizer, batch_layout(pc, caps), train=False, seed=0,
                          videos=RawVideos(pc.frame_size, cache=64))
    out = [loader((0, r)) for r in chosen]
    assert [len(x["frames"]["slot"]) for x in out] == want
    return exp, pc, caps, out


def _batch(pc, caps, rows, frame_pool, pack_groups):
    pc = dataclasses.replace(pc, frame_pool=frame_pool, pack_groups=pack_groups)
    return Batcher(batch_layout(pc, caps), pc.buckets, len(rows))(rows)


def _loss_and_grads(exp, model, batch, key):
    g, params, frozen = nnx.split(model, trainable_filter(exp.trainable), ...)

    @jax.jit
    def f(params, batch):
        def loss(p):
            m = nnx.merge(g, p, frozen)
            out = m(batch, rng=key)
            return L.lm_loss(out.logits, batch["labels"], batch["weight"])[0]
        return jax.value_and_grad(loss)(params)
    return f(params, jax.tree.map(jnp.asarray, batch))


def test_packed_and_unpacked_batches_give_equal_loss_and_gradients(rows):
    exp, pc, caps, recs = rows
    unpacked = _batch(pc, caps, recs, (), 1)
    packed = _batch(pc, caps, recs, tuple(exp.data.frame_pool), 2)
    # the ViT's frames: every slot of 4 rows (4 x 432) against the pools of rows (0, 1) and (2, 3):
    # 216 and 456 real frames, so 2 x 2 x 240 (240 frames per row holds 456)
    assert unpacked["pool"]["frames"].shape[:2] == (1, 4 * 432)
    assert packed["pool"]["frames"].shape[:2] == (2, 2 * 240)
    real = sum(int(packed["videos"][g]["frame_mask"].sum()) for g in packed["videos"])
    assert real == 672 and real / np.prod(packed["pool"]["frames"].shape[:2]) == pytest.approx(0.7)
    model = random_model(exp)
    key = jax.random.key(3, impl=exp.rng_impl)
    lu, gu = _loss_and_grads(exp, model, unpacked, key)
    lp, gp = _loss_and_grads(exp, model, packed, key)
    assert np.isfinite(float(lu))
    np.testing.assert_allclose(float(lp), float(lu), rtol=1e-6)
    flat_u, flat_p = dict(nnx.to_flat_state(gu)), dict(nnx.to_flat_state(gp))
    assert flat_u.keys() == flat_p.keys()
    norm = max(float(jnp.abs(v.get_value()).max()) for v in flat_u.values())
    for k in flat_u:
        np.testing.assert_allclose(np.asarray(flat_p[k].get_value()), np.asarray(flat_u[k].get_value()),
                                   atol=1e-5 * norm, rtol=1e-4, err_msg=str(k))
    # the image Q-Former and the rest of the model are trained: their gradients are there
    assert any("qformer" in "/".join(map(str, k)) and "video" not in "/".join(map(str, k))
               and float(jnp.abs(v.get_value()).max()) > 0 for k, v in flat_u.items())
    # the dropout keys matter (the comparison above ran with dropout on)
    lo, _ = _loss_and_grads(exp, model, packed, jax.random.key(4, impl=exp.rng_impl))
    assert float(lo) != float(lp)


def test_the_image_qformer_dropout_applies_to_the_pool(rows):
    exp, pc, caps, recs = rows
    exp = Experiment.resolve(cli.resolve(TINY, ("model.qformer.dropout=0.1",)))
    model = random_model(exp)
    pool = jax.tree.map(jnp.asarray, _batch(pc, caps, recs[:2], tuple(exp.data.frame_pool), 1)["pool"])
    enc = jax.jit(lambda m, p, k: m.encode_pool(p, k))
    plain = np.asarray(jax.jit(lambda m, p: m.encode_pool(p))(model, pool))
    a, b = (np.asarray(enc(model, pool, jax.random.key(s, impl=exp.rng_impl))) for s in (1, 2))
    np.testing.assert_array_equal(a, np.asarray(enc(model, pool, jax.random.key(1, impl=exp.rng_impl))))
    n = 216   # the real rows
    assert not np.allclose(a[0, :n], plain[0, :n], atol=1e-3) and not np.allclose(a[0, :n], b[0, :n], atol=1e-3)
    # without the key the real rows' tokens do not depend on the pool's padding
    np.testing.assert_allclose(plain[0, :n], np.asarray(jax.jit(lambda m, p: m.encode_pool(p))(
        model, jax.tree.map(lambda x: x[:, :n], pool)))[0], atol=1e-5)


def test_a_sharded_pool_is_encoded_and_gathered_on_its_own_device(rows):
    """One pool per data shard: the ViT, the image Q-Former and the gather back run without any
    collective, and give what one device computes."""
    exp, pc, caps, recs = rows
    mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
    batch = _batch(pc, caps, (recs * 2), tuple(exp.data.frame_pool), 8)
    assert batch["pool"]["frames"].shape[0] == 8
    inputs = {k: batch[k] for k in ("input_ids", "video_token_index", "videos", "pool")}
    model = random_model(exp)
    want = np.asarray(jax.jit(lambda m, b: m.input_embeddings(b))(model, inputs))
    g, state = nnx.split(model)
    with sharding.use_mesh(mesh):
        dev = sharding.to_device(inputs, mesh)
        assert dev["pool"]["frames"].sharding.spec == P(("data", "fsdp"))
        state = jax.device_put(state, NamedSharding(mesh, P()))
        fn = jax.jit(lambda s, b: nnx.merge(g, s).input_embeddings(b))
        compiled = fn.lower(state, dev).compile()
        got = np.asarray(compiled(state, dev))
    hlo = compiled.as_text()
    for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter"):
        assert op not in hlo, op
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_pipeline_packs_an_ivcr_mix_into_mostly_real_frames(demo_corpus):
    """The paper config's 12 / 96 frames over the demo corpus (the IVCR mix: 96 to 336 real frames
    of 432 slots per sample): the pool is >= 85 % real frames at batch 8 (35 % unpacked), and every
    slot shows the frame the unpacked batch shows."""
    exp = Experiment.resolve(cli.resolve(TINY, (f"data.annotations={demo_corpus}/ivcr.json",)))
    dialogues, _ = exp.dialogues("train")
    pc = dataclasses.replace(exp.pipeline(8, video_root=exp.video_root(dialogues)), pack_groups=1, cache_videos=256)
    refs = enumerate_samples(dialogues, pc.sample)[:48]
    kw = dict(train=False, seed=0, tokenizer=exp.tokenizer, process_index=0, process_count=1)
    packed = list(make_pipeline(pc, refs, **kw))
    unpacked = list(make_pipeline(dataclasses.replace(pc, frame_pool=()), refs, **kw))
    real = sum(int(b["videos"][g]["frame_mask"].sum()) for b in packed for g in b["videos"])
    pooled = sum(int(np.prod(b["pool"]["frames"].shape[:2])) for b in packed)
    slots = sum(int(np.prod(b["pool"]["frames"].shape[:2])) for b in unpacked)
    assert slots == 6 * 8 * 432 and real / slots < 0.4
    assert real / pooled >= 0.85, real / pooled
    for a, b in zip(packed, unpacked):
        va, vb = slot_view(a), slot_view(b)
        for g in va:
            np.testing.assert_array_equal(va[g]["frames"], vb[g]["frames"])
            np.testing.assert_array_equal(va[g]["timestamp_ids"], vb[g]["timestamp_ids"])
            np.testing.assert_array_equal(a["videos"][g]["frame_mask"], b["videos"][g]["frame_mask"])


def test_the_planner_pools_per_shard():
    from ivcr_jax.train import plan

    exp = Experiment.resolve(cli.resolve(TINY))
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    full = plan.abstract_batch(exp, 16, 256, mesh)
    assert full["pool"]["frames"].shape == (8, 2 * 432, 28, 28, 3)
    assert full["pool"]["frames"].sharding.spec == P(("data", "fsdp"))
    assert full["videos"]["f96"]["pool_index"].shape == (16, 2, 96)
    assert plan.abstract_batch(exp, 16, 256, mesh, frames_per_row=168)["pool"]["timestamp_ids"].shape == (8, 336, 16)
