"""Command line of the built-in corpus.

    python -m components.corpus sample [--lang zh] [--n 5] [--seed 1] [--format text]
    python -m components.corpus entropy --lang zh [--n 20000]
    python -m components.corpus accept FILE.jsonl
"""

import collections
import json
import math

from absl import flags

from components import cli, corpus
from components.common import UserError
from components.corpus.grammar import GENRES

LN2 = math.log(2)


def entropy(lang: str, n: int, seed: int) -> dict:
    """Monte Carlo estimates, with 95% intervals, of the entropy of whole stories, of the
    continuation given the prompt, and given the prompt and the genre (what a prompt tagged
    with it tells): the mean of -log2 p over n samples, per story and per character (a ratio
    of means, its interval by the delta method)."""
    stories = corpus.sample(n, seed=seed, langs=(lang,))
    separator = corpus.SEPARATORS[lang]
    whole = [(-s["log_prob"] / LN2, len(s["prompt"] + separator + s["story"])) for s in stories]
    continuation = [(-(s["log_prob"] - s["prompt_log_prob"]) / LN2, len(s["story"])) for s in stories]
    given_genre = [(bits + math.log2(GENRES[s["tags"][0]]), chars) for (bits, chars), s in zip(continuation, stories)]
    return {"lang": lang, "n": n, "seed": seed, "story": _estimate(whole),
            "continuation_given_prompt": _estimate(continuation),
            "continuation_given_prompt_and_genre": _estimate(given_genre)}


def _estimate(pairs):
    n = len(pairs)
    bits = [b for b, _ in pairs]
    chars = [c for _, c in pairs]
    mean_bits, mean_chars = sum(bits) / n, sum(chars) / n
    var_bits = sum((b - mean_bits) ** 2 for b in bits) / (n - 1)
    ratio = mean_bits / mean_chars
    # Delta method for a ratio of means: the variance of (bits - ratio * chars) / mean_chars.
    var_ratio = sum((b - ratio * c) ** 2 for b, c in pairs) / (n - 1) / mean_chars ** 2
    half, half_ratio = 1.96 * math.sqrt(var_bits / n), 1.96 * math.sqrt(var_ratio / n)
    return {"bits_per_story": mean_bits, "bits_per_story_95": [mean_bits - half, mean_bits + half],
            "bits_per_char": ratio, "bits_per_char_95": [ratio - half_ratio, ratio + half_ratio],
            "chars_per_story": mean_chars}


def accept_file(path: str) -> dict:
    total = accepted = 0
    reasons = collections.Counter()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt, story, lang = record["prompt"], record["story"], record.get("lang")
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{number} is not a JSON object with 'prompt' and 'story'.") from None
            total += 1
            result = corpus.accept(prompt, story, lang)
            if result.accepted:
                accepted += 1
            else:
                # Group reasons by their kind, without the positions.
                reasons[result.reason.split(" at character")[0]] += 1
    return {"records": total, "accepted": accepted, "fraction": accepted / total if total else 0.0,
            "rejected_by_reason": dict(reasons.most_common())}


COMMANDS = ("sample", "entropy", "accept")
# Each command's default sample size and seed (an entropy estimate needs many samples).
DEFAULT_N = {"sample": 5, "entropy": 20000}
DEFAULT_SEED = {"sample": 1, "entropy": 12345}


def define_flags():
    flags.DEFINE_enum("lang", None, corpus.LANGS, "One language (sample: default both, alternating; entropy: "
                      "required).")
    flags.DEFINE_integer("n", None, "Stories to sample (default: sample 5, entropy 20000).", lower_bound=1)
    flags.DEFINE_integer("seed", None, "Sampling seed (default: sample 1, entropy 12345).")
    flags.DEFINE_enum("format", "json", ("json", "text"), "sample: one JSON object per line, or readable text.")


def main(args: list[str]):
    if not args or args[0] not in COMMANDS:
        raise UserError(f"Give a command: {', '.join(COMMANDS)} (see --help).")
    command, rest = args[0], args[1:]
    if (command == "accept") != bool(rest):
        raise UserError("accept takes one FILE.jsonl; sample and entropy take only flags.")
    options = flags.FLAGS
    n = options.n if options.n is not None else DEFAULT_N.get(command)
    seed = options.seed if options.seed is not None else DEFAULT_SEED.get(command)
    if command == "sample":
        for story in corpus.sample(n, seed=seed, langs=(options.lang,) if options.lang else corpus.LANGS):
            if options.format == "json":
                record = {k: story[k] for k in ("prompt", "story", "lang", "tags", "log_prob")}
                print(json.dumps(record, ensure_ascii=False))
            else:
                print(f"[{story['id']}] {' '.join(story['tags'])}, log p = {story['log_prob']:.2f}\n"
                      f"{story['prompt']}{corpus.SEPARATORS[story['lang']]}{story['story']}\n")
    elif command == "entropy":
        if options.lang is None or n < 2:
            raise UserError("entropy needs --lang and --n of at least 2.")
        print(json.dumps(entropy(options.lang, n, seed), indent=2))
    else:
        try:
            print(json.dumps(accept_file(rest[0]), ensure_ascii=False, indent=2))
        except OSError as e:
            raise UserError(f"Cannot read {rest[0]}: {e.strerror}.") from None


if __name__ == "__main__":
    define_flags()
    cli.run(main, max_args=2, usage="COMMAND [FILE]", uses_tensorflow=False)
