"""Chemistry and general definition-retrieval triples from GCIDE, for benchmarks that need more than data/.

The GNU Collaborative International Dictionary of English labels about 3,400 senses "(Chem.)". Each
chemistry term becomes a query ("Instruct: Given a chemistry term, ...\\nQuery: <term>") whose positive
is its definition and whose hard negative is the most similar (TF-IDF cosine) definition of another
term in the same split; general triples come the same way from senses with no subject label. Terms are
split at random into calibration and held-out files, so no term (and no definition) is shared.

GCIDE is GPL-licensed, so the files are generated on demand, never shipped. This script installs
nothing; the dictionary comes from Debian/Ubuntu:

    sudo apt-get install dict-gcide
    python benchmarks/gcide_triples.py                 # writes output/gcide/*.json

Writes chem-calibration.json, chem-heldout.json, general-calibration.json, general-heldout.json and
stats.json to --output_dir, and prints that directory.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import random
import re
import statistics
import sys
from collections import Counter

import numpy as np

from gaprune.fileio import write_json

log = logging.getLogger("gcide_triples")

DEFAULT_DICT = "/usr/share/dictd/gcide.dict.dz"
PREFIXES = {
    "chem": "Instruct: Given a chemistry term, retrieve its dictionary definition.\nQuery: ",
    "general": "Instruct: Given a word, retrieve its dictionary definition.\nQuery: ",
}
MIN_WORDS, MAX_WORDS = 6, 80
NEGATIVE_MAX_SIMILARITY = 0.9  # a near-copy of the positive (variant spellings share definitions) is no negative

B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
SOURCE_TAG = re.compile(r"\[(?:1913 Webster|Webster 1913|PJC|WordNet|Century|Webster|AS|RN|MW|JC|JLS|F\.?W\.?|"
                        r"DOE|Chambers|Prov\.)[^\]]*\].*$")
LABEL_TEXT = r"[A-Z][A-Za-z. &,]{1,40}"
LABEL = re.compile(r"^\((" + LABEL_TEXT + r")\)\s*")
INNER_LABEL = re.compile(r"\((?:[A-Z][a-z]*\.\s*(?:&\s*|,\s*)?)+\)\s*(?=[A-Z])")  # "(Zool.) A ..." mid-text
# GCIDE writes accented letters as markup: [a^], ['e], [=o], ["o], [ae], [imac], [asl] ...
ACCENT = re.compile(r"\[(?:[`'\"=^~.*,-]([a-zA-Z]{1,2})|([a-zA-Z]{1,2})\^|(ae|oe|AE|OE))\]")
NAMED_ACCENTS = {"imac": "i", "asl": "a", "aum": "a", "add": "a", "udd": "u", "eth": "th", "thorn": "th",
                 "yogh": "y", "ng": "ng", "th": "th", "deg": " degrees", "alpha": "alpha", "beta": "beta"}
SENSE_NUMBER = re.compile(r"^(?:\d+\.|\([a-z]\))\s*")
POINTER = re.compile(r"^(?:See|Same as|Pl\. of|Alt\. of|p\. p\.|imp\.|Obs\.|pl\.)", re.IGNORECASE)
WORD = re.compile(r"[a-z0-9]+")


def decode_b64(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + B64[char]
    return value


def unaccent(text: str) -> str:
    """Accent markup → its plain letters, so that labels such as (Zo["o]l.) read (Zool.)."""
    text = ACCENT.sub(lambda m: m.group(1) or m.group(2) or m.group(3), text)
    return re.sub(r"\[(" + "|".join(NAMED_ACCENTS) + r")\]", lambda m: NAMED_ACCENTS[m.group(1)], text)


def read_entries(dict_path: str) -> list[tuple[str, str]]:
    """(headword, raw entry text) for every index line, in dictionary order."""
    index_path = re.sub(r"\.dict(\.dz)?$", ".index", dict_path)
    with gzip.open(dict_path, "rb") as handle:
        body = handle.read()
    entries = []
    with open(index_path, encoding="utf-8") as handle:
        for line in handle:
            headword, offset, length = line.rstrip("\n").split("\t")[:3]
            if headword.startswith("00-database"):
                continue
            start = decode_b64(offset)
            entries.append((headword, unaccent(body[start:start + decode_b64(length)].decode("utf-8", "replace"))))
    return entries


def clean(text: str) -> str:
    text = SOURCE_TAG.sub("", text)
    text = re.sub(r"\s--\s*\{[^{}]*[\"*`][^{}]*\}.*$", "", text)  # run-on derivatives: "-- {Zy`mo*lyt"ic}, a."
    text = re.sub(r"\s--\s*(?:n|a|adj|adv|v)\.(?:\s.*)?$", "", text)  # run-on senses of another part of speech
    text = re.sub(r"\s--\s?[A-Z][^\s]*.*$", "", text)  # "--Author." citations run to the end of a sense
    text = re.sub(r"\[(?:R\.|Obs\.|Archaic|Colloq\.|Rare|Eng\.|U\. S\.|Prov\. Eng\.|Local|Written|Also|Sometimes|Formerly|Obsoles)[^\]]*\]", "", text,
                  flags=re.IGNORECASE)
    text = re.sub(r"\[\d\]", "", text)  # homograph numbers, as in {deaden}[3]
    text = re.sub(r"\[[^\[\]]{0,80}\]", "", text)  # usage notes, leftover etymologies
    text = re.sub(r"^\s*(?:\(pl\.[^)]*\)|(?:adj|adv|n|a|v|or|prep|conj)\.(?=\s))\s*", "", text)
    text = re.sub(r'\s"[^"]*"', "", text)  # quotations
    text = text.replace("{", "").replace("}", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip(" ;,")


def strip_header(block: str) -> str:
    """The first block without headword, pronunciations, part of speech, inflections and etymologies."""
    parts = block.split("\\")
    text = parts[-1] if len(parts) >= 3 else block  # "Term \pro*nun\, n. ..." → ", n. ..."
    header_bits = [
        r"[\s,;.:&]+",
        r"\((?!" + LABEL_TEXT + r"\)|[a-z]\))[^()]*\)",  # a second pronunciation, "(gras`)"; not "(Bot.)", "(a)"
        r"(?:sing|pl|imp|p|pr|superl|compar|fem|masc)\.\s*\{[^{}]*\}",  # "pl. {Lice}", "sing. {Seneca}"
        r"(?:prop|peop|n|a|adj|adv|v|t|i|pl|prep|conj|interj|pron|imp|p|pr|vb|sing|superl|compar|fem|masc)\."
        r"(?=[\s,;\[]|$)",
        r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]",  # etymologies, nested one level
    ]
    pattern = re.compile("^(?:" + "|".join(header_bits) + ")")
    while match := pattern.match(text):
        text = text[match.end():]
    return text


def senses(entry: str) -> list[tuple[str | None, str]]:
    """(subject label or None, cleaned definition) for each sense of one entry."""
    blocks = [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", entry)]
    blocks = [b for b in blocks if b]
    if not blocks:
        return []
    header_label = None
    first = strip_header(blocks[0])
    numbered = re.search(r"(?:^|\s)1\.\s", first[:200])  # plural forms etc. before a first numbered sense
    if numbered:
        first = first[numbered.start():].strip()
    match = LABEL.match(first)
    if match:
        header_label, first = match.group(1), first[match.end():]
    result = []
    for index, block in enumerate([first, *blocks[1:]]):
        if index > 0 and not SENSE_NUMBER.match(block):
            continue  # synonyms notes, usage notes, compound terms
        block = SENSE_NUMBER.sub("", block)
        label = header_label
        while match := LABEL.match(block):  # some senses repeat their label: "(Chem.) (Chem.) formed ..."
            label, block = match.group(1), block[match.end():]
        text = clean(block)
        if text:
            result.append((label, text))
    return result


def usable(definition: str) -> bool:
    words = definition.split()
    # "?" stands for characters GCIDE lost (Greek, subscripts as in "C?H?O?"); brackets left over mean bad parsing
    balanced = definition.count("(") == definition.count(")") and not re.search(r"[\[\]{}?]", definition)
    # no final stop: a sense cut by a stray blank line, or the next headword run in ("... ferric acid. Ferre")
    return (MIN_WORDS <= len(words) <= MAX_WORDS and balanced and not POINTER.match(definition)
            and not definition.startswith("--") and definition.endswith((".", ".)", "!")))


def collect(entries: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str], Counter]:
    """term → definition for chemistry senses and for unlabelled senses of terms without one."""
    chem: dict[str, str] = {}
    general: dict[str, str] = {}
    counts: Counter = Counter()
    for headword, entry in entries:
        term = entry.split("\\", 1)[0].strip()
        if term.lower() != headword.strip().lower() or not re.fullmatch(r"[A-Za-z][A-Za-z' -]*[a-z]", term):
            continue  # index lines for alternative forms point at the main entry
        for label, definition in senses(entry):
            if label is not None and "Chem" in label:
                counts["chem senses"] += 1
                if usable(definition) and term.lower() not in chem:
                    chem[term.lower()] = (term, definition)
            elif label is None and not definition.startswith("(") and not INNER_LABEL.search(definition):
                counts["unlabelled senses"] += 1
                if usable(definition) and term.lower() not in general:
                    general[term.lower()] = (term, definition)
    general = {key: value for key, value in general.items() if key not in chem}
    return dedupe(chem.values()), dedupe(general.values()), counts


def dedupe(pairs) -> dict[str, str]:
    """One term per definition text (variant spellings share theirs)."""
    seen: set[str] = set()
    kept = {}
    for term, definition in pairs:
        if definition.lower() not in seen:
            seen.add(definition.lower())
            kept[term] = definition
    return kept


def tfidf(texts: list[str]) -> np.ndarray:
    """Row-normalised TF-IDF (log-scaled tf, smooth idf) as a dense matrix; fine for a few thousand texts."""
    tokens = [WORD.findall(t.lower()) for t in texts]
    vocabulary: dict[str, int] = {}
    for words in tokens:
        for word in words:
            vocabulary.setdefault(word, len(vocabulary))
    matrix = np.zeros((len(texts), len(vocabulary)), dtype=np.float32)
    for row, words in enumerate(tokens):
        for word, count in Counter(words).items():
            matrix[row, vocabulary[word]] = 1.0 + math.log(count)
    document_frequency = (matrix > 0).sum(axis=0)
    matrix *= np.log((1 + len(texts)) / (1 + document_frequency)) + 1.0
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True) + 1e-12
    return matrix


def triples(items: list[tuple[str, str]], prefix: str) -> list[dict]:
    """Each term with its definition and, as hard negative, the closest other definition in ``items``."""
    vectors = tfidf([d for _, d in items])
    similarity = vectors @ vectors.T
    similarity[similarity > NEGATIVE_MAX_SIMILARITY] = -1.0
    np.fill_diagonal(similarity, -np.inf)
    closest = similarity.argmax(axis=1)
    return [{"query": prefix + term, "positive": definition, "negative": items[j][1]}
            for (term, definition), j in zip(items, closest)]


def split(definitions: dict[str, str], calibration: int, heldout: int, rng: random.Random, name: str
          ) -> tuple[list, list]:
    items = sorted(definitions.items())
    rng.shuffle(items)
    if len(items) < calibration + heldout:
        scale = len(items) / (calibration + heldout)
        calibration, heldout = int(calibration * scale), len(items) - int(calibration * scale)
        log.warning("only %d %s terms: %d calibration, %d held-out", len(items), name, calibration, heldout)
        if min(calibration, heldout) < 2:
            sys.exit(f"error: {len(items)} {name} terms are too few for a calibration and a held-out split")
    return items[:calibration], items[calibration:calibration + heldout]


def word_stats(items: list[tuple[str, str]]) -> dict:
    lengths = [len(d.split()) for _, d in items]
    return {"terms": len(items), "definition_words_min": min(lengths),
            "definition_words_median": statistics.median(lengths), "definition_words_max": max(lengths)}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dict_path", default=DEFAULT_DICT, help="GCIDE's .dict.dz (its .index beside it)")
    parser.add_argument("--output_dir", default="output/gcide")
    parser.add_argument("--calibration_size", type=int, default=1000, help="calibration terms per domain")
    parser.add_argument("--heldout_size", type=int, default=500, help="held-out terms per domain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    index_path = re.sub(r"\.dict(\.dz)?$", ".index", args.dict_path)
    if not (os.path.isfile(args.dict_path) and os.path.isfile(index_path)):
        sys.exit(f"error: GCIDE dictionary not found at {args.dict_path}; install it with: sudo apt-get install dict-gcide")
    if args.calibration_size < 2 or args.heldout_size < 2:
        sys.exit("error: --calibration_size and --heldout_size must be at least 2 (negatives come from the same split)")

    log.info("reading %s", args.dict_path)
    entries = read_entries(args.dict_path)
    chem, general, counts = collect(entries)
    log.info("%d entries: %d chemistry terms, %d general terms usable", len(entries), len(chem), len(general))
    rng = random.Random(args.seed)
    splits = {name: split(definitions, args.calibration_size, args.heldout_size, rng, name)
              for name, definitions in (("chem", chem), ("general", general))}
    os.makedirs(args.output_dir, exist_ok=True)
    stats: dict = {"entries": len(entries), **counts, "chem_terms": len(chem), "general_terms": len(general),
                   "seed": args.seed, "files": {}}
    for name, parts in splits.items():
        for part, items in zip(("calibration", "heldout"), parts):
            filename = f"{name}-{part}.json"
            write_json(os.path.join(args.output_dir, filename), triples(items, PREFIXES[name]))
            log.info("wrote %d triples to %s", len(items), filename)
            stats["files"][filename] = word_stats(items)
    write_json(os.path.join(args.output_dir, "stats.json"), stats)
    print(json.dumps(stats["files"], indent=1), file=sys.stderr)
    print(args.output_dir)
    return args.output_dir


if __name__ == "__main__":
    main()
