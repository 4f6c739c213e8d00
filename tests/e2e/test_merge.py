"""`multitune merge`: single-task runs of one backbone merged into one run that evaluates like any other."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.cli import main
from tests.conftest import classification_rows, tiny_config, token_rows


def task_files(folder):
    """The two tasks' training files (sentiment, ner) in `folder`."""
    a, b = folder / "a.jsonl", folder / "b.jsonl"
    for path, rows in ((a, classification_rows(40)), (b, token_rows(40))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return a, b


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, tiny_backbone):
    """Two single-task runs (sentiment, ner) fine-tuned from the tiny backbone with the same seed."""
    folder = tmp_path_factory.mktemp("merge")
    a, b = task_files(folder)
    runs = []
    for task in ("sentiment", "ner"):
        data = tiny_config(tiny_backbone, a, b, folder / "runs", steps=8, lr=5e-3)
        data["tasks"] = {task: data["tasks"][task]}
        data["run"]["name"] = task
        path = folder / f"{task}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        assert main(["train", str(path)]) == 0
        runs.append(folder / "runs" / task)
    return folder, runs


def test_weight_averaging_gives_the_mean_backbone_and_keeps_each_head(single_runs, capsys):
    folder, runs = single_runs
    assert main(["merge", *map(str, runs), "--method", "average", "--output-dir", str(folder / "out")]) == 0
    merged_dir = folder / "out" / "merged"
    merged = load_file(str(merged_dir / "model.safetensors"))
    first, second = (load_file(str(run / "model.safetensors")) for run in runs)
    for key, value in merged.items():
        if key.startswith("backbone.") and value.is_floating_point():
            assert torch.allclose(value, (first[key] + second[key]) / 2, atol=1e-6), key
        elif key.startswith("heads.sentiment."):
            assert torch.equal(value, first[key])
        elif key.startswith("heads.ner."):
            assert torch.equal(value, second[key])
    metrics = json.loads((merged_dir / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"sentiment", "ner"} and metrics["merge"]["method"] == "average"
    cosine = metrics["merge"]["task_vector_cosine"]
    assert cosine["overall"][0][0] == 1.0 and -1.0 <= cosine["overall"][0][1] <= 1.0
    assert "embeddings" not in cosine["per_layer"] and any(k.startswith("encoder.layer.") for k in cosine["per_layer"])
    assert main(["evaluate", str(merged_dir), "--split", "test"]) == 0
    again = json.loads((merged_dir / "evaluation_test.json").read_text())
    assert {n: t["metrics"] for n, t in again["tasks"].items()} == {
        n: t["metrics"] for n, t in metrics["tasks"].items()
    }
    assert main(["report", str(merged_dir)]) == 0  # a merged run trained no steps: the report says so
    assert "merged by average, without training" in (merged_dir / "report.html").read_text()


def test_settings_are_chosen_on_validation(single_runs):
    folder, runs = single_runs
    argv = ["merge", *map(str, runs), "--method", "ties", "--set", "density=0.5", "--grid", "scaling=0.2,1.0"]
    assert main([*argv, "--output-dir", str(folder / "grid"), "--name", "ties"]) == 0
    merge = json.loads((folder / "grid" / "ties" / "metrics.json").read_text())["merge"]
    scores = {c["settings"]["scaling"]: c["validation_average_main_score"] for c in merge["candidates"]}
    assert set(scores) == {0.2, 1.0} and merge["chosen_on"] == "validation"
    assert merge["settings"] == {"density": 0.5, "scaling": max(scores, key=scores.get)}
    argv = ["merge", *map(str, runs), "--method", "dare", "--output-dir", str(folder / "grid"), "--name", "dare"]
    assert main(argv) == 0  # no --set: the defaults it merged with are recorded, not {}
    merge = json.loads((folder / "grid" / "dare" / "metrics.json").read_text())["merge"]
    assert merge["settings"] == {"density": 0.5, "scaling": 1.0, "seed": 0}


def test_runs_that_do_not_fit_together_are_refused(single_runs, tmp_path, capsys):
    _, runs = single_runs
    assert main(["merge", str(runs[0]), str(runs[0]), "--output-dir", str(tmp_path)]) == 2
    assert "is in two runs" in capsys.readouterr().err
    assert main(["merge", str(runs[0]), "--output-dir", str(tmp_path)]) == 2
    assert main(["merge", *map(str, runs), "--method", "soup", "--output-dir", str(tmp_path)]) == 2
    assert main(["merge", *map(str, runs), "--set", "density=much", "--output-dir", str(tmp_path)]) == 2
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "out"
    for argv, said in (
        (["--name", "a/b"], "run.name"),  # a one-line error, as in a config, not a validation traceback
        (["--method", "tsv", "--set", "scaling=inf"], "finite"),
        (["--method", "task_arithmetic", "--set", "scaling=1e300"], "finite in float32"),
        (["--method", "ties", "--set", "scaling=1", "--grid", "scaling=1,2"], "given by --set and by --grid"),
        (["--method", "ties", "--grid", "scaling=1,1"], "lists a value twice"),
    ):
        capsys.readouterr()
        assert main(["merge", *map(str, runs), *argv, "--output-dir", str(out)]) == 2, argv
        error = capsys.readouterr().err.strip()
        assert said in error and "\n" not in error and "Traceback" not in error, error
        assert not out.exists() or list(out.iterdir()) == [], argv  # a failed merge leaves no partial run


def test_a_merge_that_gives_non_finite_weights_is_refused_and_leaves_nothing(
    single_runs, tmp_path, capsys, monkeypatch
):
    from multitune.models.merging import TaskArithmetic

    _, runs = single_runs
    monkeypatch.setattr(TaskArithmetic, "__call__", lambda self, vectors: torch.full_like(vectors[0], float("nan")))
    out = tmp_path / "out"
    assert main(["merge", *map(str, runs), "--method", "task_arithmetic", "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "the merge with settings {'scaling': 0.3} gives" in error and "holding NaN or infinity" in error
    assert "\n" not in error and "diverged" not in error and list(out.iterdir()) == []


def test_runs_with_other_model_settings_are_refused(single_runs, tmp_path, capsys):
    """A run whose backbone pooled otherwise, read other lengths or started from random weights computes
    something else: merging it with the others is refused, naming the setting."""
    import shutil

    _, runs = single_runs
    for setting, value in (("pooling", "cls"), ("max_length", 16), ("random_init", True)):
        other = tmp_path / setting
        shutil.copytree(runs[1], other)
        config = yaml.safe_load((other / "config.yaml").read_text())
        config["model"][setting] = value
        (other / "config.yaml").write_text(yaml.safe_dump(config))
        capsys.readouterr()
        assert main(["merge", str(runs[0]), str(other), "--output-dir", str(tmp_path / "out")]) == 2
        assert f"model.{setting}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_learns_coefficients_and_merges_with_them(single_runs, tiny_backbone, granularity):
    """The merged backbone is θ_0 + Σ_t λ_t τ_t with the coefficients it reports (per layer: each layer's
    own), recomputed here from the pretrained and fine-tuned weights; the coefficients moved from 0.3."""
    from transformers import AutoModel

    folder, runs = single_runs
    out = folder / f"ada-{granularity}"
    settings = ["steps=5", "lr=0.05", f"granularity={granularity}"]
    argv = ["merge", *map(str, runs), "--method", "adamerging", *[f"--set={s}" for s in settings]]
    assert main([*argv, "--output-dir", str(out)]) == 0
    merge = json.loads((out / "merged" / "metrics.json").read_text())["merge"]
    coefficients = merge["settings"]["coefficients"]
    assert merge["settings"]["granularity"] == granularity and len(merge["candidates"]) == 1
    assert any(abs(c - 0.3) > 1e-4 for values in coefficients.values() for c in values)
    base = AutoModel.from_pretrained(str(tiny_backbone)).state_dict()
    first, second = (load_file(str(run / "model.safetensors")) for run in runs)
    merged = load_file(str(out / "merged" / "model.safetensors"))
    for key, start in base.items():
        if not start.is_floating_point():
            continue
        parts = key.split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), 0)
        group = "all" if granularity == "task" else (".".join(parts[:cut]) if cut else "other")
        l1, l2 = coefficients[group]
        name = f"backbone.{key}"
        want = start + l1 * (first[name] - start) + l2 * (second[name] - start)
        assert torch.allclose(merged[name], want, atol=1e-5), key


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_backbone):
    """One run with a LoRA adapter per task (sentiment, ner) on the frozen tiny backbone."""
    folder = tmp_path_factory.mktemp("lora-merge")
    a, b = task_files(folder)
    data = tiny_config(tiny_backbone, a, b, folder / "runs", steps=8, lr=5e-2)
    data["model"]["peft"] = {"method": "lora", "r": 2, "alpha": 4, "dropout": 0.0}
    path = folder / "lora.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    return folder, folder / "runs" / "tiny"


