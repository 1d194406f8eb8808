"""Retrieval and classification metrics on hand-computed cases, and TREC run / qrels files."""

from __future__ import annotations

import importlib
import json
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from moon2.bench.build import build_bench
from moon2.bench.config import RETRIEVAL_TASKS, BenchConfig, EvalConfig
from moon2.bench.evaluate import RETRIEVAL_METRICS, evaluate
from moon2.bench.metrics import (
    classification_metrics,
    confusion,
    first_relevant_rank,
    read_trec_qrels,
    retrieval_metrics,
    write_trec_qrels,
    write_trec_run,
)
from moon2.bench.retrieval import topk_search
from moon2.models.base import EncodeItem, Encoder

# Four queries over candidates 0..9, ranked to depth 5.
RANKED = np.array(
    [
        [3, 1, 4, 0, 2],  # q0: relevant 3 at rank 1
        [5, 6, 7, 8, 9],  # q1: relevant 7, 9 at ranks 3 and 5; relevant 0 not retrieved
        [0, 1, 2, 3, 4],  # q2: relevant 8 not retrieved
        [2, 6, 1, 0, 5],  # q3: 6 (grade 3) at rank 2, 0 (grade 1) at rank 4; 9 (grade 2) missed
    ]
)
RELEVANT = [{3: 1}, {7: 1, 9: 1, 0: 1}, {8: 1}, {6: 3, 0: 1, 9: 2}]

L2, L3, L4, L5, L6 = (math.log2(x) for x in (2, 3, 4, 5, 6))
# nDCG@10, gain 2**g - 1, discount 1 / log2(rank + 1):
# q0: DCG = 1/log2(2) = 1; ideal 1 -> 1.
# q1: DCG = 1/log2(4) + 1/log2(6) = 0.5 + 0.386853 = 0.886853;
#     ideal (three grade-1 items) = 1 + 1/log2(3) + 1/log2(4) = 2.130930 -> 0.416181.
# q2: 0.
# q3: DCG = 7/log2(3) + 1/log2(5) = 4.416508 + 0.430677 = 4.847185;
#     ideal (grades 3, 2, 1) = 7 + 3/log2(3) + 1/log2(4) = 9.392789 -> 0.516054.
NDCG = [
    1.0,
    (1 / L4 + 1 / L6) / (1 + 1 / L3 + 1 / L4),
    0.0,
    (7 / L3 + 1 / L5) / (7 + 3 / L3 + 1 / L4),
]
# AP: sum of precision@r at relevant ranks / number of relevant.
# q0: 1/1 = 1.  q1: (1/3 + 2/5) / 3 = 0.244444.  q2: 0.  q3: (1/2 + 2/4) / 3 = 0.333333.
AP = [1.0, (1 / 3 + 2 / 5) / 3, 0.0, (1 / 2 + 2 / 4) / 3]
# MRR@10: 1/1, 1/3, 0, 1/2.
RR = [1.0, 1 / 3, 0.0, 1 / 2]


def test_retrieval_metrics_by_hand():
    metrics = retrieval_metrics(RANKED, RELEVANT)
    assert list(metrics) == ["R@1", "R@5", "R@10", "MRR@10", "nDCG@10", "mAP"]
    assert metrics["R@1"] == pytest.approx(1 / 4)  # only q0 hits at rank 1
    assert metrics["R@5"] == pytest.approx(3 / 4)  # q0, q1, q3
    assert metrics["R@10"] == pytest.approx(3 / 4)  # depth 5: the whole list
    assert metrics["MRR@10"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)  # 0.458333
    assert metrics["nDCG@10"] == pytest.approx(sum(NDCG) / 4)  # 0.483059
    assert metrics["mAP"] == pytest.approx((1 + 0.2444444444 + 0 + 1 / 3) / 4)  # 0.394444
    assert metrics["mAP"] == pytest.approx(sum(AP) / 4)
    assert all(isinstance(value, float) for value in metrics.values())


