"""Training throughput, side by side in one process: (a) the plain padded loop a user writes by hand,
(b) the same loop with length bucketing, (c) multitune's training step, on identical examples.

Two models with random weights:
- `causal`: a Qwen2-0.5B-shaped decoder (24 layers, 896 wide, GQA 14/2 heads, vocabulary 151,936, tied
  embeddings) fully fine-tuned on a mixed multi-task instruction stream. The plain loops pad each batch
  and let the Hugging Face model compute its own loss (logits for every position); multitune packs the
  same examples into rows (position ids restart per example, no attention across examples) and takes
  the LM head fused with cross-entropy only at the target tokens (models/lm_loss.py).
- `encoder`: a BERT-base-shaped encoder with 5 task heads (classification, pair classification,
  regression, 6-way classification, token tagging); each step trains one task's batch. multitune runs
  its real step (MultiTaskModel, collate, balanced_backward with equal weights) on the very batches of
  the plain loop (`multitune`) and of the bucketed loop (`multitune-grouped`).

Example lengths come from real data: `--write-lengths` tokenises the eight real tasks (and Multi30k
translation for the instruction mix) and stores only the token counts in benchmarks/data/, so the
benchmark itself needs no data set and runs unchanged on a machine without one.

Reported per variant: real (non-padding) tokens/s, samples/s, MFU (6·N FLOPs per real token, N = the
parameters used in matmuls, i.e. without input-embedding tables; attention's own FLOPs are not counted,
as in Kaplan et al. 2020 and PaLM's model-FLOPs convention), against a peak measured in the same run (a
large matmul in the run's dtype), and peak memory (CUDA: the allocator's peak for that variant alone;
CPU: the process's peak RSS so far, which only grows).

    python benchmarks/throughput.py --model encoder            # CPU: BERT-base shape, fp32
    python benchmarks/throughput.py --model causal --layers 2  # CPU smoke run of the causal side
    python benchmarks/throughput.py --model both --dtype bf16  # GPU: full shapes, bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from multitune.balancing.backward import Balancer, balanced_backward  # noqa: E402
from multitune.config import MethodConfig  # noqa: E402
from multitune.data.collate import collate, pack  # noqa: E402
from multitune.data.tokens import IGNORE_INDEX, Encoded  # noqa: E402
from multitune.models.causal_lm import CausalLMMultiTask  # noqa: E402
from multitune.models.heads import HEADS  # noqa: E402
from multitune.models.multitask import MultiTaskModel  # noqa: E402
from multitune.recipe.components import build_balancer  # noqa: E402

LENGTHS = ROOT / "data" / "throughput_lengths.json"
ENCODER_TASKS = {  # task -> (head type, labels)
    "sst2": ("classification", 2),
    "mrpc": ("pair_classification", 2),
    "stsb": ("regression", 1),
    "trec": ("classification", 6),
    "wnut17": ("token_classification", 13),
}
INSTRUCTIONS = {
    "sst2": "Is the sentiment of this sentence positive or negative?",
    "cola": "Is this sentence grammatically acceptable?",
    "mrpc": "Do these two sentences mean the same thing?",
    "rte": "Does the first sentence entail the second?",
    "stsb": "Rate the similarity of these two sentences from 0 to 5.",
    "trec": "What type of answer does this question expect?",
    "sms_spam": "Is this text message spam or ham?",
    "wnut17": "List the named entities in this text with their types.",
}


# --- the length distribution ---------------------------------------------------------------------


def write_lengths(config_path: str, translation_dir: Path, per_task: int, seed: int) -> None:
    """Token counts of real examples: encoder rows (MiniLM's BERT vocabulary, as BERT-base) for the five
    encoder tasks; chat-template prompt and target lengths (SmolLM2's tokenizer) for the instruction mix."""
    from multitune.catalogue import load_config
    from multitune.data.encoding import encode
    from multitune.data.tasks import load_tasks
    from multitune.models.backbone import load_backbone
    from multitune.models.causal_lm import load_causal_lm

    config = load_config(config_path, [])
    tasks = load_tasks(config.tasks, config.run.seed)
    rng = random.Random(seed)
    bert = load_backbone("sentence-transformers/all-MiniLM-L6-v2").tokenizer
    smol = load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct").tokenizer
    encoder: dict[str, list[int]] = {}
    causal: dict[str, list[list[int]]] = {}
    for name, task in tasks.items():
        examples = rng.sample(task.splits["train"], min(per_task, len(task.splits["train"])))
        if name in ENCODER_TASKS:
            encoder[name] = [len(row.input_ids) for row in encode(examples, task, bert, 512)]
        pairs = []
        for example in examples:
            text = "\n".join(example.texts) if name != "wnut17" else " ".join(example.texts)
            if name == "wnut17":
                tags = example.label or ()
                target = ", ".join(f"{w} ({t[2:]})" for w, t in zip(example.texts, tags, strict=False) if t != "O")
                target = target or "none"
            elif isinstance(example.label, float):
                target = f"{example.label:.1f}"
            else:
                target = str(example.label)
            pairs.append(chat_lengths(smol, f"{INSTRUCTIONS[name]}\n{text}", target))
        causal[name] = pairs
    english = (translation_dir / "train.en").read_text(encoding="utf-8").splitlines()
    german = (translation_dir / "train.de").read_text(encoding="utf-8").splitlines()
    picks = rng.sample(range(len(english)), per_task)
    causal["multi30k"] = []
    for i in picks:
        causal["multi30k"].append(chat_lengths(smol, f"Translate to German:\n{english[i]}", german[i]))
    LENGTHS.parent.mkdir(parents=True, exist_ok=True)
    LENGTHS.write_text(
        json.dumps(
            {
                "about": "token counts only (no text) of real training examples; see benchmarks/throughput.py",
                "encoder_tokenizer": "bert-base-uncased vocabulary (all-MiniLM-L6-v2)",
                "causal_tokenizer": "SmolLM2-135M-Instruct, chat template; [prompt, target + eos]",
                "encoder": encoder,
                "causal": causal,
            }
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {LENGTHS}")


def chat_lengths(tokenizer: Any, message: str, target: str) -> list[int]:
    """[prompt tokens (chat template, generation prompt), target tokens + eos]."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    return [len(prompt), len(tokenizer(target, add_special_tokens=False)["input_ids"]) + 1]


# --- the step streams: identical examples for every variant ---------------------------------------


def bucketed(batches: list[list[Any]], length: Callable[[Any], int], seed: int, window: int = 50) -> list[list[Any]]:
    """The same examples, regrouped: windows of `window` batches sorted by length and cut again, the new
    batches shuffled (what a user's bucketing sampler does)."""
    rng = random.Random(seed)
    out = []
    for start in range(0, len(batches), window):
        group = batches[start : start + window]
        size = len(group[0])
        examples = sorted((e for b in group for e in b), key=length, reverse=True)
        out.extend(examples[i : i + size] for i in range(0, len(examples), size))
    rng.shuffle(out)
    return out


def causal_batches(lengths: dict[str, list[list[int]]], steps: int, batch: int, vocab: int, seed: int) -> list:
    """Mixed-task batches of (task, prompt ids, target ids), tasks drawn uniformly."""
    rng = random.Random(seed)
    names = sorted(lengths)
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            name = rng.choice(names)
            prompt, target = rng.choice(lengths[name])
            rows.append(
                (name, [rng.randrange(vocab) for _ in range(prompt)], [rng.randrange(vocab) for _ in range(target)])
            )
        out.append(rows)
    return out


def encoder_batches(lengths: dict[str, list[int]], steps: int, batch: int, vocab: int, seed: int) -> list:
    """One task per step (uniform), rows of (task, ids, label)."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        name = rng.choice(sorted(lengths))
        kind, labels = ENCODER_TASKS[name]
        rows = []
        for _ in range(batch):
            n = rng.choice(lengths[name])
            ids = [101, *(rng.randrange(1000, vocab) for _ in range(max(n - 2, 1))), 102]
            if kind == "token_classification":
                label: Any = [rng.randrange(labels) for _ in ids]
            elif kind == "regression":
                label = rng.gauss(0.0, 1.0)
            else:
                label = rng.randrange(labels)
            rows.append((name, ids, label))
        out.append(rows)
    return out


# --- models ----------------------------------------------------------------------------------------


def qwen2_05b(layers: int | None) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers or 24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        use_cache=False,
    )
    return Qwen2ForCausalLM(config)


def bert_base(layers: int | None) -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(num_hidden_layers=layers or 12), add_pooling_layer=False)


def matmul_parameters(model: nn.Module) -> int:
    """Parameters used in matmuls: all but input-embedding tables (a tied LM head counts once, as a matmul)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied_head = getattr(model, "get_output_embeddings", lambda: None)()
    if tied_head is not None:
        tables.discard(id(tied_head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in tables)


# --- steps -----------------------------------------------------------------------------------------


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def plain_causal_step(model: nn.Module, rows: list, device: torch.device) -> None:
    """What a user writes: pad, mask the prompt in the labels, let the model compute its loss."""
    ids = [p + t for _, p, t in rows]
    labels = [[IGNORE_INDEX] * len(p) + t for _, p, t in rows]
    input_ids = pad(ids, 0).to(device)
    mask = pad([[1] * len(i) for i in ids], 0).to(device)
    out = model(input_ids=input_ids, attention_mask=mask, labels=pad(labels, IGNORE_INDEX).to(device))
    out.loss.backward()


def causal_encoded(rows: list) -> dict[str, list[Encoded]]:
    """multitune's rows: prompt + target ids, labels shifted onto the positions that predict them."""
    by_task: dict[str, list[Encoded]] = {}
    for name, prompt, target in rows:
        ids = prompt + target
        label = [IGNORE_INDEX] * len(ids)
        label[len(prompt) - 1 : len(ids) - 1] = target
        by_task.setdefault(name, []).append(Encoded(ids, None, label, prompt_length=len(prompt)))
    return by_task


class EncoderPlain(nn.Module):
    """The hand-written multi-task encoder: a backbone, mean pooling, one linear head per task."""

    def __init__(self, backbone: nn.Module, hidden: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({n: nn.Linear(hidden, k) for n, (_, k) in ENCODER_TASKS.items()})

    def step(self, rows: list, device: torch.device) -> None:
        name = rows[0][0]
        kind, _ = ENCODER_TASKS[name]
        input_ids = pad([r[1] for r in rows], 0).to(device)
        mask = (input_ids != 0).long()
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        head = self.heads[name]
        if kind == "token_classification":
            labels = pad([r[2] for r in rows], IGNORE_INDEX).to(device)
            loss = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        else:
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            if kind == "regression":
                loss = F.mse_loss(head(pooled).squeeze(-1), torch.tensor([r[2] for r in rows], device=device))
            else:
                loss = F.cross_entropy(head(pooled), torch.tensor([r[2] for r in rows], device=device))
        loss.backward()


def encoder_encoded(rows: list) -> dict[str, list[Encoded]]:
    return {rows[0][0]: [Encoded(ids, None, label) for _, ids, label in rows]}


def equal_weights(tasks: list[str]) -> Balancer:
    return build_balancer(MethodConfig(name="equal"), None, tasks, {}, 0)


# --- measuring -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The dense matmul rate of this device in this dtype (FLOP/s), measured now."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - started) / 5)
    return 2 * n**3 / best


def peak_memory(device: torch.device) -> int:
    from multitune.recipe.session import peak_memory_bytes

    return peak_memory_bytes(device)


@dataclass
class Variant:
    name: str
    model: nn.Module
    step: Callable[[list], None]
    batches: list[list]


def train_step(variant: Variant, optimizer: torch.optim.Optimizer, rows: list, autocast: Any) -> None:
    with autocast:
        variant.step(rows)
    torch.nn.utils.clip_grad_norm_([p for p in variant.model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def interleaved(
    variants: list[Variant], tokens: Callable[[list], int], warmup: int, device: torch.device, dtype: torch.dtype
) -> list[dict[str, Any]]:
    """Every variant takes its step i in turn (i = 0, 1, ...), each step timed on its own: a slow moment of
    the machine hits all variants alike. Then each variant alone for two steps, for its peak memory."""
    fused = device.type == "cuda"
    optimizers = [
        torch.optim.AdamW([p for p in v.model.parameters() if p.requires_grad], lr=1e-5, fused=fused) for v in variants
    ]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times: list[list[float]] = [[] for _ in variants]
    for i in range(len(variants[0].batches)):
        for k, (variant, optimizer) in enumerate(zip(variants, optimizers, strict=True)):
            sync(device)
            started = time.perf_counter()
            train_step(variant, optimizer, variant.batches[i], autocast)
            sync(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - started)
    results = []
    for k, (variant, optimizer) in enumerate(zip(variants, optimizers, strict=True)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for rows in variant.batches[:2]:
            train_step(variant, optimizer, rows, autocast)
        profile = profiled(variant, optimizer, autocast, device) if PROFILE_STEPS else None
        timed = variant.batches[warmup:]
        seconds = sum(times[k])
        results.append(
            {
                "variant": variant.name,
                "steps": len(timed),
                "seconds": round(seconds, 3),
                "median_step_seconds": round(statistics.median(times[k]), 4),
                "samples_per_s": sum(len(rows) for rows in timed) / seconds,
                "tokens_per_s": sum(tokens(rows) for rows in timed) / seconds,
                "peak_memory_bytes": peak_memory(device),
                **({"profile": profile} if profile else {}),
            }
        )
        print(f"  {variant.name}: {results[-1]['samples_per_s']:.2f} samples/s", flush=True)
    return results


PROFILE_STEPS = 0  # --profile N: N more steps of each variant under torch.profiler


def profiled(variant: Variant, optimizer: torch.optim.Optimizer, autocast: Any, device: torch.device) -> dict[str, Any]:
    """Where a step's time goes (torch.profiler over PROFILE_STEPS steps): wall time, the device's busy
    time (the sum of kernel times; wall minus it is the time the device waited for the host), the host's
    own time in the step outside torch ops, and the ops with the most self time on the device (CPU: host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = variant.batches[2 : 2 + PROFILE_STEPS] or variant.batches[:PROFILE_STEPS]
    sync(device)
    started = time.perf_counter()
    with profile(activities=activities) as trace:
        for batch in rows:
            train_step(variant, optimizer, batch, autocast)
        sync(device)
    wall = time.perf_counter() - started
    events = trace.key_averages()
    on_device = device.type == "cuda"

    def own(event: Any) -> float:  # microseconds of self time where the step's time is spent
        return float(event.self_device_time_total if on_device else event.self_cpu_time_total)

    busy = sum(own(e) for e in events) / 1e6 if on_device else None
    top = sorted(events, key=own, reverse=True)[:15]
    return {
        "steps": len(rows),
        "wall_seconds": round(wall, 4),
        "device_busy_seconds": None if busy is None else round(busy, 4),
        "device_idle_share": None if busy is None else round(max(0.0, 1 - busy / wall), 3),
        "top_ops": [
            {"op": e.key, "calls": e.count, "self_ms": round(own(e) / 1e3, 2), "share": round(own(e) / 1e6 / wall, 3)}
            for e in top
        ],
    }


def finish(title: str, model: nn.Module, results: list[dict[str, Any]], peak: float) -> dict[str, Any]:
    n = matmul_parameters(model)
    for r in results:
        r["mfu"] = 6 * n * r["tokens_per_s"] / peak
    return {"model": title, "matmul_parameters": n, "results": results}


def bench_causal(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak: float) -> dict[str, Any]:
    lengths = json.loads(LENGTHS.read_text(encoding="utf-8"))["causal"]
    torch.manual_seed(0)
    model = qwen2_05b(args.layers).to(device)
    plain_attn = model.config._attn_implementation  # the plain loops keep transformers' default (sdpa)
    attn = args.attn or plain_attn  # multitune's steps use --attn (e.g. flex_attention)
    vocab = model.config.vocab_size
    total = args.warmup + args.steps
    padded = causal_batches(lengths, total, args.batch_size, vocab, args.seed)
    grouped = padded[: args.warmup] + bucketed(padded[args.warmup :], lambda r: len(r[1]) + len(r[2]), args.seed)
    multi = CausalLMMultiTask(model, None, {}, sorted(lengths))
    multi.loss_chunk = args.loss_chunk
    if args.compile:
        multi.body.compile(dynamic=True)
    balancer = equal_weights(sorted(lengths))
    pack_length = args.pack_length

    def use(implementation: str) -> None:
        if model.config._attn_implementation != implementation:
            model.set_attn_implementation(implementation)

    def multitune_step(rows: list) -> None:
        use(attn)
        batch = pack(causal_encoded(rows), 0, pack_length).to(device)
        balanced_backward(multi, batch, balancer, 0)

    def multitune_padded_step(rows: list) -> None:
        use(attn)
        batch = collate(causal_encoded(rows), 0).to(device)
        balanced_backward(multi, batch, balancer, 0)

    def tokens(rows: list) -> int:
        return sum(len(p) + len(t) for _, p, t in rows)

    def plain_step(rows: list) -> None:
        use(plain_attn)
        plain_causal_step(model, rows, device)

    variants = [
        Variant("plain padded", model, plain_step, padded),
        Variant("plain bucketed", model, plain_step, grouped),
        Variant("multitune padded", multi, multitune_padded_step, padded),
        Variant("multitune packed", multi, multitune_step, padded),
    ]
    title = f"Qwen2-0.5B shape, {model.config.num_hidden_layers} layers; plain: {plain_attn}, multitune: {attn}"
    return finish(title, model, interleaved(variants, tokens, args.warmup, device, dtype), peak)


def bench_encoder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak: float) -> dict[str, Any]:
    lengths = json.loads(LENGTHS.read_text(encoding="utf-8"))["encoder"]
    torch.manual_seed(0)
    backbone = bert_base(args.layers).to(device)
    hidden = backbone.config.hidden_size
    plain = EncoderPlain(backbone, hidden).to(device)
    heads = {
        n: HEADS.build(kind, hidden_size=hidden, num_labels=k, dropout=0.1) for n, (kind, k) in ENCODER_TASKS.items()
    }
    multi = MultiTaskModel(backbone, heads).to(device)
    if args.compile:
        backbone.compile(dynamic=True)
    balancer = equal_weights(sorted(ENCODER_TASKS))
    total = args.warmup + args.steps
    padded = encoder_batches(lengths, total, args.batch_size, backbone.config.vocab_size, args.seed)
    # bucketing within one task's batches (a batch holds one task)
    grouped = padded[: args.warmup]
    for name in sorted(ENCODER_TASKS):
        grouped += bucketed([b for b in padded[args.warmup :] if b[0][0] == name], lambda r: len(r[1]), args.seed)
    random.Random(args.seed).shuffle(grouped_tail := grouped[args.warmup :])
    grouped = grouped[: args.warmup] + grouped_tail

    def multitune_step(rows: list) -> None:
        batch = collate(encoder_encoded(rows), 0).to(device)
        balanced_backward(multi, batch, balancer, 0)

    def tokens(rows: list) -> int:
        return sum(len(r[1]) for r in rows)

    def plain_step(rows: list) -> None:
        plain.step(rows, device)

    variants = [
        Variant("plain padded", plain, plain_step, padded),
        Variant("plain bucketed", plain, plain_step, grouped),
        Variant("multitune", multi, multitune_step, padded),
        Variant("multitune grouped", multi, multitune_step, grouped),
    ]
    title = f"BERT-base shape, {backbone.config.num_hidden_layers} layers, 5 heads"
    return finish(title, plain, interleaved(variants, tokens, args.warmup, device, dtype), peak)


def table(title: str, bench: dict[str, Any]) -> str:
    base = bench["results"][0]
    lines = [
        f"{title}: {bench['model']} ({bench['matmul_parameters'] / 1e6:.1f}M matmul parameters)",
        "",
        "| variant | samples/s | real tokens/s | vs plain padded | MFU | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in bench["results"]:
        lines.append(
            f"| {r['variant']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['samples_per_s'] / base['samples_per_s']:.2f}x | {100 * r['mfu']:.1f}% | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["causal", "encoder", "both"], default="encoder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the real shape (CPU runs)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 32 causal / 32 encoder on CUDA, 8 / 16 on CPU"
    )
    parser.add_argument("--pack-length", type=int, default=None, help="default: 4096 on CUDA, 1024 on CPU")
    parser.add_argument("--loss-chunk", type=int, default=4096)
    parser.add_argument(
        "--attn", default=None, help="multitune's attention for the causal LM (the plain loops keep the default)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile multitune's backbone")
    parser.add_argument(
        "--profile", type=int, default=0, help="N more steps of each variant under torch.profiler: where the time goes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--write-lengths", action="store_true", help="tokenise the real data into benchmarks/data/")
    parser.add_argument("--config", default=str(ROOT.parent / "configs" / "eight_real_tasks.yaml"))
    parser.add_argument("--translation", type=Path, default=ROOT.parent.parent / "shared" / "data" / "multi30k_en_de")
    args = parser.parse_args()
    if args.write_lengths:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged models; no network
        write_lengths(args.config, args.translation, 2000, args.seed)
        return
    global PROFILE_STEPS
    PROFILE_STEPS = args.profile
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    args.pack_length = args.pack_length or (4096 if cuda else 1024)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_matmul_flops(device, dtype)
    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    )
    print(f"device: {name}; peak {dtype} matmul {peak / 1e12:.2f} TFLOP/s", flush=True)
    report: dict[str, Any] = {
        "device": name,
        "dtype": str(dtype),
        "peak_flops": peak,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if args.model in ("encoder", "both"):
        bench = bench_encoder(_with_batch(args, 32 if cuda else 16), device, dtype, peak)
        report["encoder"] = bench
        print(table("encoder", bench), flush=True)
    if args.model in ("causal", "both"):
        bench = bench_causal(_with_batch(args, 32 if cuda else 8), device, dtype, peak)
        report["causal"] = bench
        print(table("causal LM", bench), flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def _with_batch(args: argparse.Namespace, default: int) -> argparse.Namespace:
    copy = argparse.Namespace(**vars(args))
    copy.batch_size = args.batch_size or default
    return copy


if __name__ == "__main__":
    main()
