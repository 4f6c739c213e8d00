"""Model merging: one backbone from several fine-tuned copies of the same pretrained backbone, each task then
keeping its own head. A task vector is τ_t = θ_t − θ_0 (fine-tuned minus pretrained weights, per tensor);
a merge method combines the T task vectors of each tensor into one, and the merged weights are θ_0 + that.
The arithmetic of the sparsifying methods is peft's (peft.utils.merge_utils), the library's well-kept
implementation; each method here fixes how its paper scales and combines.

Methods (MERGE_METHODS), each called with a tensor's stacked task vectors [T, ...] -> merged vector [...]:
- `average`: (1/T)·Σ τ_t, i.e. the average of the fine-tuned weights (a uniform model soup, Wortsman et al.
  2022, "Model soups", ICML);
- `task_arithmetic`: λ·Σ τ_t (Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR);
- `ties`: λ · the disjoint mean of the task vectors trimmed to their `density` largest magnitudes, over the
  entries whose sign agrees with the elected (total-mass) sign (Yadav et al. 2023, "TIES-Merging", NeurIPS);
- `dare`: λ·Σ DARE(τ_t): each entry dropped with probability 1 − `density` and the rest rescaled by
  1/`density` (Yu et al. 2024, "Language Models are Super Mario", ICML), seeded;
- `dare_ties`: DARE's drop and rescale, then TIES' sign election and disjoint mean, times λ;
- `tsv` (TSV-Merge) and `iso_c` (Iso-C): per weight matrix, from singular value decompositions, our own
  (neither library has them): each task's top singular vectors made orthogonal across tasks (Gargiulo et
  al. 2025), or the summed task vectors' spectrum made flat (Marczak et al. 2025).

Three methods look at more than the weights: `adamerging` learns its coefficients from the model's
predictions on unlabelled inputs; `regmean` merges each linear layer from the inputs that layer saw in each
model (its Gram matrices, collected by `InputGrams`), every other tensor averaged; and `regmean_plusplus`
does the same block by block on the inputs each layer sees in the merged model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from multitune.registry import Registry

MERGE_METHODS: Registry[object] = Registry("merge method")


def _checked(scaling: float, density: float | None = None) -> None:
    if not 0 < scaling <= torch.finfo(torch.float32).max:  # the task vectors are float32
        raise ValueError(f"scaling must be positive and finite in float32, got {scaling}")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")


@MERGE_METHODS.register("average")
class Average:
    """(1/T)·Σ τ_t: the fine-tuned weights averaged (Wortsman et al. 2022)."""

    paper = "Wortsman et al. 2022"

    def peft_combination(self, tasks: int) -> tuple[str, list[float], float | None]:
        return "cat", [1.0 / tasks] * tasks, None

    def __call__(self, vectors: Tensor) -> Tensor:
        return vectors.mean(0)


@MERGE_METHODS.register("task_arithmetic")
class TaskArithmetic:
    """λ·Σ τ_t (Ilharco et al. 2023)."""

    paper = "Ilharco et al. 2023"

    def __init__(self, scaling: float = 0.3) -> None:
        _checked(scaling)
        self.scaling = scaling

    def peft_combination(self, tasks: int) -> tuple[str, list[float], float | None]:
        return "cat", [self.scaling] * tasks, None

    def __call__(self, vectors: Tensor) -> Tensor:
        from peft.utils.merge_utils import task_arithmetic

        return task_arithmetic(list(vectors), torch.full((len(vectors),), self.scaling, dtype=vectors.dtype))


@MERGE_METHODS.register("ties")
class Ties:
    """λ · disjoint mean of the trimmed task vectors agreeing with the elected sign (Yadav et al. 2023)."""

    paper = "Yadav et al. 2023"

    def __init__(self, density: float = 0.2, scaling: float = 1.0) -> None:
        _checked(scaling, density)
        self.density, self.scaling = density, scaling

    def peft_combination(self, tasks: int) -> tuple[str, list[float], float | None]:
        return "ties_svd", [self.scaling] * tasks, self.density

    def __call__(self, vectors: Tensor) -> Tensor:
        from peft.utils.merge_utils import ties

        weights = torch.full((len(vectors),), self.scaling, dtype=vectors.dtype)
        return ties(list(vectors), weights, self.density, majority_sign_method="total")


class _Dare:
    """DARE's settings and draws; `arithmetic` names peft's function that combines the dropped vectors."""

    arithmetic = "dare_linear"

    def __init__(self, density: float = 0.5, scaling: float = 1.0, seed: int = 0) -> None:
        _checked(scaling, density)
        self.density, self.scaling, self.seed = density, scaling, seed
        self.calls = 0

    def peft_combination(self, tasks: int) -> tuple[str, list[float], float | None]:
        torch.manual_seed(self.seed)  # peft draws DARE's drops from torch's generator
        return f"{self.arithmetic}_svd", [self.scaling] * tasks, self.density

    def __call__(self, vectors: Tensor) -> Tensor:
        from peft.utils import merge_utils

        torch.manual_seed(self.seed * 1_000_003 + self.calls)  # each tensor its own draws, reproducibly
        self.calls += 1
        weights = torch.full((len(vectors),), self.scaling, dtype=vectors.dtype)
        options = {"majority_sign_method": "total"} if self.arithmetic == "dare_ties" else {}
        return getattr(merge_utils, self.arithmetic)(list(vectors), weights, self.density, **options)  # type: ignore[no-any-return]


@MERGE_METHODS.register("dare")
class Dare(_Dare):
    """λ·Σ of the task vectors with entries dropped at rate 1 − density and rescaled (Yu et al. 2024)."""

    paper = "Yu et al. 2024"


@MERGE_METHODS.register("dare_ties")
class DareTies(_Dare):
    """DARE's drop and rescale, then TIES' sign election and disjoint mean, times λ (Yu et al. 2024)."""

    paper = "Yu et al. 2024"
    arithmetic = "dare_ties"


_RANK_TOLERANCE = 1e-10  # a singular value below this fraction of the largest counts as zero


def _as_matrices(vectors: Tensor) -> Tensor | None:
    """Stacked task vectors [T, ...] as matrices [T, out, in] when each is a weight matrix (two dimensions
    once singleton ones are dropped: a ViT's class token [1, 1, d] is a vector) with min(out, in) ≥ T;
    None otherwise (biases, norms, convolution kernels, T above the rank a matrix can hold): the SVD merges
    leave those to the mean, as their authors do."""
    shape = [size for size in vectors.shape[1:] if size != 1]
    if len(shape) != 2 or min(shape) < vectors.shape[0]:
        return None
    return vectors.reshape(vectors.shape[0], *shape)


def _nearest_orthonormal(matrix: Tensor) -> Tensor:
    """The matrix with orthonormal columns nearest to `matrix` [m, k] (k ≤ m) in Frobenius norm: P·Qᵀ from
    its SVD P·Σ·Qᵀ (the orthogonal Procrustes solution, `matrix`'s polar factor)."""
    left, _, right = torch.linalg.svd(matrix, full_matrices=False)
    return left @ right


class _SpectralMerge:
    """A merge that rebuilds each weight matrix from singular value decompositions (`rebuild`: the task
    vectors [T, out, in] in float64 -> the merged update [out, in]), times λ = `scaling`; every other tensor
    is λ · the mean task vector."""

    def __init__(self, scaling: float = 1.0) -> None:
        _checked(scaling)
        self.scaling = scaling

    def rebuild(self, matrices: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, vectors: Tensor) -> Tensor:
        matrices = _as_matrices(vectors)
        if matrices is None:
            return self.scaling * vectors.mean(0)
        merged = self.rebuild(matrices.double())  # [m, n]
        return (self.scaling * merged).reshape(vectors.shape[1:]).to(vectors.dtype)


@MERGE_METHODS.register("tsv")
class TaskSingularVectors(_SpectralMerge):
    """λ · each matrix from every task's top singular vectors, made orthogonal across tasks (Gargiulo et al. 2025)."""

    paper = "Gargiulo et al. 2025"

    def __init__(self, scaling: float = 1.0) -> None:
        """TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model
        Merging"). For a weight matrix with task vectors τ_t = U_t·S_t·V_tᵀ ([out, in]), keep each task's top
        k = ⌊min(out, in) / T⌋ singular triplets, concatenate them task by task (U [out, T·k], S [T·k],
        V [in, T·k]), replace U and V by their nearest matrices with orthonormal columns (polar factors:
        the tasks' directions made orthogonal to each other, each moved as little as possible) and return
        λ·U⊥·diag(S)·V⊥ᵀ. Triplets whose singular value is zero (a task vector of lower rank than k) are left
        out: their vectors are arbitrary and would turn the others. Every other tensor (biases, norms,
        convolution kernels, a matrix with min(out, in) < T) is λ · the mean task vector, as in the authors'
        code. When the tasks' kept singular vectors are orthogonal to each other and each τ_t has rank ≤ k,
        the result is exactly λ·Σ τ_t. Raises ValueError for a scaling that is not positive, and torch's
        LinAlgError for a task vector holding NaN or inf."""
        super().__init__(scaling)

    def rebuild(self, matrices: Tensor) -> Tensor:
        tasks, rows, columns = matrices.shape
        keep = min(rows, columns) // tasks
        lefts, values, rights = [], [], []
        for matrix in matrices:  # one task at a time: only its top k vectors are kept
            left, value, right = torch.linalg.svd(matrix, full_matrices=False)
            nonzero = value[:keep] > _RANK_TOLERANCE * float(value[0])  # all False for a zero vector
            lefts.append(left[:, :keep][:, nonzero])  # [m, ≤k]
            values.append(value[:keep][nonzero])
            rights.append(right[:keep][nonzero].T)  # [n, ≤k]
        s = torch.cat(values)  # [≤T·k]
        if not len(s):  # every task vector of this tensor is zero
            return torch.zeros_like(matrices[0])
        u, v = _nearest_orthonormal(torch.cat(lefts, 1)), _nearest_orthonormal(torch.cat(rights, 1))
        return (u * s) @ v.T


@MERGE_METHODS.register("iso_c")
class IsoC(_SpectralMerge):
    """λ · Σ τ_t with its singular values replaced by their mean: an isotropic spectrum (Marczak et al. 2025)."""

    paper = "Marczak et al. 2025"

    def __init__(self, scaling: float = 1.0) -> None:
        """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
        Task-Specific Subspaces"). For a weight matrix ([out, in]), the task arithmetic sum
        Δ = Σ_t τ_t = U·S·Vᵀ becomes λ·mean(S)·U·Vᵀ: every direction of the merged update gets the same
        strength, so the directions one task dominates no longer drown the others'. Directions with a zero
        singular value (an exactly rank-deficient sum) are left out of both the mean and the update. Every
        other tensor (biases, norms, convolution kernels, a matrix with min(out, in) < T) is λ · the mean task
        vector, as in the authors' code. Raises ValueError for a scaling that is not positive, and torch's
        LinAlgError for a task vector holding NaN or inf."""
        super().__init__(scaling)

    def rebuild(self, matrices: Tensor) -> Tensor:
        left, values, right = torch.linalg.svd(matrices.sum(0), full_matrices=False)
        kept = values > _RANK_TOLERANCE * float(values[0])
        if not kept.any():  # the task vectors sum to zero
            return torch.zeros_like(matrices[0])
        return values[kept].mean() * (left[:, kept] @ right[kept])


def merge_weights(
    base: Mapping[str, Tensor],
    tuned: Sequence[Mapping[str, Tensor]],
    method: object,
    statistics: Collection[str] = (),
) -> dict[str, Tensor]:
    """θ_0 + method([θ_t − θ_0 for each t]) for every floating-point tensor of `base` (others, such as integer
    position ids, are kept as they are). `statistics`: keys of tensors the models measured rather than learned
    (BatchNorm's running mean and variance): they are no task vectors, and a trimmed or rescaled difference of
    variances can be negative, so they are the mean of the fine-tuned models'. Raises ValueError when a
    fine-tuned model lacks a tensor or has another shape: then they are not copies of one backbone."""
    merged = {}
    for key, start in base.items():
        for index, state in enumerate(tuned):
            if key not in state or state[key].shape != start.shape:
                raise ValueError(f"model {index + 1} is not a copy of the same backbone: tensor '{key}' differs")
        if not start.is_floating_point():
            merged[key] = start.clone()
            continue
        if key in statistics:
            merged[key] = mean_of(tuned, key).to(start.dtype)
            continue
        vectors = torch.stack([state[key].float() - start.float() for state in tuned])  # [T, ...]
        merged[key] = (start.float() + method(vectors)).to(start.dtype)  # type: ignore[operator]
    return merged


def mean_of(tuned: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    """The fine-tuned models' mean of tensor `key` (float32)."""
    return torch.stack([state[key].float() for state in tuned]).mean(0)


def keys_of(base: Mapping[str, Tensor], statistics: Collection[str]) -> list[str]:
    """The floating-point running statistics among `base`'s tensors."""
    return [key for key in statistics if key in base and base[key].is_floating_point()]


MERGED = "merged"  # the merged LoRA adapter's name


def merge_lora_adapters(base: torch.nn.Module, adapters: Mapping[str, str], method: object) -> Any:
    """Per-task LoRA adapters of one base model (peft folders: {task: folder}) merged into one LoRA adapter
    through peft's `add_weighted_adapter`, as `method` combines task vectors: `average` and `task_arithmetic`
    exactly (peft's "cat": the adapters' B·A stacked, weights 1/T or λ), `ties`, `dare` and `dare_ties` on
    each layer's full delta B·A·α/r (peft's "*_svd" combinations) brought back to a LoRA of rank Σ r_t by SVD
    (exact up to that rank). Returns the PeftModel wrapping `base` with the one adapter `merged` active (the
    per-task ones deleted). Raises ValueError for a method peft cannot combine (adamerging learns
    coefficients on the full weights)."""
    from peft import PeftModel

    combination = getattr(method, "peft_combination", None)
    if combination is None:
        raise ValueError(f"{type(method).__name__} does not merge LoRA adapters (peft has no such combination)")
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    kind, weights, density = combination(len(names))
    configs: dict[str, Any] = model.peft_config
    rank = sum(int(configs[name].r) for name in names)
    options: dict[str, Any] = {} if density is None else {"density": density, "majority_sign_method": "total"}
    model.add_weighted_adapter(names, weights, MERGED, combination_type=kind, svd_rank=rank, **options)
    model.set_adapter(MERGED)
    for name in names:
        model.delete_adapter(name)
    return model


def lora_deltas(model: Any, names: Sequence[str]) -> list[dict[str, Tensor]]:
    """Each named adapter's weight change per adapted tensor ({module.weight: B·A·α/r}) of a PeftModel."""
    from peft.tuners.lora import LoraLayer

    deltas: list[dict[str, Tensor]] = [{} for _ in names]
    for key, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            layer: Any = module
            for index, name in enumerate(names):
                if name in layer.lora_A:
                    deltas[index][f"{key}.weight"] = layer.get_delta_weight(name).detach()
    return deltas


def task_vector_cosines(
    base: Mapping[str, Tensor], tuned: Sequence[Mapping[str, Tensor]], statistics: Collection[str] = ()
) -> tuple[list[list[float]], dict[str, list[list[float]]]]:
    """Cosine similarity between the task vectors τ_t = θ_t − θ_0: over all floating-point tensors together
    ([T, T]), and per layer ({layer: [T, T]}, a layer being a key's path up to its first number, e.g.
    `encoder.layer.3`; other tensors under "other"). Tasks whose vectors point the same way merge with
    little interference (Ilharco et al. 2023 report near-orthogonal task vectors across tasks)."""
    count = len(tuned)
    dots: dict[str, Tensor] = {}
    for key, start in base.items():
        if not start.is_floating_point() or key in statistics:  # running statistics are not task vectors
            continue
        vectors = torch.stack([(state[key].float() - start.float()).flatten() for state in tuned])  # [T, P]
        layer = layer_of(key)
        gram = vectors.double() @ vectors.double().T  # [T, T]
        dots[layer] = dots.get(layer, torch.zeros(count, count, dtype=torch.float64)) + gram
    overall = sum(dots.values(), torch.zeros(count, count, dtype=torch.float64))

    def cosine(gram: Tensor) -> list[list[float]]:
        norms = gram.diagonal().clamp_min(1e-30).sqrt()
        return [[round(float(v), 6) for v in row] for row in gram / norms[:, None] / norms[None, :]]

    return cosine(overall), {layer: cosine(gram) for layer, gram in dots.items()}


def layer_of(key: str) -> str:
    """A tensor's layer: its key's path up to the first number (`encoder.layer.3`), or "other"."""
    parts = key.split(".")
    cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 0)
    return ".".join(parts[:cut]) if cut else "other"


@MERGE_METHODS.register("adamerging")
class AdaMerging:
    """θ_0 + Σ_t λ_t τ_t with λ learned by entropy minimisation on unlabelled inputs (Yang et al. 2024)."""

    paper = "Yang et al. 2024"
    learns = True  # needs the model and unlabelled inputs: runs/merge.py calls `learn`, not the method itself

    def __init__(self, granularity: str = "task", steps: int = 100, lr: float = 1e-3, init: float = 0.3) -> None:
        """AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning"):
        one coefficient per task vector (`granularity` "task") or per task vector and layer ("layer"),
        started at `init` (task arithmetic's usual λ) and trained with Adam (`lr`, `steps` steps) to lower
        the entropy of every task head's predictions on its own unlabelled inputs."""
        finite = 0 < lr < float("inf") and 0 < init < float("inf")
        if granularity not in ("task", "layer") or steps < 1 or not finite:
            raise ValueError("granularity must be task or layer, steps >= 1, lr and init positive and finite")
        self.granularity, self.steps, self.lr, self.init = granularity, steps, lr, init

    def __call__(self, vectors: Tensor) -> Tensor:
        raise ValueError("adamerging learns its coefficients from the model and unlabelled inputs")

    def learn(
        self,
        model: torch.nn.Module,
        base: Mapping[str, Tensor],
        tuned: Sequence[Mapping[str, Tensor]],
        batches: Mapping[str, Sequence[object]],
        statistics: Collection[str] = (),
    ) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
        """The merged backbone weights and the learned coefficients ({layer or "all": [T]}). `model` is the
        multi-task model whose `backbone` the weights are for (its heads fixed); `batches` gives each task's
        unlabelled input batches (collated Batch objects; their labels are not read); `statistics` (running
        statistics) are averaged, not learned, as in merge_weights."""
        from torch.func import functional_call

        keys = [key for key, value in base.items() if value.is_floating_point() and key not in statistics]
        groups = sorted({layer_of(key) for key in keys}) if self.granularity == "layer" else ["all"]
        index = {key: groups.index(layer_of(key)) if self.granularity == "layer" else 0 for key in keys}
        vectors = {key: torch.stack([state[key].float() - base[key].float() for state in tuned]) for key in keys}
        coefficients = torch.nn.Parameter(torch.full((len(groups), len(tuned)), self.init))  # [G, T]
        optimizer = torch.optim.Adam([coefficients], lr=self.lr)
        fixed = {f"backbone.{key}": value for key, value in base.items() if key not in vectors}
        for key in keys_of(base, statistics):  # the running statistics: the fine-tuned models' mean
            fixed[f"backbone.{key}"] = mean_of(tuned, key).to(base[key].dtype)

        def weights() -> dict[str, Tensor]:
            merged = {}
            for key in keys:
                scale = coefficients[index[key]].view(-1, *([1] * base[key].dim()))  # [T, 1, ...]
                merged[f"backbone.{key}"] = base[key].float() + (scale * vectors[key]).sum(0)
            return {**fixed, **merged}

        was_training = model.training
        model.eval()
        for parameter in model.parameters():  # only the coefficients learn
            parameter.requires_grad_(False)
        cursor = dict.fromkeys(batches, 0)
        for _ in range(self.steps):
            optimizer.zero_grad()
            current = weights()
            loss = torch.zeros(())
            for task, task_batches in batches.items():
                batch = task_batches[cursor[task] % len(task_batches)]
                cursor[task] += 1
                outputs = functional_call(model, current, (batch,), strict=False)[task]
                loss = loss + prediction_entropy(outputs, batch)  # type: ignore[arg-type]
            loss.backward()
            optimizer.step()
        model.train(was_training)
        with torch.no_grad():
            final = {
                key[len("backbone.") :]: value.detach().to(base[key[len("backbone.") :]].dtype)
                for key, value in weights().items()
            }
        learned = {group: [round(float(v), 6) for v in coefficients[g]] for g, group in enumerate(groups)}
        return final, learned


def prediction_entropy(outputs: Tensor, batch: object) -> Tensor:
    """Mean Shannon entropy (nats) of a head's predicted distributions: [B, C] logits per row, or [B, L, C]
    per token over the real tokens; 0 for outputs that are not distributions (regression, [B])."""
    if outputs.dim() < 2 or outputs.shape[-1] < 2:
        return outputs.sum() * 0.0
    log_p = torch.log_softmax(outputs.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # [B] or [B, L]
    if entropy.dim() == 2:
        mask = batch.inputs["attention_mask"][:, : entropy.shape[1]].float()  # type: ignore[attr-defined]
        return (entropy * mask).sum() / mask.sum().clamp_min(1.0)
    return entropy.mean()


def linear_layers(module: nn.Module) -> dict[str, nn.Module]:
    """`module`'s linear layers (nn.Linear, and transformers' Conv1D as GPT-2 has them) by name, in the order
    `named_modules` gives (the order of definition)."""
    from transformers.pytorch_utils import Conv1D

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, (nn.Linear, Conv1D))}


@dataclass
class LayerInputs:
    """What one linear layer saw: `gram` = X̃ᵀX̃ [d, d] (float64) over its input rows X [N, in], with X̃ = X
    and a column of ones appended when the layer has a bias (d = in + 1), else X̃ = X (d = in); `rows` = N.
    `transposed`: the weight is stored [in, out] (transformers' Conv1D, GPT-2) rather than [out, in]."""

    gram: Tensor
    rows: int
    bias: bool
    transposed: bool


class InputGrams:
    """Forward hooks on every linear layer of `module` (nn.Linear, and transformers' Conv1D) that add each
    forward's input rows to the layer's Gram matrix (`LayerInputs`), keyed by the layer's name in `module`.
    Set `mask` ([B, L] bool or 0/1) before a forward whose linear inputs are [B, L, in] to count only the
    real tokens; inputs of any other shape count every row of their last dimension. `only` (layer names)
    limits the hooks to those layers; `stop_after` (a submodule) ends a forward run through `run` once that
    module has run, since nothing after it is read. Use as a context manager: the hooks are removed on exit."""

    def __init__(
        self, module: nn.Module, only: Collection[str] | None = None, stop_after: nn.Module | None = None
    ) -> None:
        from transformers.pytorch_utils import Conv1D

        self.layers: dict[str, LayerInputs] = {}
        self.mask: Tensor | None = None
        self._hooks = []
        for name, layer in linear_layers(module).items():
            if only is None or name in only:
                transposed = isinstance(layer, Conv1D)
                self._hooks.append(layer.register_forward_hook(self._hook(name, layer.bias is not None, transposed)))
        if stop_after is not None:
            self._hooks.append(stop_after.register_forward_hook(_stop))

    def run(self, forward: Callable[[], Any]) -> None:
        """`forward()`, ended early where `stop_after` says."""
        with contextlib.suppress(_Stopped):
            forward()

    def _hook(self, name: str, bias: bool, transposed: bool) -> Any:
        def add(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            x = inputs[0].detach()
            mask = self.mask
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]  # [real tokens, in]
            x = x.reshape(-1, x.shape[-1]).double()
            if bias:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
            gram = (x.T @ x).cpu()
            seen = self.layers.get(name)
            if seen is None:
                self.layers[name] = LayerInputs(gram, len(x), bias, transposed)
            else:
                seen.gram += gram
                seen.rows += len(x)

        return add

    def __enter__(self) -> InputGrams:
        return self

    def __exit__(self, *_: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class _Stopped(Exception):
    """Raised by `stop_after`'s hook: the rest of the forward is not needed."""


def _stop(*_: object) -> None:
    raise _Stopped


@dataclass
class LayerSums:
    """RegMean's sums over the models for one linear layer, with Θ_t [d, out] the layer's weights in model t
    (Wᵀ, the bias as a last row when it has one) and G_t = X̃_tᵀX̃_t / N_t [d, d] its input Gram matrix there
    (`LayerInputs`) divided by its N_t input rows, so that each model weighs the same whatever its tasks' text
    lengths: `gram` Σ G_t, `weighted` Σ G_t Θ_t and `diagonal` Σ diag(G_t) Θ_t (float64), over `models`
    models. Every setting of `alpha` merges from these; they hold one [d, d] and two [d, out] matrices per
    layer however many models are folded in."""

    gram: Tensor
    weighted: Tensor
    diagonal: Tensor
    models: int
    bias: bool
    transposed: bool


def _theta(state: Mapping[str, Tensor], name: str, seen: LayerInputs | LayerSums) -> Tensor:
    """Layer `name`'s weights in `state` as one [d, out] matrix: Wᵀ over the bias."""
    prefix = f"{name}." if name else ""  # the root module's own tensors have no prefix
    weight = state[f"{prefix}weight"].double()
    theta = weight if seen.transposed else weight.T  # [in, out]
    if seen.bias:
        theta = torch.cat([theta, state[f"{prefix}bias"].double()[None]], dim=0)  # [in + 1, out]
    return theta


def add_layer_inputs(
    sums: dict[str, LayerSums], inputs: Mapping[str, LayerInputs], state: Mapping[str, Tensor]
) -> dict[str, LayerSums]:
    """`sums` with one more model folded in: its layers' inputs (`InputGrams.layers`) and its weights
    (`state`, the backbone's state dict). Raises ValueError when its forward went through other linear
    layers than the models before it."""
    if sums and set(sums) != set(inputs):
        raise ValueError("the models' forwards went through different linear layers")
    for name, seen in inputs.items():
        theta = _theta(state, name, seen)
        gram = seen.gram / max(seen.rows, 1)
        weighted, diagonal = gram @ theta, gram.diagonal()[:, None] * theta
        if name not in sums:
            sums[name] = LayerSums(gram, weighted, diagonal, 1, seen.bias, seen.transposed)
            continue
        total = sums[name]
        total.gram += gram
        total.weighted += weighted
        total.diagonal += diagonal
        total.models += 1
    return sums


@MERGE_METHODS.register("regmean")
class RegMean:
    """Linear layers fitted to each model's outputs on the inputs they saw, the rest averaged (Jin et al. 2023)."""

    paper = "Jin et al. 2023"
    needs_inputs = True  # runs/merge.py collects each model's layer inputs (InputGrams) and calls `merge`

    def __init__(self, alpha: float = 0.9, rows: int = 256) -> None:
        """RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language
        Models"). For a linear layer with weights Θ_t ([d, out]: Wᵀ, the bias as a last row) in model t and
        input Gram matrix G_t = X̃_tᵀX̃_t / N_t over the N_t input rows (tokens) of model t's own forward on
        `rows` of each of its tasks' training inputs (labels not read), the merged weights minimise
        Σ_t ||X̃_t Θ − X̃_t Θ_t||² / N_t: Θ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t Θ_t, where G̃_t keeps G_t's diagonal and
        scales its off-diagonal entries by `alpha` in (0, 1] (alpha 1: the exact least-squares merge; smaller
        values pull toward a per-input-feature weighted average, which the paper found to generalise
        better). Dividing by N_t, as the common implementations do, weighs each model alike whatever the
        length of its texts. A ridge of 1e-6 times the mean diagonal, toward the models' average weights,
        settles directions that no input reached. Embeddings, norms and every tensor outside a linear layer
        are the fine-tuned models' average."""
        if not 0 < alpha <= 1 or rows < 1:
            raise ValueError(f"alpha must be in (0, 1] and rows at least 1, got alpha={alpha}, rows={rows}")
        self.alpha, self.rows = alpha, rows

    def __call__(self, vectors: Tensor) -> Tensor:
        raise ValueError("regmean merges from the inputs each model's layers saw: runs/merge.py calls `merge`")

    def merge(
        self,
        base: Mapping[str, Tensor],
        tuned: Sequence[Mapping[str, Tensor]],
        sums: Mapping[str, LayerSums],
        statistics: Collection[str] = (),
        averaged: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The merged backbone weights from the models' `sums` (`add_layer_inputs` over every model in
        `tuned`); a tensor outside the summed layers is the models' average (`averaged`, when the caller has
        it already)."""
        merged = dict(averaged) if averaged is not None else merge_weights(base, tuned, Average(), statistics)
        for name, total in sorted(sums.items()):
            if total.models != len(tuned):
                raise ValueError(f"layer '{name}' has the inputs of {total.models} models, not {len(tuned)}")
            alpha = self.alpha  # G̃ = αG + (1 − α)·diag(G), summed over the models term by term
            gram = alpha * total.gram + (1 - alpha) * torch.diag(total.gram.diagonal())
            target = alpha * total.weighted + (1 - alpha) * total.diagonal
            # a small ridge toward the average settles directions no input reached (an all-zero feature)
            ridge = 1e-6 * float(gram.diagonal().mean().clamp_min(1e-30))
            eye = torch.eye(len(gram), dtype=gram.dtype)
            average = _theta(merged, name, total)  # merged holds the average so far
            solved = torch.linalg.solve(gram + ridge * eye, target + ridge * average)  # [d, out]
            prefix = f"{name}." if name else ""
            if total.bias:
                merged[f"{prefix}bias"] = solved[-1].to(base[f"{prefix}bias"].dtype)
                solved = solved[:-1]
            weight = f"{prefix}weight"
            merged[weight] = (solved if total.transposed else solved.T).contiguous().to(base[weight].dtype)
        return merged


def layer_blocks(module: nn.Module) -> list[str]:
    """The names of `module`'s blocks in the order they are defined (the order a forward reaches them in a
    transformer): the entries of every nn.ModuleList whose entries are all of one class and each hold linear
    layers, and which is not inside another such list (BERT's `encoder.layer.0`, ..., GPT-2's `h.0`, ...; T5's
    encoder blocks, then its decoder blocks; a mixture of experts' expert lists stay inside their layer).
    Raises ValueError when it has none."""
    lists: list[tuple[str, nn.ModuleList]] = []
    for name, candidate in module.named_modules():
        if not isinstance(candidate, nn.ModuleList) or not len(candidate):
            continue
        if len({type(block) for block in candidate}) > 1 or not all(linear_layers(b) for b in candidate):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in lists):
            continue
        lists.append((name, candidate))
    if not lists:
        raise ValueError(
            f"{type(module).__name__} has no list of like blocks holding linear layers (a transformer's layers)"
        )
    return [f"{name}.{index}" if name else str(index) for name, blocks in lists for index in range(len(blocks))]


@MERGE_METHODS.register("regmean_plusplus")
class RegMeanPlusPlus(RegMean):
    """RegMean block by block, each block's inputs taken from the blocks already merged (Nguyen et al. 2025)."""

    paper = "Nguyen et al. 2025"
    in_order = True  # runs/merge.py calls `merge_in_order` with a forward over each model's inputs

    def __init__(self, alpha: float = 0.9, rows: int = 256) -> None:
        """RegMean++ (Nguyen et al. 2025, arXiv 2508.03121, TMLR 2026, "RegMean++: Enhancing Effectiveness
        and Generalization of Regression Mean for Model Merging"). RegMean (see `RegMean`) fits each linear
        layer to model t's outputs on the inputs that layer saw in model t itself; RegMean++ fits it on the
        inputs it sees in the merged model. The blocks (`layer_blocks`: a transformer's layers) are merged
        first to last: the embeddings and every tensor outside a linear layer are first averaged; then for
        block l, each model t runs its own block l (intra-layer dependencies: a block's later layers see its
        earlier ones' outputs in model t) on what the merged blocks 0..l−1 make of its tasks' inputs
        (cross-layer dependencies), which gives block l's Gram matrices, and the block is merged by RegMean's
        solve with `alpha`. The linear layers outside the blocks (BERT's pooler) are merged last, from the
        inputs they see with every block merged."""
        super().__init__(alpha, rows)

    def merge_in_order(
        self,
        module: nn.Module,
        base: Mapping[str, Tensor],
        tuned: Sequence[Mapping[str, Tensor]],
        forward: Callable[[int, InputGrams], None],
        statistics: Collection[str] = (),
    ) -> dict[str, Tensor]:
        """The merged weights of `module` (a backbone, used as the working copy: its weights are overwritten).
        `forward(t, grams)` runs model t's forward over its tasks' inputs through `module`, each batch as
        `grams.run(lambda: ...)` (which ends it after the block being merged), setting `grams.mask` first
        where the inputs are padded token rows.
        Raises ValueError when the module has no blocks (`layer_blocks`) or a model is another backbone."""
        blocks = layer_blocks(module)
        linear = linear_layers(module)
        inside = {block: [name for name in linear if name.startswith(f"{block}.")] for block in blocks}
        in_blocks = {name for names in inside.values() for name in names}
        outside = [name for name in linear if name not in in_blocks]
        outside_keys = {key for name in outside for key in (f"{name}.weight", f"{name}.bias")}
        average = merge_weights(base, tuned, Average(), statistics)  # computed once for every block's solve
        done = dict(average)  # final for what no layer solves
        fixed = {key for key in base if not any(key.startswith(f"{block}.") for block in blocks)} - outside_keys
        for block in [*blocks, None]:
            layers = inside[block] if block is not None else outside
            if not layers:
                continue
            sums: dict[str, LayerSums] = {}
            for index, state in enumerate(tuned):
                # merged: the tensors outside any linear layer and every block before this one; model t's: the rest
                module.load_state_dict({key: done[key] if key in fixed else value for key, value in state.items()})
                stop = module.get_submodule(block) if block is not None else None  # nothing after it is read
                with InputGrams(module, only=layers, stop_after=stop) as grams, torch.no_grad():
                    forward(index, grams)
                add_layer_inputs(sums, grams.layers, state)
            solved = self.merge(base, tuned, sums, statistics, average)
            owned = (
                {key for key in base if key.startswith(f"{block}.")} if block is not None else outside_keys & set(base)
            )
            done.update({key: solved[key] for key in owned})
            fixed |= owned
        return done
