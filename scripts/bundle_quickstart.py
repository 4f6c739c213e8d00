"""Build the quickstart data bundled in the package from the original files.

Takes the four permissively licensed sets of the shared data folder (TREC, SMS Spam, STS-B, WNUT-17),
subsamples each training split to at most 2,000 rows with a fixed seed, keeps each set's own file
format where it has one, and writes the license and attribution beside the files.

    python scripts/bundle_quickstart.py ../shared/data src/multitune/assets/quickstart
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

SEED = 20261123
MAX_TRAIN = 2000


def subsample(rows: list, k: int, seed: int = SEED) -> list:
    """A seeded subsample of at most k rows, kept in their original order."""
    if len(rows) <= k:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), k))
    return [rows[i] for i in keep]


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")


def trec(src: Path, out: Path) -> None:
    def parse(path: Path) -> list[str]:
        records = []
        for line in path.read_text(encoding="latin-1").splitlines():
            if not line.strip():
                continue
            label, question = line.split(" ", 1)
            coarse, fine = label.split(":", 1)
            records.append(json.dumps({"text": question, "label": coarse, "fine_label": fine}))
        return records

    write_lines(out / "train.jsonl", subsample(parse(src / "train_5500.label"), MAX_TRAIN))
    write_lines(out / "test.jsonl", parse(src / "TREC_10.label"))


def sms_spam(src: Path, out: Path) -> None:
    lines = [line for line in (src / "SMSSpamCollection").read_text(encoding="utf-8").splitlines() if line]
    # The collection has no official split: a seeded split stratified by label, 80/10/10.
    by_label: dict[str, list[str]] = {}
    for line in lines:
        by_label.setdefault(line.split("\t", 1)[0], []).append(line)
    train, validation, test = [], [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        random.Random(f"{SEED}:{label}").shuffle(group)
        n_eval = round(0.1 * len(group))
        test += group[:n_eval]
        validation += group[n_eval : 2 * n_eval]
        train += group[2 * n_eval :]
    order = {line: i for i, line in enumerate(lines)}
    for name, rows in (("train", subsample(train, MAX_TRAIN)), ("validation", validation), ("test", test)):
        write_lines(out / f"{name}.tsv", sorted(rows, key=order.__getitem__))


def stsb(src: Path, out: Path) -> None:
    # Original lines, extra trailing columns included: the reader takes columns by index.
    for name, file in (("train", "sts-train.csv"), ("validation", "sts-dev.csv"), ("test", "sts-test.csv")):
        rows = (src / file).read_text(encoding="utf-8").splitlines()
        write_lines(out / f"{name}.tsv", subsample(rows, MAX_TRAIN) if name == "train" else rows)
    shutil.copy(src / "LICENSE.txt", out / "LICENSE.txt")


def wnut17(src: Path, out: Path) -> None:
    def sentences(path: Path) -> list[str]:
        # Sentences end at a blank line; in the training file 2,394 of those hold a lone tab.
        blocks = re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8"))
        return [block.strip("\n") for block in blocks if block.strip()]

    for name, file in (
        ("train", "wnut17train.conll"),
        ("validation", "emerging.dev.conll"),
        ("test", "emerging.test.annotated"),
    ):
        rows = sentences(src / file)
        rows = subsample(rows, MAX_TRAIN) if name == "train" else rows
        (out / f"{name}.conll").write_text("\n\n".join(rows) + "\n", encoding="utf-8")


ATTRIBUTION = {
    "trec": """# TREC question classification (Li & Roth 2002)

Questions with 6 coarse and 50 fine answer-type labels. `train.jsonl`: a seeded sample of 2,000 of the
5,452 training questions; `test.jsonl`: the official 500-question TREC-10 test set.

Source: Cognitive Computation Group, University of Illinois (https://cogcomp.seas.upenn.edu/Data/QA/QC/),
released publicly for research. Cite: Xin Li and Dan Roth, "Learning Question Classifiers", COLING 2002.
""",
    "sms_spam": """# SMS Spam Collection v.1

5,574 SMS messages labeled ham/spam, split here 80/10/10 stratified by label with a fixed seed;
`train.tsv` is a seeded sample of 2,000 of the training part.

Source: T. A. Almeida and J. M. Gomez Hidalgo, UCI Machine Learning Repository. The corpus "is provided
for free and with no limitations excepting" its copyright, which remains with the authors, and without
warranty. Cite: Almeida, T.A., Gomez Hidalgo, J.M., Yamakami, A. "Contributions to the Study of SMS Spam
Filtering: New Collection and Results", DocEng 2011.
""",
    "stsb": """# STS Benchmark (Cer et al. 2017)

Sentence pairs scored 0-5 for semantic similarity. Original tab-separated lines; `train.tsv` is a seeded
sample of 2,000 of the 5,749 training pairs; `validation.tsv` and `test.tsv` are the full dev and test sets.

License: the scores are CC BY-SA 4.0 (share-alike: derived data must keep this license); each text
source keeps its own terms, see `LICENSE.txt`. Cite: Cer et al., "SemEval-2017 Task 1: Semantic Textual
Similarity Multilingual and Crosslingual Focused Evaluation", SemEval 2017.
""",
    "wnut17": """# WNUT-17 Emerging and Rare Entities

Token-level named entities (IOB2, 6 types) in user-generated text. `train.conll` is a seeded sample of
2,000 of the 3,394 training sentences; `validation.conll` and `test.conll` are the full dev and test sets.

License: CC BY 4.0. Source: https://github.com/leondz/emerging_entities_17. Cite: Derczynski et al.,
"Results of the WNUT2017 Shared Task on Novel and Emerging Entity Recognition", W-NUT 2017.
""",
}


def main(src_root: str, out_root: str) -> None:
    for name, build in (("trec", trec), ("sms_spam", sms_spam), ("stsb", stsb), ("wnut17", wnut17)):
        out = Path(out_root) / name
        out.mkdir(parents=True, exist_ok=True)
        build(Path(src_root) / name, out)
        (out / "ATTRIBUTION.md").write_text(ATTRIBUTION[name], encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:3])
