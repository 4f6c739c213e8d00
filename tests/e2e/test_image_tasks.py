"""Image tasks from YAML: the config forms, the image readers, the vision features, and the shipped recipe
trained, evaluated, predicted and served on the bundled digits with a small random backbone."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from multitune.catalogue import load_config
from multitune.cli import main
from multitune.config import Config
from multitune.data.images import read_image_folder
from multitune.errors import ConfigError, DataError
from tests.conftest import REPO

RECIPE = REPO / "configs" / "image_tasks.yaml"
ASSETS = REPO / "src" / "multitune" / "assets"
TINY_RESNET = ASSETS / "vision" / "tiny-resnet"


def png(path: Path, shade: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), shade).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide ViT on 32 x 32 images (patches of 8), with random weights, as a config folder."""
    from transformers import ViTConfig, ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny-vit")
    ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    ).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def recipe(tmp_path: Path, steps: int = 6, **model: Any) -> dict[str, Any]:
    """The shipped image recipe, small: few steps and rows, written under tmp_path."""
    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    data["run"]["output_dir"] = str(tmp_path / "runs")
    data["training"].update(steps=steps, eval_every=steps, batch_size=8, progress=False, checkpoint_every=None)
    data["model"].update(model)
    for task in data["tasks"].values():
        task["max_rows"] = {"train": 40, "validation": 16, "test": 16}
    return data


def write(tmp_path: Path, data: dict[str, Any], name: str = "image.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def config_error(data: dict[str, Any], tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data))
    return str(caught.value)


# --- config ------------------------------------------------------------------------------------


def test_image_types_are_classification_and_regression_on_images_and_pick_a_vision_backbone():
    config = load_config(RECIPE)
    assert config.model.kind == "vision"
    kinds = {name: (task.type, task.modality, task.text_fields) for name, task in config.tasks.items()}
    assert kinds == {
        "digit": ("classification", "image", ["image"]),
        "parity": ("classification", "image", ["image"]),
        "value": ("regression", "image", ["image"]),
    }
    assert config.tasks["value"].metrics == ["pearson", "spearman"]
    again = Config.model_validate(config.model_dump(mode="json"))  # a run's saved config reloads the same
    assert again.tasks == config.tasks


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            lambda d: d["tasks"].update(
                text={"type": "classification", "source": {"format": "jsonl", "train": "t.jsonl"}}
            ),
            "image task 'digit' and text task 'text' need one backbone that reads both",
        ),
        (lambda d: d["model"].update(kind="encoder"), "image task 'digit' needs a vision backbone"),
        (
            lambda d: d["tasks"]["value"]["source"].update(format="imagefolder", train="x"),
            "it feeds image_classification",
        ),
        (lambda d: d["tasks"]["parity"]["source"].update(format="unified"), "an image task reads imagefolder"),
        (
            lambda d: d["tasks"]["digit"].update(type="token_classification", modality="image"),
            "classification or regression",
        ),
        (lambda d: d["tasks"]["digit"].update(modality="text"), "modality must be image"),
        (
            lambda d: d["model"].update(architecture={"name": "cross_stitch"}),
            "is shared by hard, hybrid, mmoe, ple or soft sharing only",
        ),
        (
            lambda d: d["model"].update(peft={"method": "prefix"}),
            "per-task prefix adapters are not available for a vision",
        ),
    ],
)
def test_image_configs_that_cannot_work_are_refused_in_one_line(tmp_path, change, words):
    data = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    data["run"]["output_dir"] = str(tmp_path)
    for task in data["tasks"].values():  # absolute paths: the config is written elsewhere
        for split in ("train", "validation", "test"):
            task["source"][split] = task["source"][split].replace("multitune:", f"{ASSETS}/")
    change(data)
    message = config_error(data, tmp_path)
    assert words in message and "\n" not in message


def test_an_imagefolder_source_feeds_image_tasks_only(tmp_path):
    data = {"tasks": {"t": {"type": "classification", "source": {"format": "imagefolder", "train": "x"}}}}
    assert "feeds image tasks" in config_error(data, tmp_path)


# --- reading ------------------------------------------------------------------------------------


