"""Label spaces and expression-AU relatedness tables.

Everything here is data with its source. The tables are kept in their published form (lists of
prototypical AUs and observational AUs with the fraction of subjects that showed them) and are
projected onto whatever AU list a config uses: AUs outside the list (AU11, for example) are dropped.

This module is the only one shared by the data side (`data_pipelines`) and the model side
(`fbnet_jax`), so it imports nothing from either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

# The 7 basic expressions, in the Aff-Wild2 order (EXPR labels 0..6).
EXPRESSIONS: tuple[str, ...] = (
    "Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise")
NEUTRAL = 0

# The 17 AUs: the union of the AUs annotated by EmotioNet, DISFA, BP4D and Aff-Wild2.
AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26)

# FACS names (Ekman & Friesen), for reports and the contact sheet.
AU_NAMES: Mapping[int, str] = {
    1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 5: "upper lid raiser",
    6: "cheek raiser", 7: "lid tightener", 9: "nose wrinkler", 10: "upper lip raiser",
    11: "nasolabial deepener", 12: "lip corner puller", 14: "dimpler",
    15: "lip corner depressor", 17: "chin raiser", 20: "lip stretcher", 23: "lip tightener",
    24: "lip pressor", 25: "lips part", 26: "jaw drop",
}

# The AUs each public dataset annotates (docs/paper.md#datasets-and-their-aus). Used to build label
# masks, and by the synthetic data to imitate which AUs each kind of dataset labels.
DATASET_AUS: Mapping[str, tuple[int, ...]] = {
    # EmotioNet manual set, 11 AUs (EmotioNet challenge 2017/2018 release).
    "emotionet": (1, 2, 4, 5, 6, 9, 12, 17, 20, 25, 26),
    # DISFA: 12 AUs, one label file each (ActionUnit_Labels/SNxxx/SNxxx_au<N>.txt).
    "disfa": (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26),
    # BP4D (FERA 2015) AU_OCC: the 12 AUs of the benchmark.
    "bp4d": (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24),
    # Aff-Wild2, ABAW2 and later: header AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26.
    "affwild2": (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26),
}


@dataclasses.dataclass(frozen=True)
class RelatednessRow:
    """One row of an expression-AU relatedness table.

    Attributes:
      name: the expression (basic or compound).
      prototypical: AUs shown by (nearly) every subject; weight 1.
      observational: AU -> fraction of subjects who showed it.
      components: for compound expressions, the two basic expressions it combines.
    """
    name: str
    prototypical: tuple[int, ...]
    observational: Mapping[int, float]
    components: tuple[str, ...] = ()


RELATEDNESS_SOURCE = (
    "Du, Tao, Martinez, 'Compound facial expressions of emotion', PNAS 111(15), 2014, Table 1; "
    "as used by Kollias et al., 'Face Behavior a la carte', arXiv 1910.11111. Rows as listed in "
    "docs/paper.md#basic-expressions and docs/paper.md#compound-expressions (recalled values, "
    "not checked against the PNAS table: replace them here when you have the original).")

# Basic expressions. Neutral has no row: it implies no AU.
BASIC_RELATEDNESS: tuple[RelatednessRow, ...] = (
    RelatednessRow("Happiness", (12, 25), {6: 0.51}),
    RelatednessRow("Sadness", (4, 15), {1: 0.60, 6: 0.50, 11: 0.26, 17: 0.67}),
    RelatednessRow("Fear", (1, 4, 20, 25), {2: 0.57, 5: 0.63, 26: 0.33}),
    RelatednessRow("Anger", (4, 7, 24), {10: 0.26, 17: 0.52, 23: 0.29}),
    RelatednessRow("Surprise", (1, 2, 25, 26), {5: 0.66}),
    RelatednessRow("Disgust", (9, 10, 17), {4: 0.31, 24: 0.26}),
)

# The 15 compound expressions of Du et al. 2014.
COMPOUND_RELATEDNESS: tuple[RelatednessRow, ...] = (
    RelatednessRow("Happily Surprised", (1, 2, 12, 25), {5: 0.64, 26: 0.67},
                   ("Happiness", "Surprise")),
    RelatednessRow("Happily Disgusted", (10, 12, 25), {4: 0.32, 6: 0.61, 9: 0.59},
                   ("Happiness", "Disgust")),
    RelatednessRow("Sadly Fearful", (1, 4, 20, 25), {2: 0.46, 5: 0.24, 6: 0.34, 15: 0.30},
                   ("Sadness", "Fear")),
    RelatednessRow("Sadly Angry", (4, 15), {6: 0.26, 7: 0.48, 11: 0.20, 17: 0.50},
                   ("Sadness", "Anger")),
    RelatednessRow("Sadly Surprised", (1, 4, 25, 26), {2: 0.27, 6: 0.31},
                   ("Sadness", "Surprise")),
    RelatednessRow("Sadly Disgusted", (4, 10),
                   {1: 0.49, 6: 0.61, 9: 0.20, 11: 0.35, 15: 0.54, 17: 0.47, 25: 0.43},
                   ("Sadness", "Disgust")),
    RelatednessRow("Fearfully Angry", (4, 20, 25), {5: 0.40, 7: 0.39, 10: 0.30, 11: 0.33},
                   ("Fear", "Anger")),
    RelatednessRow("Fearfully Surprised", (1, 2, 5, 20, 25),
                   {4: 0.47, 10: 0.35, 11: 0.22, 26: 0.51}, ("Fear", "Surprise")),
    RelatednessRow("Fearfully Disgusted", (1, 4, 10, 20, 25),
                   {2: 0.64, 5: 0.50, 6: 0.26, 9: 0.28, 15: 0.33}, ("Fear", "Disgust")),
    RelatednessRow("Angrily Surprised", (4, 25, 26), {5: 0.35, 7: 0.50, 10: 0.34},
                   ("Anger", "Surprise")),
    RelatednessRow("Angrily Disgusted", (4, 10, 17), {7: 0.60, 9: 0.57, 24: 0.36},
                   ("Anger", "Disgust")),
    RelatednessRow("Disgustedly Surprised", (1, 2, 5, 10), {4: 0.45, 9: 0.37, 17: 0.66, 24: 0.33},
                   ("Disgust", "Surprise")),
    # Du et al.'s three extra categories; they name no two basic components.
    RelatednessRow("Appalled", (4, 10), {6: 0.25, 9: 0.56, 17: 0.67, 24: 0.36}),
    RelatednessRow("Hatred", (4, 10), {7: 0.57, 9: 0.27, 17: 0.63, 24: 0.37}),
    RelatednessRow("Awed", (1, 2, 5, 25), {4: 0.21, 20: 0.62, 26: 0.56}),
)

# RAF-DB's 11 compound classes, in the order of its labels 1..11 (record value = label - 1).
RAF_COMPOUND_CLASSES: tuple[str, ...] = (
    "Happily Surprised", "Happily Disgusted", "Sadly Fearful", "Sadly Angry", "Sadly Surprised",
    "Sadly Disgusted", "Fearfully Angry", "Fearfully Surprised", "Angrily Surprised",
    "Angrily Disgusted", "Disgustedly Surprised")


def _rows_by_name(rows: Sequence[RelatednessRow]) -> dict[str, RelatednessRow]:
    return {row.name: row for row in rows}


def relatedness_matrix(names: Sequence[str], aus: Sequence[int] = AUS,
                       rows: Sequence[RelatednessRow] = BASIC_RELATEDNESS) -> np.ndarray:
    """R[k, i]: 1 for prototypical AUs, the observed fraction for observational ones, else 0.

    Args:
      names: the row order, e.g. `EXPRESSIONS` or `RAF_COMPOUND_CLASSES`. A name with no row in
        `rows` (Neutral) gets a row of zeros.
      aus: the AU list to project onto; AUs of the table outside it are dropped.
      rows: the table.

    Returns:
      float32 array [len(names), len(aus)].
    """
    by_name = _rows_by_name(rows)
    column = {au: i for i, au in enumerate(aus)}
    matrix = np.zeros((len(names), len(aus)), np.float32)
    for k, name in enumerate(names):
        row = by_name.get(name)
        if row is None:
            continue
        for au, weight in row.observational.items():
            if au in column:
                matrix[k, column[au]] = weight
        for au in row.prototypical:
            if au in column:
                matrix[k, column[au]] = 1.0
    return matrix


def prototypical_mask(names: Sequence[str], aus: Sequence[int] = AUS,
                      rows: Sequence[RelatednessRow] = BASIC_RELATEDNESS) -> np.ndarray:
    """P[k, i] = True where AU aus[i] is prototypical of names[k] (and inside the AU list)."""
    by_name = _rows_by_name(rows)
    mask = np.zeros((len(names), len(aus)), bool)
    for k, name in enumerate(names):
        row = by_name.get(name)
        if row is None:
            continue
        for i, au in enumerate(aus):
            mask[k, i] = au in row.prototypical
    return mask


def basic_relatedness(aus: Sequence[int] = AUS) -> np.ndarray:
    """The [7, len(aus)] expression-AU matrix, rows in EXPRESSIONS order (Neutral row zero)."""
    return relatedness_matrix(EXPRESSIONS, aus, BASIC_RELATEDNESS)


def compound_relatedness(classes: Sequence[str] = RAF_COMPOUND_CLASSES,
                         aus: Sequence[int] = AUS) -> np.ndarray:
    """The [len(classes), len(aus)] compound-AU matrix (default: RAF-DB's 11 classes)."""
    return relatedness_matrix(classes, aus, COMPOUND_RELATEDNESS)


def compound_components(classes: Sequence[str] = RAF_COMPOUND_CLASSES) -> np.ndarray:
    """int32 [len(classes), 2]: indices into EXPRESSIONS of each compound's two basic parts."""
    by_name = _rows_by_name(COMPOUND_RELATEDNESS)
    for name in classes:
        if len(by_name[name].components) != 2:
            raise ValueError(f"compound class {name!r} names no two basic components")
    return np.array([[EXPRESSIONS.index(c) for c in by_name[name].components]
                     for name in classes], np.int32)


# The naive-Bayes AU model of a class (a basic expression or a compound): P(AU i active | class)
# is its relatedness entry clipped to [AU_PROBABILITY_FLOOR, AU_PROBABILITY_CEILING]. The floor: an
# AU the row does not list (and every AU of Neutral's all-zero row) is rare, not impossible; the
# ceiling: a prototypical AU (weight 1) is shown by nearly every subject, so one AU the network
# misses lowers a class's score instead of ruling it out. The compound zero-shot rule and
# distribution matching share it; why: docs/paper.md#compound-expressions-the-scoring-rule.
AU_PROBABILITY_FLOOR = 0.05
AU_PROBABILITY_CEILING = 0.95


def bernoulli_au_model(table: np.ndarray) -> np.ndarray:
    """P(AU active | class) [K, A], float64: a relatedness table [K, A] clipped to the bounds."""
    return np.clip(np.asarray(table, np.float64), AU_PROBABILITY_FLOOR, AU_PROBABILITY_CEILING)


def au_log_likelihood(au_probs, model: np.ndarray):
    """[N, K]: Σ_i p_i log q_ki + (1 − p_i) log(1 − q_ki), q = `model` (`bernoulli_au_model`).

    The expected Bernoulli log-likelihood of the AU activations under the network's belief p
    (exactly the log-likelihood when p is 0 or 1). Under a uniform prior over the K classes its
    softmax over k is the naive-Bayes posterior of the class given the AU predictions. It is
    linear in p and uses only `@`, so `au_probs` may be a numpy array (compound zero-shot,
    float64) or a jax array inside a jitted loss (its dtype is kept).

    Args:
      au_probs: [N, A] probabilities of the AUs (sigmoid of the AU logits).
      model: [K, A] P(AU active | class), strictly inside (0, 1).

    Returns:
      [N, K], in `au_probs`' dtype and array type.
    """
    log_q = np.log(model).T.astype(au_probs.dtype)
    log_not_q = np.log1p(-np.asarray(model)).T.astype(au_probs.dtype)
    return au_probs @ log_q + (1.0 - au_probs) @ log_not_q


def au_indices(subset: Sequence[int], aus: Sequence[int] = AUS) -> np.ndarray:
    """Positions in `aus` of the AUs of `subset` that the AU list contains."""
    return np.array([i for i, au in enumerate(aus) if au in set(subset)], np.int32)


def check_au_list(aus: Sequence[int]) -> tuple[int, ...]:
    """Validates a configured AU list: known AU numbers, no repeats. Returns it as a tuple."""
    aus = tuple(int(a) for a in aus)
    unknown = sorted(set(aus) - set(AU_NAMES))
    if unknown:
        raise ValueError(f"unknown AU numbers {unknown}; known: {sorted(AU_NAMES)}")
    if len(set(aus)) != len(aus):
        raise ValueError(f"AU list has repeats: {list(aus)}")
    return aus
