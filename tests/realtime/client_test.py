"""Drives `lfm2d serve --listen` with the official `openai` package's Realtime clients.

Run by tests/realtime_openai.rs against the tiny-c fixture model (random weights: the words are
noise, the pipeline is real). The server must run with
LFM2D_FORCE_REPLY='<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>', the test seam
that makes the first reply of a session with tools that tool call.

Usage: client_test.py PORT QUESTION_WAV
"""

import asyncio
import base64
import json
import sys
import wave

from openai import AsyncOpenAI

TIMEOUT = 20.0


def pcm16_24k(path):
    """A 16 kHz mono 16-bit WAV as 24 kHz pcm16 bytes (linear interpolation, 2 -> 3 samples)."""
    with wave.open(path, "rb") as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        raw = w.readframes(w.getnframes())
    x = [int.from_bytes(raw[i : i + 2], "little", signed=True) for i in range(0, len(raw), 2)]
    out = []
    n = len(x)
    for j in range(n * 3 // 2):
        pos = j * 2 / 3
        i = int(pos)
        frac = pos - i
        a = x[i]
        b = x[i + 1] if i + 1 < n else a
        out.append(int(round(a + (b - a) * frac)))
    return b"".join(max(-32768, min(32767, v)).to_bytes(2, "little", signed=True) for v in out)


def silence(ms):
    return b"\0\0" * (24 * ms)


class Events:
    """Reads server events; remembers every type seen."""

    def __init__(self, conn, label):
        self.conn = conn
        self.label = label
        self.seen = []

    async def next(self):
        event = await asyncio.wait_for(self.conn.recv(), TIMEOUT)
        self.seen.append(event.type)
        return event

    async def until(self, kind):
        """Events up to and including the first of type `kind`."""
        got = []
        while True:
            event = await self.next()
            got.append(event)
            if event.type == kind:
                return got
            if event.type == "error" and kind != "error":
                raise AssertionError(f"{self.label}: error while waiting for {kind}: {event.error}")

    async def error(self):
        """The next event, which must be an error."""
        event = await self.next()
        assert event.type == "error", f"{self.label}: expected an error, got {event.type}"
        return event.error


def check(cond, message):
    if not cond:
        raise AssertionError(message)


async def spoken_question_beta(client, question):
    """Beta dialect: server VAD on a streamed question, transcription, a spoken reply."""
    async with client.beta.realtime.connect(model="lfm2-audio") as conn:
        ev = Events(conn, "beta")
        created = await ev.next()
        check(created.type == "session.created", f"first event {created.type}")
        await conn.session.update(
            session={
                "modalities": ["text", "audio"],
                "instructions": "Answer briefly.",
                "voice": "alloy",
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1"},
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 500,
                    "create_response": True,
                    "interrupt_response": True,
                },
                "max_response_output_tokens": 40,
                "temperature": 0.8,
            }
        )
        updated = (await ev.until("session.updated"))[-1]
        check(updated.session.input_audio_format == "pcm16", "beta session is flat")
        check(updated.session.turn_detection.silence_duration_ms == 500, "turn_detection kept")
        check(updated.session.temperature == 0.8, f"temperature echoed exactly: {updated.session.temperature!r}")
        audio = silence(500) + question + silence(1500)
        step = 24 * 2 * 100  # 100 ms of pcm16
        for i in range(0, len(audio), step):
            await conn.input_audio_buffer.append(audio=base64.b64encode(audio[i : i + step]).decode())
        events = await ev.until("response.done")
        # The transcript is made after the reply's audio (it must not delay it).
        if not any(e.type == "conversation.item.input_audio_transcription.completed" for e in events):
            events += await ev.until("conversation.item.input_audio_transcription.completed")
        kinds = [e.type for e in events]
        first_audio = kinds.index("response.audio.delta")
        check(first_audio < kinds.index("conversation.item.input_audio_transcription.completed"), f"audio before the transcript: {kinds}")
        check("conversation.item.done" not in kinds and "conversation.item.added" not in kinds, "beta has item.created only")
        for kind in [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.created",
            "conversation.item.input_audio_transcription.completed",
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.audio_transcript.delta",
            "response.audio.delta",
            "response.audio.done",
            "response.audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
        ]:
            check(kind in kinds, f"beta: no {kind} in {kinds}")
        order = [k for k in kinds if k.startswith("input_audio_buffer.")]
        check(order[:3] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed"], f"VAD events in order: {order}")
        started = next(e for e in events if e.type == "input_audio_buffer.speech_started")
        stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
        # audio_start_ms counts the prefix padding (300 ms before the speech at ~500 ms);
        # audio_end_ms the silence (500 ms) after the speech.
        check(0 <= started.audio_start_ms <= 500, f"audio starts near 200 ms: {started.audio_start_ms}")
        speech_end = 500 + len(question) // 48
        check(speech_end - 300 <= stopped.audio_end_ms <= speech_end + 900, f"audio_end_ms {stopped.audio_end_ms} is the speech's end ({speech_end}) plus the silence")
        samples = sum(len(base64.b64decode(e.delta)) // 2 for e in events if e.type == "response.audio.delta")
        check(samples > 0 and all(len(base64.b64decode(e.delta)) % 2 == 0 for e in events if e.type == "response.audio.delta"), "pcm16 audio deltas")
        transcript = "".join(e.delta for e in events if e.type == "response.audio_transcript.delta")
        done = next(e for e in events if e.type == "response.done")
        check(done.response.status in ("completed", "incomplete"), f"status {done.response.status}")
        check(done.response.output[0].content[0].transcript == transcript, "transcript.done matches the deltas")
        print(f"beta: {len(kinds)} events, {samples / 24000:.2f} s of reply audio, transcript {transcript[:40]!r}")


async def interrupt_and_truncate_ga(client):
    """GA dialect: manual turns, a text question, cancel a reply mid-way, truncate it."""
    async with client.realtime.connect(model="lfm2-audio") as conn:
        ev = Events(conn, "ga")
        check((await ev.next()).type == "session.created", "session.created")
        await conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["audio"],
                "instructions": "Tell long stories.",
                "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
                    "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
                },
                "max_output_tokens": 4096,
            }
        )
        updated = (await ev.until("session.updated"))[-1]
        check(updated.session.audio.input.turn_detection is None, "manual turns")
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}
        )
        added = (await ev.until("conversation.item.added"))[-1]
        check(added.item.role == "user", "the user item is added")
        done = (await ev.until("conversation.item.done"))[-1]
        check(done.item.id == added.item.id, "and done")
        await conn.response.create()
        events = await ev.until("response.output_audio.delta")
        kinds = [e.type for e in events]
        check("conversation.item.added" in kinds, f"the assistant item is added in GA: {kinds}")
        item_id = events[-1].item_id
        received = len(base64.b64decode(events[-1].delta)) // 2
        await conn.response.cancel()
        rest = await ev.until("response.done")
        received += sum(len(base64.b64decode(e.delta)) // 2 for e in rest if e.type == "response.output_audio.delta")
        done = rest[-1]
        check(done.response.status == "cancelled", f"cancelled, got {done.response.status}")
        heard_ms = max(1, received // 24 // 2)
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=heard_ms)
        truncated = (await ev.until("conversation.item.truncated"))[-1]
        check(truncated.item_id == item_id and truncated.audio_end_ms == heard_ms, f"truncated: {truncated}")
        # Beyond what was sent: an error, and the session goes on.
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=heard_ms + 60_000)
        err = await ev.error()
        check("beyond" in err.message, err.message)
        # A text-only reply in the GA names.
        await conn.response.create(response={"output_modalities": ["text"]})
        events = await ev.until("response.done")
        check(events[-1].response.status in ("completed", "incomplete"), "text reply completed")
        check(not any(e.type == "response.output_audio.delta" for e in events), "no audio in a text reply")
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        tdone = next(e for e in events if e.type == "response.output_text.done")
        check(tdone.text == text, f"text.done {tdone.text!r} is the deltas {text!r}")
        check("\ufffd" not in tdone.text or "\ufffd" in text, "no replacement character the deltas did not carry")
        check(any(e.type == "conversation.item.done" for e in events), "the assistant item is done")
        print(f"ga: cancelled after {received / 24000:.2f} s, truncated to {heard_ms} ms; text reply events {[e.type for e in events]}")