def test_per_query_arrays():
    per_query = retrieval_metrics(RANKED, RELEVANT, per_query=True)
    assert list(per_query) == ["R@1", "R@5", "R@10", "MRR@10", "nDCG@10", "mAP"]
    assert per_query["R@1"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert per_query["R@5"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert per_query["MRR@10"] == pytest.approx(RR)
    assert per_query["nDCG@10"] == pytest.approx(NDCG)
    assert per_query["nDCG@10"][1] == pytest.approx(0.416181, abs=1e-6)
    assert per_query["nDCG@10"][3] == pytest.approx(0.516054, abs=1e-6)
    assert per_query["mAP"] == pytest.approx(AP)
    assert all(values.shape == (4,) for values in per_query.values())


def test_first_relevant_rank_by_hand():
    # q0: 3 at rank 1; q1: 7 at rank 3; q2: 8 not retrieved; q3: 6 at rank 2
    assert first_relevant_rank(RANKED, RELEVANT).tolist() == [1, 3, 0, 2]
    padded = np.array([[4, -1, -1], [2, 5, -1]])  # padding is never relevant
    assert first_relevant_rank(padded, [{5}, [5, 9]]).tolist() == [0, 2]


def test_cutoffs_and_ks_order():
    metrics = retrieval_metrics(RANKED, RELEVANT, ks=(3, 1), ndcg_k=2, mrr_k=2)
    assert list(metrics) == ["R@3", "R@1", "MRR@2", "nDCG@2", "mAP"]
    assert metrics["R@3"] == pytest.approx(3 / 4)  # q1's first hit is at rank 3
    # MRR@2: q1's first hit (rank 3) is cut off -> 1, 0, 0, 1/2.
    assert metrics["MRR@2"] == pytest.approx((1 + 0.5) / 4)
    # nDCG@2: q0 1; q1 no hit in the top 2 -> 0; q3 DCG 7/log2(3), ideal 7 + 3/log2(3).
    assert metrics["nDCG@2"] == pytest.approx((1 + (7 / L3) / (7 + 3 / L3)) / 4)
    assert metrics["mAP"] == pytest.approx(sum(AP) / 4)  # mAP is never cut


def test_sets_padding_and_dtypes():
    # Plain sets mean grade 1; a row may end in negative padding (fewer candidates).
    ranked = np.array([[4, 2, -1, -1], [1, 0, 3, 2]], dtype=np.int32)
    per_query = retrieval_metrics(ranked, [{2}, [2, 0]], ks=(1, 2), per_query=True)
    assert per_query["R@1"].tolist() == [0.0, 0.0]
    assert per_query["R@2"].tolist() == [1.0, 1.0]
    assert per_query["MRR@10"] == pytest.approx([1 / 2, 1 / 2])
    # q1: hits at ranks 2 and 4 -> AP (1/2 + 2/4) / 2 = 1/2;
    # nDCG (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3)).
    assert per_query["mAP"] == pytest.approx([1 / 2, 1 / 2])
    assert per_query["nDCG@10"] == pytest.approx([1 / L3, (1 / L3 + 1 / L5) / (1 + 1 / L3)])


def test_matches_brute_force():
    """Vectorised paths (including > 8 relevant per query) against a plain loop."""
    rng = np.random.default_rng(0)
    n, depth, pool = 300, 20, 60
    ranked = np.stack([rng.permutation(pool)[:depth] for _ in range(n)])
    relevant = []
    for i in range(n):
        size = 12 if i % 10 == 0 else int(rng.integers(1, 4))
        chosen = rng.choice(pool, size, replace=False)
        relevant.append({int(c): int(rng.integers(1, 4)) for c in chosen})
    got = retrieval_metrics(ranked, relevant, ks=(1, 5), ndcg_k=10, mrr_k=10, per_query=True)
    for i in range(n):
        grades = [relevant[i].get(int(c), 0) for c in ranked[i]]
        hit_ranks = [r for r, g in enumerate(grades, 1) if g]
        assert got["R@1"][i] == float(any(r <= 1 for r in hit_ranks))
        assert got["R@5"][i] == float(any(r <= 5 for r in hit_ranks))
        first = min(hit_ranks, default=None)
        assert got["MRR@10"][i] == pytest.approx(1 / first if first and first <= 10 else 0.0)
        dcg = sum((2**g - 1) / math.log2(r + 1) for r, g in enumerate(grades[:10], 1))
        ideal_grades = sorted(relevant[i].values(), reverse=True)[:10]
        ideal = sum((2**g - 1) / math.log2(r + 1) for r, g in enumerate(ideal_grades, 1))
        assert got["nDCG@10"][i] == pytest.approx(dcg / ideal)
        ap = sum(k / r for k, r in enumerate(hit_ranks, 1)) / len(relevant[i])
        assert got["mAP"][i] == pytest.approx(ap)


@pytest.mark.parametrize(
    ("ranked", "relevant", "kwargs", "message"),
    [
        (RANKED, [{3: 1}, {}, {8: 1}, {6: 1}], {}, "no relevant candidate"),
        (RANKED, [{3: 1}, set(), {8: 1}, {6: 1}], {}, "no relevant candidate"),
        (RANKED, [{3: 0}, {7: 1}, {8: 1}, {6: 1}], {}, "grades >= 1"),
        (RANKED, RELEVANT[:3], {}, "4 rows but relevant has 3"),
        (np.array([[1, 2, 1]]), [{1: 1}], {}, "candidate 1 more than once"),
        (np.array([[1, -1, 2]]), [{1: 1}], {}, "after negative padding"),
        (np.array([1, 2, 3]), [{1: 1}], {}, "2-D"),
        (np.array([[1.0, 2.0]]), [{1: 1}], {}, "integer"),
        (RANKED, RELEVANT, {"ks": (0, 5)}, "at least 1"),
        (RANKED, RELEVANT, {"ndcg_k": 0}, "at least 1"),
    ],
)
def test_retrieval_rejects(ranked, relevant, kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(ranked, relevant, **kwargs)


# --- classification ---------------------------------------------------------------------------

# bird is never predicted, fish is never true.
Y_TRUE = ["cat", "cat", "cat", "dog", "dog", "bird", "cat"]
Y_PRED = ["cat", "dog", "dog", "dog", "fish", "cat", "cat"]
# Per label (predicted / true / correct -> precision, recall, F1):
#   bird: 0 / 1 / 0 -> 0, 0, 0
#   cat:  3 / 4 / 2 -> 2/3, 1/2, 2*(2/3)(1/2)/(2/3 + 1/2) = 4/7
#   dog:  3 / 2 / 1 -> 1/3, 1/2, 2*(1/3)(1/2)/(1/3 + 1/2) = 2/5
#   fish: 1 / 0 / 0 -> 0, 0, 0
# accuracy: samples 0, 3, 6 correct -> 3/7.


def test_classification_by_hand():
    metrics = classification_metrics(Y_TRUE, Y_PRED)
    assert metrics == pytest.approx(
        {
            "acc": 3 / 7,
            "macro_p": (0 + 2 / 3 + 1 / 3 + 0) / 4,  # 0.25
            "macro_r": (0 + 1 / 2 + 1 / 2 + 0) / 4,  # 0.25
            "macro_f1": (0 + 4 / 7 + 2 / 5 + 0) / 4,  # 17/70 = 0.242857, not F1(0.25, 0.25)
        }
    )
    assert list(metrics) == ["acc", "macro_p", "macro_r", "macro_f1"]
    # Restricting the labels changes the macro averages, not the accuracy.
    only = classification_metrics(Y_TRUE, Y_PRED, labels=["cat", "dog"])
    assert only == pytest.approx(
        {"acc": 3 / 7, "macro_p": 1 / 2, "macro_r": 1 / 2, "macro_f1": (4 / 7 + 2 / 5) / 2}
    )
    # A label in neither list counts as a zero in the averages.
    extra = classification_metrics(Y_TRUE, Y_PRED, labels=["cat", "dog", "owl"])
    assert extra["macro_f1"] == pytest.approx((4 / 7 + 2 / 5) / 3)


def test_confusion_by_hand():
    matrix, labels = confusion(Y_TRUE, Y_PRED)
    assert labels == ["bird", "cat", "dog", "fish"]
    assert matrix.tolist() == [
        [0, 1, 0, 0],  # bird -> cat
        [0, 2, 2, 0],  # cat -> cat x2, dog x2
        [0, 0, 1, 1],  # dog -> dog, fish
        [0, 0, 0, 0],  # fish never true
    ]
    sub, labels = confusion(Y_TRUE, Y_PRED, labels=["dog", "cat"])
    assert labels == ["dog", "cat"] and sub.tolist() == [[1, 0], [2, 2]]


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "message"),
    [
        (["a"], ["a", "b"], None, "1 samples but y_pred has 2"),
        ([], [], None, "no samples"),
        (["a"], ["a"], ["a", "b", "a"], "'a' is listed more than once"),
        (["a"], ["a"], [], "labels is empty"),
    ],
)
def test_classification_rejects(y_true, y_pred, labels, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, y_pred, labels)


def test_classification_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    names = [f"c{i}" for i in range(12)]
    y_true = rng.choice(names[:10], 500).tolist()  # c10, c11 never true
    y_pred = rng.choice(names[2:], 500).tolist()  # c0, c1 never predicted
    for labels in (None, names[::2], [*names[:5], "unseen"]):
        got = classification_metrics(y_true, y_pred, labels)
        p, r, f1, _ = sklearn_metrics.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average="macro", zero_division=0
        )
        expected = {
            "acc": sklearn_metrics.accuracy_score(y_true, y_pred),
            "macro_p": p,
            "macro_r": r,
            "macro_f1": f1,
        }
        assert got == pytest.approx(expected)
        matrix, vocabulary = confusion(y_true, y_pred, labels)
        expected_matrix = sklearn_metrics.confusion_matrix(y_true, y_pred, labels=vocabulary)
        assert matrix.tolist() == expected_matrix.tolist()
    hand = classification_metrics(Y_TRUE, Y_PRED)
    p, r, f1, _ = sklearn_metrics.precision_recall_fscore_support(
        Y_TRUE, Y_PRED, average="macro", zero_division=0
    )
    assert (hand["macro_p"], hand["macro_r"], hand["macro_f1"]) == pytest.approx((p, r, f1))


