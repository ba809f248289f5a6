#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian-like machine: the Fashion-MNIST data package, then a
# virtual environment (.venv) with bench and its test tools. Safe to run again.
# BENCH_BROWSER=1 also installs Debian's headless Chromium and its driver, which only
# tests/test_site_browser.py and scripts/screenshot_site.py use (without them that test skips).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then
    echo "setup: could not install dataset-fashion-mnist; the fashion-mnist task will download instead" >&2
  fi
fi

if [ "${BENCH_BROWSER:-0}" = 1 ] && ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } \
    && command -v apt-get >/dev/null 2>&1; then
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1; then
    echo "setup: could not install chromium and chromium-driver; tests/test_site_browser.py will skip" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch is left unpinned on purpose: a plain resolution gives a torch/torchvision pair that
# import together (pinning the CPU-only torch 2.13.0 wheel breaks torchvision, see README).
# The ray extra is optional for users; set-up installs it so the test suite covers --engine ray.
.venv/bin/pip install -q -e ".[test,ray]"
