"""The agent against the real local server (`mindset serve --model tiny-llama`), through
the real `openai` client, with seeded greedy sampling: memories and their scores,
reflection at its threshold, the feeling loop, branches across restarts, malformed output,
and the cascade's deferral."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.agent import events
from engine.agent.affect import Affect, split_reply
from engine.agent.agent import AgentSettings
from engine.agent.long_term import RetrievalWeights
from engine.agent.session import AgentPaths, AgentSession
from engine.llm.log import InteractionLog
from tests.bad_input_assets import free_port, wait_until_serving
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("server-home")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mindset.cli", "serve", "--model", "tiny-llama", "--port",
         str(port)], cwd=REPO_ROOT, env={**os.environ, "MINDSET_HOME": str(home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(process, url)
    yield f"{url}/v1"
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)


def remote(server: str, log: InteractionLog | None = None) -> Any:
    from engine.llm.openai_adapter import OpenAIAdapter

    return OpenAIAdapter("tiny-llama", base_url=server, log=log, max_retries=0)


def settings(**changes: Any) -> AgentSettings:
    # tiny-llama reads characters and holds 1,024 of them: no tool list in its prompt.
    base = AgentSettings(max_tokens=6, temperature=0, seed=0, tools=False)
    for name, value in changes.items():
        setattr(base, name, value)
    return base


def session_at(root: Path, small: Any, large: Any = None, **changes: Any) -> AgentSession:
    paths = AgentPaths(database=root / "agent.db", memory_store=root / "memory.db",
                       files=root / "files")
    return AgentSession(small, large=large, paths=paths, settings=settings(**changes),
                        owns_adapters=False)


async def collect(stream: Any) -> list[Any]:
    return [event async for event in stream]


def of(kind: type, happened: list[Any]) -> list[Any]:
    return [event for event in happened if isinstance(event, kind)]


async def test_logprobs_come_back_through_the_server_to_the_client(server: str) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="none", base_url=server)
    reply = await client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
    await client.close()


async def test_turns_are_remembered_and_retrieved_with_the_documented_scores(
        server: str, tmp_path: Path) -> None:
    adapter = remote(server)
    session = session_at(tmp_path, adapter, rate_importance=False, summaries=False,
                         context_tokens=30, retrieve_k=3)
    agent = session.agent
    conversation = session.dialog.new_conversation()
    for role, text in [("user", "My sister's name is Oriane."), ("assistant", "Noted."),
                       ("user", "I cooked pasta last night."), ("assistant", "Nice."),
                       ("user", "The weather was grey and rainy."), ("assistant", "I see.")]:
        await agent.observe(conversation, role, text)
    assert len(session.memory) == 6
    assert "agent.memories" in session.store.table_names()  # browsable like any table
    memories = session.memory.recent(100)  # the candidates, before the turn adds its own
    happened = await collect(agent.respond(conversation, "What is my sister's name?"))
    [retrieved] = of(events.Retrieved, happened)
    top = retrieved.memories[0]
    assert "Oriane" in top.memory.text
    # Relevance is the min-max normalised cosine over every stored memory.
    vectors = session.memory.embedder.embed([m.text for m in memories])
    query = session.memory.embedder.embed(["What is my sister's name?"])[0]
    cosines = vectors @ query
    expected = (cosines - cosines.min()) / (cosines.max() - cosines.min())
    by_id = {m.id: float(e) for m, e in zip(memories, expected, strict=True)}
    weights = RetrievalWeights()
    for scored in retrieved.memories:
        assert scored.relevance == pytest.approx(by_id[scored.memory.id], abs=1e-4)
        assert scored.score == pytest.approx(
            weights.recency * scored.recency + weights.importance * scored.importance
            + weights.relevance * scored.relevance, abs=1e-6)
        assert 0 <= scored.recency <= 1 and scored.importance == 0  # all rated alike
    # The question and its reply are remembered too, and linked to their dialog turns.
    [remembered] = of(events.Remembered, happened)
    nodes = {m.node_id for m in remembered.memories}
    assert nodes == {n.id for n in session.dialog.path(conversation)[-2:]}
    session.close()
    await adapter.aclose()


async def test_reflection_fires_at_the_threshold_and_links_real_memories(
        server: str, tmp_path: Path) -> None:
    adapter = remote(server)
    session = session_at(tmp_path, adapter, rate_importance=False, reflection_threshold=15)
    agent = session.agent
    conversation = session.dialog.new_conversation()
    lines = ["I moved to Porto last spring.", "My dog Biscuit loves the beach.",
             "I started learning the cello."]
    first = await agent.observe(conversation, "user", lines[0])
    second = await agent.observe(conversation, "user", lines[1])
    assert not of(events.Reflected, first + second)  # 5 + 5 < 15
    third = await agent.observe(conversation, "user", lines[2])  # 15: due
    [reflected] = of(events.Reflected, third)
    stored = {m.id: m for m in session.memory.recent(100)}
    reflections = [m for m in stored.values() if m.kind == "reflection"]
    assert reflections == list(reflected.memories)
    for reflection in reflections:
        assert reflection.evidence
        for evidence in reflection.evidence:
            assert stored[evidence].kind == "turn"  # a real memory, not a made-up id
    # What was reflected on no longer counts toward the next reflection.
    assert not of(events.Reflected, await agent.observe(conversation, "user", "Hello."))
    session.close()
    await adapter.aclose()


async def test_the_feeling_round_trips_from_reply_to_turn_to_the_next_prompt(
        server: str, tmp_path: Path) -> None:
    log = InteractionLog(tmp_path / "log.sqlite")
    adapter = remote(server, log)
    session = session_at(tmp_path, adapter, rate_importance=False)
    agent = session.agent
    conversation = session.dialog.new_conversation()
    happened = await collect(agent.respond(conversation, "Hello there"))
    # tiny-llama writes no feeling tag: that is reported, and the feeling is estimated.
    [notice] = [n for n in of(events.Notice, happened) if "feeling" in n.text]
    assert "estimated" in notice.text
    [replied] = of(events.Replied, happened)
    node = session.dialog.node(replied.node.id)
    assert node.arousal == replied.affect.arousal and node.valence == replied.affect.valence
    assert node.meta["feeling_source"] == "estimated from the text"
    assert node.meta["feeling_error"]

    def last_system_prompt() -> str:
        answers = [e for e in log.recent(50) if e.messages and e.messages[0]["role"] == "system"]
        return str(answers[0].messages[0]["content"])

    await collect(agent.respond(conversation, "And now?"))
    # The log links each reply to the dialog: its conversation, and the call it continues.
    replies = [n for n in session.dialog.path(conversation) if n.role == "assistant"]
    logged = {e.id: e for e in log.recent(50)}
    second = logged[str(replies[1].interaction_id)]
    assert second.conversation_id == conversation
    assert second.parent_id == replies[0].interaction_id
    assert Affect(node.arousal, node.valence, node.emotion or "").describe() \
        in last_system_prompt()
    agent.pin(Affect(-0.5, 0.5, "calm, positive"))
    await collect(agent.respond(conversation, "Still there?"))
    prompt = last_system_prompt()
    assert "held there by the user" in prompt and "calm, positive" in prompt
    # The format the prompt asks for parses back to the same feeling.
    text, parsed = split_reply("All good.\n" + Affect(0.3, -0.4, "tense").tag())
    assert text == "All good." and parsed == Affect(0.3, -0.4, "tense")
    session.close()
    await adapter.aclose()


async def test_branches_persist_across_restarts(server: str, tmp_path: Path) -> None:
    adapter = remote(server)
    session = session_at(tmp_path, adapter, rate_importance=False)
    conversation = session.dialog.new_conversation("branches")
    await collect(session.agent.respond(conversation, "First question"))
    await collect(session.agent.respond(conversation, "Second question"))
    first_user = session.dialog.path(conversation)[0]
    await collect(session.agent.edit(first_user.id, "A different first question"))
    branch = [(n.role, n.content) for n in session.dialog.path(conversation)]
    session.close()

    again = session_at(tmp_path, adapter, rate_importance=False)
    path = again.dialog.path(conversation)
    assert [(n.role, n.content) for n in path] == branch
    assert again.dialog.position(path[0].id) == (2, 2)
    old = again.dialog.switch(path[0].id, -1)
    assert [n.content for n in again.dialog.path(conversation)][::2] == \
        ["First question", "Second question"]
    assert old.content == "First question"
    exported = again.dialog.export(conversation, "json")
    assert "First question" in exported
    again.close()
    await adapter.aclose()


async def test_malformed_model_output_is_reported_and_nothing_breaks(
        server: str, tmp_path: Path) -> None:
    adapter = remote(server)
    session = session_at(tmp_path, adapter, rate_importance=True)
    conversation = session.dialog.new_conversation()
    happened = await collect(session.agent.respond(conversation, "Rate this"))
    notices = " | ".join(n.text for n in of(events.Notice, happened))
    assert "importance rating" in notices and "used 5" in notices  # not a number
    [remembered] = of(events.Remembered, happened)
    assert [m.importance for m in remembered.memories] == [5, 5]
    assert [n.importance for n in session.dialog.path(conversation)] == [5, 5]
    session.close()
    await adapter.aclose()


async def test_the_cascade_defers_when_the_small_model_is_unsure(
        server: str, tmp_path: Path) -> None:
    from engine.agent.cascade import Cascade, mean_entropy
    from engine.llm.local import LocalAdapter
    from engine.llm.types import SamplingParams

    small = remote(server)
    large = LocalAdapter.from_spec("tiny-gpt2")
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=5)
    probe = await small.chat([{"role": "user", "content": "What is 2 + 2?"}], params)
    entropy = mean_entropy(probe.logprobs or [])
    assert entropy > 0
    unsure = Cascade(small, large, entropy_threshold=entropy / 2)
    sure = Cascade(small, large, entropy_threshold=entropy * 2)
    ask = [{"role": "user", "content": "What is 2 + 2?"}]
    deferred = await unsure.run("answer", ask, SamplingParams(max_tokens=6, temperature=0))
    kept = await sure.run("answer", ask, SamplingParams(max_tokens=6, temperature=0))
    assert deferred.deferred and deferred.model == "tiny-gpt2"
    assert deferred.measure == "entropy" and deferred.uncertainty == pytest.approx(entropy)
    assert deferred.small_text == probe.text
    assert not kept.deferred and kept.model == "tiny-llama" and kept.text == probe.text
    assert unsure.stats.rate() == 1.0 and sure.stats.rate() == 0.0
    # Through the agent, the reply records the model that answered.
    session = session_at(tmp_path, small, large, rate_importance=False)
    session.cascade.entropy_threshold = entropy / 2
    conversation = session.dialog.new_conversation()
    happened = await collect(session.agent.respond(conversation, "What is 2 + 2?"))
    [answer] = [s for s in of(events.StepDone, happened) if s.step == "answer"]
    assert answer.deferred and answer.model == "tiny-gpt2"
    assert session.dialog.path(conversation)[-1].model == "tiny-gpt2"
    session.close()
    await small.aclose()
    await large.aclose()


async def test_a_prompt_too_long_for_the_model_is_cut_to_fit(tmp_path: Path) -> None:
    from engine.llm.local import LocalAdapter

    log = InteractionLog(tmp_path / "log.sqlite")
    adapter = LocalAdapter.from_spec("tiny-llama", log=log)  # 1,024 characters of context
    session = session_at(tmp_path, adapter, rate_importance=False, tools=True)
    conversation = session.dialog.new_conversation()
    for text in ["My locker code is 4817.", "I went for a walk.", "I cooked pasta."]:
        await session.agent.observe(conversation, "user", text)
    happened = await collect(session.agent.respond(conversation, "What is my locker code?"))
    assert of(events.Replied, happened)
    [answer] = [e for e in log.recent(10) if e.messages and e.messages[0]["role"] == "system"]
    system = answer.messages[0]["content"]
    assert "Tools:" not in system  # the tool list went first
    assert any("4817" in m["content"] for m in answer.messages)  # the fact stayed
    assert adapter.count_prompt_tokens(
        messages=[m for m in _as_messages(answer.messages)]) + 6 <= adapter.context_length
    session.close()
    await adapter.aclose()


def _as_messages(raw: list[dict[str, str]]) -> list[Any]:
    from engine.llm.types import ChatMessage

    return [ChatMessage(m["role"], m["content"]) for m in raw]


async def test_the_inner_thought_comes_before_the_reply_and_stays_private(
        server: str, tmp_path: Path) -> None:
    adapter = remote(server)
    session = session_at(tmp_path, adapter, rate_importance=False, inner_dialogue=True)
    conversation = session.dialog.new_conversation()
    happened = await collect(session.agent.respond(conversation, "Plan my day"))
    [thought] = of(events.Thought, happened)
    steps = [s.step for s in of(events.StepDone, happened)]
    assert steps.index("inner") < steps.index("answer")
    user, inner, reply = session.dialog.path(conversation)
    assert (user.role, inner.role, reply.role) == ("user", "inner", "assistant")
    assert inner.id == thought.node.id and reply.parent_id == inner.id
    assert "## inner" not in session.dialog.export(conversation, "markdown")
    assert "## inner" in session.dialog.export(conversation, "markdown", include_inner=True)
    # A regenerated reply keeps the same thought: a sibling under it, not a new one.
    await collect(session.agent.regenerate(reply.id))
    assert session.dialog.position(session.dialog.path(conversation)[-1].id) == (2, 2)
    assert [n.role for n in session.dialog.path(conversation)] == ["user", "inner", "assistant"]
    session.close()
    await adapter.aclose()
