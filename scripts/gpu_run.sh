python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi -L
export PYTHONUNBUFFERED=1 GPU_MIXED=0 JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
s=$(date +%s)
KERAS_BACKEND=jax GPU_BUDGET_S=455 python3 scripts/gpu_train.py 2>&1 | tee $OUT/log.txt | grep -v -E "^\s*$"
if [ ! -f $OUT/weights.part0 ] && [ $(( $(date +%s) - s )) -lt 150 ]; then
  echo "JAX run failed early: falling back to torch"
  KERAS_BACKEND=torch GPU_BUDGET_S=$(( 520 - ($(date +%s) - s) )) GPU_ARM_S=170 python3 scripts/gpu_train.py 2>&1 | tee $OUT/log2.txt
fi
ls -la $OUT
