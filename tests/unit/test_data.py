"""Edit-request loaders: every supported layout, every kind of malformed record, uploads, the built-in sets."""
from __future__ import annotations

import json
import re

import pytest

from editors import data
from editors.data import (
    DataFileNotFoundError,
    DataSourceError,
    builtin_probes,
    builtin_requests,
    detect_format,
    load_counterfact,
    load_requests,
    load_user_edits,
    load_zsre,
    parse_bytes,
    parse_user_edits_bytes,
    request_from_dict,
    requests_to_csv,
    write_user_edits,
)
from editors.requests import EditRequest, RequestError
from tests.conftest import shared_path

CF = {"case_id": 7, "prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
      "target_new": "Rome", "ground_truth": "Paris", "rephrase_prompt": "Where is the Eiffel Tower? It is in",
      "locality_prompt": "The Colosseum is located in the city of", "locality_ground_truth": "Rome"}
ROME = {"case_id": 3,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                              "subject": "Danielle Darrieux",
                              "target_new": {"str": "English", "id": "Q1860"},
                              "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"]}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "loc": "nq question: who wrote the song hallelujah", "loc_ans": "Leonard Cohen", "cond": "x"}
OWN = {"case_id": "u-1", "prompt": "The capital of Japan is", "subject": "Japan", "target_new": "Kyoto",
       "target_true": "Tokyo", "rephrase_prompts": ["The capital city of Japan is"],
       "locality_prompts": ["The capital of Italy is"], "locality_answers": ["Rome"], "relation": "capital"}


def write_json(tmp_path, name, obj) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def write_jsonl(tmp_path, name, records) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# good records of every layout
# ---------------------------------------------------------------------------------------------------------------
def test_counterfact_easyedit_layout(tmp_path):
    path = write_json(tmp_path, "cf.json", [CF])
    for reqs in (load_counterfact(path), load_requests("counterfact:" + path), load_requests(path)):
        assert reqs == [EditRequest(case_id="7", prompt=CF["prompt"], subject="The Eiffel Tower", target_new="Rome",
                                    target_true="Paris", rephrase_prompts=(CF["rephrase_prompt"],),
                                    locality_prompts=(CF["locality_prompt"],), locality_answers=("Rome",))]
    assert reqs[0].prompt_template == "{} is located in the city of"


def test_counterfact_rome_layout_neighbours_answer_target_true(tmp_path):
    path = write_json(tmp_path, "rome.json", [ROME])
    (req,) = load_requests("counterfact:" + path)
    assert req.case_id == "3" and req.subject == "Danielle Darrieux"
    assert req.prompt == "The mother tongue of Danielle Darrieux is"
    assert (req.target_new, req.target_true, req.relation) == ("English", "French", "P103")
    assert req.rephrase_prompts == ("Danielle Darrieux spoke the language",)
    assert req.locality_prompts == tuple(ROME["neighborhood_prompts"])
    assert req.locality_answers == ("French", "French")
    assert load_requests(path) == [req]  # auto-detected as a plain path too


def test_zsre_layout(tmp_path):
    path = write_json(tmp_path, "zsre.json", [ZSRE, dict(ZSRE, subject="Windows 10", src="Who made Windows 10?")])
    reqs = load_requests("zsre:" + path)
    assert [r.case_id for r in reqs] == ["0", "1"]
    r = reqs[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (ZSRE["src"], "UniFirst", "unmanned aircraft",
                                                                 "uniform")
    assert r.rephrase_prompts == (ZSRE["rephrase"],)
    assert r.locality_prompts == (ZSRE["loc"],) and r.locality_answers == ("Leonard Cohen",)
    assert load_zsre(path) == reqs == load_requests(path)


def test_own_schema_json_jsonl_and_single_strings(tmp_path):
    single = dict(OWN, case_id="u-2", rephrase_prompts="Japan's capital city is", locality_prompts="The capital of "
                  "Egypt is", locality_answers="Cairo")
    minimal = {"prompt": "Lionel Messi plays for", "subject": "Lionel Messi", "target_new": "Chelsea"}
    path = write_json(tmp_path, "own.json", [OWN, single, minimal])
    reqs = load_user_edits(path)
    assert reqs[0].to_dict() == OWN
    assert reqs[1].rephrase_prompts == ("Japan's capital city is",) and reqs[1].locality_answers == ("Cairo",)
    assert reqs[2].case_id == "2" and reqs[2].target_true == "" and reqs[2].locality_prompts == ()
    jl = write_jsonl(tmp_path, "own.jsonl", [OWN, single, minimal])
    assert load_requests(jl) == reqs == load_requests(path)


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(CF) + "\n" + json.dumps(dict(CF, case_id=8)) + "\n")
    assert [r.case_id for r in load_requests(str(path))] == ["7", "8"]


