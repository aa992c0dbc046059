import os

from components import pusher


def make_saved_model(path, content="graph"):
    os.makedirs(os.path.join(path, "variables"), exist_ok=True)
    with open(os.path.join(path, "saved_model.pb"), "w") as f:
        f.write(content)
    return str(path)


def test_push_numbers_versions_and_keeps_old_ones(tmp_path):
    first = make_saved_model(tmp_path / "a", "one")
    second = make_saved_model(tmp_path / "b", "two")
    serving = tmp_path / "serving"
    assert pusher.push(first, str(serving), "storygen") == {"version": 1, "path": str(serving / "storygen" / "1")}
    assert pusher.push(second, str(serving), "storygen")["version"] == 2
    assert (serving / "storygen" / "1" / "saved_model.pb").read_text() == "one"
    assert (serving / "storygen" / "2" / "saved_model.pb").read_text() == "two"
    assert sorted(os.listdir(serving / "storygen")) == ["1", "2"]  # no staging folder left behind
    assert pusher.versions(str(serving / "storygen")) == [1, 2]


def test_versions_ignore_staging_and_other_names(tmp_path):
    base = tmp_path / "m"
    for name in ("3", ".tmp-4-123", "10", "latest"):
        (base / name).mkdir(parents=True)
    assert pusher.versions(str(base)) == [3, 10]
    assert pusher.push(make_saved_model(tmp_path / "x"), str(tmp_path), "m")["version"] == 11
    assert pusher.versions(str(tmp_path / "missing")) == []