async def function_call_round_trip(client):
    """A tool call (the LFM2D_FORCE_REPLY seam) and its output sent back."""
    async with client.realtime.connect(model="lfm2-audio") as conn:
        ev = Events(conn, "tools")
        await ev.until("session.created")
        await conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["audio"],
                "audio": {"input": {"turn_detection": None}},
                "tools": [
                    {
                        "type": "function",
                        "name": "get_weather",
                        "description": "The weather in a city",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                    }
                ],
                "max_output_tokens": 40,
            }
        )
        await ev.until("session.updated")
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}
        )
        await conn.response.create()
        events = await ev.until("response.done")
        calls = [e for e in events if e.type == "response.function_call_arguments.done"]
        added = [e for e in events if e.type == "conversation.item.added" and e.item.type == "function_call"]
        check(len(added) == 1, f"the function call is added to the conversation: {[e.type for e in events]}")
        check(any(e.type == "conversation.item.done" and e.item.type == "function_call" and e.item.arguments for e in events), "and done with its arguments")
        check(len(calls) == 1, f"one function call in {[e.type for e in events]}")
        call = calls[0]
        check(call.name == "get_weather", call.name)
        check(json.loads(call.arguments) == {"city": "Paris"}, call.arguments)
        check(any(e.type == "response.function_call_arguments.delta" for e in events), "arguments delta")
        output = events[-1].response.output
        check(any(o.type == "function_call" and o.call_id == call.call_id for o in output), "function_call in response.done")
        await conn.conversation.item.create(
            item={"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"sky": "clear", "celsius": 21})}
        )
        created = (await ev.until("conversation.item.added"))[-1]
        check(created.item.type == "function_call_output", created.item.type)
        await conn.response.create()
        events = await ev.until("response.done")
        check(events[-1].response.status in ("completed", "incomplete"), "the reply after the tool output")
        check(not any(e.type == "response.function_call_arguments.done" for e in events), "the second reply is not forced")
        print(f"tools: get_weather({call.arguments}) -> output -> {len(events)} events")


async def garbage(client):
    """Malformed input gives error events, and the session still works afterwards."""
    async with client.realtime.connect(model="lfm2-audio") as conn:
        ev = Events(conn, "garbage")
        await ev.until("session.created")
        await conn.send_raw("this is not json")
        check((await ev.error()).code == "invalid_json", "non-JSON")
        await conn.send_raw(json.dumps({"type": "no.such.event", "event_id": "evt_garbage"}))
        err = await ev.error()
        check(err.code == "unknown_event" and err.event_id == "evt_garbage", f"unknown type: {err}")
        await conn.send_raw(json.dumps({"type": "input_audio_buffer.append", "audio": "%%% not base64 %%%"}))
        err = await ev.error()
        check(err.code == "invalid_audio" and "base64" in err.message, f"bad base64: {err}")
        await conn.send_raw(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}}))
        err = await ev.error()
        check(err.code == "unsupported_audio_format" and "24000" in err.message, f"wrong format: {err}")
        await conn.send_raw(json.dumps({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}}))
        check((await ev.error()).code == "unsupported_audio_format", "wrong beta format")
        await conn.send_raw(json.dumps({"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0, "audio_end_ms": 5}))
        check("no item" in (await ev.error()).message, "truncate of an unknown item")
        await conn.send_raw(json.dumps([1, 2, 3]))
        check((await ev.error()).code == "invalid_event", "not an object")
        await conn.send_raw(json.dumps({"type": "input_audio_buffer.commit"}))
        check((await ev.error()).code == "input_audio_buffer_commit_empty", "empty commit")
        # An item the engine cannot take (no such call): the reply asked for after it fails
        # rather than answering without it.
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}, "max_output_tokens": 20})
        await ev.until("session.updated")
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": "call_nope", "output": "{}"})
        await conn.response.create()
        got = []
        while not got or got[-1].type != "response.done":
            got.append(await ev.next())
        errors = [e.error.message for e in got if e.type == "error"]
        check(any("call_nope" in m for m in errors), f"the failed item is reported: {errors}")
        check(got[-1].response.status == "failed", f"the reply without it fails: {got[-1].response.status} {[e.type for e in got]}")
        # Still working: a question and a reply.
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}, "max_output_tokens": 20})
        await ev.until("session.updated")
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Still there?"}]}
        )
        await conn.response.create()
        events = await ev.until("response.done")
        check(events[-1].response.status in ("completed", "incomplete"), "a reply after the garbage")
        print(f"garbage: {ev.seen.count('error')} errors, then a reply")


