"""The relatedness table: Du et al.'s, one estimated from the data, its file and its loader.

Exact tests run on `ListSource`, a source of hand-written records wired in as the kind "list";
one test checks that the estimate from the synthetic generator recovers the probabilities it
draws AUs with.
"""

import json
import logging
import math

import ml_collections
import numpy as np
import pytest

from data_pipelines import pipeline
from data_pipelines import schema
from data_pipelines import synthetic
from fbnet_jax.eval import relatedness
from fbnet_jax.core import relatedness as tables
from fbnet_jax.core import taxonomy
from fbnet_jax.core.errors import ConfigError, UserError

AUS = (1, 2, 4)
_ = -1   # an unlabelled AU
HAPPINESS, ANGER = taxonomy.EXPRESSIONS.index("Happiness"), taxonomy.EXPRESSIONS.index("Anger")

# (expression or None, au) per record of each list source, on the AU list AUS.
RECORDS = {
    "lab": [
        (HAPPINESS, [1, 0, _]),
        (HAPPINESS, [1, 1, _]),
        (HAPPINESS, [0, _, _]),
        (ANGER, [_, _, _]),      # no AU labelled: not used
        (None, [1, 1, 1]),       # no expression: not used
        (ANGER, [0, 0, 1]),
    ],
    "expressions": [(HAPPINESS, [_, _, _]), (ANGER, [_, _, _])],
    "unweighted": [(HAPPINESS, [1, 1, 1])],   # weight 0: never read
}


class ListSource:
    """Schema records with the labels of RECORDS[name]."""

    def __init__(self, name, source_index):
        self.name, self.source_index, self.reads = name, source_index, []

    def __len__(self):
        return len(RECORDS[self.name])

    def __getitem__(self, index):
        self.reads.append(index)
        expression, au = RECORDS[self.name][index]
        return schema.make_record(np.zeros((4, 4, 3), np.uint8), key=f"{self.name}/{index}",
                                  source=self.source_index, expression=expression, au=au,
                                  num_aus=len(AUS))


@pytest.fixture(name="built")
def list_sources(monkeypatch):
    """Makes `pipeline.build_source` build ListSource for sources of kind "list"; returns the
    sources built, by name."""
    real, built = pipeline.build_source, {}

    def build_source(name, source_config, *, split, aus, source_index):
        if source_config.kind != "list":
            source = real(name, source_config, split=split, aus=aus, source_index=source_index)
        else:
            assert split == "train" and tuple(aus) == AUS
            source = ListSource(name, source_index)
        built[name] = source
        return source

    monkeypatch.setattr(pipeline, "build_source", build_source)
    monkeypatch.setattr(pipeline, "SOURCE_KINDS", (*pipeline.SOURCE_KINDS, "list"))
    return built


def list_config(**weights):
    config = ml_collections.ConfigDict()
    config.name = "lists"
    config.data = ml_collections.ConfigDict(dict(aus=AUS, sources=ml_collections.ConfigDict({
        name: ml_collections.ConfigDict(dict(kind="list", weight=weight))
        for name, weight in weights.items()})))
    return config


LISTS = dict(lab=1.0, expressions=0.5, unweighted=0.0)


def test_du2014_is_the_taxonomy_table():
    table = tables.load("du2014", taxonomy.AUS)
    np.testing.assert_array_equal(table.matrix, taxonomy.basic_relatedness(taxonomy.AUS))
    np.testing.assert_array_equal(table.prototypical,
                                  taxonomy.prototypical_mask(taxonomy.EXPRESSIONS, taxonomy.AUS))
    assert table.matrix.dtype == np.float32 and table.prototypical.dtype == bool
    assert table.aus == taxonomy.AUS and not table.matrix[taxonomy.NEUTRAL].any()
    assert table.source.startswith("du2014: Du, Tao, Martinez, PNAS 2014")
    with pytest.raises(ValueError, match="read-only"):
        table.matrix[1, 1] = 0.5


def test_du2014_projected_onto_a_shorter_reordered_au_list():
    aus = (25, 12, 14)
    table = tables.load("du2014", aus)
    full = tables.load("du2014", taxonomy.AUS)
    columns = [taxonomy.AUS.index(a) for a in aus]
    np.testing.assert_array_equal(table.matrix, full.matrix[:, columns])
    np.testing.assert_array_equal(table.prototypical, full.prototypical[:, columns])
    np.testing.assert_array_equal(table.matrix[HAPPINESS], [1, 1, 0])
    np.testing.assert_array_equal(table.prototypical[HAPPINESS], [True, True, False])
    assert table.aus == aus


