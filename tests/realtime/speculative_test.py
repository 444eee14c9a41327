"""One server-VAD turn with the official `openai` client; prints what the client saw as JSON.

Run by tests/realtime_openai.rs twice, against a server that starts replies on the user's
pauses and one that does not: the two outputs must be equal (the same events, ids, words and
speech). The question is streamed twice with a short pause between (shorter than the silence
that ends a turn), so that a reply started on that pause is dropped, then the silence ends the
turn.

Usage: speculative_test.py PORT QUESTION_WAV
"""

import asyncio
import base64
import hashlib
import json
import sys

from openai import AsyncOpenAI

from client_test import Events, check, pcm16_24k, silence


async def one_turn(client, question):
    async with client.realtime.connect(model="lfm2-audio") as conn:
        ev = Events(conn, "speculative")
        check((await ev.next()).type == "session.created", "session.created")
        await conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["audio"],
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "turn_detection": {
                            "type": "server_vad",
                            "threshold": 0.5,
                            "prefix_padding_ms": 300,
                            "silence_duration_ms": 500,
                            "create_response": True,
                            "interrupt_response": True,
                        },
                    },
                },
                "max_output_tokens": 40,
            }
        )
        await ev.until("session.updated")
        audio = silence(500) + question + silence(300) + question + silence(1500)
        step = 24 * 2 * 100  # 100 ms of pcm16
        for i in range(0, len(audio), step):
            await conn.input_audio_buffer.append(audio=base64.b64encode(audio[i : i + step]).decode())
        events = await ev.until("response.done")
        kinds = [e.type for e in events]
        check(kinds.count("response.created") == 1, f"one response: {kinds}")
        check("response.output_audio.delta" in kinds, f"the reply speaks: {kinds}")
        check(events[-1].response.status in ("completed", "incomplete"), f"status {events[-1].response.status}")
        speech = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
        words = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        # Every id the client was given, in order, as the rank of its first appearance (the
        # events carry them under these names; a turn undone unseen leaves a gap in the
        # server's numbering, not a change in which id goes where).
        ranks = {}
        ids = []
        for e in events:
            for name in ("item_id", "response_id", "previous_item_id"):
                value = getattr(e, name, None)
                if value is not None:
                    value = ranks.setdefault(value, len(ranks))
                ids.append(value)
        return {
            "events": kinds,
            "ids": ids,
            "transcript": words,
            "speech_bytes": len(speech),
            "speech_sha256": hashlib.sha256(speech).hexdigest(),
        }


async def main():
    port, wav = int(sys.argv[1]), sys.argv[2]
    client = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        websocket_base_url=f"ws://127.0.0.1:{port}/v1",
        api_key="any-key",
    )
    seen = await one_turn(client, pcm16_24k(wav))
    print("TURN " + json.dumps(seen, sort_keys=True))
    print("speculative turn test: all parts passed")


if __name__ == "__main__":
    asyncio.run(main())