def test_per_task_lora_adapters_merge_through_peft_into_one_backbone(lora_run, tiny_backbone):
    """task_arithmetic (λ = 0.5) over LoRA adapters: every adapted tensor of the merged backbone is
    W + λ·Σ_t (α/r)·B_t·A_t, computed here from the adapters' own files; the others are the frozen W; each
    task keeps its head; the merged adapter loads with plain peft; evaluate reproduces the scores."""
    from peft import PeftModel
    from transformers import AutoModel

    folder, run = lora_run
    argv = [
        "merge",
        str(run),
        "--method",
        "task_arithmetic",
        "--set",
        "scaling=0.5",
        "--output-dir",
        str(folder / "out"),
    ]
    assert main(argv) == 0
    merged_dir = folder / "out" / "merged"
    merged = load_file(str(merged_dir / "model.safetensors"))
    trained = load_file(str(run / "model.safetensors"))
    base = AutoModel.from_pretrained(str(tiny_backbone)).state_dict()
    expected = {key: value.clone() for key, value in base.items()}
    for task in ("sentiment", "ner"):
        adapter = load_file(str(run / "adapters" / task / "adapter_model.safetensors"))
        settings = json.loads((run / "adapters" / task / "adapter_config.json").read_text())
        scale = settings["lora_alpha"] / settings["r"]
        for key, a in adapter.items():
            if ".lora_A." in key:
                target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                b = adapter[key.replace("lora_A", "lora_B")]  # [out, r] @ [r, in]
                expected[target] = expected[target] + 0.5 * scale * b @ a
    changed = 0
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(merged[f"backbone.{key}"], value, atol=1e-5), key
            changed += not torch.allclose(value, base[key])
    assert changed >= 4  # the adapted query and value projections of both layers
    heads = {k for k in merged if k.startswith("heads.")}
    assert heads and all(torch.equal(merged[k], trained[k]) for k in heads)
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_backbone)), str(merged_dir / "adapter"))
    folded = plain.merge_and_unload().state_dict()
    assert all(torch.allclose(folded[k], expected[k], atol=1e-5) for k in expected if expected[k].is_floating_point())
    metrics = json.loads((merged_dir / "metrics.json").read_text())
    assert metrics["merge"]["task_vector_cosine"]["overall"][0][0] == 1.0
    assert main(["evaluate", str(merged_dir), "--split", "test"]) == 0
    again = json.loads((merged_dir / "evaluation_test.json").read_text())
    assert {n: t["metrics"] for n, t in again["tasks"].items()} == {
        n: t["metrics"] for n, t in metrics["tasks"].items()
    }