def test_estimate_counts_exactly(built):
    est = relatedness.estimate(list_config(**LISTS), min_count=1)
    expected_counts = np.zeros((7, 3), int)
    expected_active = np.zeros((7, 3), int)
    expected_counts[HAPPINESS], expected_active[HAPPINESS] = [3, 2, 0], [2, 1, 0]
    expected_counts[ANGER], expected_active[ANGER] = [1, 1, 1], [0, 0, 1]
    np.testing.assert_array_equal(est.counts, expected_counts)
    np.testing.assert_array_equal(est.active, expected_active)
    np.testing.assert_array_equal(est.expression_counts, [0, 1, 0, 0, 3, 0, 0])
    np.testing.assert_array_equal(est.matrix[HAPPINESS], [2 / 3, 1 / 2, np.nan])
    np.testing.assert_array_equal(est.matrix[ANGER], [0, 0, 1])
    assert np.isnan(est.matrix[[0, 2, 3, 5, 6]]).all()
    # min_count 1: every entry with an example is estimated; only Anger/AU4 (1.0) reaches 0.8.
    np.testing.assert_array_equal(est.estimated, expected_counts >= 1)
    assert np.argwhere(est.prototypical).tolist() == [[ANGER, 2]]
    assert est.sources == {"lab": 4}
    assert est.unused == {
        "expressions": "labels both on none of the 2 examples read (2 with an expression, "
                       "0 with AUs)",
        "unweighted": "has weight 0 (not trained on)"}
    assert "unweighted" not in built and built["lab"].reads == list(range(6))
    assert est.description == ("P(AU active | expression) counted on the training split of "
                               "config 'lists': lab (4 examples)")
    # min_count 2 leaves Anger (one example) and Happiness/AU4 (none) unestimated.
    est = relatedness.estimate(list_config(**LISTS), min_count=2)
    assert np.argwhere(est.estimated).tolist() == [[HAPPINESS, 0], [HAPPINESS, 1]]
    assert not est.prototypical.any()


def test_max_examples_reads_evenly_spread_indices(built):
    np.testing.assert_array_equal(relatedness.read_indices(10, 4), [0, 2, 5, 7])
    np.testing.assert_array_equal(relatedness.read_indices(3, 5), [0, 1, 2])
    np.testing.assert_array_equal(relatedness.read_indices(3, None), [0, 1, 2])
    est = relatedness.estimate(list_config(lab=1.0), min_count=1, max_examples=3)
    assert built["lab"].reads == [0, 2, 4]
    np.testing.assert_array_equal(est.counts[HAPPINESS], [2, 1, 0])
    np.testing.assert_array_equal(est.active[HAPPINESS], [1, 0, 0])
    assert est.sources == {"lab": 2}
    assert est.description.endswith("lab (2 examples), at most 3 per source")


def test_no_source_with_both_labels_is_one_message(built, tiny_config):
    with pytest.raises(UserError) as error:
        relatedness.estimate(list_config(expressions=1.0, unweighted=0.0))
    assert str(error.value) == (
        "no training source labels an expression and AUs on the same examples, so there is "
        "nothing to estimate P(AU | expression) from: expressions labels both on none of the 2 "
        "examples read (2 with an expression, 0 with AUs); unweighted has weight 0 (not trained "
        "on)")
    # Synthetic sources that cannot contribute are judged on their config, without reading.
    built.clear()
    tiny_config.data.sources.affwild2_like.synthetic.label_expression = False
    with pytest.raises(UserError) as error:
        relatedness.estimate(tiny_config)
    assert str(error.value).endswith(
        "from: affectnet_like labels expressions and no AU; affwild2_like labels AUs and no "
        "expression; rafdb_like labels expressions and no AU")
    assert not built


def test_estimate_recovers_the_generators_probabilities(built, tiny_config):
    # Independent faces (no clips), so that n counts independent draws.
    source = tiny_config.data.sources.affwild2_like.synthetic
    source.num_records, source.video_frames = 2100, 0
    est = relatedness.estimate(tiny_config, min_count=100)
    assert list(built) == ["affwild2_like"]   # the other two label no AU: not even built
    assert est.sources == {"affwild2_like": 2100} and est.expression_counts.sum() == 2100
    # Every AU is labelled in every example of this source.
    np.testing.assert_array_equal(est.counts, est.expression_counts[:, None].repeat(17, 1))
    assert est.estimated.all()
    truth = synthetic.au_probabilities(False, taxonomy.AUS)
    tolerance = 4 * np.sqrt(truth * (1 - truth) / est.counts) + 0.01
    error = np.abs(est.matrix - truth)
    worst = np.unravel_index(np.argmax(error / tolerance), error.shape)
    assert (error <= tolerance).all(), (worst, est.matrix[worst], truth[worst])
    # A table of 17 AUs stays within 100 columns.
    text = relatedness.format_table(est, tables.load("du2014", taxonomy.AUS))
    assert max(len(line) for line in text.splitlines()) <= 100, text


