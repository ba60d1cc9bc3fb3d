"""General-ability probes: the built-in set's format, the GLUE loader on the real files, scoring on a tiny model,
and (slow) the default model's accuracy on the built-in set."""
import json

import numpy as np
import pytest
import torch

from analysis.evaluation import teacher_forced
from analysis.general import (
    BUILTIN_PATH,
    GLUE_TASKS,
    ProbeItem,
    general_abilities,
    glue_items,
    load_builtin,
    load_glue,
    predict,
    score_candidates,
)
from tests.conftest import shared_path

COLUMNS = ["task", "metric", "value", "n", "chance"]


def test_builtin_probe_file():
    items = load_builtin()
    assert len(items) >= 60
    tasks = {it.task for it in items}
    assert tasks == {"sentiment", "arithmetic", "knowledge"}
    for it in items:
        assert 0 <= it.answer < len(it.candidates) and len(set(it.candidates)) == len(it.candidates)
        assert not it.candidates[it.answer].startswith(" ")  # targets carry no leading space
    sent = [it.answer for it in items if it.task == "sentiment"]
    assert sent.count(0) == sent.count(1)  # balanced: a constant guess stays at chance
    with open(BUILTIN_PATH, encoding="utf-8") as f:
        assert json.load(f)["version"] >= 1


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_glue_loader_reads_the_real_files(task):
    folder = shared_path("glue")
    recs = load_glue(task, folder)
    assert len(recs) == 200
    assert {r["label"] for r in recs} == {0, 1}
    assert sum(r["label"] for r in recs) == 100  # class-balanced subsets
    text_keys = {"sentence"} if task in ("sst2", "cola") else {"sentence1", "sentence2"}
    assert text_keys <= set(recs[0])
    assert len(load_glue(task, folder, n=7)) == 7
    items = glue_items(task, recs[:5])
    assert [it.answer for it in items] == [r["label"] for r in recs[:5]]
    assert all(len(it.candidates) == 2 for it in items)


def test_glue_k_shot_prompts_exclude_the_query():
    recs = load_glue("sst2", shared_path("glue"))
    items = glue_items("sst2", recs[:4], k_shot=2, demos=recs, seed=1)
    for rec, it in zip(recs[:4], items):
        assert it.prompt.count("Sentiment:") == 3 and it.prompt.endswith("Sentiment:")
        assert it.prompt.count(rec["sentence"].strip()) == 1  # only as the query
    zero = glue_items("sst2", recs[:1])[0].prompt
    assert zero.count("Sentiment:") == 1
    with pytest.raises(FileNotFoundError, match="EDITBENCH_GLUE_DIR"):
        load_glue("rte", "/nonexistent")
    with pytest.raises(ValueError, match="valid"):
        load_glue("qnli")


def test_scores_match_teacher_forcing(tiny_llama):
    prompts = ["Review: I loved it.\nSentiment:", "Math: 2 + 3 =", "The opposite of hot is"]
    cands = [("positive", "negative"), ("5", "6", "4"), ("very cold", "warm")]  # the last: multi-token
    sc = score_candidates(tiny_llama, prompts, cands, batch_size=2)
    flat = [(p, c) for p, cs in zip(prompts, cands) for c in cs]
    ref = [o.logprob for o in teacher_forced(tiny_llama, [p for p, _ in flat], [c for _, c in flat])]
    assert np.allclose([s for row in sc for s in row], ref, atol=1e-4)
    items = [ProbeItem("t", p, c, 0) for p, c in zip(prompts, cands)]
    assert list(predict(tiny_llama, items)) == [int(np.argmax(s)) for s in sc]


def test_general_abilities_on_a_tiny_model(tiny_llama):
    df = general_abilities(tiny_llama)
    assert list(df.columns) == COLUMNS
    assert set(df["task"]) == {"builtin", "builtin/sentiment", "builtin/arithmetic", "builtin/knowledge"}
    assert set(df["metric"]) == {"accuracy"} and df["value"].between(0, 1).all()
    overall = df[df["task"] == "builtin"].iloc[0]
    assert overall["n"] == len(load_builtin())
    per = df[df["task"] != "builtin"]
    assert overall["value"] == pytest.approx((per["value"] * per["n"]).sum() / per["n"].sum())
    assert df.set_index("task").loc["builtin/sentiment", "chance"] == pytest.approx(0.5)
    threads = torch.get_num_threads()
    one = general_abilities(tiny_llama, tasks=("builtin/arithmetic",), n=5, threads=1)
    assert list(one["task"]) == ["builtin/arithmetic"] and one["n"].iloc[0] == 5
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="valid"):
        general_abilities(tiny_llama, tasks=("builtin/poetry",))


def test_general_abilities_glue_metrics(tiny_llama):
    df = general_abilities(tiny_llama, tasks=("mrpc", "cola"), n=8, glue_dir=shared_path("glue"), k_shot=1)
    assert list(df.columns) == COLUMNS
    got = set(zip(df["task"], df["metric"]))
    assert got == {("mrpc", "accuracy"), ("mrpc", "f1"), ("cola", "accuracy"), ("cola", "mcc")}
    assert (df["n"] == 8).all()
    assert df["value"].between(-1, 1).all()


@pytest.mark.slow
def test_default_model_builtin_accuracy(default_lm):
    df = general_abilities(default_lm, threads=1)
    acc = df.set_index("task")["value"]
    assert acc["builtin"] >= 0.6
    assert all(acc[t] > df.set_index("task").loc[t, "chance"] for t in acc.index)
