"""The acceptance path exactly as a user runs it: ``chatglm-gateway serve --model NAME=PATH
--dtype float32`` in its own process, queried with the official ``openai`` client, compared with
what THUDM's reference code answered; then SIGTERM ends it cleanly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.conftest import checkpoint_dir, oracle, requires_reference

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@requires_reference
def test_serve_command_gives_the_official_answers() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--dtype", "float32",
         "--model", f"glm2={checkpoint_dir('chatglm2-6b-tiny')}",
         "--model", f"glm1={checkpoint_dir('chatglm-6b-tiny')}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        for model, name in (("glm2", "chatglm2-6b-tiny"), ("glm1", "chatglm-6b-tiny")):
            case = oracle(name)["cases"][1]  # a Chinese prompt without history
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": case["query"]}],
                temperature=0, max_tokens=16)
            assert r.choices[0].message.content == case["chat_response"]
            assert r.usage.prompt_tokens == len(case["inputs"]["input_ids"][0])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.stdout is not None
    with proc.stdout:
        log = proc.stdout.read()
    assert "Traceback" not in log, log