def test_detect_format():
    assert detect_format(CF) == "counterfact"
    assert detect_format(ROME) == "counterfact-rome"
    assert detect_format(ZSRE) == "zsre"
    assert detect_format(OWN) == "schema"
    assert detect_format({"sentence": "x", "label": 1}) is None


# ---------------------------------------------------------------------------------------------------------------
# malformed records: RequestError naming file, record and field
# ---------------------------------------------------------------------------------------------------------------
def _error(tmp_path, records, name="bad.json", source_prefix="") -> RequestError:
    path = write_json(tmp_path, name, records)
    with pytest.raises(RequestError) as info:
        load_requests(source_prefix + path)
    err = info.value
    assert err.source == path and path in str(err)
    return err


@pytest.mark.parametrize("records, record, field, problem", [
    ([OWN, {k: v for k, v in OWN.items() if k != "target_new"} | {"case_id": "u-9"}], "1 (case_id u-9)",
     "target_new", "missing"),
    ([dict(OWN, subject="Germany")], "0 (case_id u-1)", "subject", "does not occur"),
    ([dict(OWN, target_new="  ")], "0 (case_id u-1)", "target_new", "empty"),
    ([dict(OWN, target_new=5)], "0 (case_id u-1)", "target_new", "expected a string"),
    ([dict(OWN, rephrase_prompts=[1])], "0 (case_id u-1)", "rephrase_prompts[0]", "expected a string"),
    ([dict(OWN, locality_answers=[])], "0 (case_id u-1)", "locality_answers", "1 locality prompts but 0"),
    ([OWN, "not a record"], "1", "(record)", "expected a JSON object"),
    ([OWN, OWN], "1 (case_id u-1)", "case_id", "duplicate"),
    ([dict(OWN, case_id=[1])], "0 (case_id [1])", "case_id", "expected a string or an integer"),
])
def test_malformed_own_records(tmp_path, records, record, field, problem):
    err = _error(tmp_path, records)
    assert (err.record, err.field_name) == (record, field)
    assert problem in err.problem
    assert f"record {record}" in str(err) and f"'{field}'" in str(err)


def test_malformed_counterfact_records(tmp_path):
    no_truth = {k: v for k, v in CF.items() if k != "ground_truth"}
    err = _error(tmp_path, [CF, dict(no_truth, case_id=8)], source_prefix="counterfact:")
    assert (err.record, err.field_name, err.problem) == ("1 (case_id 8)", "ground_truth", "missing")
    err = _error(tmp_path, [dict(CF, subject="Big Ben")])
    assert err.field_name == "subject" and "Big Ben" in err.problem
    err = _error(tmp_path, [dict(CF, target_new="")])
    assert err.field_name == "target_new" and err.problem == "empty"