# --- TREC files -------------------------------------------------------------------------------


def test_write_trec_run(tmp_path):
    path = tmp_path / "runs" / "dev.run"
    ranked = np.array([[2, 0, 1], [1, 2, -1]])  # q2 has two candidates, then padding
    scores = np.array([[0.9, 0.5, 0.5], [1.25, -3e-05, 7.0]], dtype=np.float32)
    write_trec_run(path, ["q1", "q2"], ["d0", "d1", "d2"], ranked, scores, "moon2-base")
    lines = path.read_text().splitlines()
    assert lines == [
        "q1 Q0 d2 1 0.9 moon2-base",  # float32 scores in their shortest float32 form
        "q1 Q0 d0 2 0.5 moon2-base",
        "q1 Q0 d1 3 0.5 moon2-base",
        "q2 Q0 d1 1 1.25 moon2-base",
        "q2 Q0 d2 2 -0.00003 moon2-base",
    ]
    assert [p.name for p in path.parent.iterdir()] == ["dev.run"]  # no temporary left
    # float64 scores read back exactly.
    scores64 = np.array([[1 / 3, 0.1 + 0.2, 1e-300], [2.0, 1.0, 0.0]])
    write_trec_run(path, ["q1", "q2"], ["d0", "d1", "d2"], ranked, scores64, "r")
    written = [float(line.split()[4]) for line in path.read_text().splitlines()]
    assert written == [1 / 3, 0.1 + 0.2, 1e-300, 2.0, 1.0]


