"""``corolla api --monitor`` on a live loopback swarm of the real SmolLM2 (one swarm for both, to keep the suite
lean).

The API, driven by the real ``openai`` package: the models the registry announces, chat and plain completions
(greedy text equal to local transformers' ``generate``), streaming with usage, stop sequences, OpenAI-shaped errors,
concurrent streams, a client that hangs up mid-stream (the servers free its cache), and a server killed mid-stream
(the stream goes on unchanged).

The health page, in a real headless Chromium: healthy; a killed server's blocks shown missing and the model broken;
healthy again once it is back. ``/metrics`` parsed by prometheus-client's parser; ``/api/v1/state`` against its
schema."""

from __future__ import annotations

import asyncio
import time

import httpx2
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.local_swarm import LocalSwarm, wait_for
from corolla.net.loop import run_sync

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "smollm2-135m"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Blocks 0:15 on one server and 15:30 on two (one of them may be killed), then `corolla api` with a key and
    the health page."""
    logs = tmp_path_factory.mktemp("logs-api")
    with LocalSwarm(model=MODEL, spans=["0:15", "15:30", "15:30"], log_dir=logs) as swarm:
        monitor = ["--monitor", "--refresh-period-s", "1", "--call-timeout-s", "2"]
        # speculative decoding on: every greedy comparison below covers it (requests with n > 1 run without it)
        speculate = ["--prompt-lookup-tokens", "4"]
        swarm.api_url = swarm.start_api(extra_args=["--api-key", KEY, *monitor, *speculate])
        swarm.page_url = swarm.api_url.removesuffix("/v1") + "/"
        yield swarm


@pytest.fixture(scope="module")
def client(swarm):
    return openai.OpenAI(base_url=swarm.api_url, api_key=KEY, timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def local(smollm2_path):
    """The same weights in local transformers, and a function giving the text greedy decoding produces."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()

    def greedy(prompt_ids: list[int], max_new_tokens: int) -> tuple[str, int, str]:
        """(text, generated tokens, finish reason) of local greedy decoding."""
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, len(prompt_ids) :].tolist()
        stopped = new[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
        return text, len(new), "stop" if stopped else "length"

    def chat_ids(question: str) -> list[int]:
        messages = [{"role": "user", "content": question}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])

    return tokenizer, greedy, chat_ids


@pytest.fixture(scope="module")
def statuses(swarm):
    """The live servers' own status (info RPC), by process name."""
    from corolla.net.dht_process import client_dht
    from corolla.net.ping import server_status
    from corolla.net.transport import P2PTransport

    dht = client_dht(swarm.initial_peers, startup_timeout=30, bootstrap_timeout=30)
    p2p = run_sync(dht.replicate_p2p(), timeout_s=30)
    transport = P2PTransport(p2p)

    def read() -> dict:
        alive = {name: swarm.peer_ids[name] for name, p in swarm.processes.items() if name in swarm.peer_ids}
        alive = {name: peer for name, peer in alive.items() if swarm.processes[name].poll() is None}

        async def all_statuses():
            answers = await asyncio.gather(*(server_status(transport, p, timeout_s=10) for p in alive.values()))
            return dict(zip(alive, answers))

        return run_sync(all_statuses(), timeout_s=30)

    yield read
    run_sync(p2p.shutdown(), timeout_s=10)
    dht.shutdown()


def expect_caches_free(statuses) -> None:
    """Every live server has no session and its whole cache budget free."""
    last = {}

    def free() -> bool:
        last.update(statuses())
        return all(s.active_sessions == 0 and s.cache_tokens_left == s.cache_tokens_total for s in last.values())

    try:
        wait_for(free, timeout_s=20, what="the servers to free every session's cache", poll_s=0.2)
    except TimeoutError:
        pytest.fail(f"sessions or cache still held: {last}")


def test_models_chat_and_usage_equal_local_greedy(client, local, statuses):
    tokenizer, greedy, chat_ids = local
    assert [m.id for m in client.models.list().data] == [MODEL]  # found in the swarm's model registry
    assert client.models.retrieve(MODEL).id == MODEL
    question = "What is the capital of France?"
    expected, generated, reason = greedy(chat_ids(question), 24)

    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == reason
    assert reply.usage.prompt_tokens == len(chat_ids(question))
    assert reply.usage.completion_tokens == generated
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + generated
    expect_caches_free(statuses)


