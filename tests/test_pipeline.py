"""The mixture pipeline: proportions, masks, sharding, determinism, resume and evaluation.

Most tests run on `ToySource`, a tiny source defined here whose labels and keys are known, wired
in as the kind "toy"; one test runs the real synthetic source.
"""

import contextlib

import cv2
import grain
import ml_collections
import numpy as np
import pytest

from data_pipelines import batching
from data_pipelines import eval_batches
from data_pipelines import mixture
from data_pipelines import pipeline
from data_pipelines import schema
from data_pipelines import source_build
from data_pipelines import transforms
from fbnet_jax.core import taxonomy

AUS = taxonomy.AUS
SOURCE_SIZE = 20  # toy images are 20x20, so the pipeline's resize to 16x16 is exercised
SPLIT_CODES = {"train": 0, "test": 1}


class ToySource:
    """Schema records with known labels; its key `name/split/index` identifies every example.

    Module level, so that grain's spawned worker processes can unpickle it.
    """

    def __init__(self, name, source_index, num_records, *, split="train", expression=True,
                 va=True, label_aus=None, encoded=False):
        self.name, self.source_index, self.num_records = name, source_index, num_records
        self.split, self.expression, self.va, self.encoded = split, expression, va, encoded
        labelled = AUS if label_aus is None else label_aus
        self.au_labelled = np.isin(AUS, labelled)

    def __len__(self):
        return self.num_records

    def __getitem__(self, index):
        rng = np.random.default_rng([self.source_index, SPLIT_CODES[self.split], index])
        image = rng.integers(0, 256, (SOURCE_SIZE, SOURCE_SIZE, 3), dtype=np.uint8)
        au = np.where(self.au_labelled, index % 2, schema.MISSING_AU)
        record = schema.make_record(
            image, key=f"{self.name}/{self.split}/{index:05d}", source=self.source_index,
            expression=index % 7 if self.expression else None, au=au,
            va=[(index % 5) / 5, -(index % 3) / 3] if self.va else None)
        if self.encoded:  # PNG: lossless, so decoded images can be compared exactly
            del record[schema.IMAGE]
            record[transforms.IMAGE_BYTES] = cv2.imencode(".png", image[..., ::-1])[1].tobytes()
        return record


@pytest.fixture(autouse=True)
def toy_kind(monkeypatch):
    """Makes `source_build.build_source` (what the train and eval batches call) build ToySource
    for sources of kind "toy"."""
    real = source_build.build_source

    def build_source(name, source_config, *, split, aus, source_index, **render_cache):
        if source_config.kind != "toy":
            return real(name, source_config, split=split, aus=aus, source_index=source_index,
                        **render_cache)
        toy = source_config.toy
        size = toy.num_records if split == "train" else source_config.test_size
        return ToySource(name, source_index, size, split=split, expression=toy.expression,
                         va=toy.va, label_aus=toy.label_aus, encoded=toy.encoded)

    monkeypatch.setattr(source_build, "build_source", build_source)


def toy(weight=1.0, num_records=40, test_size=10, expression=True, va=True, label_aus=None,
        encoded=False):
    return ml_collections.ConfigDict(dict(
        kind="toy", weight=weight, test_size=test_size,
        toy=ml_collections.ConfigDict(dict(num_records=num_records, expression=expression, va=va,
                                           label_aus=label_aus, encoded=encoded))))


def make_config(sources, *, batch=8, eval_batch=8, workers=0, seed=0, augment=True):
    config = ml_collections.ConfigDict()
    config.seed = seed
    config.data = ml_collections.ConfigDict(dict(
        image_size=16, aus=AUS, global_batch_size=batch, eval_batch_size=eval_batch,
        num_workers=workers, worker_buffer_size=2, read_threads=1, prefetch_buffer_size=2,
        validate_records=True,
        augment=ml_collections.ConfigDict(dict(
            flip=0.5 if augment else 0.0, max_shift=0.06 if augment else 0.0,
            max_scale=0.08 if augment else 0.0, brightness=0.15 if augment else 0.0,
            contrast=0.15 if augment else 0.0)),
        sources=ml_collections.ConfigDict(sources)))
    return config


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for field in x:
            np.testing.assert_array_equal(x[field], y[field], err_msg=field)


def two_sources(**kwargs):
    return make_config({"alpha": toy(expression=True, va=True, label_aus=()),
                        "beta": toy(expression=False, va=False, label_aus=(1, 2, 4),
                                    encoded=True)}, **kwargs)