def test_qrels_round_trip(tmp_path):
    path = tmp_path / "test.qrels"
    judgements = [("q1", "d2", 1), ("q1", "d7", 0), ("q2", "d1", 3), ("q1", "d0", np.int64(2))]
    write_trec_qrels(path, judgements)
    assert path.read_text() == "q1 0 d2 1\nq1 0 d7 0\nq2 0 d1 3\nq1 0 d0 2\n"
    qrels = read_trec_qrels(path)
    assert qrels == {"q1": {"d2": 1, "d7": 0, "d0": 2}, "q2": {"d1": 3}}
    # From qrels back to metrics: drop grade-0 judgements, map ids to candidate indices.
    candidates = ["d0", "d1", "d2", "d7"]
    relevant = [
        {candidates.index(doc): grade for doc, grade in qrels[q].items() if grade >= 1}
        for q in ("q1", "q2")
    ]
    metrics = retrieval_metrics(np.array([[2, 0], [3, 1]]), relevant, ks=(1,))
    assert metrics["R@1"] == pytest.approx(1 / 2)
    assert metrics["mAP"] == pytest.approx((1 + 1) / 2 / 2 + (1 / 2) / 2)  # q1 1, q2 1/2


def test_read_qrels_tolerates_blank_lines_and_tabs(tmp_path):
    path = tmp_path / "q.qrels"
    path.write_text("q1\t0\td1\t1\n\nq1 0 d2 -1\n")
    assert read_trec_qrels(path) == {"q1": {"d1": 1, "d2": -1}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("q1 0 d1\n", r":1: expected 4 fields"),
        ("q1 0 d1 1\nq1 0 d2 high\n", r":2: grade 'high' is not an integer"),
        ("q1 0 d1 1\nq1 0 d1 2\n", r":2: query 'q1', document 'd1' is judged more than once"),
    ],
)
def test_read_qrels_rejects(tmp_path, text, message):
    path = tmp_path / "bad.qrels"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_trec_qrels(path)


