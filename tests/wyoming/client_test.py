"""Drives `lfm2d serve --wyoming` with the official `wyoming` package (1.10.2), sending what Home
Assistant's wyoming integration sends: describe; speech to text; text to speech (whole and
streamed); the conversation agent over two turns of one conversation; and bad input.

Run by tests/wyoming_ha.rs against the tiny-c fixture model (random weights: the words are noise,
the pipeline is real).

Usage: client_test.py PORT EXPECTED_JSON
  EXPECTED_JSON maps WAV paths to the transcript `lfm2d transcribe` gives for them.
Usage: client_test.py PORT --bench WAV RUNS
  Prints the median time from audio-stop to transcript and from synthesize to the first
  audio-chunk over RUNS runs (for the README's latency figures).
"""

import asyncio
import json
import statistics
import sys
import time
import wave

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

TIMEOUT = 60.0
HOST = "127.0.0.1"


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def read_wav(path):
    with wave.open(path, "rb") as w:
        return w.getframerate(), w.getsampwidth(), w.getnchannels(), w.readframes(w.getnframes())


class Client:
    """One connection; remembers every event type it read."""

    def __init__(self, port):
        self.client = AsyncTcpClient(HOST, port)
        self.seen = []

    async def __aenter__(self):
        await self.client.connect()
        return self

    async def __aexit__(self, *exc):
        await self.client.disconnect()

    async def send(self, event):
        await self.client.write_event(event.event() if hasattr(event, "event") else event)

    async def next(self):
        event = await asyncio.wait_for(self.client.read_event(), TIMEOUT)
        check(event is not None, "the server closed the connection")
        self.seen.append(event.type)
        return event

    async def until(self, kind):
        got = []
        while True:
            event = await self.next()
            got.append(event)
            if event.type == kind:
                return got
            check(event.type != "error" or kind == "error", f"error while waiting for {kind}: {event.data}")


async def describe(port):
    async with Client(port) as c:
        await c.send(Describe())
        info = Info.from_event(await c.next())
        asr, tts, handle = info.asr[0], info.tts[0], info.handle[0]
        check(asr.installed and asr.supports_transcript_streaming, f"asr: {asr}")
        check(asr.models[0].languages == ["en"], f"asr languages: {asr.models[0].languages}")
        voices = {v.name for v in tts.voices}
        check({"us-male", "us-female", "uk-male", "uk-female"} <= voices, f"voices: {voices}")
        check(tts.supports_synthesize_streaming, "tts streaming")
        check(handle.supports_handled_streaming and handle.models, f"handle: {handle}")
    print("describe: ok")


async def transcribe(port, path, chunk_samples=1024, language="en"):
    """As Home Assistant's stt entity: transcribe, audio-start, chunks, audio-stop."""
    rate, width, channels, raw = read_wav(path)
    async with Client(port) as c:
        await c.send(Transcribe(language=language))
        await c.send(AudioStart(rate=rate, width=width, channels=channels))
        step = chunk_samples * width * channels
        for i in range(0, len(raw), step):
            await c.send(AudioChunk(rate=rate, width=width, channels=channels, audio=raw[i : i + step]))
        await c.send(AudioStop())
        stopped = time.monotonic()
        events = await c.until("transcript")
        took = time.monotonic() - stopped
        kinds = [e.type for e in events]
        check(kinds[0] == "transcript-start" and kinds[-2] == "transcript-stop", f"streaming order: {kinds}")
        chunks = "".join(TranscriptChunk.from_event(e).text for e in events if e.type == "transcript-chunk")
        t = Transcript.from_event(events[-1])
        check(chunks == t.text, f"chunks {chunks!r} != transcript {t.text!r}")
        return t.text, took


async def speech_to_text(port, expected):
    for path, want in expected.items():
        text, took = await transcribe(port, path)
        check(text == want, f"{path}: transcript {text!r}, lfm2d transcribe gives {want!r}")
        print(f"transcript of {path.rsplit('/', 1)[-1]}: {text[:40]!r} ({took * 1000:.0f} ms after audio-stop)")


async def synthesize(port, text, voice="uk-female"):
    """As Home Assistant's tts entity (whole text)."""
    async with Client(port) as c:
        start = time.monotonic()
        await c.send(Synthesize(text=text, voice=SynthesizeVoice(name=voice)))
        first = None
        audio = b""
        fmt = None
        while True:
            event = await c.next()
            check(event.type != "error", f"synthesize: {event.data}")
            if AudioStart.is_type(event.type):
                fmt = AudioStart.from_event(event)
            elif AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                if first is None:
                    first = time.monotonic() - start
                check((chunk.rate, chunk.width, chunk.channels) == (24000, 2, 1), f"chunk format {chunk}")
                audio += chunk.audio
            elif AudioStop.is_type(event.type):
                break
        check(fmt is not None and fmt.rate == 24000, f"audio-start {fmt}")
        check(c.seen[0] == "audio-start", f"first event {c.seen[0]}")
        return audio, first


async def text_to_speech(port):
    audio, first = await synthesize(port, "Hello there. The kitchen light is on.")
    check(len(audio) >= 2 * 1920, f"only {len(audio)} bytes of speech")
    print(f"synthesize: {len(audio) // 2} samples, first chunk after {first * 1000:.0f} ms")


