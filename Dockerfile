# backdoorscan container image.
#
#   docker build -t backdoorscan .                          # CPU image
#   docker build --build-arg GPU=1 -t backdoorscan:gpu .    # adds the CUDA and cuDNN libraries
#   docker run --rm backdoorscan demo
#
# BASE is any image with Python 3.10+ (python3 on PATH, the venv module) and useradd: the
# official python:*-slim images, or a local Debian root with python3 and python3-venv.
# Pip settings for the build (a private index, a proxy's CA, a local wheel folder) can be
# passed without ending up in the image: --secret id=pip.conf,src=/path/to/pip.conf.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG GPU=0
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY backdoorscan/ backdoorscan/
# Build the wheel, install it with its dependencies into /opt/venv (the only thing the final
# stage takes), then precompile the bytecode (not the libraries' own tests): the image may run
# on a read-only root, where Python cannot keep what it compiles.
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    set -eu; \
    case "$GPU" in \
      0) set -- ;; \
      1) set -- "onnxruntime-gpu[cuda,cudnn]" ;; \
      *) echo "GPU must be 0 or 1, not '$GPU'" >&2; exit 2 ;; \
    esac; \
    python3 -m venv /opt/venv; \
    pip wheel --no-deps --wheel-dir /tmp/dist /src; \
    pip install --no-compile /tmp/dist/backdoorscan-*.whl "$@"; \
    python -m compileall -q -j 0 --invalidation-mode unchecked-hash -x '/tests?/' /opt/venv/lib

FROM ${BASE}
ARG BASE
ARG GPU=0
# The package's version, from backdoorscan/_version.py (its one source):
#   --build-arg VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' backdoorscan/_version.py)"
ARG VERSION=unset
LABEL org.opencontainers.image.title="backdoorscan" \
      org.opencontainers.image.description="Detects backdoor (data-poisoning) attacks in neural networks with Activation Clustering" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"
# ORT_DISABLE_TELEMETRY: ONNX Runtime 1.31 otherwise keeps a telemetry device ID and event
# store under ~/.cache and a session file in /tmp (which the build would bake into the image)
# and tries to upload them over HTTPS.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    NUMBA_CACHE_DIR=/opt/backdoorscan/numba-cache \
    ORT_DISABLE_TELEMETRY=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
# The license, where a Debian image keeps its packages' (the wheel's copy is in the venv too).
COPY --from=build /src/LICENSE /usr/share/doc/backdoorscan/LICENSE
# As root: the unprivileged user, its Numba cache folder, a start-up hook for read-only
# containers (below), and with GPU=1 the pip-installed CUDA libraries on the loader's path.
# The hook: Numba only uses a cache folder it can write to, so when NUMBA_CACHE_DIR is
# read-only (docker run --read-only, or another --user) each Python start copies it once to
# $TMPDIR or /tmp and points Numba there, keeping the kernels compiled below.
RUN set -eu; \
    useradd --uid 10001 --user-group --home-dir /home/scan --create-home \
        --shell /usr/sbin/nologin scan; \
    install -d -o 10001 -g 10001 "$NUMBA_CACHE_DIR"; \
    site=$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
    printf '%s\n' \
      '"""Point Numba at a writable copy of a read-only NUMBA_CACHE_DIR (image start-up hook)."""' \
      'import os' \
      'import shutil' \
      'import sys' \
      '' \
      '' \
      'def _use_writable_numba_cache() -> None:' \
      '    src = os.environ.get("NUMBA_CACHE_DIR", "")' \
      '    if not os.path.isdir(src) or os.access(src, os.W_OK):' \
      '        return' \
      '    tmp = os.environ.get("TMPDIR") or "/tmp"' \
      '    dst = os.path.join(tmp, f"backdoorscan-numba-cache-{os.getuid()}")' \
      '    try:' \
      '        if not os.path.isdir(dst):' \
      '            part = f"{dst}.{os.getpid()}"' \
      '            shutil.copytree(src, part)' \
      '            try:' \
      '                os.rename(part, dst)' \
      '            except OSError:' \
      '                shutil.rmtree(part, ignore_errors=True)' \
      '    except OSError as exc:' \
      '        msg = f"backdoorscan: {src} is read-only and {tmp} is not writable ({exc});"' \
      '        print(msg, "run the container with --tmpfs /tmp", file=sys.stderr)' \
      '        return' \
      '    os.environ["NUMBA_CACHE_DIR"] = dst' \
      '' \
      '' \
      '_use_writable_numba_cache()' \
      > "$site/_backdoorscan_numba_cache.py"; \
    echo 'import _backdoorscan_numba_cache' > "$site/_backdoorscan_numba_cache.pth"; \
    python -m compileall -q --invalidation-mode unchecked-hash "$site/_backdoorscan_numba_cache.py"; \
    if [ "$GPU" = 1 ]; then \
      find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u > /etc/ld.so.conf.d/nvidia-pip.conf; \
      ldconfig; \
    fi
USER 10001:10001
WORKDIR /scan
# Compile the Numba kernels once, into NUMBA_CACHE_DIR: scan the shipped demo, then scan it
# again with both reductions, every analysis of the decision rule and k chosen automatically,
# so that the kernels the demo skips (FastICA, silhouette's) are compiled too. Each must write its report (its exit code is 1:
# it finds the planted backdoor).
RUN set -eu; \
    data=$(python -c 'import backdoorscan, pathlib; print(pathlib.Path(backdoorscan.__file__).parent / "data")'); \
    rule=$(python -c 'from backdoorscan.scanner.config import ANALYSES; print(",".join(ANALYSES))'); \
    warm() { \
      backdoorscan "$@" -q --format json -o /tmp/warmup.json > /tmp/warmup.log 2>&1 || true; \
      [ -s /tmp/warmup.json ] || { cat /tmp/warmup.log >&2; echo "warm-up failed: $*" >&2; return 1; }; \
      rm -f /tmp/warmup.json /tmp/warmup.log; \
    }; \
    warm demo; \
    warm scan "$data/demo.onnx" --data "$data/demo.npz" --reduce pca+ica --clusters auto --rule "$rule"; \
    if ! find "$NUMBA_CACHE_DIR" -name '*.nbi' | grep -q .; then \
      echo "no Numba kernels were cached" >&2; exit 1; \
    fi
ENTRYPOINT ["backdoorscan"]
CMD ["--help"]