@pytest.mark.parametrize(
    ("query_ids", "candidate_ids", "run_name", "message"),
    [
        (["q 1", "q2"], ["d0", "d1", "d2"], "run", "query id 'q 1' contains whitespace"),
        (["q1", "q2"], ["d0", "d\t1", "d2"], "run", r"candidate id 'd\\t1' contains whitespace"),
        (["q1", "q2"], ["d0", "d1", "d2"], "my run", "run name 'my run' contains whitespace"),
        (["q1", ""], ["d0", "d1", "d2"], "run", "query id is empty"),
        (["q1", "q1"], ["d0", "d1", "d2"], "run", "query id 'q1' appears more than once"),
        (["q1", "q2"], ["d0", "d1", "d0"], "run", "candidate id 'd0' appears more than once"),
        (["q1", "q2"], ["d0", "d1"], "run", "only 2 candidate ids"),
    ],
)
def test_write_run_rejects_bad_ids(tmp_path, query_ids, candidate_ids, run_name, message):
    path = tmp_path / "x.run"
    ranked = np.array([[0, 1], [2, 1]])
    with pytest.raises(ValueError, match=message):
        write_trec_run(path, query_ids, candidate_ids, ranked, np.ones((2, 2)), run_name)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_write_run_rejects_bad_scores(tmp_path):
    path, ranked, ids = tmp_path / "x.run", np.array([[0, 1]]), ["d0", "d1"]
    with pytest.raises(ValueError, match="increase along its ranked list"):
        write_trec_run(path, ["q1"], ids, ranked, np.array([[0.1, 0.2]]), "run")
    with pytest.raises(ValueError, match="finite"):
        write_trec_run(path, ["q1"], ids, ranked, np.array([[np.nan, 0.2]]), "run")
    with pytest.raises(ValueError, match="shape"):
        write_trec_run(path, ["q1"], ids, ranked, np.array([0.2, 0.1]), "run")
    assert not path.exists()


@pytest.mark.parametrize(
    ("judgement", "message"),
    [
        (("q 1", "d1", 1), "query id 'q 1' contains whitespace"),
        (("q1", "d\n1", 1), r"document id 'd\\n1' contains whitespace"),
        (("q1", "d1", 1.5), "grade 1.5 is not an integer"),
        (("q1", "d0", 1), "judged more than once"),
    ],
)
def test_write_qrels_rejects(tmp_path, judgement, message):
    path = tmp_path / "x.qrels"
    with pytest.raises(ValueError, match=message):
        write_trec_qrels(path, [("q1", "d0", 1), judgement])
    assert not path.exists()


# --- trec_eval cross-check --------------------------------------------------------------------

# Each retrieval metric of results.json and the trec_eval measure equal to it on every query,
# when trec_eval is given
# - moon2's own ranking with strictly decreasing, rank-derived scores: trec_eval orders by score
#   and breaks ties by docid descending, moon2's search by candidate position ascending, so on
#   tied scores the two would evaluate different orders;
# - qrels whose level is moon2's nDCG gain 2**grade - 1 (trec_eval's gain is the level itself);
#   with trec_eval's default relevance level 1, a level is >= 1 exactly when the grade is.
TREC_EQUIVALENT = {
    "R@1": "success_1",  # hit rate (any relevant candidate in the top k), not recall_k
    "R@5": "success_5",
    "R@10": "success_10",
    "MRR@10": "recip_rank",  # on the run cut to its first 10 candidates (recip_rank is uncut)
    "nDCG@10": "ndcg_cut_10",  # ideal DCG from all the query's relevant qrels
    # AP over moon2's whole ranked list, i.e. its search depth (trec_eval: the retrieved list),
    # divided by all the query's relevant candidates, those beyond the depth included.
    "mAP": "map",
}


