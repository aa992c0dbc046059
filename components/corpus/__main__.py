"""Command line of the built-in corpus.

    python -m components.corpus sample --lang zh --n 5 --seed 1 [--format text]
    python -m components.corpus entropy --lang zh --n 20000
    python -m components.corpus accept FILE.jsonl
"""

import argparse
import collections
import json
import math
import sys

from components import corpus

LN2 = math.log(2)


def entropy(lang: str, n: int, seed: int) -> dict:
    """Monte Carlo estimates, with 95% intervals, of the entropy of whole stories and of the
    continuation given the prompt: the mean of -log2 p over n samples, per story and per
    character (a ratio of means, its interval by the delta method)."""
    stories = corpus.sample(n, seed=seed, langs=(lang,))
    separator = corpus.SEPARATORS[lang]
    whole = [(-s["log_prob"] / LN2, len(s["prompt"] + separator + s["story"])) for s in stories]
    continuation = [(-(s["log_prob"] - s["prompt_log_prob"]) / LN2, len(s["story"])) for s in stories]
    return {"lang": lang, "n": n, "seed": seed, "story": _estimate(whole), "continuation_given_prompt": _estimate(continuation)}


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
                raise SystemExit(f"error: {path}:{number} is not a JSON object with 'prompt' and 'story'.")
            total += 1
            result = corpus.accept(prompt, story, lang)
            if result.accepted:
                accepted += 1
            else:
                # Group reasons by their kind, without the positions.
                reasons[result.reason.split(" at character")[0]] += 1
    return {"records": total, "accepted": accepted, "fraction": accepted / total if total else 0.0,
            "rejected_by_reason": dict(reasons.most_common())}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m components.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="print sampled stories")
    sample.add_argument("--lang", choices=corpus.LANGS, default=None, help="one language (default: both, alternating)")
    sample.add_argument("--n", type=int, default=5)
    sample.add_argument("--seed", type=int, default=1)
    sample.add_argument("--format", choices=("json", "text"), default="json")
    estimate = commands.add_parser("entropy", help="estimate the entropy per story and per character")
    estimate.add_argument("--lang", choices=corpus.LANGS, required=True)
    estimate.add_argument("--n", type=int, default=20000)
    estimate.add_argument("--seed", type=int, default=12345)
    check = commands.add_parser("accept", help="the fraction of a JSONL file's records that the grammar accepts")
    check.add_argument("file")
    args = parser.parse_args(argv)

    if args.command == "sample":
        for story in corpus.sample(args.n, seed=args.seed, langs=(args.lang,) if args.lang else corpus.LANGS):
            if args.format == "json":
                record = {k: story[k] for k in ("prompt", "story", "lang", "tags", "log_prob")}
                print(json.dumps(record, ensure_ascii=False))
            else:
                print(f"[{story['id']}] {' '.join(story['tags'])}, log p = {story['log_prob']:.2f}\n"
                      f"{story['prompt']}{corpus.SEPARATORS[story['lang']]}{story['story']}\n")
    elif args.command == "entropy":
        if args.n < 2:
            parser.error("--n must be at least 2")
        print(json.dumps(entropy(args.lang, args.n, args.seed), indent=2))
    else:
        try:
            print(json.dumps(accept_file(args.file), ensure_ascii=False, indent=2))
        except OSError as e:
            sys.exit(f"error: cannot read {args.file}: {e.strerror}.")


if __name__ == "__main__":
    main()
