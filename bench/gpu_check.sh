#!/usr/bin/env bash
# One prepared GPU check of actsparse, for ONE call of the device tool (nvidia-h200: one H200,
# python3 = /opt/torch/.venv/bin/python3 with torch+CUDA, pytest, matplotlib, safetensors, ...;
# no network, so tyro (the CLI's parser) and the sparsify peer must travel as wheels).
#
# Before the call, here (network): bash bench/gpu_check.sh --fetch-wheels   (fills .whl/, ignored by git)
# The call:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=500)
#
# Writes at most 6 files under $OUT (the tool returns at most 8, two folders deep, so the run
# folders stay in /tmp and only their metrics come back):
#   machine.txt          nvidia-smi, python, torch, CUDA, NCCL, package versions, wheel install
#   cli_runs.txt         output of every `actsparse train` / torchrun / NCCL check
#   runs_metrics.json    metrics.json of each run (scalars)
#   topk_throughput.json TopK SAE training step on the GPU: actsparse (sparse/dense decode,
#                        bf16 autocast) vs eai-sparsify's SparseCoder when it was carried
#   pytest_gpu.txt       the tests that mention cuda (-k cuda/gpu/device), then the tests whose
#                        runs pick CUDA by --device auto (torchrun, CLI) when a GPU is there
#   summary.txt          one line per check: ok / failed / skipped and the key number
#
# Env: OUT (default /tmp/gpu_check_out), PYTHON (python3), GPU_CHECK_BUDGET (seconds for the
# whole script, default 440: give the call ~60 s more), GPU_CHECK_DEVICE (cuda; cpu only to test
# this script), GPU_CHECK_SMOKE=1 (tiny sizes, for a dry run on a CPU machine),
# GPU_CHECK_TESTS (test files of the second pytest run), GPU_CHECK_WHEELS (wheel folder, .whl).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WHEELS=${GPU_CHECK_WHEELS:-.whl}

# ------------------------------------------------------------------ --fetch-wheels (dev machine)
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # pure-Python wheels the device machine lacks (KINDS.md's package list): tyro and its two needs
    # (actsparse train), eai-sparsify with the two modules its SparseCoder imports (the peer).
    mkdir -p "$WHEELS"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 \
        eai-sparsify==1.3.3 natsort==8.4.0 simple-parsing==0.1.9
    ls -la "$WHEELS"; du -sh "$WHEELS"
    echo "now call the device with carry=[\"$WHEELS\"] and command \"bash bench/gpu_check.sh\""
    exit 0
fi

OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}
SMOKE=${GPU_CHECK_SMOKE:-0}
BUDGET=${GPU_CHECK_BUDGET:-440}
WORK=/tmp/gpu_check_work
RUNS=$WORK/runs
rm -rf "$WORK"; mkdir -p "$WORK" "$RUNS"
SUMMARY=$OUT/summary.txt
CLI_LOG=$OUT/cli_runs.txt
: >"$SUMMARY"; : >"$CLI_LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLCONFIGDIR=$WORK/mpl TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
T0=$SECONDS