async def items_usage_and_limits(client):
    """GA: exact echo, usage, the token limit, the item API, out-of-band replies, sizes."""
    async with client.realtime.connect(model="lfm2-audio") as conn:
        ev = Events(conn, "items")
        await ev.until("session.created")
        await conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 700}}},
                "max_output_tokens": 3,
            }
        )
        updated = (await ev.until("session.updated"))[-1]
        td = updated.session.audio.input.turn_detection
        check(td.threshold == 0.6, f"threshold echoed exactly: {td.threshold!r}")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await ev.until("session.updated")
        # Instructions that cannot fit the context are refused at once; the session goes on.
        await conn.session.update(session={"type": "realtime", "instructions": "word " * 1_600_000})
        err = await ev.error()
        check(err.code == "context_length_exceeded", f"long instructions: {err}")
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "na " * 40_000}]}
        )
        err = await ev.error()
        check(err.code == "context_length_exceeded", f"a long item: {err}")
        # A reply cut by max_output_tokens: incomplete, with its usage.
        await conn.conversation.item.create(
            item={"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Count to a hundred."}]}
        )
        await ev.until("conversation.item.done")
        # (Speech: a text-only reply of the random-weight model may stop at once where it would
        # begin to speak.)
        await conn.response.create(response={"output_modalities": ["audio"]})
        events = await ev.until("response.done")
        r = events[-1].response
        check(r.status == "incomplete" and r.status_details.reason == "max_output_tokens", f"cut reply: {r.status} {r.status_details} {r.usage} {[e.type for e in events]}")
        u = r.usage
        check(u is not None and u.total_tokens == u.input_tokens + u.output_tokens, f"usage {u}")
        check(u.input_token_details.text_tokens > 5 and u.output_tokens == 3, f"usage {u}")
        check(u.output_token_details.text_tokens + u.output_token_details.audio_tokens == 3, f"usage {u}")
        reply_item = next(e.item.id for e in events if e.type == "conversation.item.added")
        # Retrieve, and items placed anywhere: a system item first, a user item after u1.
        await conn.send_raw(json.dumps({"type": "conversation.item.retrieve", "item_id": "u1"}))
        got = (await ev.until("conversation.item.retrieved"))[-1]
        check(got.item.id == "u1" and got.item.content[0].text == "Count to a hundred.", f"retrieved {got.item}")
        await conn.conversation.item.create(
            previous_item_id="root",
            item={"id": "s1", "type": "message", "role": "system", "content": [{"type": "input_text", "text": "Be terse."}]},
        )
        added = (await ev.until("conversation.item.added"))[-1]
        check(added.item.id == "s1" and added.previous_item_id is None, f"system item first: {added}")
        await conn.conversation.item.create(
            previous_item_id="u1",
            item={"id": "u2", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "And back."}]},
        )
        added = (await ev.until("conversation.item.added"))[-1]
        check(added.previous_item_id == "u1", f"after u1: {added}")
        await conn.send_raw(json.dumps({"type": "conversation.item.retrieve", "item_id": reply_item}))
        got = (await ev.until("conversation.item.retrieved"))[-1]
        check(got.item.role == "assistant", f"the reply retrieved: {got.item}")
        # Out of band: a reply to its own input, outside the conversation.
        await conn.response.create(
            response={
                "conversation": "none",
                "output_modalities": ["text"],
                "metadata": {"purpose": "summary"},
                "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Summarize: sky, sea."}]}],
            }
        )
        events = await ev.until("response.done")
        kinds = [e.type for e in events]
        check("conversation.item.added" not in kinds, f"out of band adds nothing to the conversation: {kinds}")
        r = events[-1].response
        check(r.conversation_id is None and r.metadata == {"purpose": "summary"}, f"out-of-band response {r}")
        if r.output:
            await conn.send_raw(json.dumps({"type": "conversation.item.retrieve", "item_id": r.output[0].id}))
            check((await ev.error()).code == "item_not_found", "the out-of-band item is not in the conversation")
        # The conversation goes on as before.
        await conn.response.create()
        events = await ev.until("response.done")
        check(events[-1].response.status in ("completed", "incomplete"), "a reply in the conversation after it")
        print(f"items: usage {u.input_tokens}+{u.output_tokens}, out-of-band {kinds.count('response.output_text.delta')} deltas")


async def main():
    port, wav = int(sys.argv[1]), sys.argv[2]
    question = pcm16_24k(wav)
    client = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        # The beta client always dials wss:// unless told where the WebSocket is.
        websocket_base_url=f"ws://127.0.0.1:{port}/v1",
        api_key="any-key",
    )
    await spoken_question_beta(client, question)
    await interrupt_and_truncate_ga(client)
    await function_call_round_trip(client)
    await garbage(client)
    await items_usage_and_limits(client)
    print("realtime client test: all parts passed")


if __name__ == "__main__":
    asyncio.run(main())