def test_lora_merges_by_ties_and_dare_and_refuse_adamerging(lora_run, capsys):
    folder, run = lora_run
    for method in ("ties", "dare_ties"):
        out = folder / "sparse"
        assert main(["merge", str(run), "--method", method, "--output-dir", str(out), "--name", method]) == 0
        assert (out / method / "adapter" / "adapter_model.safetensors").exists()
    assert main(["merge", str(run), "--method", "adamerging", "--output-dir", str(folder / "ada")]) == 2
    assert "does not merge LoRA adapters" in capsys.readouterr().err
    assert not (folder / "ada").exists()


def test_regmean_merges_the_linear_layers_from_their_inputs_and_averages_the_rest(single_runs):
    """Embeddings and norms are the two models' average; each linear layer is RegMean's solve, which is
    neither model's weights nor their average; the grid's alpha is chosen on validation, and the merged run
    evaluates like any other."""
    folder, runs = single_runs
    out = folder / "regmean"
    argv = ["merge", *map(str, runs), "--method", "regmean", "--set", "rows=24", "--grid", "alpha=0.5,1.0"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    merge = json.loads((out / "merged" / "metrics.json").read_text())["merge"]
    assert merge["paper"] == "Jin et al. 2023" and merge["chosen_on"] == "validation"
    scores = {c["settings"]["alpha"]: c["validation_average_main_score"] for c in merge["candidates"]}
    assert set(scores) == {0.5, 1.0} and merge["settings"] == {"rows": 24, "alpha": max(scores, key=scores.get)}
    first, second = (load_file(str(run / "model.safetensors")) for run in runs)
    merged = load_file(str(out / "merged" / "model.safetensors"))
    linear = [k for k in merged if k.endswith("attention.self.query.weight")]
    assert linear
    for key, value in merged.items():
        if not key.startswith("backbone.") or not value.is_floating_point():
            continue
        average = (first[key] + second[key]) / 2
        if "embeddings" in key or "LayerNorm" in key:
            assert torch.allclose(value, average, atol=1e-6), key
    for key in linear:
        assert not torch.allclose(merged[key], (first[key] + second[key]) / 2, atol=1e-6), key
        assert torch.isfinite(merged[key]).all()
    assert main(["evaluate", str(out / "merged"), "--split", "test"]) == 0


def _numpy_svd_merge(method, vectors, scaling):
    """TSV-Merge or Iso-C of one weight matrix's task vectors ([T, out, in] numpy), written from the papers
    in numpy: the reference the merged run is checked against."""
    import numpy as np

    if method == "iso_c":
        u, s, vt = np.linalg.svd(vectors.sum(0), full_matrices=False)
        return scaling * s.mean() * u @ vt
    k = min(vectors.shape[1:]) // len(vectors)
    parts = [np.linalg.svd(v, full_matrices=False) for v in vectors]
    u = np.concatenate([p[0][:, :k] for p in parts], 1)
    s = np.concatenate([p[1][:k] for p in parts])
    v = np.concatenate([p[2][:k].T for p in parts], 1)

    def polar(m):
        left, _, right = np.linalg.svd(m, full_matrices=False)
        return left @ right

    return scaling * polar(u) @ np.diag(s) @ polar(v).T


@pytest.mark.parametrize(("method", "scaling"), [("tsv", 1.0), ("iso_c", 1.5)])
def test_svd_merges_rebuild_each_matrix_and_average_the_rest(single_runs, tiny_backbone, method, scaling):
    """Every weight matrix of the merged backbone is θ_0 plus the method's rebuild of the two task vectors,
    recomputed here in numpy; every other tensor is θ_0 + λ · the mean task vector. The merged run
    evaluates like any other."""
    from transformers import AutoModel

    folder, runs = single_runs
    out = folder / method
    argv = ["merge", *map(str, runs), "--method", method, "--set", f"scaling={scaling}"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    merge = json.loads((out / "merged" / "metrics.json").read_text())["merge"]
    assert merge["method"] == method and merge["settings"] == {"scaling": scaling}
    base = AutoModel.from_pretrained(str(tiny_backbone)).state_dict()
    first, second = (load_file(str(run / "model.safetensors")) for run in runs)
    merged = load_file(str(out / "merged" / "model.safetensors"))
    matrices = 0
    for key, start in base.items():
        if not start.is_floating_point():
            continue
        name = f"backbone.{key}"
        vectors = torch.stack([first[name] - start, second[name] - start]).double()
        if start.dim() == 2 and min(start.shape) >= 2:
            matrices += 1
            want = start.double() + torch.from_numpy(_numpy_svd_merge(method, vectors.numpy(), scaling))
        else:
            want = start.double() + scaling * vectors.mean(0)
        assert torch.allclose(merged[name].double(), want, atol=1e-5), key
    assert matrices > 0
    assert main(["evaluate", str(out / "merged"), "--split", "test"]) == 0


def test_lora_adapters_refuse_the_svd_merges(lora_run, capsys):
    folder, run = lora_run
    for method in ("tsv", "iso_c"):
        assert main(["merge", str(run), "--method", method, "--output-dir", str(folder / method)]) == 2
        assert "does not merge LoRA adapters" in capsys.readouterr().err
        assert not (folder / method).exists()


def test_regmean_plusplus_merges_block_by_block_and_differs_from_regmean(single_runs):
    """RegMean++ through `multitune merge`: alpha chosen on validation, the paper recorded; the embeddings and
    every norm are the models' average as in RegMean; each block's linear layers are solved from the merged
    blocks' outputs, so they differ from RegMean's solve on the same rows and alpha; the run evaluates."""
    folder, runs = single_runs
    merged = {}
    for method in ("regmean", "regmean_plusplus"):
        out = folder / method
        argv = ["merge", *map(str, runs), "--method", method, "--set", "rows=24", "--set", "alpha=1.0"]
        assert main([*argv, "--output-dir", str(out)]) == 0
        merged[method] = load_file(str(out / "merged" / "model.safetensors"))
    merge = json.loads((folder / "regmean_plusplus" / "merged" / "metrics.json").read_text())["merge"]
    assert merge["paper"] == "Nguyen et al. 2025" and merge["settings"] == {"rows": 24, "alpha": 1.0}
    first, second = (load_file(str(run / "model.safetensors")) for run in runs)
    plus, plain = merged["regmean_plusplus"], merged["regmean"]
    for key, value in plus.items():
        if key.startswith("backbone.") and ("embeddings" in key or "LayerNorm" in key):
            assert torch.allclose(value, (first[key] + second[key]) / 2, atol=1e-6), key
    blocks = sorted({key.split(".layer.")[1].split(".")[0] for key in plus if ".encoder.layer." in key})
    assert len(blocks) >= 2
    for block in blocks:
        key = f"backbone.encoder.layer.{block}.output.dense.weight"
        assert torch.isfinite(plus[key]).all() and not torch.allclose(plus[key], plain[key], atol=1e-6), key
    assert main(["evaluate", str(folder / "regmean_plusplus" / "merged"), "--split", "test"]) == 0
