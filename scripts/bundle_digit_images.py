"""Write the bundled image tasks (src/multitune/assets/digit_images): scikit-learn's 8x8 handwritten digits
(the UCI "Optical Recognition of Handwritten Digits" test set, CC BY 4.0, shipped inside scikit-learn, so
nothing is downloaded) as grayscale PNG files, split into three disjoint image sets for three tasks:

- digit: which digit (10 classes), an image folder with one sub-folder per class;
- parity: even or odd, a JSONL file of {"image": path, "label": ...};
- value: the digit as a number (image regression), a CSV file of image,value.

It also writes assets/vision/tiny-resnet: the config and image processor of a small ResNet (two stages,
about 80k parameters at 32 x 32 pixels) that the recipe builds with random weights (`model.random_init`), so
the image recipe runs offline; a user with internet names a pretrained checkpoint instead.

Deterministic: the same files on every run. Usage: python scripts/bundle_digit_images.py
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from transformers import ConvNextImageProcessor, ResNetConfig

ASSETS = Path(__file__).resolve().parent.parent / "src" / "multitune" / "assets"
OUT = ASSETS / "digit_images"
TINY = ASSETS / "vision" / "tiny-resnet"
SPLITS = {"train": 0.7, "validation": 0.15, "test": 0.15}
README = """# Bundled image tasks: handwritten digits

Three small image tasks for `configs/image_tasks.yaml`, written by `scripts/bundle_digit_images.py`: the
1,797 8x8 grayscale digits that scikit-learn ships (`sklearn.datasets.load_digits`), as PNG files, in three
disjoint sets (each split 70/15/15 into train, validation and test):

- `digit/`: which digit, 0-9 (an image folder: one sub-folder per class);
- `parity/`: even or odd (`{split}.jsonl`, records `{"image": path, "label": "even" | "odd"}`);
- `value/`: the digit as a number, an image regression task (`{split}.csv`, columns `image,value`).

Source: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine Learning
Repository, 1998 (https://doi.org/10.24432/C50P49), licensed CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/); the 8x8 images are scikit-learn's copy of its test set.
The files here are those images rescaled from 0-16 to 0-255 grey levels, otherwise unchanged.
"""


def _png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255 / 16).round().astype("uint8"), mode="L").save(path, optimize=True)


def _splits(indices: list[int]) -> dict[str, list[int]]:
    cut_train = round(len(indices) * SPLITS["train"])
    cut_validation = cut_train + round(len(indices) * SPLITS["validation"])
    return {
        "train": indices[:cut_train],
        "validation": indices[cut_train:cut_validation],
        "test": indices[cut_validation:],
    }


def main() -> None:
    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(13).shuffle(order)
    third = len(order) // 3
    sets = {"digit": order[:third], "parity": order[third : 2 * third], "value": order[2 * third :]}
    if OUT.exists():
        shutil.rmtree(OUT)
    for split, rows in _splits(sets["digit"]).items():
        for i in rows:
            _png(digits.images[i], OUT / "digit" / split / str(digits.target[i]) / f"{i:04d}.png")
    (OUT / "parity").mkdir(parents=True)
    (OUT / "value").mkdir(parents=True)
    for split, rows in _splits(sets["parity"]).items():
        with open(OUT / "parity" / f"{split}.jsonl", "w", encoding="utf-8") as out:
            for i in rows:
                _png(digits.images[i], OUT / "parity" / "images" / f"{i:04d}.png")
                label = "even" if digits.target[i] % 2 == 0 else "odd"
                out.write(json.dumps({"image": f"images/{i:04d}.png", "label": label}) + "\n")
    for split, rows in _splits(sets["value"]).items():
        with open(OUT / "value" / f"{split}.csv", "w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["image", "value"])
            for i in rows:
                _png(digits.images[i], OUT / "value" / "images" / f"{i:04d}.png")
                writer.writerow([f"images/{i:04d}.png", int(digits.target[i])])
    (OUT / "README.md").write_text(README, encoding="utf-8")
    print(f"wrote {len(order)} images to {OUT}")
    config = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic")
    config.save_pretrained(TINY)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(TINY)
    print(f"wrote {TINY}")


if __name__ == "__main__":
    main()
