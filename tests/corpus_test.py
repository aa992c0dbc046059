import json
import math
import random
import re
import statistics

import pytest

from components import corpus
from components.corpus import __main__ as cli
from components.corpus import en, zh
from components.corpus.grammar import check_prefix_free
from conftest import run_cli

N = 10_000


@pytest.fixture(scope="module", params=corpus.LANGS)
def stories(request):
    return request.param, corpus.sample(N, seed=7, langs=(request.param,))


def test_every_sample_round_trips_exactly(stories):
    lang, samples = stories
    for story in samples:
        result = corpus.accept(story["prompt"], story["story"], lang)
        assert result.accepted, (result.reason, story)
        assert abs(result.log_prob - story["log_prob"]) < 1e-9
        assert abs(result.prompt_log_prob - story["prompt_log_prob"]) < 1e-9


def test_derivation_is_the_sampled_one():
    from components.corpus.grammar import Derivation, parse

    rng = random.Random(3)
    for lang, fn in corpus.STORY_FUNCTIONS.items():
        for _ in range(50):
            sampled = Derivation(rng=rng)
            fn(sampled)
            assert parse(fn, sampled.story).choices == sampled.choices


def test_lengths_and_entropy(stories):
    lang, samples = stories
    if lang == "zh":
        lengths = [len(s["prompt"] + s["story"]) for s in samples]
        assert 150 <= min(lengths) and max(lengths) <= 600
    else:
        words = [len((s["prompt"] + " " + s["story"]).split()) for s in samples]
        assert 100 <= min(words) and max(words) <= 400
    assert statistics.mean(-s["log_prob"] / math.log(2) for s in samples) >= 40


def test_tags_and_ids(stories):
    lang, samples = stories
    assert {tuple(s["tags"]) for s in samples} == {("fairy_tale",), ("fable",)}
    assert len({s["id"] for s in samples}) == len(samples)


def test_the_genre_is_chosen_at_the_ending_apart_from_the_hero(stories):
    lang, samples = stories
    grammar = {"zh": zh, "en": en}[lang]
    fables = [s for s in samples if s["tags"] == ["fable"]]
    assert abs(len(fables) / len(samples) - 0.5) < 0.02  # GENRES' share, within 4 sigma
    for s in samples:
        has_moral = any(intro in s["story"][-120:] for intro in grammar.MORAL_INTROS)
        assert has_moral == (s["tags"] == ["fable"]), s["story"]
        assert corpus.accept(s["prompt"], s["story"], lang).tags == s["tags"]
    # Every hero's opening is followed by stories of both genres.
    genres_by_opening_hero = {}
    for s in samples:
        hero = s["prompt"].split("，名叫" if lang == "zh" else " named ")[0].split(" called ")[0][-8:]
        genres_by_opening_hero.setdefault(hero, set()).update(s["tags"])
    assert len(genres_by_opening_hero) >= 20
    assert all(genres == {"fable", "fairy_tale"} for genres in genres_by_opening_hero.values())


def test_sampling_is_deterministic_and_alternates_languages():
    assert corpus.sample(20, seed=5) == corpus.sample(20, seed=5)
    assert corpus.sample(20, seed=5) != corpus.sample(20, seed=6)
    assert [s["lang"] for s in corpus.sample(4, seed=5)] == ["zh", "en", "zh", "en"]


def test_the_opening_comes_back():
    """Long-range consistency: the hero's name opens the continuation and returns at the end,
    and the helper who gives the object is the one who appeared."""
    for story in corpus.sample(200, seed=11):
        name = re.search(r"(?:名叫|named |called )(\w+)", story["prompt"]).group(1)
        assert story["story"].startswith(name)
        assert story["story"].count(name) >= 5


def _sentences(lang, text):
    return re.findall(r"[^。！？]+[。！？]”?", text) if lang == "zh" else re.findall(r"[^.!?]+[.!?]”?(?: |$)", text)