async def streamed_text_to_speech(port):
    """As Home Assistant streams a reply: synthesize-start, chunks, the whole text, stop."""
    async with Client(port) as c:
        voice = SynthesizeVoice(name="us-male")
        await c.send(SynthesizeStart(voice=voice))
        pieces = ["The weather ", "is sunny. It will ", "stay warm", " all day."]
        for p in pieces:
            await c.send(SynthesizeChunk(text=p))
        await c.send(Synthesize(text="".join(pieces), voice=voice))
        await c.send(SynthesizeStop())
        events = await c.until("synthesize-stopped")
        kinds = [e.type for e in events]
        check(kinds[0] == "audio-start" and kinds[-2] == "audio-stop", f"order {kinds}")
        check(kinds.count("audio-start") == 1 and kinds.count("audio-stop") == 1, f"{kinds}")
        n = sum(len(e.payload or b"") for e in events if e.type == "audio-chunk")
        check(n > 0, "no streamed speech")
    print(f"streamed synthesis: {n // 2} samples, then synthesize-stopped")


async def converse(port, text, conversation_id):
    """As Home Assistant's conversation agent: a transcript with the conversation id."""
    async with Client(port) as c:
        await c.send(Transcript(text=text, context={"conversation_id": conversation_id}, language="en"))
        events = []
        while True:
            event = await c.next()
            events.append(event)
            if Handled.is_type(event.type) or NotHandled.is_type(event.type):
                break
            check(event.type in ("handled-start", "handled-chunk", "handled-stop"), f"unexpected {event.type}")
        last = events[-1]
        if NotHandled.is_type(last.type):
            reason = NotHandled.from_event(last).text
            check(bool(reason), "not-handled without a reason")
            return None, reason
        h = Handled.from_event(last)
        check(h.context["conversation_id"] == conversation_id, f"context {h.context}")
        chunks = "".join(HandledChunk.from_event(e).text for e in events if e.type == "handled-chunk")
        kinds = [e.type for e in events]
        check(kinds[0] == "handled-start" and kinds[-2] == "handled-stop", f"order {kinds}")
        check(chunks.strip() == h.text, f"chunks {chunks!r} != handled {h.text!r}")
        return h.text, None


async def conversation(port):
    cid = "01HTEST-CONVERSATION"
    for turn, question in enumerate(["What time is it?", "And what day is it?"], 1):
        answer, reason = await converse(port, question, cid)
        check(answer is not None, f"turn {turn}: not handled: {reason}")
        print(f"conversation turn {turn}: handled {answer[:40]!r}")


async def raw_exchange(port, data, want_error):
    """Sends raw bytes; the next event must be an error with code `want_error`."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(data)
    await writer.drain()
    from wyoming.event import async_read_event

    event = await asyncio.wait_for(async_read_event(reader), TIMEOUT)
    check(event is not None and event.type == "error", f"expected an error, got {event}")
    err = Error.from_event(event)
    check(err.code == want_error, f"expected {want_error}, got {err.code}: {err.text}")
    return reader, writer, err


async def bad_input(port, path):
    # Garbage, then a good request on the same connection: it goes on.
    reader, writer, err = await raw_exchange(port, b"this is not json\n", "invalid_header")
    writer.write(b'{"type": "describe"}\n')
    await writer.drain()
    from wyoming.event import async_read_event

    event = await asyncio.wait_for(async_read_event(reader), TIMEOUT)
    check(event.type == "info", f"after garbage: {event.type}")
    writer.close()
    print(f"garbage: error ({err.text[:50]}), then describe answered")
    # An unknown event type.
    _, w, err = await raw_exchange(port, b'{"type": "dance", "version": "1.10.2"}\n', "unknown_event")
    w.close()
    # Oversize data and payload, announced in the header.
    _, w1, err = await raw_exchange(port, b'{"type": "audio-chunk", "payload_length": 100000000}\n', "payload_too_large")
    _, w2, err2 = await raw_exchange(port, b'{"type": "synthesize", "data_length": 50000000}\n', "data_too_large")
    # A header line that never ends.
    _, w3, err3 = await raw_exchange(port, b"{" + b"x" * (70 << 10), "header_too_long")
    # Half an event, left hanging.
    r4, w4 = await asyncio.open_connection(HOST, port)
    w4.write(b'{"type": "audio-chunk", "data_length": 10}\n{"ra')
    await w4.drain()
    # Audio it cannot read.
    async with Client(port) as c:
        await c.send(Transcribe(language="en"))
        await c.send(AudioStart(rate=16000, width=7, channels=1))
        e = await c.next()
        check(e.type == "error" and Error.from_event(e).code == "unsupported_audio", f"{e}")
        await c.send(AudioStop())
        events = await c.until("transcript")
        check(Transcript.from_event(events[-1]).text == "", "a transcript of unreadable audio")
    print("oversize, unknown, endless and unreadable input: errors")
    # Meanwhile the other clients are served.
    await describe(port)
    text, _ = await transcribe(port, path)
    print(f"other clients still served (transcript {text[:20]!r})")
    for w in (w1, w2, w3, w4):
        w.close()


async def main():
    port = int(sys.argv[1])
    if sys.argv[2] == "--bench":
        path, runs = sys.argv[3], int(sys.argv[4])
        stt, tts = [], []
        await transcribe(port, path)  # warm up
        for _ in range(runs):
            stt.append((await transcribe(port, path))[1])
            tts.append((await synthesize(port, "The front door is locked and the lights are off."))[1])
        print(f"audio-stop to transcript: median {statistics.median(stt) * 1000:.0f} ms, runs {[round(x * 1000) for x in stt]}")
        print(f"synthesize to first audio-chunk: median {statistics.median(tts) * 1000:.0f} ms, runs {[round(x * 1000) for x in tts]}")
        return
    expected = json.loads(sys.argv[2])
    await describe(port)
    await speech_to_text(port, expected)
    await text_to_speech(port)
    await streamed_text_to_speech(port)
    await conversation(port)
    await bad_input(port, next(iter(expected)))
    print("all parts passed")


if __name__ == "__main__":
    asyncio.run(main())
