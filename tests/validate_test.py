import pytest

from components.validate import Quarantine, RecordValidator, load_schema


@pytest.fixture(scope="module")
def validator():
    return RecordValidator(load_schema(), max_chars=50)


def test_schema_lists_the_example_record():
    schema = load_schema()
    assert [f.name for f in schema.feature] == ["story", "prompt", "title", "lang", "tags", "source", "id", "ends_story"]
    story = schema.feature[0]
    assert story.presence.min_fraction == 1.0


@pytest.mark.parametrize("record, reason", [
    ({"story": "A fox. A hen."}, None),
    ({"story": "A fox.", "prompt": "", "lang": "en", "tags": ["fable", "short"]}, None),
    ({"prompt": "only a prompt"}, "missing required field 'story'"),
    ({"story": ""}, "required field 'story' is empty"),
    ({"story": ["a", "b"]}, "field 'story' has 2 values, at most 1 allowed"),
    ({"story": 3}, "field 'story' must be a string, not int"),
    ({"story": "x" * 51}, "field 'story' is longer than 50 characters"),
    ({"story": "a\x00b"}, "field 'story' contains control characters"),
    ({"story": "ok", "lang": "fr"}, "field 'lang' is 'fr', not one of ['en', 'other', 'zh']"),
    ({"story": "ok", "tags": [1]}, "field 'tags' must be a string, not int"),
    ({"story": "ok", "author": "me"}, "unknown field 'author'"),
])
def test_check(validator, record, reason):
    assert validator.check(record) == reason


def test_quarantine_writes_only_when_needed(tmp_path):
    path = tmp_path / "q.jsonl"
    quarantine = Quarantine(str(path))
    quarantine.close()
    assert not path.exists()
    quarantine = Quarantine(str(path))
    quarantine.add("bad", "f.jsonl:3", {"story": ""})
    quarantine.close()
    assert path.read_text() == '{"reason": "bad", "location": "f.jsonl:3", "record": {"story": ""}}\n'
    assert quarantine.count == 1
