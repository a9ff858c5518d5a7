#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md asks for, in one run of under 10 minutes on one
# H100/H200 (a lent machine's whole budget is ~15 min). Results land in $OUT:
#   b16_bf16.json          ViT-B/16, bf16, batch 256: mimkit vs transformers, eager, + predict_ratio 0.25
#   b16_bf16_compile.json  the same, torch.compile
#   l16_bf16.json          ViT-L/16, bf16, batch 128, eager
#   b16_profile.json       torch.profiler: encoder / decoder / loss / backward / optimizer (mimkit, transformers)
#   jpeg_decode.json       decode / decode+augment rates: pil, torchvision (1 core) and data.decode=device (GPU)
#   jpeg_trainer.json      the real trainer on ImageNet-sized JPEGs, data.decode=device, against the synthetic step
#   jpeg_trainer_pil.json  the same with data.decode=pil and 15 workers
#   fsdp.json              train.strategy=fsdp on the GPU: a run cut by SIGTERM and resumed vs uninterrupted
#   log.txt                everything printed
# Usage (repository root): OUT=/some/dir bash benchmarks/gpu_session.sh
# SMOKE=1 runs the same steps with tiny models on the CPU (a check of the script, not a measurement).
set -u
OUT=${OUT:-/tmp/mimkit-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "${SMOKE:-0}" = 1 ]; then
  DEV=(--device cpu --dtype fp32); B16=(--arch vit_tiny_small_images --img-size 32 --batch-size 8)
  L16=("${B16[@]}"); ITERS=(--warmup 1 --iters 2); NJPEG=64; JBATCH=8; JWORKERS=1; TDEV=cpu; JDEV=cpu
  TMODEL=(model.arch=vit_tiny_small_images model.img_size=32)
  FSDP_MODEL=(model.arch=vit_tiny_small_images model.img_size=32 train.batch_size=4); ROUNDS=1
else
  DEV=(--device cuda --dtype bf16); B16=(--batch-size 256); L16=(--arch vit_large_patch16 --batch-size 128)
  ITERS=(--warmup 5 --iters 20); NJPEG=8192; JBATCH=256; JWORKERS=15; TDEV=cuda; TMODEL=(); JDEV=cuda
  FSDP_MODEL=(model.arch=vit_large_patch16 train.batch_size=32 train.amp=bf16); ROUNDS=2
fi
# FSDP2 on the GPU: 12 steps straight, against 12 steps cut by SIGTERM after the first checkpoint
# (the trainer then saves and stops) and resumed; the losses must be identical.
RUNS=$(mktemp -d)
FSDP=(-m torch.distributed.run --standalone --nproc_per_node=1 -m mimkit pretrain --config mae_vit_base_patch16
      data.name=synthetic data.synthetic_size=2048 train.strategy=fsdp train.device=$TDEV train.max_steps=12
      train.checkpoint_every=6 train.log_every=1 train.loggers=[] train.warmup_epochs=0 train.accum_iter=1
      data.num_workers=2 "${FSDP_MODEL[@]}")
fsdp_check() {
  $PY "${FSDP[@]}" --out "$RUNS/a" || return 1
  $PY "${FSDP[@]}" --out "$RUNS/b" & local pid=$!
  while [ ! -e "$RUNS/b/checkpoint-00000006.pt" ] && kill -0 $pid 2>/dev/null; do sleep 0.5; done
  pkill -TERM -f "pretrain --config mae_vit_base_patch16.*--out $RUNS/b" ; wait $pid
  $PY "${FSDP[@]}" --out "$RUNS/b" --resume || return 1
  $PY - "$RUNS" "$OUT/fsdp.json" <<'EOF'
import json, sys
from pathlib import Path
from mimkit.engine.logging import read_metrics
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
a, b = ({r["step"]: r["loss"] for r in read_metrics(runs / x) if "loss" in r} for x in "ab")
diff = max(abs(a[s] - b[s]) for s in a)
res = {"steps": sorted(a), "same_steps": sorted(a) == sorted(b), "max_abs_loss_diff": diff,
       "identical": diff == 0 and sorted(a) == sorted(b), "loss_a": a, "loss_b": b}
out.write_text(json.dumps(res, indent=1))
print("FSDP2 cut + resume vs straight:", "identical" if res["identical"] else f"max |diff| {diff:g}")
EOF
}
if [ "${1:-}" = --fsdp-check ]; then fsdp_check; exit; fi
exec > >(tee -a "$OUT/log.txt") 2>&1

step() {  # step NAME SECONDS COMMAND...: one measurement; a failure or timeout does not stop the rest
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout $((limit * ${LIMIT_SCALE:-1})) "$@" || echo "=== $name: exit $?"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
$PY -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"

step "ViT-B/16 eager" 80 $PY -m mimkit bench "${DEV[@]}" "${B16[@]}" "${ITERS[@]}" --rounds $ROUNDS \
  --impl mimkit hf --variant decoder.predict_ratio=0.25 --json "$OUT/b16_bf16.json"
step "ViT-B/16 compiled" 110 $PY -m mimkit bench "${DEV[@]}" "${B16[@]}" "${ITERS[@]}" --compile \
  --impl mimkit hf --json "$OUT/b16_bf16_compile.json"
step "ViT-L/16 eager" 60 $PY -m mimkit bench "${DEV[@]}" "${L16[@]}" "${ITERS[@]}" \
  --impl mimkit hf --json "$OUT/l16_bf16.json"
step "ViT-B/16 profile" 45 $PY -m mimkit bench "${DEV[@]}" "${B16[@]}" --warmup 3 --iters 3 --profile 5 \
  --impl mimkit hf --in-process --json "$OUT/b16_profile.json"

JPEGS=$(mktemp -d)/jpegs
step "write $NJPEG JPEGs" 40 $PY - "$JPEGS" "$NJPEG" <<'EOF'
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from mimkit.bench import write_jpeg_folder
root, n = Path(sys.argv[1]), int(sys.argv[2])
chunks = 16
with ProcessPoolExecutor(chunks) as pool:
    list(pool.map(write_jpeg_folder, [root / f"part{i:02d}" for i in range(chunks)], [n // chunks] * chunks,
                  [(500, 375)] * chunks, [90] * chunks, range(chunks)))
print(sum(1 for _ in root.rglob("*.jpg")), "JPEGs in", root)
EOF
step "JPEG decode rates" 25 $PY -m mimkit bench --jpeg --jpeg-dir "$JPEGS/part00" --img-size 224 --rounds 2 \
  --jpeg-device $JDEV --json "$OUT/jpeg_decode.json"
TRAIN_JPEG=(--trainer --config mae_vit_base_patch16 data.root="$JPEGS" data.val_fraction=0.02 train.batch_size=$JBATCH
            train.accum_iter=1 data.num_workers=$JWORKERS train.device=$TDEV train.loggers=[] "${TMODEL[@]}")
step "trainer from JPEGs, decoded on the device" 60 $PY -m mimkit bench "${TRAIN_JPEG[@]}" data.decode=device \
  --warmup 8 --iters 20 --json "$OUT/jpeg_trainer.json"
step "trainer from JPEGs, decoded by PIL workers" 60 $PY -m mimkit bench "${TRAIN_JPEG[@]}" data.decode=pil \
  --warmup 8 --iters 20 --json "$OUT/jpeg_trainer_pil.json"

step "FSDP2 resume" 80 bash "$0" --fsdp-check
echo "=== done $(date -u +%H:%M:%S)"
ls -la "$OUT"