def test_an_image_folder_gives_one_row_per_image_labelled_by_its_folder(tmp_path):
    from PIL import Image

    png(tmp_path / "train" / "cat" / "b.png", 10)
    png(tmp_path / "train" / "dog" / "c.png", 30)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "cat" / "a.jpg")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".cache").mkdir()
    rows = list(read_image_folder(str(tmp_path / "train")))
    assert [(Path(r.values["image"]).name, r.values["label"]) for r in rows] == [
        ("a.jpg", "cat"),
        ("b.png", "cat"),
        ("c.png", "dog"),
    ]
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="class folder 'cls' holds no images"):
        list(read_image_folder(str(tmp_path / "empty")))
    with pytest.raises(DataError, match="no class sub-folders"):
        list(read_image_folder(str(tmp_path / "empty" / "cls")))


def test_a_damaged_image_is_a_one_line_error_naming_its_file_and_no_run_is_made(tmp_path, capsys):
    data = recipe(tmp_path)
    folder = tmp_path / "digits"
    for split in ("train", "validation"):
        for label, shade in (("0", 0), ("1", 255)):
            for i in range(3):
                png(folder / split / label / f"{i}.png", shade)
    (folder / "train" / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data["tasks"] = {
        "digit": {
            "type": "image_classification",
            "source": {
                "format": "imagefolder",
                "train": str(folder / "train"),
                "validation": str(folder / "validation"),
            },
        }
    }
    assert main(["train", str(write(tmp_path, data))]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("multitune: error: ") and "broken.png" in error and "not a readable image" in error
    assert "\n" not in error and not (tmp_path / "runs").exists()


def test_a_damaged_image_names_its_file(tmp_path):
    from multitune.data.images import open_image

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError) as caught:
        open_image(str(bad), "list.jsonl", 4)
    assert str(bad) in str(caught.value) and "not a readable image" in str(caught.value)
    with pytest.raises(DataError, match="image file not found"):
        open_image(str(tmp_path / "missing.png"))


# --- features -----------------------------------------------------------------------------------


def test_a_cnn_gives_its_own_pooled_output_and_a_vit_its_first_token(tiny_vit):
    from transformers import AutoModel, ViTModel

    from multitune.models.vision import image_features, load_vision_backbone

    pixels = torch.randn(3, 3, 32, 32)
    resnet = load_vision_backbone(str(TINY_RESNET), random_init=True)
    resnet.model.eval()
    assert resnet.hidden_size == 64  # the last stage's width
    expected = resnet.model(pixel_values=pixels).pooler_output.reshape(3, 64)  # ResNet's own global average pool
    by_hand = resnet.model(pixel_values=pixels).last_hidden_state.mean((2, 3))
    assert torch.allclose(expected, by_hand, atol=1e-6)
    assert torch.allclose(image_features(resnet.model(pixel_values=pixels), "mean")[:, 0], expected, atol=1e-6)

    vit = load_vision_backbone(str(tiny_vit), random_init=True)
    vit.model.eval()
    assert vit.model.pooler is None and vit.hidden_size == 32  # its untrained pooler dense layer is dropped
    reference = ViTModel(vit.model.config, add_pooling_layer=False).eval()
    reference.load_state_dict(vit.model.state_dict())
    tokens = reference(pixel_values=pixels).last_hidden_state  # [3, 17, 32]: the CLS token and 16 patches
    assert tokens.shape == (3, 17, 32)
    assert torch.allclose(image_features(vit.model(pixel_values=pixels), "cls")[:, 0], tokens[:, 0], atol=1e-6)
    assert torch.allclose(image_features(vit.model(pixel_values=pixels), "mean")[:, 0], tokens.mean(1), atol=1e-6)
    assert isinstance(AutoModel.from_config(vit.model.config), ViTModel)


@pytest.mark.parametrize("family", ["resnet", "convnext", "vit"])
def test_hybrid_towers_start_as_the_models_own_top_blocks(tiny_vit, family):
    """Cut into shared lower blocks and per-task top blocks, the untrained hybrid gives every task the features
    the whole model gives (its own pooled output), computed here by the model before the cut."""
    from transformers import ConvNextConfig, ConvNextModel

    from multitune.models.architectures import ARCHITECTURES
    from multitune.models.vision import image_features, load_vision_backbone

    torch.manual_seed(0)
    if family == "convnext":
        model = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24], depths=[1, 1, 1], num_stages=3)).eval()
    else:
        model = load_vision_backbone(str(TINY_RESNET if family == "resnet" else tiny_vit), random_init=True).model
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    whole = copy.deepcopy(model)(pixel_values=pixels)
    expected = whole.last_hidden_state[:, 0] if family == "vit" else whole.pooler_output.flatten(1)
    if family == "vit":  # ViT's own features: its final layer norm, then the first token
        assert torch.equal(expected, image_features(whole, "cls")[:, 0])
    heads = {"a": torch.nn.Linear(expected.shape[1], 2), "b": torch.nn.Linear(expected.shape[1], 3)}
    injected = {"backbone": model, "heads": heads, "pooling": "cls", "hidden_size": 0, "model_kind": "vision"}
    hybrid = ARCHITECTURES.build("hybrid", injected=injected, task_layers=1).eval()
    hidden = hybrid.backbone(pixel_values=pixels).last_hidden_state
    for name in heads:
        features = hybrid.task_features(name, hidden, torch.ones(2, 1, dtype=torch.long))
        assert features.shape == (2, 1, expected.shape[1])
        assert torch.allclose(features[:, 0], expected, atol=1e-5)
    assert hybrid.towers["a"]["blocks"][0] is not hybrid.towers["b"]["blocks"][0]
    with pytest.raises(ConfigError, match="task_layers must be between 1 and the backbone's"):
        ARCHITECTURES.build("hybrid", injected={**injected, "backbone": copy.deepcopy(hybrid.backbone)}, task_layers=9)