def test_batch_shapes_and_dtypes():
    with contextlib.closing(pipeline.build_train_iterator(two_sources(), process_index=0,
                                                          process_count=1)) as it:
        batch = next(it)
    expected = {
        "image": ((8, 16, 16, 3), np.uint8), "row": ((8,), np.int32),
        "expression": ((8,), np.int32),
        "expression_mask": ((8,), np.float32), "au": ((8, 17), np.float32),
        "au_mask": ((8, 17), np.float32), "va": ((8, 2), np.float32),
        "va_mask": ((8,), np.float32), "compound": ((8,), np.int32),
        "compound_mask": ((8,), np.float32), "source": ((8,), np.int32)}
    for field, (shape, dtype) in expected.items():
        assert batch[field].shape == shape and batch[field].dtype == dtype, field
    assert batch["key"].shape == (8,) and batch["key"].dtype.kind == "U"
    assert set(batch) == set(expected) | {"key"}
    # The faces as stored (augmented on the device, in the step); each row's place in its
    # global batch names its augmentation.
    np.testing.assert_array_equal(batch["row"], np.arange(8))
    assert all(np.isfinite(batch[f]).all() for f in expected)


def test_masks_follow_each_sources_labels():
    config = two_sources()
    with contextlib.closing(pipeline.build_train_iterator(config, process_index=0,
                                                          process_count=1)) as it:
        batches = take(it, 6)
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    alpha, beta = batch["source"] == 0, batch["source"] == 1
    assert alpha.any() and beta.any()
    assert pipeline.source_names(config.data) == ["alpha", "beta"]
    assert all(k.startswith("alpha/") for k in batch["key"][alpha])
    assert (batch["expression_mask"][alpha] == 1).all() and (batch["va_mask"][alpha] == 1).all()
    assert (batch["au_mask"][alpha] == 0).all() and (batch["au"][alpha] == 0).all()
    assert (batch["expression_mask"][beta] == 0).all() and (batch["va_mask"][beta] == 0).all()
    assert (batch["va"][beta] == 0).all() and (batch["expression"][beta] == 0).all()
    np.testing.assert_array_equal(batch["au_mask"][beta][:, :3], 1)
    np.testing.assert_array_equal(batch["au_mask"][beta][:, 3:], 0)
    assert (batch["compound_mask"] == 0).all()
    # Labels survive the pipeline: the toy's expression is index % 7.
    index = np.array([int(k.rsplit("/", 1)[1]) for k in batch["key"][alpha]])
    np.testing.assert_array_equal(batch["expression"][alpha], index % 7)


def test_mixture_proportions_and_source_counts():
    config = make_config({"big": toy(weight=3.0, num_records=50),
                          "small": toy(weight=1.0, num_records=30)},
                         batch=100, augment=False)
    with contextlib.closing(pipeline.build_train_iterator(config, process_index=0,
                                                          process_count=1)) as it:
        counts = sum(pipeline.source_counts(b, 2) for b in take(it, 20))
    assert counts.sum() == 2000
    assert abs(counts[0] / 2000 - 0.75) < 0.02
    np.testing.assert_allclose(mixture.mixture_weights(config.data), [0.75, 0.25])


def test_zero_weight_source_is_not_trained_on_but_keeps_its_index():
    config = make_config({"a": toy(weight=0.0), "b": toy(weight=1.0)}, augment=False)
    with contextlib.closing(pipeline.build_train_iterator(config, process_index=0,
                                                          process_count=1)) as it:
        batch = next(it)
    assert (batch["source"] == 1).all()