say() { echo "[gpu_check $((SECONDS - T0))s] $*"; }
# summary line: NAME STATUS DETAIL
record() { printf '%-16s %-8s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"; }
# seconds a step may take: its own cap, less if the script's budget runs short (20 s kept for the end)
limit() {
    local left=$((BUDGET - (SECONDS - T0) - 20))
    if ((left < $1)); then echo "$left"; else echo "$1"; fi
}
# the last line of a pytest log that counts tests
pytest_line() { { grep -E "[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran" "$1" || true; } | tail -n 1 | sed 's/=//g;s/^ *//'; }

say "repo $ROOT, OUT $OUT, python $PY, device $DEV, smoke $SMOKE, budget ${BUDGET}s"

# ------------------------------------------------------------------ 0. carried wheels
SETUP=$WORK/setup.txt
: >"$SETUP"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    rc=0
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl >>"$SETUP" 2>&1 || rc=$?
    if ((rc == 0)); then
        export PYTHONPATH="$PYTHONPATH:$WORK/site"   # after the repo and before site-packages
        record wheels ok "$(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS installed to $WORK/site"
    else
        record wheels failed "pip install of $WHEELS/*.whl exited $rc (see machine.txt)"
    fi
else
    echo "no $WHEELS/*.whl: nothing to install (run 'bash bench/gpu_check.sh --fetch-wheels' on the dev machine and carry $WHEELS)" >>"$SETUP"
    record wheels skipped "no $WHEELS/*.whl carried"
fi

# ------------------------------------------------------------------ 1. the machine
MACHINE=$OUT/machine.txt
{
    echo "== date: $(date -u +%FT%TZ)   uname: $(uname -a)"
    echo "== cores: $(nproc)"; free -g 2>/dev/null | head -2 || true
    echo "== nvidia-smi"
    timeout 30 nvidia-smi 2>&1 || echo "(nvidia-smi failed or missing: rc $?)"
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 || true
    echo "== python: $(command -v "$PY") $("$PY" --version 2>&1)"
    echo "== torch"
} >"$MACHINE" 2>&1
rc=0
timeout "$(limit 120)" "$PY" - >>"$MACHINE" 2>&1 <<'EOF' || rc=$?
import importlib.metadata as md, torch
print("torch", torch.__version__, "| built for CUDA", torch.version.cuda)
print("torch.cuda.is_available()", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device_count", torch.cuda.device_count(), "| device 0:", torch.cuda.get_device_name(0),
          "| capability", torch.cuda.get_device_capability(0), "| memory GiB", round(p.total_memory / 2**30, 1),
          "| SMs", p.multi_processor_count)
    print("bf16 supported", torch.cuda.is_bf16_supported(), "| NCCL", torch.cuda.nccl.version())
print("torch.distributed nccl available", torch.distributed.is_available() and torch.distributed.is_nccl_available())
for name in ("actsparse", "tyro", "typeguard", "docstring-parser", "typing_extensions", "pytest", "pytest-xdist",
             "pytest-timeout", "hypothesis", "safetensors", "matplotlib", "scikit-learn", "tqdm", "pyyaml",
             "triton", "transformers", "eai-sparsify", "natsort", "simple-parsing"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} (not installed)")
import actsparse
print("actsparse", actsparse.__version__, "from", actsparse.__file__)
EOF
{ echo "== wheel setup"; cat "$SETUP"; } >>"$MACHINE"
say "machine:"; sed -n '/== torch/,$p' "$MACHINE" | head -8
HAS_CUDA=0
grep -q "torch.cuda.is_available() True" "$MACHINE" && HAS_CUDA=1
if ((rc != 0)); then
    record machine failed "python/torch probe exited $rc (see machine.txt)"
else
    record machine ok "$(grep -m1 '^torch ' "$MACHINE"); cuda=$HAS_CUDA; $(grep -m1 'device 0:' "$MACHINE" | sed 's/.*device 0: //;s/ |.*//' || echo 'no GPU')"
fi
if [[ "$DEV" == cuda* && $HAS_CUDA == 0 ]]; then
    say "WARNING: torch sees no CUDA device: the --device $DEV steps below will fail (or be skipped)"
fi

# can `actsparse train` parse flags here? (tyro must be importable)
HAS_TYRO=1
"$PY" -c "import tyro" >/dev/null 2>&1 || HAS_TYRO=0
NO_TYRO="tyro not importable (actsparse train cannot parse flags): run 'bash bench/gpu_check.sh --fetch-wheels' on the dev machine and carry $WHEELS"

# ------------------------------------------------------------------ 2. actsparse train on the GPU
declare -A SIZE
if ((SMOKE)); then
    SIZE=([classic]="--samples 500 --iterations 5 --threads 1" [topk]="--samples 2000 --hidden 64 --threads 1"
          [ddp]="--samples 2000 --hidden 64 --threads 1")
else
    SIZE=([classic]="--iterations 100" [topk]="--samples 100000 --hidden 512" [ddp]="--samples 50000 --hidden 512")
fi
METRICS_FILES=()

# train_step NAME RUN CAP -- argv...: runs argv (a train command writing $RUNS/RUN), logs it,
# records rc and the run's metrics
train_step() {
    local name=$1 run=$2 cap=$3; shift 4
    local t; t=$(limit "$cap")
    if ((HAS_TYRO == 0)); then record "$name" skipped "$NO_TYRO"; return; fi
    if ((t < 10)); then record "$name" skipped "out of time (budget ${BUDGET}s)"; return; fi
    local log=$WORK/$name.log rc=0 t1=$SECONDS
    say "$name: $* (timeout ${t}s)"
    timeout -k 10 "$t" "$@" >"$log" 2>&1 || rc=$?
    local wall=$((SECONDS - t1))
    { echo "=================== $name: rc $rc, ${wall}s wall"; echo "\$ $*"; cat "$log"; echo; } >>"$CLI_LOG"
    tail -n 4 "$log" | sed "s/^/    /"
    local m=$RUNS/$run/metrics.json
    if ((rc == 0)) && [[ -f $m ]]; then
        METRICS_FILES+=("$name=$m")
        record "$name" ok "$("$PY" - "$m" "$wall" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
keys = [("steps", "{} steps"), ("seconds", "{:.1f} s train"), ("fvu", "FVU {:.4f}"), ("l0", "L0 {:.1f}"), ("processes", "{} proc")]
bits = [fmt.format(d[k]) for k, fmt in keys if isinstance(d.get(k), (int, float))]
print(", ".join(bits) + f"; {sys.argv[2]} s wall")
EOF
)"
    elif ((rc == 0)); then
        record "$name" failed "rc 0 but no $m"
    elif ((rc == 124 || rc == 137)); then
        record "$name" failed "timed out after ${t}s; last: $(tail -n 1 "$log" | cut -c1-150)"
    else
        local why; why=$(grep -E "[Ee]rror: " "$log" | head -n 1 || true)
        [[ -n "$why" ]] || why=$(grep -E "exitcode|[A-Za-z]+Error" "$log" | tail -n 1 || true)
        [[ -n "$why" ]] || why=$(grep -vE '^\s*$|^=+$' "$log" | tail -n 1 || true)
        record "$name" failed "rc $rc: $(cut -c1-180 <<<"$why" | sed 's/^ *//')"
    fi
}

