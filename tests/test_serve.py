"""`transformers serve`, the library's OpenAI-compatible server, on what training produced, through the real server
on 127.0.0.1: completions, streamed completions, chat with a template, and continuous batching with concurrent
requests. The reference is `generate` on the MiniGPT folder itself (remote code), greedy."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import script_env

PROMPTS = ["def", "import os", "class A:", "return x"]
NEW_TOKENS = 12
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")  # fmt: skip
MESSAGES = [{"role": "user", "content": "print the sum"}]


@pytest.fixture(scope="module")
def folders(uninterrupted, tmp_path_factory):
    """The tiny run's final folder, its weights spread (a 12-step model greedily repeats one token, which
    would make every comparison pass) and a chat template added, then its native GPT-2 export: the folder
    the README serves."""
    import shutil

    from transformers import AutoTokenizer

    from export import export_gpt2
    from modeling_minigpt import MiniGPTForCausalLM

    final = tmp_path_factory.mktemp("serve") / "final"
    shutil.copytree(uninterrupted / "final", final)
    model = MiniGPTForCausalLM.from_pretrained(final)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(final)
    return final, export_gpt2(final, final.with_name("final-gpt2"))


@pytest.fixture(scope="module")
def reference(folders):
    """Greedy continuations from the MiniGPT folder, loaded as a user loads it (remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, _ = folders
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=True)

    def continuation(ids):
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        return tokenizer.decode(out[0, len(ids) :])

    texts = {prompt: continuation(tokenizer(prompt).input_ids) for prompt in PROMPTS}
    chat = continuation(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert len(set(texts.values())) > 1 and len(set(texts[PROMPTS[0]])) > 2  # varied text: the test can fail
    return texts, chat


class Server:
    """`transformers serve FOLDER` in its own process on a free port of 127.0.0.1, stopped by its PID."""

    def __init__(self, folder: Path, *options: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder = str(folder)
        cli = Path(sys.executable).with_name("transformers")
        self.process = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(self.port), *options,
                                         self.folder], env=script_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.time() + 180
        while not self.healthy():
            if self.process.poll() is not None or time.time() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.process.stdout.read()[-3000:]}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5).status == 200
        except OSError:
            return False

    def post(self, endpoint: str, body: dict):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/{endpoint}",
                                         data=json.dumps({"model": self.folder, **body}).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        return urllib.request.urlopen(request, timeout=120)

    def complete(self, prompt: str, **options) -> str:
        body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, **options}
        if not options.get("stream"):
            return json.load(self.post("completions", body))["choices"][0]["text"]
        events = [line[len(b"data: ") :] for line in self.post("completions", body) if line.startswith(b"data: ")]
        chunks = [json.loads(event) for event in events if event.strip() != b"[DONE]"]
        assert len(chunks) > 2  # streamed, not one answer
        return "".join(chunk["choices"][0].get("text", "") for chunk in chunks)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(folders):
    served = Server(folders[1])
    yield served
    served.stop()


def test_completions_plain_and_streamed_are_generates_text(server, reference):
    texts, _ = reference
    for prompt in PROMPTS:
        assert server.complete(prompt) == texts[prompt], prompt
    assert server.complete(PROMPTS[0], stream=True) == texts[PROMPTS[0]]


def test_chat_completions_use_the_folders_template(server, reference):
    _, chat = reference
    body = {"messages": MESSAGES, "max_tokens": NEW_TOKENS, "temperature": 0}
    assert json.load(server.post("chat/completions", body))["choices"][0]["message"]["content"] == chat


def test_continuous_batching_answers_concurrent_requests_each_with_its_own_text(folders, reference):
    """Four requests at once through the paged cache, bounded (16 blocks, 64 tokens a batch: the default sizes it
    from the machine's free memory)."""
    texts, _ = reference
    served = Server(folders[1], "--continuous-batching", "--cb-num-blocks", "16", "--cb-max-batch-tokens", "64")
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(served.complete, PROMPTS))
    finally:
        served.stop()
    assert answers == [texts[prompt] for prompt in PROMPTS]
