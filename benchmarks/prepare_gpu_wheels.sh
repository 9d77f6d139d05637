#!/usr/bin/env bash
# Download, here (where pip reaches a registry), the wheels that benchmarks/gpu_check.sh needs on
# a GPU machine that has torch, torchvision, numpy, pillow, pyarrow, scipy, matplotlib, tqdm,
# psutil, pyyaml, requests, aiohttp, grpcio, protobuf ... but no Ray, MLflow or WebDataset, and
# no network. Two sets; together with the repository they fit the 64 MiB one device call carries:
#
#   .whl/stage1/  webdataset, braceexpand, cityscapesscripts (its labels table only), lz4 (shards
#                 written with --image-encoding lz4): stage 1
#   .whl/stage2/  Ray 2.60.0 repacked without what a Python-only local run never loads (ray/jars:
#                 Java workers, 31 MiB; ray/rllib, ray/llm; the dashboard web UI's source maps),
#                 mlflow-skinny (MLflow's Python code without the tracking server's web UI), and
#                 the dependencies of both, the ray[default] extras included, that the image lacks
#
# Versions are the exact ones of constraints.txt (today's pins), for CPython 3.12 manylinux x86_64.
# .whl/ is git-ignored; a device call carries the sets it names: carry=[".whl/stage1", ".whl/stage2"].
#
#   bash benchmarks/prepare_gpu_wheels.sh              # both sets, then their sizes
#   PYVER=3.11 bash benchmarks/prepare_gpu_wheels.sh   # for another Python (e.g. to rehearse here)
#   DEST=/tmp/w bash benchmarks/prepare_gpu_wheels.sh  # elsewhere than .whl/
#   RAY_ZIP=deflate bash ...                           # repack Ray with the usual deflate (faster
#       here, 41 MiB instead of 31): by default it is LZMA-compressed, which pip installs as any
#       wheel (Python's zipfile reads it) and which leaves the call 10 MiB more room
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=constraints.txt
RAY_ZIP=${RAY_ZIP:-lzma}

STAGE1="webdataset braceexpand cityscapesscripts lz4"
# Stage 2: what `run.py train` (Ray Train on a local cluster) and `run.py evaluate` import,
# MLflow's SQLite store included, found by tracing every process's imports during
# `gpu_check.sh --cpu-smoke` and running it in an environment holding only the GPU image's
# packages plus these. MLflow 3.17 imports fastapi, databricks-sdk and cryptography when it is
# imported. The dashboard's dependencies (ray[default]) are needed, not optional: without its
# state API, Ray Train's PlacementGroupCleaner can take the controller for dead and remove the
# worker group's placement group mid-run (seen). protobuf is carried although the image has one:
# Ray's and OpenTelemetry's generated code must meet the runtime they were resolved with.
STAGE2="ray mlflow-skinny
  jsonschema jsonschema-specifications referencing rpds-py
  alembic mako
  pydantic pydantic-core typing-inspection annotated-types
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  opentelemetry-exporter-prometheus aiohttp-cors colorful opencensus opencensus-context wcwidth
  google-api-core googleapis-common-protos proto-plus google-auth pyasn1 pyasn1-modules
  importlib-metadata cachetools sqlparse databricks-sdk fastapi starlette
  cryptography cffi pycparser protobuf"
# Pure-Python wheels where a package also ships one (SQLAlchemy's C speed-ups are 2.5 MiB of 4.5).
STAGE2_PURE="sqlalchemy"

pin() {  # NAME -> NAME==VERSION from constraints.txt
    local name=$1 line
    line=$(grep -i -E "^${name//-/[-_.]}==" "$CONSTRAINTS" || true)
    [ -n "$line" ] || { echo "prepare_gpu_wheels: $name is not pinned in $CONSTRAINTS" >&2; exit 2; }
    echo "${line%%[ #;]*}"
}

download() {  # DIR NAME...
    local dir=$1; shift
    mkdir -p "$dir"
    local specs=()
    for name in "$@"; do specs+=("$(pin "$name")"); done
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${specs[@]}" \
        2> >(grep -v "^WARNING: Location" >&2)
}

download_pure() {  # DIR NAME...
    local dir=$1; shift
    local specs=()
    for name in "$@"; do specs+=("$(pin "$name")"); done
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation py \
        --platform any -d "$dir" "${specs[@]}" 2> >(grep -v "^WARNING: Location" >&2)
}

rm -rf "$DEST/stage1" "$DEST/stage2"
download "$DEST/stage1" $STAGE1
download "$DEST/stage2" $STAGE2
download_pure "$DEST/stage2" $STAGE2_PURE

# Ray without the parts named above; RECORD keeps only the files still there. (LZMA takes a
# couple of minutes here.)
"$PYTHON" - "$DEST/stage2" "$RAY_ZIP" <<'EOF'
import sys, zipfile
from pathlib import Path

DROP = ("ray/jars/", "ray/rllib/", "ray/llm/")


def dropped(name: str) -> bool:  # the web UI must stay (the dashboard refuses to start without it), its .map files need not
    return name.startswith(DROP) or (name.startswith("ray/dashboard/client/build/") and name.endswith(".map"))


folder, method = Path(sys.argv[1]), {"lzma": zipfile.ZIP_LZMA, "deflate": zipfile.ZIP_DEFLATED}[sys.argv[2]]
(src,) = folder.glob("ray-*.whl")
tmp = src.with_suffix(".repacking")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", method, compresslevel=9) as zout:
    kept = [i for i in zin.infolist() if not dropped(i.filename)]
    for info in kept:
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if not dropped(l.split(",", 1)[0])) + "\n").encode()
        zout.writestr(info, data, compress_type=method, compresslevel=9)
before, after = src.stat().st_size, tmp.stat().st_size
tmp.replace(src)
print(f"repacked {src.name} ({sys.argv[2]}): {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
EOF

for d in "$DEST/stage1" "$DEST/stage2"; do
    echo "$d: $(ls "$d"/*.whl | wc -l) wheels, $(du -cb "$d"/*.whl | tail -1 | awk '{printf "%.1f MiB", $1/1048576}')"
done
echo "together: $(du -cb "$DEST"/stage1/*.whl "$DEST"/stage2/*.whl | tail -1 | awk '{printf "%.1f MiB", $1/1048576}')" \
     "(+ the repository, $(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | awk '{printf "%.1f MiB", $1/1048576}'))"