def _pytrec_eval() -> ModuleType:
    """``pytrec_eval`` (the ``dev`` extra installs it). Missing, the cross-checks skip, except
    under ``CI=true``, where the import error fails them (issue #30: CI must run them)."""
    if os.environ.get("CI") == "true":
        return importlib.import_module("pytrec_eval")
    return pytest.importorskip("pytrec_eval")


def _gain_levels(qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Qrels with moon2's nDCG gain ``2**grade - 1`` as level (grades below 1: level 0)."""
    return {q: {d: 2**g - 1 if g >= 1 else 0 for d, g in docs.items()} for q, docs in qrels.items()}


def _trec_metrics(
    pytrec_eval: ModuleType,
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    qids: Sequence[str],
) -> dict[str, np.ndarray]:
    """trec_eval's value of each moon2 metric (``TREC_EQUIVALENT``) per query, in ``qids`` order.

    ``run`` must have no tied scores within a query (checked), ``qrels`` gain levels."""
    assert all(len(set(docs.values())) == len(docs) for docs in run.values())
    top10 = {
        q: dict(sorted(docs.items(), key=lambda item: item[1], reverse=True)[:10])
        for q, docs in run.items()
    }
    full = pytrec_eval.RelevanceEvaluator(qrels, {"success.1,5,10", "ndcg_cut.10", "map"})
    trec = full.evaluate(run)
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    return {
        name: np.array([(cut if name == "MRR@10" else trec)[q][measure] for q in qids])
        for name, measure in TREC_EQUIVALENT.items()
    }


def _differs(ours: np.ndarray, trec: dict[str, dict[str, float]], qids, measure: str) -> bool:
    return any(abs(ours[i] - trec[q][measure]) > 1e-6 for i, q in enumerate(qids))


def test_retrieval_metrics_equal_trec_eval(tmp_path):
    """Every metric results.json reports equals its trec_eval measure on every query (1e-6),
    through moon2's run and qrels writers and pytrec_eval's parsers, on moon2's own search with
    tied scores, 1-4 graded relevant candidates per query, relevant candidates beyond the
    depth (some queries have none retrieved) and rows padded short."""
    pytrec_eval = _pytrec_eval()
    assert tuple(TREC_EQUIVALENT) == RETRIEVAL_METRICS  # every reported metric is checked
    rng = np.random.default_rng(30)
    n, pool, depth = 300, 60, 20
    # Small integer embeddings: integer scores, exact in float32, tied in nearly every row.
    queries = rng.integers(0, 3, (n, 4)).astype(np.float32)
    scores, ranked = topk_search(queries, rng.integers(0, 3, (pool, 4)).astype(np.float32), depth)
    ranked[::7, 15:] = -1  # some rows list only 15 candidates
    relevant = [
        {int(c): int(rng.integers(1, 4)) for c in rng.choice(pool, rng.integers(1, 5), False)}
        for _ in range(n)
    ]
    qids, dids = [f"q{i:03d}" for i in range(n)], [f"d{c:02d}" for c in range(pool)]
    judgements = [(qids[i], dids[c], g) for i in range(n) for c, g in relevant[i].items()]
    write_trec_qrels(tmp_path / "r.qrels", judgements)
    rank_scores = np.broadcast_to(-np.arange(1.0, depth + 1), ranked.shape)
    write_trec_run(tmp_path / "r.run", qids, dids, ranked, rank_scores, "moon2")
    write_trec_run(tmp_path / "tied.run", qids, dids, ranked, scores, "moon2")
    with open(tmp_path / "r.qrels") as file:
        graded = pytrec_eval.parse_qrel(file)
    assert graded == read_trec_qrels(tmp_path / "r.qrels")
    qrels = _gain_levels(graded)
    with open(tmp_path / "r.run") as file:
        run = pytrec_eval.parse_run(file)

    ours = retrieval_metrics(ranked, relevant, per_query=True)
    trec = _trec_metrics(pytrec_eval, qrels, run, qids)
    for name in RETRIEVAL_METRICS:
        assert ours[name] == pytest.approx(trec[name], abs=1e-6), name
        assert ours[name].mean() == pytest.approx(trec[name].mean(), abs=1e-6), name

    # The data separates the mapping from its near misses.
    retrieved = [set(row[row >= 0].tolist()) for row in ranked]
    missed = [relevant[i].keys() - retrieved[i] for i in range(n)]
    assert sum(bool(m) and m != relevant[i].keys() for i, m in enumerate(missed)) > 20
    assert (ours["R@10"] == 0).sum() > 20  # no relevant candidate in the top 10
    other = pytrec_eval.RelevanceEvaluator(qrels, {"recall.10", "recip_rank"}).evaluate(run)
    assert _differs(ours["R@10"], other, qids, "recall_10")  # a hit rate, not recall
    assert _differs(ours["MRR@10"], other, qids, "recip_rank")  # first hits at ranks 11-20
    linear = pytrec_eval.RelevanceEvaluator(graded, {"ndcg_cut.10"}).evaluate(run)
    assert _differs(ours["nDCG@10"], linear, qids, "ndcg_cut_10")  # gain 2**g - 1, not g
    # moon2's scores tie in most rows, and trec_eval would order the ties differently.
    ties = (scores[:, 1:] == scores[:, :-1]) & (ranked[:, 1:] >= 0)
    assert ties.any(axis=1).mean() > 0.5
    with open(tmp_path / "tied.run") as file:
        tied_run = pytrec_eval.parse_run(file)
    tied = pytrec_eval.RelevanceEvaluator(qrels, {"map"}).evaluate(tied_run)
    assert _differs(ours["mAP"], tied, qids, "map")


class _TiedEncoder(Encoder):
    """Embeds a text and a main image as seeded 0/1 vectors of their content, summed (not
    L2-normalised): scores are small integers, so moon2's tie rule orders much of a ranking."""

    name = "tied"

    @property
    def dim(self) -> int:
        return 6

    def encode(self, items: Sequence[EncodeItem]) -> np.ndarray:
        out = np.zeros((len(items), self.dim), np.float32)
        for i, item in enumerate(items):
            parts = [item.text.encode()] if item.text else []
            parts += [image.tobytes() for image in item.images[:1]]
            for part in parts:
                out[i] += np.random.default_rng(zlib.crc32(part)).integers(0, 2, self.dim)
        return out


def test_eval_files_equal_results_json(small_catalog: Path, tmp_path: Path) -> None:
    """trec_eval on the files of ``moon2 eval`` (runs/<task>.trec in its rank column's order,
    the benchmark's qrels.trec) reproduces results.json, for a model with tied scores and a
    depth (10) below the candidate pool."""
    pytrec_eval = _pytrec_eval()
    bench, out = tmp_path / "bench", tmp_path / "eval"
    build_bench(small_catalog, bench, BenchConfig.model_validate({"tasks": {"min_items": 3}}))
    config = EvalConfig(tasks=list(RETRIEVAL_TASKS), device="cpu", depth=10, batch_size=64)
    evaluate(_TiedEncoder(), bench, out, config)
    results = json.loads((out / "results.json").read_text())
    tied = beyond = 0
    for task in RETRIEVAL_TASKS:
        with open(bench / "test" / "tasks" / task / "qrels.trec") as file:
            qrels = _gain_levels(pytrec_eval.parse_qrel(file))
        lines = (out / "runs" / f"{task}.trec").read_text().splitlines()
        scores = pytrec_eval.parse_run(lines)
        run: dict[str, dict[str, float]] = {}
        for line in lines:
            qid, _, did, rank, _, _ = line.split()
            run.setdefault(qid, {})[did] = -float(rank)
        assert {q: docs.keys() for q, docs in run.items()} == {
            q: docs.keys() for q, docs in scores.items()
        }
        tied += sum(len(set(docs.values())) < len(docs) for docs in scores.values())
        beyond += sum(any(d not in run[q] for d, g in qrels[q].items() if g) for q in run)
        trec = _trec_metrics(pytrec_eval, qrels, run, list(run))
        assert tuple(results[task]) == RETRIEVAL_METRICS, task
        for name in RETRIEVAL_METRICS:  # results.json rounds to 6 decimals
            assert results[task][name] == pytest.approx(trec[name].mean(), abs=1e-6), (task, name)
    assert tied > 0 and beyond > 0
    assert 0 < max(results[task]["R@10"] for task in RETRIEVAL_TASKS) < 1