def test_hybrid_trains_on_images_with_micro_batch_replay(tmp_path):
    data = recipe(tmp_path, steps=2, architecture={"name": "hybrid", "task_layers": 1})
    data["training"].update(mixed_batches=True, gradient_accumulation=2)
    data["gradient_aggregation"] = {"name": "pcgrad", "source": "representation"}
    assert main(["train", str(write(tmp_path, data))]) == 0
    assert main(["evaluate", str(tmp_path / "runs" / "image_tasks"), "--split", "test"]) == 0


# --- the recipe, end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("image-run")
    assert main(["train", str(write(folder, recipe(folder, steps=8)))]) == 0
    return folder / "runs" / "image_tasks"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_the_recipe_trains_evaluates_and_predicts_each_image_task(image_run, tmp_path):
    metrics = json.loads((image_run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"digit", "parity", "value"} and metrics["steps"] == 8
    assert metrics["tasks"]["value"]["main_metric"] == "pearson"
    assert (image_run / "backbone" / "preprocessor_config.json").is_file()  # the image processor travels
    assert main(["evaluate", str(image_run), "--split", "test"]) == 0
    evaluated = json.loads((image_run / "evaluation_test.json").read_text())
    assert set(evaluated["tasks"]) == {"digit", "parity", "value"}

    image = next((ASSETS / "digit_images" / "parity" / "images").glob("*.png"))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"image": str(image)}) + "\n" + json.dumps({"image": data_url(image)}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(image_run), "--task", "parity", "--input", str(inputs), "--output", str(out)]) == 0
    by_path, by_bytes = [json.loads(line) for line in out.read_text().splitlines()]
    assert by_path["prediction"] in ("even", "odd") and by_path["probabilities"] == by_bytes["probabilities"]

    assert main(["predict", str(image_run), "--task", "value", "--input", str(inputs), "--output", str(out)]) == 0
    values = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 <= values[0]["prediction"] <= 9 and values[0]["raw"] == pytest.approx(values[1]["raw"], abs=1e-5)

    relative = tmp_path / "rel.jsonl"  # a path in a record is relative to the record's file
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(image.read_bytes())
    relative.write_text(json.dumps({"image": "pics/x.png"}) + "\n")
    assert main(["predict", str(image_run), "--task", "parity", "--input", str(relative), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["probabilities"] == by_path["probabilities"]


def test_an_image_run_does_not_export_as_a_transformers_model(image_run, tmp_path):
    with pytest.raises(ConfigError, match="serve the run"):
        from multitune.export.model import export_task

        export_task(image_run, "digit", tmp_path / "out")


@pytest.mark.parametrize("architecture", [{"name": "mmoe", "experts": 2}, {"name": "ple"}, {"name": "soft"}])
def test_the_expert_mixtures_and_soft_sharing_train_on_pooled_image_features(tmp_path, architecture):
    data = recipe(tmp_path, steps=2, architecture=architecture)
    assert main(["train", str(write(tmp_path, data))]) == 0
    metrics = json.loads((tmp_path / "runs" / "image_tasks" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"digit", "parity", "value"}


def test_per_task_lora_on_a_vit_trains_only_adapters_and_heads_and_saves_them_for_peft(tmp_path, tiny_vit):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    from multitune.models.vision import load_vision_backbone

    data = recipe(tmp_path, steps=3, backbone=str(tiny_vit), pooling="cls", peft={"method": "lora", "r": 4})
    data["training"]["lr"] = 5e-2
    data["regularization"] = {"l2_sp_alpha": 0.0, "l2_sp_beta": 0.0}
    assert main(["train", str(write(tmp_path, data))]) == 0
    run = tmp_path / "runs" / "image_tasks"
    weights = load_file(str(run / "model.safetensors"))
    torch.manual_seed(data["run"]["seed"])  # the backbone the run started from, rebuilt the same way
    start = load_vision_backbone(str(tiny_vit), random_init=True).model.state_dict()
    frozen = {k: v for k, v in weights.items() if k.startswith("backbone.") and "lora_" not in k}
    assert frozen and all(
        torch.equal(value, start[key.removeprefix("backbone.").replace(".base_layer.", ".")])
        for key, value in frozen.items()
    )
    lora = [k for k in weights if "lora_B" in k]
    assert lora and any(weights[k].abs().sum() > 0 for k in lora)  # B starts at zero: it trained
    assert {"q_proj", "v_proj"} >= {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora}
    for task in ("digit", "parity", "value"):
        plain = AutoModel.from_config(load_vision_backbone(str(tiny_vit), random_init=True).model.config)
        loaded = PeftModel.from_pretrained(plain, str(run / "adapters" / task))
        assert any("lora_A" in name for name, _ in loaded.named_parameters())


def test_a_hugging_face_image_dataset_reads_its_image_and_class_columns(tmp_path):
    folder = tmp_path / "hf"
    for split in ("train", "validation"):
        for label, shade in (("dark", 0), ("light", 255)):
            for i in range(4):
                png(folder / split / label / f"{i}.png", shade)
    data = recipe(tmp_path, steps=2)
    data["tasks"] = {
        "shade": {
            "type": "image_classification",
            "source": {
                "format": "hf",
                "dataset": "imagefolder",
                "data_files": {"train": str(folder / "train" / "**"), "validation": str(folder / "validation" / "**")},
            },
        }
    }
    from multitune.data.tasks import load_tasks

    config = load_config(write(tmp_path, data))
    task = load_tasks(config.tasks, 13)["shade"]
    assert task.labels == ["dark", "light"] and len(task.splits["train"]) == 8
    assert task.splits["train"][0].image is not None and task.splits["train"][0].texts == ()
    assert main(["train", str(write(tmp_path, data))]) == 0


def test_the_server_answers_images_sent_as_base64_and_reads_no_files(image_run, tmp_path):
    httpx = pytest.importorskip("httpx")
    from tests.serving.conftest import running_server

    image = next((ASSETS / "digit_images" / "parity" / "images").glob("*.png"))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"image": str(image)}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(image_run), "--task", "parity", "--input", str(inputs), "--output", str(out)]) == 0
    expected = json.loads(out.read_text())
    with running_server(image_run, "--max-chars", "100000") as url:
        for sent in (data_url(image), base64.b64encode(image.read_bytes()).decode()):
            response = httpx.post(f"{url}/v1/tasks/parity/predict", json={"input": {"image": sent}})
            assert response.status_code == 200, response.text
            answer = response.json()["predictions"][0]
            assert answer["prediction"] == expected["prediction"]
            assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
        refused = httpx.post(f"{url}/v1/tasks/parity/predict", json={"input": {"image": str(image)}})
        assert refused.status_code in (400, 422) and "reads no files" in refused.text
        schema = httpx.get(f"{url}/v1/tasks").json()
        assert "image" in json.dumps(schema)


