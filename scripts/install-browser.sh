#!/usr/bin/env bash
# Install Debian's chromium for the browser test of the chat page (tests/test_web_page.py),
# plus small CJK and emoji fonts so its screenshots show Chinese text and emoji, not boxes.
# Idempotent: does nothing when everything is present.  Needs root (or sudo) and apt.
# The test drives this browser through the `playwright` Python package (the `test` extra);
# `playwright install` is never needed: the test points Playwright at /usr/bin/chromium.
set -euo pipefail

packages=()
[ -x /usr/bin/chromium ] || packages+=(chromium)
[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || packages+=(fonts-wqy-microhei)
[ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || packages+=(fonts-noto-color-emoji)

if [ ${#packages[@]} -eq 0 ]; then
    echo "install-browser: chromium and fonts already installed"
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-browser: run as root (or install sudo)" >&2; exit 1; }
    sudo=(sudo)
fi
echo "install-browser: installing ${packages[*]}"
"${sudo[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"