def test_write_then_load(built, tmp_path, monkeypatch):
    est = relatedness.estimate(list_config(**LISTS), min_count=2)
    path = relatedness.write(est, tmp_path / "table.json")
    content = json.loads(path.read_text())
    assert content["format"] == "fbnet_jax.relatedness" and content["version"] == 1
    assert content["matrix"][HAPPINESS] == [0.6667, 0.5, None]
    assert content["matrix"][ANGER] == [None, None, None]
    assert content["counts"][ANGER] == [1, 1, 1] and content["min_count"] == 2
    assert content["sources"] == {"lab": 4}
    assert "    [0.6667, 0.5, null]," in path.read_text().splitlines()   # a row per line
    assert list(tmp_path.iterdir()) == [path]          # no temporary file left

    table = tables.load(str(path), (4, 2))         # shorter and reordered
    assert table.aus == (4, 2)
    expected = np.zeros((7, 2), np.float32)
    expected[HAPPINESS] = [0, 0.5]                     # null -> 0
    np.testing.assert_array_equal(table.matrix, expected)
    assert not table.prototypical.any()
    assert table.source == f"{path}: {est.description}; 13 entries without data set to 0"

    # Prototypical entries survive the round trip.
    est = relatedness.estimate(list_config(**LISTS), min_count=1)
    table = tables.load(str(relatedness.write(est, path)), AUS)
    np.testing.assert_array_equal(table.prototypical, est.prototypical)
    np.testing.assert_allclose(table.matrix, np.nan_to_num(est.matrix), atol=5e-5)

    # A write that fails leaves the file as it was, and no temporary file.
    before = path.read_text()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(relatedness.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        relatedness.write(relatedness.estimate(list_config(lab=1.0), min_count=2), path)
    assert path.read_text() == before and list(tmp_path.iterdir()) == [path]


def _valid_table():
    return {"format": "fbnet_jax.relatedness", "version": 1, "description": "by hand",
            "expressions": list(taxonomy.EXPRESSIONS), "aus": [1, 2, 4],
            "matrix": [[0.5, None, 1]] * 7, "prototypical": [[False, False, True]] * 7}


def _edited(**changes):
    table = _valid_table()
    table.update(changes)
    return json.dumps(table)


def _matrix_with(row, column, value):
    matrix = [list(r) for r in _valid_table()["matrix"]]
    matrix[row][column] = value
    return matrix


LOADER_ERRORS = [
    ("{", "is not JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
          "(char 1)"),
    (_edited(format="other"), ": not a relatedness table (\"format\" is 'other', expected "
                              "'fbnet_jax.relatedness')"),
    ("[1]", ": not a relatedness table (\"format\" is 'list', expected 'fbnet_jax.relatedness')"),
    (_edited(version=2), ": table version 2; this fbnet_jax reads version 1"),
    (_edited(expressions=list(taxonomy.EXPRESSIONS[1:])),
     ": \"expressions\" must be ['Neutral', 'Anger', 'Disgust', 'Fear', 'Happiness', "
     "'Sadness', 'Surprise'], in this order; got ['Anger', 'Disgust', 'Fear', 'Happiness', "
     "'Sadness', 'Surprise']"),
    (_edited(aus=[1, 1, 4]), ": \"aus\" must be a list of distinct AU numbers; got [1, 1, 4]"),
    (_edited(aus=[1, 4]), ": no column for AU2 of data.aus (the table has AU1, AU4)"),
    (_edited(matrix=[[0.5, None]] * 7),
     ": \"matrix\" must be 7 rows of 3 numbers or null (one per AU of \"aus\")"),
    (_edited(matrix=_matrix_with(HAPPINESS, 0, 1.5)),
     ": values must lie in [0, 1]: Happiness/AU1 = 1.5"),
    (_edited(matrix=_matrix_with(ANGER, 1, math.nan)),   # json.dumps writes NaN
     ": values must lie in [0, 1]: Anger/AU2 = nan"),
    (_edited(matrix=_matrix_with(ANGER, 0, -0.25)),
     ": values must lie in [0, 1]: Anger/AU1 = -0.25"),
    (_edited(matrix=_matrix_with(ANGER, 1, True)),
     ": \"matrix\" must be 7 rows of 3 numbers or null (one per AU of \"aus\")"),
    (_edited(prototypical=[[0, 0, 1]] * 7),
     ": \"prototypical\" must be 7 rows of 3 booleans (one per AU of \"aus\")"),
]


@pytest.mark.parametrize("text, message", LOADER_ERRORS, ids=[
    "not json", "format", "not an object", "version", "expressions", "repeated aus",
    "missing au", "short rows", "above 1", "nan", "negative", "bool value", "int prototypical"])
def test_loader_errors_name_the_field_and_the_file(tmp_path, text, message):
    path = tmp_path / "table.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        tables.load(str(path), (1, 2))
    separator = " " if message.startswith("is not") else ""
    assert str(error.value) == f"invalid config: loss.relatedness: {path}{separator}{message}"


def test_loader_accepts_the_valid_table_and_refuses_a_missing_file(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(_edited())
    table = tables.load(str(path), (4, 1))
    np.testing.assert_array_equal(table.matrix[0], [1, 0.5])
    assert table.source == f"{path}: by hand"   # the AUs used have no null entry
    table = tables.load(str(path), (1, 2))
    np.testing.assert_array_equal(table.matrix[0], [0.5, 0])
    assert table.source == f"{path}: by hand; 7 entries without data set to 0"
    for spec, message in (
            (str(tmp_path / "nothere.json"),
             f"no such file '{tmp_path / 'nothere.json'}' (expected 'du2014' or the path of a "
             f"table written by `fbnet relatedness`)"),
            ("du2015", "no such file 'du2015' (expected 'du2014' or the path of a table "
                       "written by `fbnet relatedness`)"),
            (str(tmp_path), f"{tmp_path} is not a file"),
            (None, "expected 'du2014' or the path of a table written by `fbnet relatedness`, "
                   "got None")):
        with pytest.raises(ConfigError) as error:
            tables.load(spec, (1, 2))
        assert str(error.value) == f"invalid config: loss.relatedness: {message}"


def test_format_table_marks_unestimated_and_prototypical_entries(built):
    est = relatedness.estimate(list_config(**LISTS), min_count=2)
    text = relatedness.format_table(est, tables.load("du2014", AUS))
    assert text.splitlines() == [
        "est: P(AU active | expression) counted on the training data, from n examples of the "
        "expression;",
        "ref: du2014; *: prototypical (est: >= 0.8); -: fewer than 2 labelled examples",
        "AU               1    2    4",
        "Neutral   est   -    -    -",
        "n=0       ref 0.00 0.00 0.00",
        "Anger     est   -    -    -",
        "n=1       ref 0.00 0.00 1.00*",
        "Disgust   est   -    -    -",
        "n=0       ref 0.00 0.00 0.31",
        "Fear      est   -    -    -",
        "n=0       ref 1.00*0.57 1.00*",
        "Happiness est 0.67 0.50   -",
        "n=3       ref 0.00 0.00 0.00",
        "Sadness   est   -    -    -",
        "n=0       ref 0.60 0.00 1.00*",
        "Surprise  est   -    -    -",
        "n=0       ref 1.00*1.00*0.00",
        "largest differences: Happiness AU1 0.67 vs 0.00; Happiness AU2 0.50 vs 0.00",
    ]
    est = relatedness.estimate(list_config(**LISTS), min_count=1)
    text = relatedness.format_table(est, tables.load("du2014", AUS))
    assert "Anger     est 0.00 0.00 1.00*" in text.splitlines()
    with pytest.raises(ValueError, match="are not the estimate's"):
        relatedness.format_table(est, tables.load("du2014", (4, 2, 1)))


def test_run_command_checks_out_first_then_logs_and_writes(built, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out, message in ((None, "fbnet relatedness needs --out FILE (the JSON table to write)"),
                         (str(tmp_path), f"--out {tmp_path}: is a directory; give a file name"),
                         (str(blocker / "t.json"), f"--out {blocker / 't.json'}: {blocker} is "
                                                   f"not a directory")):
        with pytest.raises(UserError) as error:
            relatedness.run_command(list_config(**LISTS), out)
        assert str(error.value) == message
    assert not built   # nothing was read
    out = tmp_path / "t.json"
    with caplog.at_level(logging.INFO, logger="fbnet_jax.eval.relatedness"):
        est = relatedness.run_command(list_config(**LISTS), str(out), min_count=2)
    assert tables.load(str(out), AUS).source.startswith(f"{out}: {est.description}")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["not used: expressions labels both on none of the 2 examples read "
                            "(2 with an expression, 0 with AUs)",
                            "not used: unweighted has weight 0 (not trained on)"]
    assert "\nHappiness est 0.67 0.50   -\n" in messages[2]
    assert messages[3] == (f"wrote {out} (2 of 21 entries estimated); train with it: "
                           f"--config.loss.relatedness={out}")
