#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU (under 8 minutes): the test suite on CUDA, then the
# speed benchmark on CUDA, both written to docs/gpu.md with the card's name.
#
#     bash benchmarks/gpu_check.sh                 # from the repository root
#     TESTS_TIMEOUT=210 BENCH_TIMEOUT=240 bash benchmarks/gpu_check.sh
#
# Parts (each under its own time limit; a part that runs out is reported as such, not hidden):
#   1. pytest -q --device cuda (the default suite: slow sweeps excluded), at most TESTS_TIMEOUT s.
#   2. benchmarks/speed.py --device cuda: eight schools and logistic regression against Pyro's
#      Trace_ELBO (and NumPyro if installed); the digits VAE with IWAE K=16 and K=64 at batch 1024
#      against a hand-written torch.compile(mode="reduce-overhead") step; the largest K that fits
#      (eager step, run before the VAE table). At most BENCH_TIMEOUT s; what it printed before a
#      timeout is kept in the report.
# Exits non-zero, before running anything, when CUDA is not available.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-210}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
OUT="${GPU_REPORT:-docs/gpu.md}"

if ! CARD=$("$PYTHON" -c 'import torch, sys
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False (torch " + torch.__version__ + ", built for CUDA " + str(torch.version.cuda) + ")")
print(torch.cuda.get_device_name())'); then
    echo "gpu_check.sh: no CUDA device; this script needs a GPU (nothing was run)." >&2
    exit 2
fi
echo "GPU: $CARD"
LOG=$(mktemp -d)

start=$(date +%s)
timeout "$TESTS_TIMEOUT" "$PYTHON" -m pytest -q -p no:cacheprovider --device cuda tests > "$LOG/tests.txt" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

start=$(date +%s)
timeout "$BENCH_TIMEOUT" "$PYTHON" benchmarks/speed.py --device cuda --quick --tables abk \
    --vae-batch 1024 --vae-k 16,64 --vae-objectives iwae --compile-mode reduce-overhead > "$LOG/speed.txt" 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - start ))

status() { case "$1" in 0) echo "passed";; 124) echo "ran out of time (limit $2 s)";; *) echo "failed (exit $1)";; esac; }
{
    echo "# GPU check"
    echo
    echo "Written by \`benchmarks/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo
    echo "- GPU: **$CARD**"
    echo "- $("$PYTHON" -c 'import torch, pyro; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), pyro {pyro.__version__}")')"
    echo "- tests (\`pytest --device cuda\`): $(status $tests_rc "$TESTS_TIMEOUT"), ${tests_s} s"
    echo "- speed benchmark: $(status $bench_rc "$BENCH_TIMEOUT"), ${bench_s} s"
    echo
    echo "## Tests (last lines)"
    echo
    echo '```'
    tail -n 40 "$LOG/tests.txt"
    echo '```'
    echo
    echo "## Speed (\`benchmarks/speed.py --device cuda --quick --tables abk --vae-batch 1024 --vae-k 16,64\`)"
    echo
    grep -v '^\s*$' "$LOG/speed.txt" | grep -E '^\||^\(|^torch|Error|error' || tail -n 30 "$LOG/speed.txt"
} > "$OUT"
echo "wrote $OUT"
cat "$OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
