"""What an application does: a plain OpenAI completions call to vLLM with a text prompt."""

import json
import urllib.request


def ask(url: str, model: str, prompt: str, max_tokens: int = 12) -> str:
    body = json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    ).encode()
    req = urllib.request.Request(
        f"{url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]["text"]
