#!/usr/bin/env bash
# The GPU check: one script, sized to finish in under 8 minutes on one CUDA GPU (an H200 here).
#
#   tests       the opt-in GPU tests: packing correctness (sdpa, flex attention, eager; bf16 autocast:
#               packed losses equal the padded ones, so no token attends across examples) and every
#               balancing method training with its state on the GPU;
#   balancers   (after flex) the balancer overhead on a BERT-base-shaped encoder (bf16, 64 rows x 128 tokens per
#               task, 2/4/8 tasks): every loss weighting and gradient aggregator against equal weights;
#   throughput  causal-LM SFT throughput and MFU on a Qwen2-0.5B-shaped decoder (bf16, sdpa): a plain
#               padded loop beside multitune's padded step (fused chunked LM loss) and its packed step,
#               in one process; the BERT-base encoder's step beside its plain loop in the same run;
#   flex        the causal comparison with multitune's steps on flex attention (the plain loops on sdpa), then
#               3 steps of each variant under torch.profiler: device busy time, idle share, top ops (--profile);
#   compile     the causal comparison with the backbone compiled (torch.compile, dynamic shapes).
#
# Each part has its own time limit, cut to what is left of BUDGET_S (default 460 s), so a part that
# fails or hangs costs only its own minutes; PARTS picks a subset (default: all, in the order above).
# The figures go to $OUT (default benchmarks/results/gpu/): gpu_check.log and one JSON file per part.
#
#   bash benchmarks/gpu_check.sh
#   PARTS="tests flex" BUDGET_S=300 bash benchmarks/gpu_check.sh
#
# Python packages the machine lacks (pydantic and its parts) can travel as wheels in .whl/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

say() { echo "$*" | tee -a "$LOG"; }

BUDGET_S=${BUDGET_S:-460}
PARTS=${PARTS:-tests throughput flex balancers compile}
DEADLINE=$(($(date +%s) + BUDGET_S))

part() { # NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start rc left
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return ;; esac
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    say "=== $name: skipped, ${left}s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "=== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  say "=== $name: exit $rc after $(($(date +%s) - start))s"
}

say "date: $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >>"$LOG" 2>&1
$PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" >>"$LOG" 2>&1

part tests 100 $PY -m pytest -q -m gpu -p no:cacheprovider tests/generation/test_packing.py \
  tests/contracts/test_balancing_devices.py
part throughput 110 $PY benchmarks/throughput.py --model both --dtype bf16 --steps 20 \
  --output "$OUT/throughput_sdpa.json"
part flex 150 $PY benchmarks/throughput.py --model causal --dtype bf16 --steps 10 --batch-size 64 \
  --attn flex_attention --profile 3 --output "$OUT/throughput_flex.json"
part balancers 150 $PY benchmarks/balancing_overhead.py --model bert-base --device cuda --rows 64 --length 128 \
  --bf16 --rounds 5 --out "$OUT/balancing_overhead_bert_base.json"
part compile 150 $PY benchmarks/throughput.py --model causal --dtype bf16 --steps 10 --batch-size 64 \
  --compile --output "$OUT/throughput_compile.json"
say "done"
tail -n 120 "$LOG" | grep -E "^(===|\||device:|causal|encoder|[0-9]+ passed|FAILED)" || true
