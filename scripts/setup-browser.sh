#!/usr/bin/env bash
# Headless Chromium for the browser test (tests/web/test_browser.py): Debian's
# chromium and chromium-driver. Safe to run again; it installs only when one
# is missing, and only as root with apt. Otherwise it says what to install:
# the browser test then skips, except in CI (CI set), where it fails.
set -euo pipefail

have_browser() {
  { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } && command -v chromedriver >/dev/null
}

if have_browser; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup-browser: installing chromium and chromium-driver with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null && have_browser; then
    exit 0
  fi
  echo "setup-browser: could not install chromium and chromium-driver" >&2
else
  echo "setup-browser: chromium and chromium-driver are missing; install them, e.g." >&2
  echo "  sudo apt-get install chromium chromium-driver" >&2
fi
if [ -n "${CI:-}" ]; then
  exit 1
fi
echo "setup-browser: the browser test will be skipped" >&2
