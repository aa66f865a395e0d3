#!/usr/bin/env bash
# GPU check for Tessera on a machine with an NVIDIA GPU and no internet (docs/gpu-check.md).
#
#   benchmarks/gpu/run_gpu_check.sh prepare
#       On a workstation with the dev venv (bpy 5.0.1 on Python 3.11): tar a trimmed
#       copy of /root/.pyenv/versions/3.11.7 with bpy, pynvml.py and the X11/GL/ffi
#       libraries bpy links against (lib/syslibs/), xz it and split it into
#       .gpucarry/py311.tar.xz.part-* of 65 MB (one per device call; /.gpucarry/ is in
#       .git/info/exclude and never committed). The trimmed bpy drops the AMD (gfx*)
#       kernels, the NVIDIA cubins (sm_90 has none: Hopper JIT-compiles the compute_75
#       PTX), the HIP/SYCL denoiser plug-ins and the pxr Python bindings.
#   benchmarks/gpu/run_gpu_check.sh run [CARRY_DIR] [OUT_DIR]
#       On the GPU machine, once every part is in CARRY_DIR (default /tmp/carry):
#       unpack to /root/.pyenv/versions/3.11.7, nvidia-smi, NVML snapshot through
#       renderers/devices.py, Cycles device list (+ resolve_device answers), render the
#       default cube on CPU, then OPTIX and CUDA in parallel (cold: kernels compiled or
#       JIT-ed), then each again in a fresh process (disk caches warm) if time allows;
#       HIP must report no device; compare images. OUT_DIR (default $OUT) receives 7
#       files: results.json, log.txt, cycles_devices.json, nvml.json, cpu/optix/cuda EXRs.
#   benchmarks/gpu/run_gpu_check.sh node [CARRY_DIR] [OUT_DIR]
#       The node half (benchmarks/gpu/node_check.py, with the carried Python): a
#       coordinator and `tessera node --device GPU --gpus all --cpu-worker` on 127.0.0.1,
#       every GPU worker's warm-up (time or reason), a GPU and a CPU job rendered by the
#       workers side by side, then the node restarted to time the warm-up with the kernel
#       caches kept. OUT_DIR receives node_check.json, node.log, coordinator.log.
#       WARMUP_TIMEOUT (default 540) and NODE_BUDGET_S (default 560) bound it.
#   benchmarks/gpu/run_gpu_check.sh all [CARRY_DIR] [OUT_DIR]
#       `run` with a short budget, then `node`: one visit (about 15 minutes with the
#       kernel compilation of a card without a prebuilt kernel; split it over two calls
#       of 10 minutes: `run` then `node`, the unpacked Python stays in between).
set -u -o pipefail

MODE=${1:-run}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PREFIX=${GPU_CHECK_PREFIX:-/root/.pyenv/versions/3.11.7}