def test_malformed_rome_records(tmp_path):
    rw = dict(ROME["requested_rewrite"], prompt="The mother tongue of Danielle Darrieux is")
    err = _error(tmp_path, [dict(ROME, requested_rewrite=rw)])
    assert err.field_name == "requested_rewrite.prompt" and "{}" in err.problem
    rw = {k: v for k, v in ROME["requested_rewrite"].items() if k != "target_true"}
    err = _error(tmp_path, [dict(ROME, requested_rewrite=rw)])
    assert (err.record, err.field_name, err.problem) == ("0 (case_id 3)", "requested_rewrite.target_true", "missing")
    rw = dict(ROME["requested_rewrite"], target_new={"id": "Q1"})
    err = _error(tmp_path, [dict(ROME, requested_rewrite=rw)])
    assert err.field_name == "requested_rewrite.target_new"


def test_malformed_zsre_records(tmp_path):
    err = _error(tmp_path, [ZSRE, dict(ZSRE, subject="Apple")], source_prefix="zsre:")
    assert (err.record, err.field_name) == ("1", "subject")
    assert "does not occur" in err.problem
    err = _error(tmp_path, [dict(ZSRE, alt="")])
    assert (err.field_name, err.problem) == ("alt", "empty")
    err = _error(tmp_path, [{k: v for k, v in ZSRE.items() if k != "loc_ans"}])
    assert err.field_name == "loc_ans" and "missing" in err.problem
    err = _error(tmp_path, [dict(ZSRE, answers=[1])])
    assert err.field_name == "answers[0]"


def test_wrong_layout_for_prefix(tmp_path):
    err = _error(tmp_path, [CF], source_prefix="zsre:")
    assert err.field_name == "(record)" and "'zsre'" in err.problem and "counterfact" in err.problem
    err = _error(tmp_path, [{"sentence": "fine", "label": 1}])
    assert "unrecognised record layout" in err.problem


def test_unparseable_jsonl_line_names_its_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(OWN) + "\n\n{\"prompt\": \"oops\n")
    with pytest.raises(RequestError) as info:
        load_requests(str(path))
    assert info.value.record == "1 (line 3)" and "line 3" in info.value.problem
    assert str(path) in str(info.value)


def test_skip_invalid_is_explicit_and_logged(tmp_path, caplog):
    path = write_json(tmp_path, "zs.json", [ZSRE, dict(ZSRE, alt=""), dict(ZSRE, subject="X Corp",
                                                                          src="Who owns X Corp?")])
    with pytest.raises(RequestError):
        load_zsre(path)
    with caplog.at_level("WARNING"):
        reqs = load_requests("zsre:" + path, skip_invalid=True)
    assert [r.case_id for r in reqs] == ["0", "2"]
    assert "record 1" in caplog.text and "'alt'" in caplog.text
    assert [r.case_id for r in load_requests("zsre:" + path, 2, skip_invalid=True)] == ["0", "2"]


# ---------------------------------------------------------------------------------------------------------------
# files as a whole, sources, n
# ---------------------------------------------------------------------------------------------------------------
def test_file_not_found_and_not_json(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(DataFileNotFoundError, match="nope.json"):
        load_requests(missing)
    with pytest.raises(FileNotFoundError):
        load_requests("counterfact:" + missing)
    bad = tmp_path / "bad.json"
    bad.write_text("this is not json")
    with pytest.raises(DataSourceError, match=r"bad\.json: not valid JSON"):
        load_requests(str(bad))
    other = tmp_path / "edits.txt"
    other.write_text("[]")
    with pytest.raises(DataSourceError, match=r"\.json, \.jsonl, \.csv"):
        load_requests(str(other))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DataSourceError, match="is a directory"):
        load_requests(str(tmp_path / "dir.json"))
    notjson = tmp_path / "latin1.json"
    notjson.write_bytes(b"[\xff\xfe]")
    with pytest.raises(DataSourceError, match="not UTF-8"):
        load_requests(str(notjson))


def test_unknown_prefix_lists_valid_ones():
    with pytest.raises(DataSourceError) as info:
        load_requests("wikidata:facts.json")
    msg = str(info.value)
    assert "'wikidata:'" in msg
    for valid in ("builtin", "counterfact:PATH", "zsre:PATH", ".jsonl", ".csv"):
        assert valid in msg
    with pytest.raises(DataSourceError):
        load_requests("")