def test_copying_answer_with_prompt_lookup_equals_local_greedy(client, local):
    """A request whose answer copies the prompt, where prompt lookup's guesses are accepted."""
    _, greedy, chat_ids = local
    question = "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog near the river bank."
    expected, _, _ = greedy(chat_ids(question), 24)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.content == expected


def test_streamed_chat_with_usage(client, local):
    _, greedy, chat_ids = local
    question = "Name three colors."
    expected, generated, reason = greedy(chat_ids(question), 20)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_completion_tokens=20,
            temperature=0, stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == generated
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_with_stop_sequence_and_echo(client, local):
    tokenizer, greedy, _ = local
    prompt = "The capital of France is"
    expected, _, _ = greedy(tokenizer(prompt)["input_ids"], 12)
    assert "." in expected  # the stop sequence occurs in the greedy text
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=["."])
    assert reply.choices[0].text == expected.split(".")[0]
    assert reply.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt) and len(echoed.choices[0].text) > len(prompt)


def test_sampling_with_a_seed_repeats_and_n_gives_choices(client):
    def ask(seed):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a word."}], max_tokens=6,
            temperature=1.0, top_p=0.9, seed=seed, n=2,
        )  # fmt: skip

    first, again = ask(7), ask(7)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_mistakes_get_openai_errors(swarm, client, local):
    _, _, chat_ids = local
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError, match="Bearer"):
        openai.OpenAI(base_url=swarm.api_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=chat)
    assert missing.value.code == "model_not_found" and MODEL in missing.value.message
    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(model=MODEL, messages=chat, temperature=3)
    assert hot.value.param == "temperature"
    with pytest.raises(openai.BadRequestError, match="n must be at most"):
        client.chat.completions.create(model=MODEL, messages=chat, n=100)
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=MODEL, messages=chat, max_tokens=10**6)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        )
    raw = httpx2.post(f"{swarm.api_url}/chat/completions", content=b"{not json", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


def test_four_concurrent_streams_each_get_their_own_text(swarm, local):
    _, greedy, chat_ids = local
    questions = ["What is 2+2?", "Say hello.", "Name a fruit.", "What color is the sky?"]
    expected = [greedy(chat_ids(q), 16)[0] for q in questions]
    client = openai.AsyncOpenAI(base_url=swarm.api_url, api_key=KEY, timeout=120, max_retries=0)
    first_chunk, finished = {}, {}

    async def stream(i: int, question: str) -> str:
        chunks = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0, stream=True
        )
        text = ""
        async for chunk in chunks:
            first_chunk.setdefault(i, time.monotonic())
            text += chunk.choices[0].delta.content or ""
        finished[i] = time.monotonic()
        return text

    async def all_streams():
        try:
            return await asyncio.gather(*(stream(i, q) for i, q in enumerate(questions)))
        finally:
            await client.close()

    assert asyncio.run(all_streams()) == expected
    # served side by side, not one after another: every stream had begun before any had ended
    assert max(first_chunk.values()) < min(finished.values())


def test_client_hanging_up_mid_stream_frees_the_servers_caches(swarm, statuses):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 100."}], "max_tokens": 200,
            "temperature": 0, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx2.stream("POST", f"{swarm.api_url}/chat/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            assert next(lines).startswith("data: ")
            next(lines)  # the blank line after each event
        assert sum(s.active_sessions for s in statuses().values()) == 2  # 0:15 and one of the 15:30 servers
    # the connection is closed here, long before 200 tokens
    expect_caches_free(statuses)


def test_a_server_killed_mid_stream_does_not_break_the_stream(swarm, client, local, statuses):
    _, greedy, chat_ids = local
    question = "Count from 1 to 100."
    expected, _, _ = greedy(chat_ids(question), 96)
    chunks = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=96, temperature=0, stream=True
    )
    text = ""
    for i, chunk in enumerate(chunks):
        text += chunk.choices[0].delta.content or ""
        if i == 1:  # the session is open on one of the two servers of 15:30: kill that one
            busy = [name for name, s in statuses().items() if s.active_sessions and s.start_block == 15]
            assert len(busy) == 1, busy
            swarm.kill(busy[0])
    assert text == expected
    expect_caches_free(statuses)