if [ "$MODE" = prepare ]; then
    set -e
    SITE="$REPO/.venv/lib/python3.11/site-packages"
    STAGE=$(mktemp -d)/py311
    mkdir -p "$STAGE/bin" "$STAGE/lib/syslibs" "$STAGE/lib/python3.11/site-packages"
    cp -a "$PREFIX/bin/python3.11" "$STAGE/bin/"
    cp -a "$PREFIX"/lib/libpython3.11.so* "$STAGE/lib/"
    (cd "$PREFIX/lib" && tar cf - --exclude=python3.11/test --exclude=python3.11/site-packages \
        --exclude='python3.11/config-3.11-*' --exclude=python3.11/idlelib \
        --exclude=python3.11/tkinter --exclude=python3.11/turtledemo \
        --exclude=python3.11/ensurepip --exclude=python3.11/lib2to3 --exclude='__pycache__' \
        python3.11) | (cd "$STAGE/lib" && tar xf -)
    (cd "$SITE" && tar cf - --exclude='__pycache__' --exclude='*gfx*' --exclude='kernel_sm_*' \
        --exclude='libOpenImageDenoise_device_hip*' --exclude='libOpenImageDenoise_device_sycl*' \
        --exclude='bpy/5.0/python/lib/python3.11/site-packages/pxr' \
        bpy bpy-5.0.1.dist-info pynvml.py) | (cd "$STAGE/lib/python3.11/site-packages" && tar xf -)
    # Tessera's own dependencies (pydantic, fastapi, numpy, OpenEXR...) for `node`: the
    # top-level packages the coordinator, the node and the CLI import, and their metadata.
    DEPS=$(cd "$REPO" && PYTHONPATH="$REPO" "$REPO/.venv/bin/python" - "$SITE" <<'PYEOF'
import sys, pathlib
site = pathlib.Path(sys.argv[1]).resolve()
import app.cli.main, app.cli.farm, coordinator.server, farm_node.main, farm_node.fleet  # noqa
names = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if not path:
        continue
    path = pathlib.Path(path).resolve()
    if site in path.parents:
        top = path.relative_to(site).parts[0]
        if top not in ("bpy", "PySide6", "shiboken6") and not top.startswith("_distutils"):
            names.add(top)
for dist in site.glob("*.dist-info"):
    top = dist / "top_level.txt"
    if top.exists() and names & set(top.read_text().split()):
        names.add(dist.name)
print(" ".join(sorted(names)))
PYEOF
)
    (cd "$SITE" && tar cf - --exclude='__pycache__' --exclude='tests' $DEPS) \
        | (cd "$STAGE/lib/python3.11/site-packages" && tar xf -)
    for lib in libX11.so.6 libXrender.so.1 libXfixes.so.3 libXi.so.6 libxkbcommon.so.0 \
        libxcb.so.1 libXext.so.6 libSM.so.6 libICE.so.6 libGL.so.1 libGLX.so.0 \
        libGLdispatch.so.0 libXau.so.6 libXdmcp.so.6 libuuid.so.1 libbsd.so.0 libmd.so.0 \
        libffi.so.8; do
        cp -L "/lib/x86_64-linux-gnu/$lib" "$STAGE/lib/syslibs/"
    done
    mkdir -p "$REPO/.gpucarry"
    rm -f "$REPO"/.gpucarry/py311.tar.xz.part-*
    (cd "$(dirname "$STAGE")" && tar cf - py311) | xz -9 -T0 \
        | split -b 65000000 - "$REPO/.gpucarry/py311.tar.xz.part-"
    ls -l "$REPO/.gpucarry"
    exit 0
fi

if [ "$MODE" = all ]; then
    BUDGET_S=${BUDGET_S:-200} COLD_TIMEOUT=${COLD_TIMEOUT:-150} "$0" run "${2:-/tmp/carry}" "${3:-${OUT:-/tmp/gpu-check-out}}"
    exec "$0" node "${2:-/tmp/carry}" "${3:-${OUT:-/tmp/gpu-check-out}}"
fi

CARRY=${2:-/tmp/carry}
OUTDIR=${3:-${OUT:-/tmp/gpu-check-out}}
WORK=/tmp/gpu-check
GPU_CHECK="$REPO/benchmarks/gpu/gpu_check.py"
COLD_TIMEOUT=${COLD_TIMEOUT:-240}
BUDGET_S=${BUDGET_S:-330}
GPU_TYPES=${GPU_TYPES:-OPTIX CUDA}
START=$SECONDS
mkdir -p "$WORK" "$OUTDIR"
exec > >(tee "$OUTDIR/log.txt") 2>&1

step() { echo "=== [$((SECONDS - START)) s] $*"; }

if [ ! -x "$PREFIX/bin/python3.11" ]; then
    step "unpacking $(cat "$CARRY"/py311.tar.xz.part-* | wc -c) bytes of Python 3.11 + bpy"
    if command -v xz >/dev/null; then unxz() { xz -dc -T0; }
    else unxz() { python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)'; }
    fi
    cat "$CARRY"/py311.tar.xz.part-* | unxz | tar -x -C /tmp || { echo "unpack failed"; exit 2; }
    mkdir -p "$(dirname "$PREFIX")" && mv /tmp/py311 "$PREFIX"
fi

# The carried X11/GL libraries only for the carried Python, never for nvidia-smi.
py() {
    LD_LIBRARY_PATH="$PREFIX/lib/syslibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        PYTHONUNBUFFERED=1 "$PREFIX/bin/python3.11" -I "$@"
}