# shellcheck disable=SC2086  # the SIZE strings are word lists
train_step train_classic train_classic 90 -- "$PY" -m actsparse train ${SIZE[classic]} --no-progress --device "$DEV" \
    --out "$RUNS" --name train_classic
# shellcheck disable=SC2086
train_step train_topk_gt train_topk_gt 120 -- "$PY" -m actsparse train --data ground-truth --activation topk --k 16 \
    ${SIZE[topk]} --epochs 1 --device "$DEV" --no-progress --out "$RUNS" --name train_topk_gt

# bf16: only if the CLI has a precision flag
if ((HAS_TYRO)); then
    HELP=$(timeout 60 "$PY" -m actsparse train --help 2>&1 || true)
    FLAG=$(grep -oE -- "--(dtype|precision|autocast|amp|bf16|mixed-precision)\b" <<<"$HELP" | head -n 1 || true)
    if [[ -z "$FLAG" ]]; then
        record train_bf16 skipped "actsparse train --help has no dtype/precision/autocast flag (library-level bf16 autocast is timed in topk_throughput.json)"
    else
        VALUE=bfloat16; [[ "$FLAG" == "--bf16" ]] && VALUE=""
        # shellcheck disable=SC2086
        train_step train_bf16 train_bf16 120 -- "$PY" -m actsparse train --data ground-truth --activation topk --k 16 \
            ${SIZE[topk]} --epochs 1 --device "$DEV" --no-progress --out "$RUNS" --name train_bf16 $FLAG $VALUE
    fi
else
    record train_bf16 skipped "$NO_TYRO"
fi

# ------------------------------------------------------------------ 3. torchrun (one GPU) and NCCL
# With --nproc_per_node=1, WORLD_SIZE is 1 and actsparse.distributed.init_from_env forms no process
# group (no DDP, no NCCL): the run checks torchrun's environment (LOCAL_RANK device) only. NCCL refuses
# two ranks on one GPU, so the NCCL path is checked apart below, on a one-rank NCCL group.
# shellcheck disable=SC2086
train_step torchrun_1gpu ddp 150 -- "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m actsparse train \
    --data ground-truth --activation topk --k 16 ${SIZE[ddp]} --epochs 1 --device "$DEV" --no-progress \
    --out "$RUNS" --name ddp

