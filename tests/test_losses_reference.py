"""The losses as the reference computes them (issue 13, item 5).

* ``train.lm_loss_reduction="sample_mean"``: HF's causal-LM loss per sample (torch
  ``CrossEntropyLoss`` over the shifted labels of a batch of 1), averaged over the real samples;
* ``train.faithful_select="videotokens"``: ``ivcr/models/ivcr.py : IVCR.forward``'s ``flag == 1``
  block chooses L_C / L_V by the sample's ``<VIDEOTOKEN>`` count and scores an unparseable index 0;
* ``train.aux_start_step``: the aux terms from a given batch on (the reference: epoch >= 1), in one
  compiled step.
"""
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ivcr_jax import experiment
from ivcr_jax.cli import UsageError, load_config
from ivcr_jax.experiment import Experiment
from ivcr_jax.tokenizer import bundled_test_tokenizer, load_tokenizer
from ivcr_jax.train import losses, step as step_lib
from ivcr_jax.train.aux import Faithful, Off, make_aux_mode

# ------------------------------------------------------------------------------ LM reduction ---

V = 23


def _lm_batch(seed=0):
    """4 rows: answers of 2, 7 and 4 tokens, and a padding row (weight 0, labels left in)."""
    rng = np.random.default_rng(seed)
    B, S = 4, 14
    logits = rng.normal(size=(B, S, V)).astype(np.float32) * 2
    ids = rng.integers(0, V, (B, S)).astype(np.int32)
    labels = np.full((B, S), -100, np.int32)
    for b, (lo, hi) in enumerate([(11, 13), (5, 12), (9, 13), (3, 14)]):
        labels[b, lo:hi] = ids[b, lo:hi]
    weight = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
    return logits, labels, weight


def _torch_reference(logits, labels, weight):
    """The reference's LM loss: per sample, HF's shifted ``CrossEntropyLoss()``; then the mean."""
    import torch

    per = []
    for lg, lab, w in zip(logits, labels, weight):
        if w <= 0:
            continue
        shift_logits = torch.tensor(lg[:-1]).view(-1, V)
        shift_labels = torch.tensor(lab[1:].astype(np.int64)).view(-1)
        per.append(float(torch.nn.CrossEntropyLoss()(shift_logits, shift_labels)))
    return float(np.mean(per))


def _numpy_token_mean(logits, labels, weight):
    lg, tg = logits[:, :-1], labels[:, 1:]
    mask = (tg != -100) & (weight[:, None] > 0)
    logz = np.log(np.exp(lg.astype(np.float64)).sum(-1))
    nll = logz - np.take_along_axis(lg, np.maximum(tg, 0)[..., None], -1)[..., 0]
    return float(nll[mask].sum() / mask.sum())


def test_sample_mean_is_the_references_per_sample_loss_and_token_mean_is_unchanged():
    logits, labels, weight = _lm_batch()
    sm, n_sm = losses.lm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weight),
                              reduction="sample_mean")
    tm, n_tm = losses.lm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weight))
    np.testing.assert_allclose(float(sm), _torch_reference(logits, labels, weight), rtol=1e-5)
    np.testing.assert_allclose(float(tm), _numpy_token_mean(logits, labels, weight), rtol=1e-5)
    assert int(n_sm) == int(n_tm) == 2 + 7 + 4        # supervised tokens of the real rows
    assert abs(float(sm) - float(tm)) > 1e-3           # unequal answer lengths: the two differ
    # The padding row's labels count nowhere: dropping the row changes nothing.
    sm3, _ = losses.lm_loss(jnp.asarray(logits[:3]), jnp.asarray(labels[:3]), jnp.asarray(weight[:3]),
                            reduction="sample_mean")
    np.testing.assert_allclose(float(sm3), float(sm), rtol=1e-6)