if [ "$MODE" = node ]; then
    step "node check: one worker per GPU, warm-up, caches kept across a restart"
    nvidia-smi -L
    mkdir -p "$OUTDIR/node-check"
    LD_LIBRARY_PATH="$PREFIX/lib/syslibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        PYTHONUNBUFFERED=1 "$PREFIX/bin/python3.11" "$REPO/benchmarks/gpu/node_check.py" \
        "$OUTDIR/node-check"
    echo "node check exit $?"
    rm -rf "$OUTDIR/node-check/work"  # scenes, EXRs, caches: too big to bring back
    step "done"
    exit 0
fi

step "machine"
date -u; uname -r; nproc
nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,pci.bus_id --format=csv
nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1; cat "$WORK/nvidia-smi.txt"

step "NVML snapshot (renderers.devices.nvml_snapshot)"
py "$GPU_CHECK" nvml "$WORK/nvml.json" --repo "$REPO"

step "Cycles devices"
py "$GPU_CHECK" devices "$WORK/cycles_devices.json" --repo "$REPO"

step "render CPU"
py "$GPU_CHECK" render CPU "$WORK" --repeat 2

# With bpy 5.0.1 on Hopper (sm_90, no cubin in the wheel) both CUDA and OPTIX first wait
# for the driver to JIT the compute_75 PTX: over 5 minutes on one core on 2026-11-25.
# GPU_TYPES="CUDA" COLD_TIMEOUT=540 measures that alone; CUDA_CACHE_MAXSIZE/CUDA_CACHE_PATH
# (set by the caller) decide whether the JIT result is kept for the next process.
step "render ${GPU_TYPES} in parallel (cold: kernels compiled or JIT-ed), limit ${COLD_TIMEOUT} s"
declare -A cold_pids=()
for dev in $GPU_TYPES; do
    timeout "$COLD_TIMEOUT" bash -c "$(declare -f py); PREFIX=$PREFIX; py '$GPU_CHECK' render $dev '$WORK' --repeat 1 --tag _cold" &
    cold_pids[$dev]=$!
done
for dev in $GPU_TYPES; do
    wait "${cold_pids[$dev]}"; echo "$dev cold exit $? (124: time limit)"
done

for dev in $GPU_TYPES; do
    if [ $((SECONDS - START)) -lt "$BUDGET_S" ]; then
        step "render $dev again in a fresh process (caches warm), twice in-process"
        timeout 90 bash -c "$(declare -f py); PREFIX=$PREFIX; py '$GPU_CHECK' render $dev '$WORK' --repeat 2"
        echo "$dev warm exit $? (124: time limit)"
    else
        step "skipping warm $dev render: over the time budget"
    fi
done

step "render HIP (no AMD GPU here: must refuse, exit 3)"
py "$GPU_CHECK" render HIP "$WORK" --repeat 1; echo "HIP exit $?"

step "compare with the CPU image"
others=()
for dev in optix cuda; do
    if [ -f "$WORK/$dev.exr" ]; then others+=("$WORK/$dev.exr")
    elif [ -f "$WORK/${dev}_cold.exr" ]; then others+=("$WORK/${dev}_cold.exr"); fi
done
[ ${#others[@]} -gt 0 ] && py "$GPU_CHECK" compare "$WORK/cpu.exr" "${others[@]}" --out "$WORK/compare.json"

step "collect"
py - "$WORK" "$OUTDIR/results.json" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def load(name):
    p = work / name
    return json.loads(p.read_text()) if p.exists() else None
results = {
    "renders": {p.stem[len("render_"):]: load(p.name) for p in sorted(work.glob("render_*.json"))},
    "compare": load("compare.json"),
    "resolve": load("cycles_devices_resolve.json"),
    "nvml_parsed": load("nvml_parsed.json"),
    "nvidia_smi": (work / "nvidia-smi.txt").read_text() if (work / "nvidia-smi.txt").exists() else None,
}
out.write_text(json.dumps(results, indent=2) + "\n")
EOF
cp "$WORK/cycles_devices.json" "$WORK/nvml.json" "$OUTDIR/" 2>/dev/null
for dev in cpu optix cuda; do
    if [ -f "$WORK/$dev.exr" ]; then cp "$WORK/$dev.exr" "$OUTDIR/"
    elif [ -f "$WORK/${dev}_cold.exr" ]; then cp "$WORK/${dev}_cold.exr" "$OUTDIR/"; fi
done
step "done"