@pytest.mark.parametrize("source", ["representation", "parameters"])
def test_gradient_aggregation_balances_image_tasks_in_mixed_batches(tmp_path, source):
    data = recipe(tmp_path, steps=2)
    data["training"]["mixed_batches"] = True
    data["gradient_aggregation"] = {"name": "pcgrad", "source": source}
    assert main(["train", str(write(tmp_path, data))]) == 0
    metrics = json.loads((tmp_path / "runs" / "image_tasks" / "metrics.json").read_text())
    assert sum(metrics["task_steps"].values()) > metrics["steps"]


def test_per_task_lora_on_swin_routes_each_windowed_row_to_its_own_task(tmp_path):
    """Swin's attention runs on every window of every image ([B · windows, ...]): each example's windows take
    its task's adapter. With adapters made different, a mixed batch answers each task as its rows alone do."""
    from transformers import SwinConfig, ViTImageProcessor

    from multitune.catalogue import load_config
    from multitune.data.collate import collate
    from multitune.recipe.prepare import prepare

    folder = tmp_path / "swin"
    SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2
    ).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    data = recipe(tmp_path, steps=2, backbone=str(folder), peft={"method": "lora", "r": 2})
    prepared = prepare(load_config(write(tmp_path, data)))
    model = prepared.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    digit, parity = prepared.encoded["digit"]["validation"][:3], prepared.encoded["parity"]["validation"][:3]
    with torch.no_grad():
        mixed = model(collate({"digit": digit, "parity": parity}, 0))
        alone = {
            "digit": model(collate({"digit": digit}, 0))["digit"],
            "parity": model(collate({"parity": parity}, 0))["parity"],
        }
    for task in ("digit", "parity"):
        assert torch.allclose(mixed[task], alone[task], atol=1e-5)
    assert main(["train", str(write(tmp_path, {**data, "training": {**data["training"], "mixed_batches": True}}))]) == 0