def _batches(config, process_index, process_count, num_batches, start_step=0):
    with contextlib.closing(pipeline.build_train_iterator(
            config, process_index=process_index, process_count=process_count,
            start_step=start_step)) as it:
        return take(it, num_batches)


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_are_the_same_whatever_the_number_of_processes(process_count):
    config = make_config({"a": toy(num_records=40), "b": toy(num_records=30)})
    whole = _batches(config, 0, 1, 4)
    parts = [_batches(config, p, process_count, 4) for p in range(process_count)]
    for n, batch in enumerate(whole):
        assert all(part[n]["image"].shape[0] == 8 // process_count for part in parts)
        # Process p holds rows [p * b, (p + 1) * b) of global batch n, and says so in `row`.
        assert_same_batches([batch], [{k: np.concatenate([part[n][k] for part in parts])
                                       for k in batch}])
    keys = [{k for b in part for k in b["key"]} for part in parts]
    assert all(keys) and not set.intersection(*keys)


def test_a_process_reads_only_its_rows(monkeypatch):
    # 100 records: the 6 batches (48 rows) read here stay within one epoch, so process 0's
    # rows and process 1's rows are different records.
    config = make_config({"a": toy(num_records=100)}, augment=False)

    def index(batches):
        return [int(k.rsplit("/", 1)[1]) for b in batches for k in b["key"]]

    zeros = index(_batches(config, 0, 2, 6))
    read = []
    original, original_init = ToySource.__getitem__, ToySource.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.watched = True

    # Only the sources built from here on are watched: the closed iterator of process 0 may
    # still be finishing a read-ahead on its thread.
    monkeypatch.setattr(ToySource, "__init__", init)
    monkeypatch.setattr(ToySource, "__getitem__", lambda self, i: (
        read.append(int(i)) if getattr(self, "watched", False) else None) or original(self, i))
    ones = index(_batches(config, 1, 2, 3))
    assert set(ones) <= set(read)  # (prefetching reads a little ahead)
    assert read and not set(read) & set(zeros)  # nothing of process 0's rows is read


def test_start_step_is_the_position_of_the_data(tmp_path):
    config = two_sources()
    expected = _batches(config, 0, 1, 7)
    assert_same_batches(_batches(config, 0, 1, 4, start_step=3), expected[3:])
    # A run that continues on another number of processes gets the same global batches.
    halves = [_batches(config, p, 2, 4, start_step=3) for p in (0, 1)]
    assert_same_batches([{k: np.concatenate([h[n][k] for h in halves]) for k in expected[0]}
                         for n in range(4)], expected[3:])


def test_same_seed_same_batches_other_seed_other_batches():
    def first_batches(seed):
        config = two_sources(seed=seed)
        with contextlib.closing(pipeline.build_train_iterator(config, process_index=0,
                                                              process_count=1)) as it:
            return take(it, 3)

    assert_same_batches(first_batches(0), first_batches(0))
    assert not np.array_equal(first_batches(0)[0]["key"], first_batches(1)[0]["key"])


def _order(config, source, num_batches):
    """The indices of `source`'s examples in the order training draws them."""
    with contextlib.closing(pipeline.build_train_iterator(config, process_index=0,
                                                          process_count=1)) as it:
        keys = np.concatenate([batch["key"] for batch in take(it, num_batches)])
    return [int(k.rsplit("/", 1)[1]) for k in keys if k.startswith(f"{source}/")]


def test_a_sources_order_does_not_depend_on_the_other_sources():
    alone = _order(make_config({"beta": toy(num_records=40)}, augment=False), "beta", 10)
    # "alpha" sorts first: with seeds numbered by position, it would renumber "beta".
    mixed = _order(make_config({"alpha": toy(num_records=40), "beta": toy(num_records=40)},
                               augment=False), "beta", 20)
    n = min(len(alone), len(mixed))
    assert n >= 60 and alone[:n] == mixed[:n]  # more than an epoch, in the same order


def test_no_source_replays_anothers_order_an_epoch_later():
    config = make_config({"alpha": toy(num_records=40), "beta": toy(num_records=40)},
                         augment=False)
    alpha, beta = _order(config, "alpha", 25), _order(config, "beta", 25)
    assert len(alpha) >= 80 and len(beta) >= 80  # two epochs of each
    for order in (alpha, beta):
        assert sorted(order[:40]) == sorted(order[40:80]) == list(range(40))  # epochs
        assert order[:40] != order[40:80]  # reshuffled
    assert alpha[40:80] != beta[:40] and beta[40:80] != alpha[:40]
    assert mixture.shuffle_seed(0, "alpha") != mixture.shuffle_seed(1, "alpha")


def test_worker_processes_change_where_the_work_runs_not_what_comes_out():
    expected = _batches(two_sources(workers=0), 0, 1, 5)
    assert_same_batches(_batches(two_sources(workers=2), 0, 1, 5), expected)
    assert_same_batches(_batches(two_sources(workers=2), 0, 1, 3, start_step=2), expected[2:])


def test_closed_iterator_refuses_next():
    it = pipeline.build_train_iterator(two_sources(), process_index=0, process_count=1)
    next(it)
    pipeline.close_iterator(it)
    pipeline.close_iterator(it)  # idempotent
    with pytest.raises(ValueError):
        next(it)


@pytest.mark.parametrize("change, match", [
    (lambda c: setattr(c.data.sources.alpha, "weight", -1.0), "finite and >= 0"),
    (lambda c: [setattr(s, "weight", 0.0) for s in c.data.sources.values()], "all source"),
    (lambda c: setattr(c.data, "global_batch_size", 9), "multiple of the process count"),
    (lambda c: setattr(c.data.sources.beta, "kind", "tfrecords"), "'beta'.*known kinds"),
])
def test_config_errors(change, match):
    config = two_sources()
    change(config)
    with pytest.raises(ValueError, match=match):
        pipeline.build_train_iterator(config, process_index=0, process_count=2)


def test_synthetic_source_needs_the_split_size():
    source = synthetic_config().data.sources.expr_va
    with pytest.raises(ValueError, match="'expr_va' has no split 'validation'"):
        pipeline.build_source("expr_va", source, split="validation", aus=AUS, source_index=0)


def test_bad_process_index():
    with pytest.raises(ValueError, match="process_index"):
        pipeline.build_train_iterator(two_sources(), process_index=2, process_count=2)


def all_eval_rows(config, process_index, process_count):
    batches = pipeline.build_eval_batches(config, process_index=process_index,
                                          process_count=process_count)
    out = list(batches)
    assert len(out) == len(batches)
    return out


def test_eval_visits_every_example_once_with_padding():
    config = make_config({"a": toy(test_size=13), "b": toy(test_size=7, encoded=True)},
                         eval_batch=8)
    batches = all_eval_rows(config, 0, 1)
    assert len(batches) == 3  # 20 examples in batches of 8
    valid = np.concatenate([b["valid"] for b in batches])
    keys = np.concatenate([b["key"] for b in batches])
    assert valid.dtype == np.float32 and valid.sum() == 20
    np.testing.assert_array_equal(valid, [1] * 20 + [0] * 4)
    assert sorted(keys[:20]) == sorted([f"a/test/{i:05d}" for i in range(13)]
                                       + [f"b/test/{i:05d}" for i in range(7)])
    last = batches[-1]
    for field in ("expression_mask", "au_mask", "va_mask", "compound_mask", "image"):
        assert (last[field][4:] == 0).all(), field
    # Padding rows say source 0; counting by `valid` leaves them out.
    np.testing.assert_array_equal(sum(pipeline.source_counts(b, 2) for b in batches), [13, 7])
    assert all(b["image"].shape == (8, 16, 16, 3) for b in batches)


def test_eval_is_deterministic_and_unaugmented():
    config = make_config({"a": toy(test_size=5, encoded=True)}, eval_batch=8)
    first, = all_eval_rows(config, 0, 1)
    again, = all_eval_rows(config, 0, 1)
    assert_same_batches([first], [again])
    source = ToySource("a", 0, 5, split="test", encoded=True)
    row = transforms.DecodeImage().map(source[3])
    row = transforms.ResizeImage(16).map(row)
    assert first["image"].dtype == np.uint8
    np.testing.assert_array_equal(first["image"][3], row["image"])


def test_eval_shards_have_equal_batch_counts_and_cover_everything():
    config = make_config({"a": toy(test_size=13), "b": toy(test_size=7)}, eval_batch=6)
    shards = [all_eval_rows(config, p, 3) for p in range(3)]
    # Real examples per process: 5 + 3, 4 + 2, 4 + 2 -> 4 batches of 2 each, padded.
    assert [len(s) for s in shards] == [4, 4, 4]
    assert all(b["image"].shape[0] == 2 for s in shards for b in s)
    keys = [k for s in shards for b in s for k, v in zip(b["key"], b["valid"]) if v]
    assert len(keys) == len(set(keys)) == 20
    assert [sum(b["valid"].sum() for b in s) for s in shards] == [8, 6, 6]


def test_eval_with_more_processes_than_examples():
    config = make_config({"a": toy(test_size=2)}, eval_batch=4)
    shards = [all_eval_rows(config, p, 4) for p in range(4)]
    assert [len(s) for s in shards] == [1, 1, 1, 1]
    assert [s[0]["valid"].sum() for s in shards] == [1, 1, 0, 0]
    assert shards[3][0]["image"].shape == (1, 16, 16, 3)


def synthetic_config(**kwargs):
    def source(weight, seed, **spec):
        fields = dict(num_records=64, seed=seed, image_size=24, label_expression=True,
                      label_va=True, label_aus=(), compound=False, video_frames=0,
                      style=ml_collections.ConfigDict(dict(
                          identity=1.0, pose=1.0, clutter=1.0, lighting=1.0, blur=1.0,
                          noise=1.0, jpeg=1.0, occlusion=1.0)))
        fields.update(spec)
        return ml_collections.ConfigDict(dict(
            kind="synthetic", weight=weight, test_size=10,
            synthetic=ml_collections.ConfigDict(fields)))

    return make_config({"expr_va": source(0.5, 1),
                        "aus_only": source(0.5, 2, label_expression=False, label_va=False,
                                           label_aus=None)}, **kwargs)


def test_synthetic_mixture_end_to_end():
    pytest.importorskip("data_pipelines.synthetic")
    config = synthetic_config()
    with contextlib.closing(pipeline.build_train_iterator(config, process_index=0,
                                                          process_count=1)) as it:
        batches = take(it, 4)
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.uint8
    # A default ConfigDict iterates its keys sorted, so "aus_only" is source 0.
    names = pipeline.source_names(config.data)
    assert names == ["aus_only", "expr_va"]
    expr_va = batch["source"] == names.index("expr_va")
    aus_only = batch["source"] == names.index("aus_only")
    assert expr_va.any() and aus_only.any()
    assert all(k.startswith("expr_va/train/") for k in batch["key"][expr_va])
    assert (batch["va_mask"][aus_only] == 0).all()
    assert (batch["expression_mask"][aus_only] == 0).all()
    assert (batch["au_mask"][aus_only] == 1).all()
    assert (batch["au_mask"][expr_va] == 0).all()
    assert (batch["expression_mask"][expr_va] == 1).all()
    assert (batch["va_mask"][expr_va] == 1).all()
    # Evaluation splits are fully labelled, whatever the train split labels.
    eval_batches = all_eval_rows(config, 0, 1)
    keys = [k for b in eval_batches for k, v in zip(b["key"], b["valid"]) if v]
    assert len(keys) == len(set(keys)) == 20
    for b in eval_batches:
        real = b["valid"] == 1
        assert (b["va_mask"][real] == 1).all() and (b["au_mask"][real] == 1).all()


def test_cached_synthetic_sources_give_the_same_batches_rendering_each_face_once(monkeypatch):
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
    plain = synthetic_config()
    cached = synthetic_config()
    for name in cached.data.sources:
        cached.data.sources[name].cache = True
    rendered = []   # (source, index) of every face a cached source rendered
    render = synthetic.SyntheticFaces._render

    def counting_render(self, index):
        if self.cache:
            rendered.append((self.name, self.split, index))
        return render(self, index)

    monkeypatch.setattr(synthetic.SyntheticFaces, "_render", counting_render)

    def batches(config):
        with contextlib.closing(pipeline.build_train_iterator(config, process_index=0,
                                                              process_count=1)) as it:
            return take(it, 20)   # 160 examples from 2 x 64 records: more than an epoch

    assert_same_batches(batches(cached), batches(plain))
    assert len(rendered) == len(set(rendered)) == 128   # each face once (and read ahead)
    # An evaluation split is rendered once per process, however many evaluations read it.
    rendered.clear()
    for _ in range(3):
        assert_same_batches(all_eval_rows(cached, 0, 1), all_eval_rows(plain, 0, 1))
    assert len(rendered) == len(set(rendered)) == 20


class _BatchedToy(ToySource):
    """A ToySource with a batched read that records each call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _getitems(self, indices):
        self.calls.append(list(indices))
        return [self[i] for i in indices]


def test_eval_batches_read_each_batch_in_one_call_per_source_it_spans():
    sources = [_BatchedToy("a", 0, 5, split="test"), _BatchedToy("b", 1, 3, split="test")]
    batches = eval_batches._Batches([grain.MapDataset.source(s) for s in sources], 3)
    assert len(batches) == 3
    records = [s[i] for s in sources for i in range(len(s))]
    for n, rows in enumerate([[0, 1, 2], [3, 4, 5], [6, 7]]):
        want = batching.collate([records[r] for r in rows])
        got = batches[n]
        assert sorted(got) == sorted(want)
        for field in want:
            np.testing.assert_array_equal(got[field], want[field], err_msg=field)
    # Batch 1 spans both sources: rows 3-4 of a, row 0 of b.
    assert sources[0].calls == [[0, 1, 2], [3, 4]] and sources[1].calls == [[0], [1, 2]]