cat >"$WORK/nccl_check.py" <<'EOF'
"""Under torchrun (one rank): which backend actsparse.distributed.init_from_env asks for on this
device (init_process_group intercepted, WORLD_SIZE faked to 2), then a real one-rank group of that
backend: all_reduce, actsparse's differentiable all_sum and global_mean, broadcast_object_list, barrier."""
import os, sys, time
import torch
import torch.distributed as dist
from actsparse import distributed as ad

want = sys.argv[1]
dev = torch.device(want if want == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
asked = {}
real_init = dist.init_process_group
dist.init_process_group = lambda backend=None, **kw: asked.setdefault("backend", backend)
os.environ["WORLD_SIZE"] = "2"
try:
    ad.init_from_env(dev)
finally:
    os.environ["WORLD_SIZE"] = "1"
    dist.init_process_group = real_init
backend = asked.get("backend")
print(f"actsparse.distributed.init_from_env({dev}) asks for backend {backend!r}")
t0 = time.perf_counter()
kw = {"device_id": dev} if dev.type == "cuda" else {}
dist.init_process_group(backend=backend, **kw)
print("process group:", dist.get_backend(), "world", dist.get_world_size(),
      "| NCCL", torch.cuda.nccl.version() if dev.type == "cuda" else "-")
x = torch.arange(1024, dtype=torch.float32, device=dev)
y = x.clone(); dist.all_reduce(y)
assert torch.equal(x, y), "all_reduce of one rank changed the tensor"
a = torch.randn(8, device=dev, requires_grad=True)
s = ad.all_sum(a); (s * 3).sum().backward()
assert torch.allclose(a.grad, torch.full_like(a, 3.0)), a.grad
m = ad.global_mean(torch.ones(4, device=dev), 10)
assert torch.allclose(m, torch.ones(4, device=dev)), m
objs = ["name"]; dist.broadcast_object_list(objs, src=0)
big = torch.ones(64 * 2**20 // 4, device=dev)  # 64 MiB all_reduce
if dev.type == "cuda": torch.cuda.synchronize()
t1 = time.perf_counter(); dist.all_reduce(big)
if dev.type == "cuda": torch.cuda.synchronize()
t2 = time.perf_counter()
dist.barrier(); dist.destroy_process_group()
ok = backend == ("nccl" if dev.type == "cuda" else "gloo")
print(f"RESULT backend={backend} ok={ok} all_reduce_64MiB_ms={1e3 * (t2 - t1):.2f} total_s={time.perf_counter() - t0:.2f}")
sys.exit(0 if ok else 3)
EOF
t=$(limit 90)
if ((t < 10)); then
    record nccl skipped "out of time"
elif [[ "$DEV" == cuda* && $HAS_CUDA == 0 ]]; then
    record nccl skipped "no CUDA device: NCCL not checked"
else
    rc=0
    say "nccl: one-rank process group under torchrun (timeout ${t}s)"
    timeout -k 10 "$t" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$WORK/nccl_check.py" "$DEV" \
        >"$WORK/nccl.log" 2>&1 || rc=$?
    { echo "=================== nccl: rc $rc"; cat "$WORK/nccl.log"; echo; } >>"$CLI_LOG"
    tail -n 3 "$WORK/nccl.log" | sed "s/^/    /"
    if ((rc == 0)); then
        record nccl ok "$(grep -m1 '^RESULT' "$WORK/nccl.log" | sed 's/^RESULT //')"
    else
        record nccl failed "rc $rc: $(grep -E 'RESULT|Error|error' "$WORK/nccl.log" | tail -n 1 | cut -c1-180)"
    fi
fi

# collected metrics of the runs
"$PY" - "$OUT/runs_metrics.json" "${METRICS_FILES[@]}" <<'EOF' || echo "(could not write runs_metrics.json)"
import json, sys
out = {}
for item in sys.argv[2:]:
    name, path = item.split("=", 1)
    d = json.load(open(path))
    out[name] = {k: v for k, v in d.items() if not isinstance(v, list)}
json.dump(out, open(sys.argv[1], "w"), indent=2)
EOF

# ------------------------------------------------------------------ 4. TopK training-step throughput
cat >"$WORK/topk_throughput.py" <<'EOF'
"""TopK SAE training step on one device: forward + backward + Adam (fused on CUDA), as
actsparse.train.train_step does it (parallel-gradient removal and decoder renormalisation
included), 10 warm-up then 50 timed steps, synchronised; tokens/s = batch * steps / seconds.
Contenders: actsparse decode=auto and decode=dense, actsparse auto under bf16 autocast, and
eai-sparsify's SparseCoder (the step of bench/peers.py) if it can be imported; plus the floor,
the encoder's forward matmul alone."""
import importlib.util, json, os, sys, time, types, traceback
from pathlib import Path
import torch

out_path, dev_name, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sys.path.insert(0, str(Path("bench").resolve()))
from _common import topk_sae  # noqa: E402
import actsparse  # noqa: E402
from actsparse.train import train_step  # noqa: E402
from actsparse.metrics import fvu  # noqa: E402

result = {"device": dev_name, "torch": torch.__version__, "actsparse": actsparse.__version__}
if dev_name.startswith("cuda") and not torch.cuda.is_available():
    result.update(status="skipped", reason="torch sees no CUDA device")
    json.dump(result, open(out_path, "w"), indent=2); print("SKIPPED no CUDA"); sys.exit(0)
dev = torch.device(dev_name)
cuda = dev.type == "cuda"
if cuda:
    result["gpu"] = torch.cuda.get_device_name(dev)
P = dict(d_in=16, d_sae=64, k=4, batch=32, warmup=2, steps=3) if smoke else \
    dict(d_in=768, d_sae=16384, k=32, batch=4096, warmup=10, steps=50)
result["problem"] = {**P, "optimizer": f"Adam(lr=1e-3, fused={cuda})", "data": "randn, 8 fixed batches"}
g = torch.Generator(device="cpu").manual_seed(0)
pool = torch.randn(8, P["batch"], P["d_in"], generator=g).to(dev)


def sync():
    if cuda:
        torch.cuda.synchronize(dev)


def timed(step, reconstruct):
    for i in range(P["warmup"]):
        step(pool[i % 8])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(P["steps"]):
        step(pool[i % 8])
    sync()
    s = time.perf_counter() - t0
    r = {"tokens_per_s": P["batch"] * P["steps"] / s, "ms_per_step": 1e3 * s / P["steps"]}
    if cuda:
        r["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    with torch.no_grad():
        r["fvu_on_a_batch"] = float(fvu(pool[0], reconstruct(pool[0])))
    return r


def actsparse_contender(decode, autocast=None):
    model = topk_sae(P["d_in"], P["d_sae"], P["k"], decode, 0).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=cuda)

    def step(x):
        if autocast is None:
            train_step(model, opt, x)
        else:
            with torch.autocast(dev.type, dtype=autocast):
                train_step(model, opt, x)

    def rec(x):
        return model(x).reconstruction.float()
    return step, rec


def sparsify_contender():
    try:
        from sparsify import SaeConfig, SparseCoder
        how = "import sparsify"
    except ImportError:  # its __init__ imports the trainer (datasets, schedulefree): load the model modules only
        spec = importlib.util.find_spec("sparsify")
        if spec is None:
            raise
        pkg = types.ModuleType("sparsify"); pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = pkg
        from sparsify.config import SaeConfig
        from sparsify.sparse_coder import SparseCoder
        how = "sparsify.sparse_coder only (package __init__ skipped)"
    from importlib.metadata import version
    torch.manual_seed(0)
    model = SparseCoder(P["d_in"], SaeConfig(activation="topk", num_latents=P["d_sae"], k=P["k"],
                                             normalize_decoder=True), device=dev, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=cuda)

    def step(x):  # bench/peers.py's make_sparsify step
        model.set_decoder_norm_to_unit_norm()
        out = model(x)
        out.fvu.backward()
        model.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def rec(x):
        return model(x).sae_out
    return step, rec, f"eai-sparsify {version('eai-sparsify')} ({how})"


contenders = {
    "actsparse_auto": lambda: actsparse_contender("auto"),
    "actsparse_dense": lambda: actsparse_contender("dense"),
    "actsparse_auto_bf16_autocast": lambda: actsparse_contender("auto", torch.bfloat16),
}
res = {}
for name, make in contenders.items():
    try:
        res[name] = timed(*make())
    except Exception as e:  # noqa: BLE001 - record and go on
        res[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        traceback.print_exc()
    if cuda:
        torch.cuda.empty_cache()
try:
    step, rec, ver = sparsify_contender()
    res["sparsify"] = {"version": ver, **timed(step, rec)}
except ImportError as e:
    res["sparsify"] = {"error": f"not installed: {e} (carry its wheels: bash bench/gpu_check.sh --fetch-wheels)"}
except Exception as e:  # noqa: BLE001
    res["sparsify"] = {"error": f"{type(e).__name__}: {e}"[:400]}
    traceback.print_exc()

# the floor: x @ W_enc^T + b alone
x = pool[0]; w = torch.randn(P["d_sae"], P["d_in"], device=dev); b = torch.zeros(P["d_sae"], device=dev)
buf = torch.empty(P["batch"], P["d_sae"], device=dev)
floor = lambda _x: torch.addmm(b, _x, w.t(), out=buf)  # noqa: E731
for i in range(3):
    floor(x)
sync(); t0 = time.perf_counter()
for i in range(P["steps"]):
    floor(pool[i % 8])
sync()
res["floor_encoder_matmul"] = {"tokens_per_s": P["batch"] * P["steps"] / (time.perf_counter() - t0)}

result["contenders"] = res
a = res["actsparse_auto"].get("tokens_per_s")
if a and res["sparsify"].get("tokens_per_s"):
    result["actsparse_auto_over_sparsify"] = a / res["sparsify"]["tokens_per_s"]
if a:
    result["actsparse_auto_fraction_of_floor"] = a / res["floor_encoder_matmul"]["tokens_per_s"]
ok = "tokens_per_s" in res["actsparse_auto"]
result["status"] = "ok" if ok else "failed"
json.dump(result, open(out_path, "w"), indent=2)
for name, r in res.items():
    print(f"{name:32s} " + (f"{r['tokens_per_s']:14.0f} tokens/s" if "tokens_per_s" in r else r.get("error", "")))
line = f"actsparse auto {a:.3g} tok/s" if a else "actsparse auto failed"
if "actsparse_auto_over_sparsify" in result:
    line += f", x{result['actsparse_auto_over_sparsify']:.2f} vs sparsify"
elif "error" in res["sparsify"]:
    line += ", sparsify: " + res["sparsify"]["error"].split(":")[0]
if "tokens_per_s" in res["actsparse_dense"]:
    line += f", dense {res['actsparse_dense']['tokens_per_s']:.3g}"
if "tokens_per_s" in res["actsparse_auto_bf16_autocast"]:
    line += f", bf16 autocast {res['actsparse_auto_bf16_autocast']['tokens_per_s']:.3g}"
else:
    line += ", bf16 autocast failed"
print("RESULT " + line)
sys.exit(0 if ok else 3)
EOF
t=$(limit 150)
if ((t < 10)); then
    record topk_throughput skipped "out of time"
else
    rc=0
    say "topk_throughput (timeout ${t}s)"
    timeout -k 10 "$t" "$PY" "$WORK/topk_throughput.py" "$OUT/topk_throughput.json" "$DEV" "$SMOKE" \
        >"$WORK/throughput.log" 2>&1 || rc=$?
    { echo "=================== topk_throughput: rc $rc"; cat "$WORK/throughput.log"; echo; } >>"$CLI_LOG"
    grep -vE '^\s+File|^Traceback' "$WORK/throughput.log" | tail -n 8 | sed "s/^/    /"
    if grep -q '^SKIPPED' "$WORK/throughput.log"; then
        record topk_throughput skipped "torch sees no CUDA device"
    elif ((rc == 0)); then
        record topk_throughput ok "$(grep -m1 '^RESULT' "$WORK/throughput.log" | sed 's/^RESULT //')"
    else
        [[ -f "$OUT/topk_throughput.json" ]] || echo "{\"status\": \"failed\", \"rc\": $rc}" >"$OUT/topk_throughput.json"
        record topk_throughput failed "rc $rc: $(grep -vE '^\s+File|^Traceback' "$WORK/throughput.log" | tail -n 1 | cut -c1-180)"
    fi
fi

# ------------------------------------------------------------------ 5. tests
# No test skips without CUDA (grep: only tests/test_sklearn.py and tests/test_trust_data.py say
# "cuda", one of them a test that skips WITH CUDA). Run A is that literal selection. Run B is what
# a GPU changes: the tests whose runs take --device auto, so CUDA here (torchrun with 2 processes
# on one GPU, the CLI's training and ground-truth runs).
PYT=$OUT/pytest_gpu.txt
: >"$PYT"
mapfile -t CUDA_FILES < <(grep -rln "cuda" tests/ | sort || true)
t=$(limit 90)
if ((${#CUDA_FILES[@]} == 0)); then
    record pytest_cuda_k skipped "no test file mentions cuda"
elif ((t < 10)); then
    record pytest_cuda_k skipped "out of time"
else
    rc=0
    say "pytest A: ${CUDA_FILES[*]} -k 'cuda or gpu or device' (timeout ${t}s)"
    echo "=================== A: python -m pytest -q -x -p no:cacheprovider ${CUDA_FILES[*]} -k 'cuda or gpu or device' -rfEs" >>"$PYT"
    timeout -s INT -k 15 "$t" "$PY" -m pytest -q -x -p no:cacheprovider "${CUDA_FILES[@]}" \
        -k "cuda or gpu or device" -rfEs >>"$PYT" 2>&1 || rc=$?
    echo "=================== A: rc $rc" >>"$PYT"
    line=$(pytest_line "$PYT")
    if ((rc == 0)); then record pytest_cuda_k ok "$line"
    elif ((rc == 124 || rc == 137)); then record pytest_cuda_k failed "timed out after ${t}s: $line"
    else record pytest_cuda_k failed "rc $rc: $line"; fi
fi

if ((SMOKE)); then
    read -r -a GPU_TESTS <<<"${GPU_CHECK_TESTS:-tests/test_distributed.py}"
    KSEL=(-k lbfgs)
else
    read -r -a GPU_TESTS <<<"${GPU_CHECK_TESTS:-tests/test_distributed.py tests/test_cli.py tests/test_ground_truth_cli.py}"
    KSEL=()
fi
PLUG=()
"$PY" -c "import xdist" >/dev/null 2>&1 && ((!SMOKE)) && PLUG+=(-n 8)
"$PY" -c "import pytest_timeout" >/dev/null 2>&1 && PLUG+=(--timeout 150)
t=$(limit 240)
if ((HAS_TYRO == 0)); then
    record pytest_auto_gpu skipped "$NO_TYRO"
elif ((t < 20)); then
    record pytest_auto_gpu skipped "out of time"
else
    rc=0
    say "pytest B: ${GPU_TESTS[*]} ${KSEL[*]} ${PLUG[*]} (timeout ${t}s)"
    echo "=================== B: python -m pytest -q -p no:cacheprovider ${GPU_TESTS[*]} ${KSEL[*]} ${PLUG[*]} --maxfail 20 -rfEs --durations 15 (cuda=$HAS_CUDA)" >>"$PYT"
    timeout -s INT -k 15 "$t" "$PY" -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}" "${KSEL[@]}" "${PLUG[@]}" \
        --maxfail 20 -rfEs --durations 15 >"$WORK/pytest_b.txt" 2>&1 || rc=$?
    cat "$WORK/pytest_b.txt" >>"$PYT"
    echo "=================== B: rc $rc" >>"$PYT"
    line=$(pytest_line "$WORK/pytest_b.txt")
    if ((rc == 0)); then record pytest_auto_gpu ok "$line"
    elif ((rc == 124 || rc == 137)); then record pytest_auto_gpu failed "timed out after ${t}s: $line"
    else record pytest_auto_gpu failed "rc $rc: $line; first: $(grep -m1 -E '^(FAILED|ERROR)' "$WORK/pytest_b.txt" | cut -c1-150)"; fi
fi

echo "total ${BUDGET}s budget, $((SECONDS - T0))s used; device $DEV, cuda=$HAS_CUDA, smoke=$SMOKE" >>"$SUMMARY"
say "done in $((SECONDS - T0))s. Summary ($SUMMARY):"
cat "$SUMMARY"
ls -la "$OUT"