# --- images read alike everywhere -------------------------------------------------------------------------


def test_exif_orientation_is_applied_on_every_route_as_hugging_face_decodes_it(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90°): our reader and the `datasets` Image
    decoder give the same upright pixels."""
    import numpy as np
    from PIL import Image

    from multitune.data.images import open_image

    stored = np.zeros((16, 32), dtype=np.uint8)
    stored[:, :16] = 255  # left half white as stored; upright (rotated 90° clockwise) the top half is white
    image = Image.fromarray(stored, mode="L")
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    image.save(path, exif=exif, quality=100)
    ours = np.asarray(open_image(str(path)).convert("L"), dtype=float)
    assert ours.shape == (32, 16)  # width and height swapped: turned upright
    assert ours[:16].mean() > 200 and ours[16:].mean() < 50
    import datasets

    theirs = datasets.Image().decode_example({"path": str(path), "bytes": None})
    assert np.abs(np.asarray(open_image(theirs).convert("L"), dtype=float) - ours).max() <= 1


def test_sixteen_bit_and_float_grey_levels_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from multitune.data.images import open_image

    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)  # mode I;16
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(open_image(str(path)).convert("L"))[0].tolist() == [0, 64, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(open_image(floats).convert("L"))[0].tolist() == [0, 128, 255]


def test_hidden_files_and_macos_forks_in_an_image_folder_are_skipped(tmp_path):
    png(tmp_path / "train" / "a" / "x.png", 10)
    (tmp_path / "train" / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    png(tmp_path / "train" / "__MACOSX" / "a" / "x.png", 10)
    png(tmp_path / "train" / "b" / "y.png", 20)
    rows = list(read_image_folder(str(tmp_path / "train")))
    assert [(Path(r.values["image"]).name, r.values["label"]) for r in rows] == [("x.png", "a"), ("y.png", "b")]


def test_base64_images_are_read_as_clients_send_them():
    import base64 as b64

    from multitune.data.images import decode_base64_image

    raw = bytes(range(256)) * 3
    expected = {"bytes": raw}
    assert decode_base64_image(b64.encodebytes(raw).decode()) == expected  # MIME lines of 76 characters
    assert decode_base64_image(b64.b64encode(raw).decode().rstrip("=")) == expected  # no padding
    assert decode_base64_image("  DATA:image/png;base64," + b64.b64encode(raw).decode() + "\n") == expected
    with pytest.raises(ValueError, match="expected an image as base64"):
        decode_base64_image("not base64 at all!")


def test_a_changed_image_changes_the_data_fingerprint_so_resume_and_compare_see_it(tmp_path):
    from multitune.data.tasks import load_tasks
    from multitune.runs.layout import data_fingerprint

    for label, shade in (("a", 0), ("b", 255)):
        for i in range(3):
            png(tmp_path / "train" / label / f"{i}.png", shade)
    task = {"type": "image_classification", "source": {"format": "imagefolder", "train": str(tmp_path / "train")}}
    config = load_config(write(tmp_path, {**recipe(tmp_path), "tasks": {"t": task}}))

    def fingerprint() -> Any:
        return data_fingerprint(load_tasks(config.tasks, 13)["t"])

    before = fingerprint()
    png(tmp_path / "train" / "a" / "1.png", 99)  # same name, other pixels
    assert fingerprint() != before


def test_images_the_processor_leaves_in_several_sizes_are_refused_before_the_run_exists(tmp_path, tiny_vit, capsys):
    import shutil

    from transformers import ViTImageProcessor

    model = tmp_path / "vit"
    shutil.copytree(tiny_vit, model)
    ViTImageProcessor(do_resize=False).save_pretrained(model)  # 8x8 digits stay 8x8: the ViT wants 32x32
    data = recipe(tmp_path, steps=2, backbone=str(model))
    assert main(["train", str(write(tmp_path, data))]) == 2
    error = capsys.readouterr().err.strip()
    assert "the backbone cannot read task" in error and "\n" not in error and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("architecture", ["hard", "mmoe"])
def test_a_timm_model_through_transformers_timm_wrapper_trains_and_predicts(tmp_path, architecture, capsys):
    """A timm checkpoint as transformers' TimmWrapper folder (config.json holding timm's pretrained_cfg): its
    pooled [B, C] features feed the heads. Runs where timm is installed (timm needs torchvision, which this
    project does not require); hybrid sharing is refused in one line (the wrapper exposes no blocks)."""
    timm = pytest.importorskip("timm")
    from transformers import TimmWrapperConfig, TimmWrapperModel

    pretrained = {**timm.create_model("resnet10t", pretrained=False).pretrained_cfg, "input_size": (3, 32, 32)}
    folder = tmp_path / "resnet10t"
    TimmWrapperModel(TimmWrapperConfig(architecture="resnet10t", pretrained_cfg=pretrained)).save_pretrained(folder)
    data = recipe(tmp_path, steps=4, backbone=str(folder), random_init=False, architecture={"name": architecture})
    assert main(["train", str(write(tmp_path, data))]) == 0
    run = tmp_path / "runs" / "image_tasks"
    assert set(json.loads((run / "metrics.json").read_text())["tasks"]) == {"digit", "parity", "value"}
    image = next((ASSETS / "digit_images" / "parity" / "images").glob("*.png"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": str(image)}) + "\n")
    argv = ["predict", str(run), "--task", "parity", "--input", str(tmp_path / "in.jsonl")]
    assert main([*argv, "--output", str(tmp_path / "out.jsonl")]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["prediction"] in ("even", "odd")
    hybrid = recipe(tmp_path, steps=2, backbone=str(folder), architecture={"name": "hybrid"})
    hybrid["run"]["name"] = "hybrid"
    capsys.readouterr()
    assert main(["train", str(write(tmp_path, hybrid, "hybrid.yaml"))]) == 2
    assert "TimmWrapperModel exposes none" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "hybrid").exists()