def _perturbations(story, rng):
    lang, text = story["lang"], story["story"]
    name = re.search(r"(?:名叫|named |called )(\w+)", story["prompt"]).group(1)
    names = zh.NAMES if lang == "zh" else en.NAMES
    other = next(n for group in names.values() for n in group if n != name and name not in n and n not in name)
    half = len(text) // 2
    yield "renamed halfway", text[:half] + text[half:].replace(name, other)
    sentences = _sentences(lang, text)
    assert "".join(sentences) == text
    i = rng.randrange(1, len(sentences) - 1)
    yield "sentence dropped", "".join(sentences[:i] + sentences[i + 1:])
    j = rng.randrange(0, len(sentences) - 1)
    yield "sentences swapped", "".join(sentences[:j] + [sentences[j + 1], sentences[j]] + sentences[j + 2:])
    k = rng.randrange(half // 2, half)
    yield "word changed", text[:k] + ("某" if lang == "zh" else " zebra ") + text[k + 1:]


def test_perturbed_stories_are_rejected():
    rng = random.Random(0)
    for story in corpus.sample(400, seed=13):
        for kind, text in _perturbations(story, rng):
            result = corpus.accept(story["prompt"], text, story["lang"])
            assert not result.accepted and result.reason, (kind, text)


def test_wrong_prompt_boundary_and_language():
    story = corpus.sample(1, seed=2, langs=("zh",))[0]
    cut = story["prompt"][:-1]
    assert not corpus.accept(cut, story["prompt"][-1] + story["story"], "zh").accepted
    assert not corpus.accept(story["prompt"], story["story"], "en").accepted
    assert corpus.accept(story["prompt"], story["story"]).accepted  # language found by trying both


def test_choice_points_are_prefix_free():
    with pytest.raises(ValueError, match="prefix-free"):
        check_prefix_free(["Ann", "Anna"])
    check_prefix_free(["Anna", "Annie"])


def test_entropy_estimate_agrees_with_a_fresh_sample():
    for lang in corpus.LANGS:
        estimate = cli.entropy(lang, 5000, seed=1)
        fresh = corpus.sample(5000, seed=99, langs=(lang,))
        mean_bits = statistics.mean(-s["log_prob"] / math.log(2) for s in fresh)
        low, high = estimate["story"]["bits_per_story_95"]
        # The fresh mean has its own sampling error: allow the two intervals' combined width
        # (and float rounding: every English story has the same probability, a zero-width interval).
        slack = high - low + 1e-9
        assert low - slack <= mean_bits <= high + slack
        conditional = estimate["continuation_given_prompt"]
        assert conditional["bits_per_story"] < estimate["story"]["bits_per_story"]
        assert 0 < conditional["bits_per_char"] < 1
        # Told the genre (a fair coin, apart from the prompt), a story holds one bit less.
        told = estimate["continuation_given_prompt_and_genre"]
        assert told["bits_per_story"] == pytest.approx(conditional["bits_per_story"] - 1)


def test_cli(tmp_path):
    sampled = run_cli("components.corpus", "sample", "--lang", "zh", "--n", "3", "--seed", "1")
    records = [json.loads(line) for line in sampled.stdout.splitlines()]
    assert [set(r) for r in records] == [{"prompt", "story", "lang", "tags", "log_prob"}] * 3
    assert records[0]["prompt"] == corpus.sample(1, seed=1, langs=("zh",))[0]["prompt"]
    path = tmp_path / "s.jsonl"
    path.write_text(sampled.stdout + json.dumps({"prompt": "从前有座山。", "story": "完。"}, ensure_ascii=False) + "\n")
    accepted = json.loads(run_cli("components.corpus", "accept", str(path)).stdout)
    assert accepted["records"] == 4 and accepted["accepted"] == 3 and accepted["fraction"] == 0.75
    assert sum(accepted["rejected_by_reason"].values()) == 1
    text = run_cli("components.corpus", "sample", "--n", "2", "--format", "text").stdout
    assert "从前" in text or "很久" in text
    entropy = json.loads(run_cli("components.corpus", "entropy", "--lang", "en", "--n", "200").stdout)
    assert entropy["story"]["bits_per_story"] > 40
    missing = run_cli("components.corpus", "accept", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 1 and missing.stderr.startswith("python -m components.corpus: error: Cannot read")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    bad = run_cli("components.corpus", "accept", str(tmp_path / "bad.jsonl"))
    assert bad.returncode == 1 and "bad.jsonl:1 is not a JSON object" in bad.stderr
    unknown = run_cli("components.corpus", "shuffle")
    assert unknown.returncode == 1 and unknown.stderr.strip().endswith("Give a command: sample, entropy, accept (see --help).")
    assert run_cli("components.corpus", "sample", "--nosuchflag").returncode == 2