def test_sample_mean_with_the_supervised_head_and_on_a_sharded_global_batch():
    logits, labels, weight = _lm_batch(1)
    want = _torch_reference(logits, labels, weight)
    # train.lm_head="supervised": logits only at the loss_index positions.
    idx = losses.loss_index(labels, weight, multiple=4)
    at = np.take_along_axis(logits, np.maximum(idx, 0)[..., None], axis=1)
    got, _ = losses.lm_loss(jnp.asarray(at), jnp.asarray(labels), jnp.asarray(weight), jnp.asarray(idx),
                            reduction="sample_mean")
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # The batch sharded over a 2-device data axis: the jitted loss is the global one.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))  # noqa: E731
    for red, ref in (("sample_mean", want), ("token_mean", _numpy_token_mean(logits, labels, weight))):
        fn = jax.jit(lambda lg, lab, w, red=red: losses.lm_loss(lg, lab, w, reduction=red)[0])
        np.testing.assert_allclose(float(fn(put(logits), put(labels), put(weight))), ref, rtol=1e-5)


def test_an_all_padding_batch_gives_zero_not_nan():
    logits, labels, weight = _lm_batch()
    got, n = losses.lm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros(4), reduction="sample_mean")
    assert float(got) == 0.0 and int(n) == 0


# ---------------------------------------------------------------------- faithful selection ---

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled_test_tokenizer())


def _faithful_batch(tok, rows):
    """A host batch whose argmax answers decode to the given texts.

    ``rows``: ``(predicted text, kind, number of videos, target_index, gt_span, weight)``. The
    labels hold the text's ids too (only their positions matter: faithful_aux reads the argmax at
    the positions that predict a supervised token).
    """
    enc = [tok(t, add_special_tokens=False).input_ids for t, *_ in rows]
    S = max(len(e) for e in enc) + 4
    B = len(rows)
    labels = np.full((B, S), -100, np.int32)
    pred = np.zeros((B, S), np.int32)
    for b, e in enumerate(enc):
        labels[b, 2:2 + len(e)] = e
        pred[b, 1:1 + len(e)] = e                      # position t predicts label t + 1
    nvid = np.array([r[2] for r in rows])
    Vmax = max(int(nvid.max()), 1)
    mask = np.arange(Vmax)[None, :] < nvid[:, None]
    batch = {
        "labels": labels,
        "kind": np.array([r[1] for r in rows], np.int32),
        "target_index": np.array([r[3] for r in rows], np.int32),
        "gt_span": np.array([r[4] for r in rows], np.float32),
        "weight": np.array([r[5] for r in rows], np.float32),
        # Two frame groups, as the pipeline lays them out: retrieval candidates and moment videos.
        "videos": {"f12": {"video_mask": mask}, "f96": {"video_mask": np.zeros((B, 1), bool)}},
    }
    return pred, batch


RET = "The intent is video retrieval. The given query happens in 4th video."
MOM = "The intent is temporal video grounding. The given query happens 10 - 20 seconds."
RIGHT = -math.log(math.exp(10.0) / (math.exp(10.0) + 9 * math.exp(0.01)))   # CE(const, gt), parsed = gt
WRONG = -math.log(math.exp(0.01) / (math.exp(10.0) + 9 * math.exp(0.01)))   # parsed != gt