def test_n_takes_first_records_in_file_order(tmp_path):
    records = [dict(CF, case_id=i) for i in range(10)]
    path = write_json(tmp_path, "cf.json", records)
    assert [r.case_id for r in load_requests(path, 3)] == ["0", "1", "2"]
    assert load_requests(path, 3) == load_requests(path, 3)
    assert load_requests(path, 0) == []
    assert len(load_requests(path, 50)) == 10
    jl = write_jsonl(tmp_path, "cf.jsonl", records + ["garbage beyond n"])
    assert [r.case_id for r in load_requests(jl, 4)] == ["0", "1", "2", "3"]
    assert [r.case_id for r in load_requests("builtin", 5)] == [r.case_id for r in builtin_requests()[:5]]
    with pytest.raises(ValueError, match="non-negative"):
        load_requests(path, -1)


def test_empty_list_gives_no_requests(tmp_path):
    assert load_requests(write_json(tmp_path, "empty.json", [])) == []


# ---------------------------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------------------------
def test_csv_round_trip(tmp_path):
    reqs = builtin_requests()[:5] + load_user_edits(write_json(tmp_path, "own.json", [
        {"case_id": "x", "prompt": 'He said "hi", then', "subject": "He", "target_new": "left, quickly",
         "rephrase_prompts": ["Line one\nline two", "Other"]}]))
    for ext in (".csv", ".json", ".jsonl"):
        path = str(tmp_path / f"round{ext}")
        write_user_edits(path, reqs)
        assert load_user_edits(path) == reqs
        assert load_requests(path) == reqs


def test_csv_list_fields_and_errors(tmp_path):
    path = tmp_path / "edits.csv"
    path.write_text("prompt,subject,target_new,locality_prompts,locality_answers,rephrase_prompts\n"
                    "The capital of Japan is,Japan,Kyoto,The capital of Italy is | The capital of Peru is,Rome|Lima,"
                    "Japan's capital is\n", encoding="utf-8")
    (req,) = load_user_edits(str(path))
    assert req.case_id == "0"
    assert req.locality_prompts == ("The capital of Italy is", "The capital of Peru is")
    assert req.locality_answers == ("Rome", "Lima") and req.rephrase_prompts == ("Japan's capital is",)
    path.write_text("prompt,subject\nThe capital of Japan is,Japan\n")
    with pytest.raises(RequestError) as info:
        load_user_edits(str(path))
    assert (info.value.record, info.value.field_name) == ("header", "target_new")
    path.write_text("case_id,prompt,subject,target_new\na,The capital of Japan is,Japan,Kyoto\n"
                    "b,The capital of Peru is,Chile,Quito\n")
    with pytest.raises(RequestError) as info:
        load_user_edits(str(path))
    assert (info.value.record, info.value.field_name) == ("1 (row 3, case_id b)", "subject")
    assert "edits.csv" in str(info.value)


def test_csv_writer_refuses_separator_inside_items():
    req = EditRequest(case_id="1", prompt="A is", subject="A", target_new="b", rephrase_prompts=("x | y",))
    with pytest.raises(DataSourceError, match="contains '|'"):
        requests_to_csv([req])


# ---------------------------------------------------------------------------------------------------------------
# uploads
# ---------------------------------------------------------------------------------------------------------------
def test_parse_user_edits_bytes_formats():
    blob = json.dumps([OWN]).encode()
    assert parse_user_edits_bytes(blob, "mine.json")[0].to_dict() == OWN
    assert parse_user_edits_bytes(blob, "/some/dir/mine.JSON")[0].case_id == "u-1"
    assert parse_user_edits_bytes((json.dumps(CF) + "\n").encode(), "cf.jsonl")[0].target_true == "Paris"
    csv_text = "\ufeffprompt,subject,target_new\nThe capital of Japan is,Japan,Kyoto\n"
    assert parse_user_edits_bytes(csv_text.encode("utf-8"), "e.csv")[0].target_new == "Kyoto"