# ---- the health page ---------------------------------------------------------------------------------------------


def test_state_and_metrics(swarm):
    from prometheus_client.parser import text_string_to_metric_families

    from corolla.monitor.state import SwarmState

    def state() -> SwarmState:
        return SwarmState.model_validate(httpx2.get(swarm.page_url + "api/v1/state", timeout=30).json())

    wait_for(lambda: state().models and state().models[0].healthy, timeout_s=30, what="a healthy reading")
    reading = state()
    (model,) = reading.models
    assert (model.name, model.num_blocks, model.model_type) == (MODEL, 30, "llama")
    live = {swarm.peer_ids[n] for n, p in swarm.processes.items() if n in swarm.peer_ids and p.poll() is None}
    assert {s.peer_id for s in model.servers if s.reachable} == live
    assert all(s.state == "ONLINE" and s.ping_ms is not None and s.dtype == "float32" for s in model.servers
               if s.reachable)  # fmt: skip
    assert model.coverage == [1] * 15 + [len(live) - 1] * 15 and model.missing == []
    assert [b.answers for b in reading.bootstrap_peers] == [True]
    assert httpx2.get(swarm.page_url + "api/v1/state/schema", timeout=30).json() == SwarmState.model_json_schema()

    text = httpx2.get(swarm.page_url + "metrics", timeout=30).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
    assert samples[("corolla_model_healthy", (("model", MODEL),))] == 1
    assert samples[("corolla_model_blocks_covered", (("model", MODEL),))] == 30
    assert samples[("corolla_model_min_coverage", (("model", MODEL),))] == 1
    assert samples[("corolla_model_servers", (("model", MODEL), ("state", "ONLINE")))] == len(live)
    assert samples[("corolla_monitor_up", ())] == 1


@pytest.fixture
def browser(tmp_path):
    """Debian's headless chromium through its chromedriver (nothing is downloaded)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not installed (`make browser-deps` installs them as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()  # stops the browser it started; then the driver process, by its PID, if it is still there
        if service.process is not None and service.process.poll() is None:
            service.process.kill()


def test_page_shows_a_killed_server_s_blocks_missing_and_recovers(swarm, browser, tmp_path):
    import os

    from selenium.webdriver.support.ui import WebDriverWait

    # the page re-renders itself every second: each look at it is one script, so no element goes stale mid-read
    look = """
        const section = document.querySelector(`section[data-model="${arguments[0]}"]`);
        if (!section) return null;
        const badge = section.querySelector('[data-health]');
        const row = section.querySelector(`tr[data-peer="${arguments[1]}"]`);
        return {health: badge ? badge.getAttribute('data-health') : '', text: section.innerText,
                peers: [...section.querySelectorAll('tr[data-peer]')].map(r => r.getAttribute('data-peer')),
                row: row ? row.innerText : '',
                bootstrap: document.querySelectorAll('[data-bootstrap="answers"]').length};
    """

    def page(driver) -> dict:
        return driver.execute_script(look, MODEL, swarm.peer_ids["server0"]) or {"health": ""}

    def health(driver) -> str:
        return page(driver)["health"]

    browser.get(swarm.page_url)
    WebDriverWait(browser, 30).until(lambda d: health(d) == "healthy")
    seen = page(browser)
    assert seen["bootstrap"] and swarm.peer_ids["server0"] in seen["peers"]
    shot = os.environ.get("COROLLA_MONITOR_SCREENSHOT") or str(tmp_path / "healthy.png")
    browser.save_screenshot(shot)  # COROLLA_MONITOR_SCREENSHOT=docs/monitor.png refreshes the docs' picture

    swarm.kill("server0")  # the only server of blocks 0:15
    WebDriverWait(browser, 30).until(lambda d: health(d) == "broken")  # 1 s refreshes, 2 s call timeout
    seen = page(browser)
    assert "Blocks 0:15 have no serving server" in seen["text"]
    assert "unreachable" in seen["row"]

    swarm.start_server("server0", ["--blocks", "0:15"])  # the same identity: the same peer comes back
    WebDriverWait(browser, 90).until(lambda d: health(d) == "healthy")