def test_faithful_chooses_the_term_by_the_samples_video_count(tok):
    no_span = (-1.0, -1.0)
    rows = [
        (RET, 1, 10, 3, no_span, 1.0),              # 10 videos, index 4 = gt → L_V = CE right
        (RET, 1, 10, 0, no_span, 1.0),              # 10 videos, wrong index → L_V = CE wrong
        ("I cannot tell which one", 1, 10, 3, no_span, 1.0),   # unparseable (no '.') → 0
        ("The intent is retrieval. None of them.", 1, 10, 3, no_span, 1.0),  # no number → 0
        (MOM, 2, 1, -1, (15.0, 25.0), 1.0),         # 1 video → L_C = 1 - IoU = 1 - 5/15
        ("No idea", 2, 1, -1, (15.0, 25.0), 1.0),   # 1 video, no span → iou_loss := 1 → L_C = 0
        (MOM, 2, 11, -1, (15.0, 25.0), 1.0),        # retrieval turn then moment turn: neither
        (RET, 1, 20, 3, no_span, 1.0),              # two retrieval turns: neither
        (RET, 1, 10, 3, no_span, 0.0),              # padding row: ignored
    ]
    pred, batch = _faithful_batch(tok, rows)
    assert losses.video_counts(batch).tolist() == [10, 10, 10, 10, 1, 1, 11, 20, 10]
    aux = losses.faithful_aux(pred, batch, tok)     # default select = "videotokens"
    video = [RIGHT, WRONG, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # Neither branch: iou_loss stays 0, so the reference adds 0.01 * (1 - 0): L_C = 1.
    moment = [0.0, 0.0, 0.0, 0.0, 1.0 - 5.0 / 15.0, 0.0, 1.0, 1.0]
    assert aux["video_n"] == aux["moment_n"] == 8
    np.testing.assert_allclose(aux["video"], np.mean(video), rtol=1e-6)
    np.testing.assert_allclose(aux["moment"], np.mean(moment), rtol=1e-6)
    # The reference's per-sample total LM + 0.01·((1 − iou_loss) + index_loss), averaged over the
    # samples, is LM + α·L_V + β·L_C of these means.
    per_sample = [0.01 * (m + v) for v, m in zip(video, moment)]
    np.testing.assert_allclose(0.01 * aux["video"] + 0.01 * aux["moment"], np.mean(per_sample), rtol=1e-6)


def test_faithful_kind_select_keeps_the_earlier_behaviour(tok):
    rows = [
        (RET, 1, 10, 3, (-1.0, -1.0), 1.0),
        ("I cannot tell which one", 1, 10, 3, (-1.0, -1.0), 1.0),   # unparseable → ln 10
        (MOM, 2, 11, -1, (15.0, 25.0), 1.0),                         # a moment turn → L_C
        ("hello", 0, 11, -1, (-1.0, -1.0), 1.0),                     # chat: neither
    ]
    pred, batch = _faithful_batch(tok, rows)
    aux = losses.faithful_aux(pred, batch, tok, select="kind")
    np.testing.assert_allclose(aux["video"], (RIGHT + math.log(10.0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(aux["moment"], 1.0 - 5.0 / 15.0, rtol=1e-6)
    assert (aux["video_n"], aux["moment_n"]) == (2, 1)


def test_the_reference_index_reader():
    r = losses.reference_video_index
    assert r(RET) == 4
    assert r("Intent: retrieval. Video 10 matches.") == 10
    assert r("no period here 3") is None                # the reference raises IndexError
    assert r("a. b 11.") is None and r("a. video 0") is None and r("a. none") is None
    assert r("video 3. the 7th one") == 7                # the second piece, as the reference


# -------------------------------------------------------------------------- the start step ---

class _Tiny(nnx.Module):
    """Embedding + linear head: the model interface the step and the aux modes call."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(V, 8, rngs=rngs)
        self.out = nnx.Linear(8, V, rngs=rngs)

    def __call__(self, batch, rng=None, logits_at=None):
        return SimpleNamespace(logits=self.out(self.emb(batch["input_ids"])))


class _Squares(Off):
    """A differentiable stand-in aux term (counts its traces)."""

    traces = 0

    def terms(self, logits, extra, batch):
        type(self).traces += 1
        return {"video": (self.alpha, jnp.mean(logits ** 2)), "moment": (self.beta, jnp.mean(jnp.abs(logits)))}


def _run(aux, steps, lm_reduction="token_mean"):
    _, labels, weight = _lm_batch()
    ids = np.random.default_rng(3).integers(0, V, labels.shape).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels), "weight": jnp.asarray(weight)}
    graphdef, params, frozen = nnx.split(_Tiny(nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.sgd(0.1)
    state = step_lib.init_state(params, tx, 0)
    fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, lambda s: 0.1, aux,
                                                          lm_reduction=lm_reduction))
    out = []
    for _ in range(steps):
        state, m, o = fn(state, frozen, batch)
        out.append(({k: float(v) for k, v in m.items()}, o))
    return out, batch


def test_differentiable_terms_start_at_aux_start_step_in_one_compilation():
    _Squares.traces = 0
    out, _ = _run(_Squares(0.5, 0.25, start_step=2), 4)
    assert _Squares.traces == 1                                   # one trace, one compilation
    on = [m["aux_on"] for m, _ in out]
    assert on == [0.0, 0.0, 1.0, 1.0]
    for m, _ in out[:2]:
        assert m["loss/video"] == m["loss/moment"] == 0.0 and m["loss"] == m["loss/lm"]
    for m, _ in out[2:]:
        assert m["loss/video"] > 0 and m["loss/moment"] > 0
        np.testing.assert_allclose(m["loss"], m["loss/lm"] + 0.5 * m["loss/video"] + 0.25 * m["loss/moment"],
                                   rtol=1e-6)
    # Before the start the update is the LM loss's alone: the same as with aux off.
    off, _ = _run(Off(0.5, 0.25), 2)
    for (m, _), (m_off, _) in zip(out[:2], off):
        np.testing.assert_allclose(m["grad_norm"], m_off["grad_norm"], rtol=1e-6)
        np.testing.assert_allclose(m["loss/lm"], m_off["loss/lm"], rtol=1e-6)


def test_faithful_terms_are_reported_from_aux_start_step_on(tok):
    aux = make_aux_mode("faithful", tok, start_step=1)
    assert isinstance(aux, Faithful) and aux.select == "videotokens"
    out, batch = _run(aux, 2, lm_reduction="sample_mean")
    host = {k: np.asarray(v) for k, v in batch.items()}
    host.update(kind=np.array([1, 2, 2, 0], np.int32), target_index=np.array([3, -1, -1, -1], np.int32),
                gt_span=np.array([[-1, -1], [1, 2], [1, 2], [-1, -1]], np.float32),
                num_videos=np.array([10, 1, 11, 0]))
    reported = []
    for m, o in out:
        m = dict(m)
        aux.report(m, o, host, None)
        assert "aux_on" not in m
        reported.append(m)
    assert reported[0]["loss/video"] == reported[0]["loss/moment"] == 0.0
    assert reported[0]["loss"] == reported[0]["loss/lm"]
    # From the start step on: row 2 (11 videos) alone gives L_C = 1 of 3 real rows, at least.
    assert reported[1]["loss/moment"] >= 1.0 / 3.0 - 1e-9
    np.testing.assert_allclose(reported[1]["loss"], reported[1]["loss/lm"] + 0.01 * reported[1]["loss/video"]
                               + 0.01 * reported[1]["loss/moment"], rtol=1e-6)


# ------------------------------------------------------------------------------- the config ---

def test_the_train_keys_are_validated_and_agree_with_the_losses():
    assert experiment.LM_LOSS_REDUCTIONS == losses.LM_REDUCTIONS
    assert experiment.FAITHFUL_SELECTS == losses.FAITHFUL_SELECTS
    c = load_config("configs/paper.py:tiny")
    tc = Experiment.resolve(c).train
    assert (tc.lm_loss_reduction, tc.faithful_select, tc.aux_start_step) == ("token_mean", "videotokens", 0)
    for key, bad in (("lm_loss_reduction", "mean"), ("faithful_select", "count"), ("aux_start_step", -1)):
        c = load_config("configs/paper.py:tiny")
        c.train[key] = bad
        with pytest.raises(UsageError, match=f"config.train.{key}"):
            Experiment.resolve(c)