def test_parse_user_edits_bytes_refuses_unsafe_input():
    import pickle
    with pytest.raises(DataSourceError, match="over the limit"):
        parse_user_edits_bytes(b"[" + b" " * 200 + b"]", "big.json", max_bytes=100)
    with pytest.raises(DataSourceError, match="unsupported file type"):
        parse_user_edits_bytes(pickle.dumps([OWN]), "edits.pkl")
    with pytest.raises(DataSourceError, match="unsupported file type"):
        parse_user_edits_bytes(b"[]", "edits.json.pkl")
    with pytest.raises(DataSourceError, match="edits.json"):
        parse_user_edits_bytes(pickle.dumps([OWN]), "edits.json")
    with pytest.raises(DataSourceError, match="nested too deeply"):
        parse_user_edits_bytes(b"[" * 100_000 + b"]" * 100_000, "deep.json", max_bytes=10 ** 6)
    with pytest.raises(DataSourceError, match="expected the file's bytes"):
        parse_user_edits_bytes("[]", "x.json")  # type: ignore[arg-type]
    with pytest.raises(RequestError) as info:
        parse_user_edits_bytes(json.dumps([dict(OWN, subject="Peru")]).encode(), "/tmp/up/mine.json")
    assert info.value.source == "mine.json" and info.value.field_name == "subject"


def test_parse_bytes_has_no_size_limit_and_the_same_checks():
    blob = json.dumps([OWN] + [dict(OWN, case_id=f"u-{i}") for i in range(2, 40)]).encode()
    assert len(parse_bytes(blob, "mine.json")) == 39 and len(blob) > 1000
    with pytest.raises(DataSourceError, match="over the limit"):
        parse_user_edits_bytes(blob, "mine.json", max_bytes=1000)
    with pytest.raises(DataSourceError, match="unsupported file type"):
        parse_bytes(blob, "mine.pkl")
    with pytest.raises(DataSourceError, match="expected the file's bytes"):
        parse_bytes("[]", "x.json")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# one request from a dict (the playground's form)
# ---------------------------------------------------------------------------------------------------------------
def test_request_from_dict_is_the_schema_loader():
    assert request_from_dict(OWN) == load_user_edits_from(OWN)
    req = request_from_dict({k: v for k, v in OWN.items() if k != "case_id"}, "playground", default_case_id="pg")
    assert req.case_id == "pg" and req.rephrase_prompts == tuple(OWN["rephrase_prompts"])
    with pytest.raises(RequestError) as info:
        request_from_dict(dict(OWN, prompt=""), "playground")
    assert str(info.value) == "playground: record u-1: field 'prompt': empty"
    with pytest.raises(RequestError, match="record edit: field 'subject'"):
        request_from_dict(dict(OWN, subject="Peru"), "playground", label="edit")
    with pytest.raises(RequestError, match=r"field 'rephrase_prompts\[0\]': expected a string"):
        request_from_dict(dict(OWN, rephrase_prompts=[3]), "playground")


def load_user_edits_from(record: dict) -> EditRequest:
    (req,) = parse_bytes(json.dumps([record]).encode(), "one.json")
    return req


