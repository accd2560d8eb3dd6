import json

import pytest

from memupdate.memory.encoding import encode_facts, sequence_length
from memupdate.memory.fact_sets import phonebook_facts
from memupdate.memory.facts import Fact, FactError, check_fact_count, load_facts, write_facts


def write(tmp_path, lines):
    path = tmp_path / "facts.jsonl"  # surrogateescape: "\udcff" becomes the invalid byte 0xff
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    return path


def test_loads_prompt_target_and_text_facts(tmp_path):
    path = write(
        tmp_path,
        [
            json.dumps({"prompt": "Q: capital of Zorbia?\nA:", "target": " Quell"}),
            "",
            json.dumps({"text": "Zorbia exports blue salt."}),
        ],
    )
    facts = load_facts(path)
    assert [f.target for f in facts] == [" Quell", None]
    assert facts[1].text == "Zorbia exports blue salt."
    assert facts[0].source == "facts.jsonl:1" and facts[1].source == "facts.jsonl:3"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "facts.jsonl:2: invalid JSON"),
        (json.dumps({"prompt": "p", "target": ""}), "facts.jsonl:2: `target` is empty"),
        (json.dumps({"prompt": "p", "target": "   "}), "facts.jsonl:2: `target` is empty"),
        (
            json.dumps({"prompt": "p", "target": 5}),
            "facts.jsonl:2: target: Input should be a valid string",
        ),
        (json.dumps({"prompt": "p"}), "facts.jsonl:2: a fact needs `prompt` and `target`"),
        (json.dumps({"prompt": "p", "target": "\x07 5"}), "`target` contains control characters"),
        ("\udcff", "facts.jsonl:2: not UTF-8 text"),
        (json.dumps({"prompt": "p", "target": "t", "text": "x"}), "facts.jsonl:2: give either"),
        (
            json.dumps({"prompt": "p", "target": "t", "extra": 1}),
            "facts.jsonl:2: extra: Extra inputs",
        ),
        (
            json.dumps({"prompt": "p", "target": "t", "source": "mine"}),
            "facts.jsonl:2: source: Extra inputs",
        ),
        (json.dumps(["p", "t"]), "facts.jsonl:2: expected a JSON object, got list"),
        (
            json.dumps({"prompt": "p", "target": "t", "questions": "why?"}),
            "facts.jsonl:2: questions: Input should be a list",
        ),
        (
            json.dumps({"prompt": "p", "target": "t", "questions": ["ok?", " "]}),
            "`questions[1]` is empty",
        ),
        (
            json.dumps({"prompt": "p", "target": "t", "paraphrases": ["a\x00b"]}),
            "`paraphrases[0]` contains control characters (U+0000)",
        ),
        (
            json.dumps({"prompt": "p", "target": "t", "paraphrases": ["x"] * 33}),
            "`paraphrases`: 33 given, the limit is 32",
        ),
        (
            json.dumps({"text": "some text", "questions": ["q?"]}),
            "`paraphrases` and `questions` need `prompt` + `target`",
        ),
    ],
)
def test_bad_lines_are_named_and_nothing_is_returned(tmp_path, line, message):
    path = write(tmp_path, [json.dumps({"prompt": "ok", "target": " fine"}), line])
    with pytest.raises(FactError) as err:
        load_facts(path)
    assert message in str(err.value)
    assert "nothing trained" in str(err.value)


def test_every_bad_line_is_reported(tmp_path):
    path = write(tmp_path, ["{", json.dumps({"prompt": "p", "target": ""}), "[1]"])
    with pytest.raises(FactError) as err:
        load_facts(path)
    text = str(err.value)
    assert text.startswith("3 bad fact(s)")
    assert all(f"facts.jsonl:{n}:" in text for n in (1, 2, 3))


