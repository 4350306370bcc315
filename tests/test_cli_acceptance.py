"""The acceptance path exactly as a user runs it: ``chatglm-gateway serve --model NAME=PATH
--dtype float32`` in its own process, queried with the official ``openai`` client, compared with
what THUDM's reference code answered; then SIGTERM ends it cleanly."""

from __future__ import annotations

import openai

from tests.conftest import checkpoint_dir, oracle, requires_reference
from tests.server import gateway_process


@requires_reference
def test_serve_command_gives_the_official_answers() -> None:
    flags = ("--dtype", "float32", "--model", f"glm2={checkpoint_dir('chatglm2-6b-tiny')}",
             "--model", f"glm1={checkpoint_dir('chatglm-6b-tiny')}")
    with gateway_process(*flags) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        for model, name in (("glm2", "chatglm2-6b-tiny"), ("glm1", "chatglm-6b-tiny")):
            case = oracle(name)["cases"][1]  # a Chinese prompt without history
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": case["query"]}],
                temperature=0, max_tokens=16)
            assert r.choices[0].message.content == case["chat_response"]
            assert r.usage.prompt_tokens == len(case["inputs"]["input_ids"][0])
