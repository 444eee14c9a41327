"""Three sessions of the official `openai` package's GA Realtime client at once, against
`lfm2d serve --listen` on the tiny-c fixture model (random weights: the words are noise, the
replies run to their `max_output_tokens`).

Sessions A and B ask for a spoken reply together (A's shorter than B's); once both are streaming,
C asks for one. The engine generates every reply asked for together, a step of each in turn: B
streams before A is done, and C, which waits for no reply to end, streams before A (the shorter)
is done. Only the order of events is checked.

Usage: concurrent_test.py PORT
"""

import asyncio
import sys
import time

from openai import AsyncOpenAI

TIMEOUT = 60.0


def check(cond, message):
    if not cond:
        raise AssertionError(message)


async def open_session(client, stack, label, max_tokens):
    conn = await stack.enter_async_context(client.realtime.connect(model="lfm2-audio"))
    await until(conn, label, "session.created")
    await conn.session.update(
        session={
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {"input": {"turn_detection": None}},
            "max_output_tokens": max_tokens,
        }
    )
    await until(conn, label, "session.updated")
    await conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"Hello, this is {label}."}]}
    )
    await until(conn, label, "conversation.item.done")
    return conn


async def until(conn, label, kind):
    while True:
        event = await asyncio.wait_for(conn.recv(), TIMEOUT)
        if event.type == "error":
            raise AssertionError(f"{label}: error while waiting for {kind}: {event.error}")
        if event.type == kind:
            return event


async def reply(conn, label, times, streaming):
    """Asks for a reply and notes when its first audio and its end arrive."""
    await conn.response.create()
    while True:
        event = await asyncio.wait_for(conn.recv(), TIMEOUT)
        if event.type == "error":
            raise AssertionError(f"{label}: {event.error}")
        if event.type == "response.output_audio.delta" and label + " first" not in times:
            times[label + " first"] = time.monotonic()
            streaming.set()
        if event.type == "response.done":
            times[label + " done"] = time.monotonic()
            check(event.response.status in ("completed", "incomplete"), f"{label}: {event.response.status}")
            return


async def main():
    port = int(sys.argv[1])
    client = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        websocket_base_url=f"ws://127.0.0.1:{port}/v1",
        api_key="any-key",
    )
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        a = await open_session(client, stack, "A", 150)
        b = await open_session(client, stack, "B", 450)
        c = await open_session(client, stack, "C", 20)
        times = {}
        a_on, b_on, c_on = asyncio.Event(), asyncio.Event(), asyncio.Event()
        ta = asyncio.create_task(reply(a, "A", times, a_on))
        tb = asyncio.create_task(reply(b, "B", times, b_on))
        await asyncio.wait_for(asyncio.gather(a_on.wait(), b_on.wait()), TIMEOUT)
        tc = asyncio.create_task(reply(c, "C", times, c_on))
        await asyncio.gather(ta, tb, tc)
    order = sorted(times, key=times.get)
    print("order:", ", ".join(order))
    check(times["B first"] < times["A done"], f"B streams beside A: {order}")
    check(times["C first"] < times["A done"], f"C waits for no reply to end: {order}")
    print("concurrent realtime test: all parts passed")


if __name__ == "__main__":
    asyncio.run(main())