def test_fact_limit_and_empty_inputs(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": f"p{i}", "target": " t"}) for i in range(5)])
    with pytest.raises(FactError, match="more than the limit of 3 facts"):
        load_facts(path, max_facts=3)
    with pytest.raises(FactError, match="no facts in the file"):
        load_facts(write(tmp_path, [""]))
    with pytest.raises(FactError, match="no such file"):
        load_facts(tmp_path / "missing.jsonl")
    with pytest.raises(FactError, match="exceed the limit"):
        check_fact_count(phonebook_facts(4), max_facts=3)


def test_prompt_is_tokenized_alone_and_target_appended(tiny):
    _, tok = tiny
    fact = Fact(prompt="The phone number of Ada Bauer is", target=" 1234567890")
    [enc] = encode_facts([fact], tok, 256)
    assert list(enc.prompt_ids) == tok(fact.prompt)["input_ids"]
    assert tok.decode(list(enc.target_ids)) == fact.target
    assert enc.input_ids == list(enc.prompt_ids) + list(enc.target_ids)


def test_text_fact_targets_all_tokens_but_the_first(tiny):
    _, tok = tiny
    [enc] = encode_facts([Fact(text="Once upon a time")], tok, 256)
    ids = tok("Once upon a time")["input_ids"]
    assert list(enc.prompt_ids) == ids[:1] and list(enc.target_ids) == ids[1:]
    assert sequence_length([enc]) == len(ids) - 1


def test_contradiction_is_rejected_naming_both_facts(tiny):
    _, tok = tiny
    facts = [
        Fact(prompt="Ada's number is", target=" 111", source="f.jsonl:1"),
        Fact(prompt="Ada's number is", target=" 222", source="f.jsonl:7"),
    ]
    with pytest.raises(FactError, match="f.jsonl:7: contradicts f.jsonl:1"):
        encode_facts(facts, tok, 256)


def test_exact_duplicates_are_kept_once(tiny):
    _, tok = tiny
    fact = Fact(prompt="Ada's number is", target=" 111")
    assert len(encode_facts([fact, fact], tok, 256)) == 1


def test_fact_longer_than_context_is_rejected(tiny):
    _, tok = tiny
    long = Fact(prompt="a " * 300, target=" b", source="f.jsonl:3")
    with pytest.raises(FactError, match="f.jsonl:3: .* longer than the model's context of 256"):
        encode_facts([long], tok, 256)


def test_sequence_length_counts_target_tokens_only(tiny):
    _, tok = tiny
    facts = encode_facts(phonebook_facts(5, seed=2), tok, 256)
    assert sequence_length(facts) == sum(
        len(tok(f.target, add_special_tokens=False)["input_ids"])
        for f in phonebook_facts(5, seed=2)
    )


def test_phonebook_is_seeded_and_unique():
    a, b = phonebook_facts(300, seed=7), phonebook_facts(300, seed=7)
    assert a == b and a != phonebook_facts(300, seed=8)
    assert len({f.prompt for f in a}) == 300
    assert all(len(f.target) == 11 and f.target[1:].isdigit() for f in a)
    assert len({f.prompt for f in phonebook_facts(4000, seed=1)}) == 4000  # past the name pairs


def test_fact_sets_are_seeded_distinct_and_counterfactuals_really_change(tmp_path):
    from memupdate.memory.fact_sets import KINDS, _places

    for kind, make in KINDS.items():
        facts = make(60, seed=3)
        assert len(facts) == 60, kind
        assert facts == make(60, seed=3) and facts != make(60, seed=4), kind
        assert len({f.prompt for f in facts}) == 60, kind
    countries, _ = _places()
    capital = {f"The capital of {c['name']} is": f" {c['capital']}" for c in countries}
    changed = KINDS["counterfactual"](300, seed=0)
    assert sum(f.prompt in capital for f in changed) >= 200  # capitals first, then cities
    assert all(capital.get(f.prompt, "") != f.target for f in changed)
    # Past the countries, cities move to another country; many cities share a country, and
    # 1,500 facts (calibration sizes) come back at once, one per city name.
    _, cities = _places()
    country = {c["iso"]: c["name"] for c in countries}
    truth: dict[str, str] = {}
    for c in cities:
        prompt = f"The city of {c['name']} is located in the country of"
        truth.setdefault(prompt, f" {country.get(c['countrycode'])}")
    many = KINDS["counterfactual"](1500, seed=0)
    moved = [f for f in many if f.prompt in truth]
    assert len(many) == 1500 == len({f.prompt for f in many}) and len(moved) > 1000
    assert all(truth[f.prompt] != f.target for f in moved)
    # Written and read back as a fact file, through the command line.
    from memupdate.cli import main
    from memupdate.memory.facts import load_facts

    out = tmp_path / "bio.jsonl"
    assert main(["fact-set", "biography", "--count", "5", "--out", str(out)]) == 0
    assert [f.target for f in load_facts(out)] == [f.target for f in KINDS["biography"](5)]


def test_forms_survive_a_write_and_a_read(tmp_path):
    fact = Fact(prompt="p", target=" t", paraphrases=("q",), questions=("What is p?",))
    write_facts([fact, Fact(text="plain text")], tmp_path / "out.jsonl")
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == {"text": "plain text"}  # no empty fields written
    again = load_facts(tmp_path / "out.jsonl")
    assert again[0].paraphrases == ("q",) and again[0].questions == ("What is p?",)


def test_paraphrases_are_sequences_with_the_same_target(tiny):
    model, tok = tiny
    fact = Fact(prompt="The code of Ada is", target=" 42", paraphrases=("Ada's code is",))
    prompt, para = encode_facts([fact], tok, 512)  # the tiny model has no chat template
    assert (prompt.form, para.form) == ("prompt", "paraphrase")
    assert para.target_ids == prompt.target_ids
    assert para.prompt_ids == tuple(tok("Ada's code is")["input_ids"])
    assert para.source == "fact paraphrase 1" and para.asked == "Ada's code is"
    assert sequence_length([prompt, para]) == 2 * len(prompt.target_ids)
    with pytest.raises(FactError, match="`questions` given, but the base model has no chat"):
        encode_facts([Fact(prompt="p", target=" t", questions=("q?",))], tok, 512)


def test_a_paraphrase_that_is_another_facts_prompt_with_another_target_is_refused(tiny):
    _, tok = tiny
    facts = [
        Fact(prompt="Ada's code is", target=" 7", source="a"),
        Fact(prompt="The code of Ada is", target=" 42", paraphrases=("Ada's code is",), source="b"),
    ]
    with pytest.raises(FactError, match="b paraphrase 1: contradicts a"):
        encode_facts(facts, tok, 512)