# ---------------------------------------------------------------------------------------------------------------
# the registries: readers are independent of the layout, a new layout is one registration
# ---------------------------------------------------------------------------------------------------------------
def test_every_reader_gives_the_same_requests_for_one_layout(tmp_path):
    records = [CF, dict(CF, case_id=8, subject="Eiffel", target_new="Lyon")]
    as_json = load_requests(write_json(tmp_path, "cf.json", records))
    as_jsonl = load_requests(write_jsonl(tmp_path, "cf.jsonl", records))
    path = tmp_path / "cf.csv"
    header = list(CF)
    lines = [",".join(header)] + [",".join(str(r[k]) for k in header) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    as_csv = load_requests("counterfact:" + str(path))
    assert as_json == as_jsonl == as_csv and len(as_json) == 2
    assert data.file_extensions() == (".json", ".jsonl", ".csv")
    assert [lay.name for lay in data.layouts()] == ["schema", "counterfact", "zsre", "counterfact-rome"]


def test_a_registered_layout_is_a_new_source(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_LAYOUTS", dict(data._LAYOUTS))

    @data.register_layout("trivia", title="Trivia QA", prefix="trivia", detect=lambda keys: "question" in keys)
    def _build_trivia(rec, index, label, name, csv_lists):
        return data.make_request(source=name, record=label, case_id=str(index), prompt=rec["question"],
                                 subject=rec["topic"], target_new=rec["answer"])

    path = write_json(tmp_path, "t.json", [{"question": "Who wrote Hamlet? It was", "topic": "Hamlet",
                                            "answer": "Marlowe"}])
    (req,) = load_requests("trivia:" + path)
    assert req.subject == "Hamlet" and req.target_new == "Marlowe"
    assert detect_format({"question": "x"}) == "trivia" and "trivia:" in data.source_prefixes()
    with pytest.raises(RequestError, match="'trivia' records were expected"):
        load_requests("trivia:" + write_json(tmp_path, "own.json", [OWN]))
    with pytest.raises(DataSourceError, match="trivia:PATH"):
        load_requests("wikidata:facts.json")
    with pytest.raises(RequestError, match="or Trivia QA"):
        load_requests(write_json(tmp_path, "odd.json", [{"foo": 1}]))
    with pytest.raises(ValueError, match="already registered"):
        data.register_layout("trivia", title="x", detect=lambda keys: False)(lambda *a: None)


# ---------------------------------------------------------------------------------------------------------------
# built-in sets
# ---------------------------------------------------------------------------------------------------------------
def test_builtin_fact_set():
    reqs = builtin_requests()
    assert len(reqs) >= 100
    assert reqs == load_requests("builtin")
    ids = [r.case_id for r in reqs]
    assert len(set(ids)) == len(ids) and all(i.startswith("bf-") for i in ids)
    assert len({r.relation for r in reqs}) >= 8 and all(r.relation for r in reqs)
    for r in reqs:
        assert r.subject in r.prompt
        assert r.target_true and r.target_new and r.target_new.lower() != r.target_true.lower()
        assert r.rephrase_prompts and len(r.locality_prompts) == len(r.locality_answers) == 1
        assert r.locality_prompts[0] != r.prompt


def test_builtin_probes_are_disjoint_from_fact_subjects():
    probes = builtin_probes()
    assert len(probes) >= 40 and len(set(probes)) == len(probes)
    assert all(isinstance(p, str) and isinstance(a, str) and p and a for p, a in probes)
    subjects = {r.subject for r in builtin_requests()}
    # whole words, so that a subject such as "Mali" would not hit "animal"
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in sorted(subjects)) + r")\b", re.IGNORECASE)
    for prompt, _ in probes:
        assert not pattern.search(prompt), prompt


# ---------------------------------------------------------------------------------------------------------------
# the reference data beside the project (skipped where it is missing)
# ---------------------------------------------------------------------------------------------------------------
def test_shared_counterfact_records():
    path = shared_path("counterfact", "counterfact-train.json")
    reqs = load_requests("counterfact:" + path, 5)
    assert len(reqs) == 5
    for r in reqs:
        assert r.subject in r.prompt and r.target_new and r.target_true
        assert len(r.rephrase_prompts) == 1 and len(r.locality_prompts) == len(r.locality_answers) == 1
    assert load_requests(path, 5) == reqs


def test_shared_zsre_records():
    path = shared_path("zsre", "zsre-800.json")
    reqs = load_requests("zsre:" + path, 5)
    assert len(reqs) == 5
    for r in reqs:
        assert r.subject in r.prompt and r.prompt.endswith("?")
        assert r.locality_prompts[0].startswith("nq question:")
    with pytest.raises(RequestError, match="record 534: field 'alt': empty"):
        load_zsre(path)
