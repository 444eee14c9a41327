"""Drives `lfm2d serve --listen` with LiveKit Agents' OpenAI Realtime model (no LiveKit room).

Run by tests/realtime_openai.rs against the tiny-c fixture model, with LFM2D_FORCE_REPLY set so
that the first reply of a session with tools calls get_weather(city="Paris"). The plugin's
RealtimeSession is used directly, as an AgentSession would use it: a reply to a chat context,
then a tool call, its output sent back in the chat context, and the reply after it.

Usage: livekit_test.py PORT
"""

import asyncio
import sys

import aiohttp
from livekit.agents import llm
from livekit.plugins import openai

TIMEOUT = 60.0


def check(cond, message):
    if not cond:
        raise AssertionError(message)


async def collect(generation):
    """The text, audio samples and function calls of one generation."""
    text, samples, calls = [], 0, []

    async def messages():
        nonlocal samples
        async for msg in generation.message_stream:

            async def read_text(m=msg):
                async for piece in m.text_stream:
                    text.append(str(piece))

            async def read_audio(m=msg):
                nonlocal samples
                async for frame in m.audio_stream:
                    samples += frame.samples_per_channel

            await asyncio.gather(read_text(), read_audio())

    async def functions():
        async for call in generation.function_stream:
            calls.append(call)

    await asyncio.wait_for(asyncio.gather(messages(), functions()), TIMEOUT)
    return "".join(text), samples, calls


@llm.function_tool
async def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: The city.
    """
    return "clear"


async def main():
    port = int(sys.argv[1])
    async with aiohttp.ClientSession() as http:
        model = openai.realtime.RealtimeModel(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="any-key",
            http_session=http,
            turn_detection=None,
        )
        model.update_options(max_response_output_tokens=40)
        # A spoken reply to a chat context.
        session = model.session()
        ctx = llm.ChatContext()
        ctx.add_message(role="user", content="Say hello.")
        await session.update_chat_ctx(ctx)
        gen = await asyncio.wait_for(session.generate_reply(), TIMEOUT)
        text, samples, calls = await collect(gen)
        check(samples > 0, "LiveKit received the reply's speech")
        check(not calls, f"no tool call without tools: {calls}")
        print(f"livekit turn: {samples / 24000:.2f} s of speech, text {text[:40]!r}")
        await session.aclose()

        # A tool call, its output sent back, and the reply after it.
        session = model.session()
        await session.update_tools([get_weather])
        ctx = llm.ChatContext()
        ctx.add_message(role="user", content="Weather in Paris?")
        await session.update_chat_ctx(ctx)
        gen = await asyncio.wait_for(session.generate_reply(), TIMEOUT)
        _, _, calls = await collect(gen)
        check(len(calls) == 1 and calls[0].name == "get_weather", f"one get_weather call: {calls}")
        check('"Paris"' in calls[0].arguments, calls[0].arguments)
        ctx = session.chat_ctx.copy()
        ctx.items.append(
            llm.FunctionCallOutput(call_id=calls[0].call_id, name="get_weather", output='{"sky": "clear"}', is_error=False)
        )
        await session.update_chat_ctx(ctx)
        gen = await asyncio.wait_for(session.generate_reply(), TIMEOUT)
        text, samples, calls2 = await collect(gen)
        check(not calls2 and samples > 0, "a spoken reply after the tool output")
        print(f"livekit tool call: get_weather({calls[0].arguments}) -> output -> {samples / 24000:.2f} s of speech")
        await session.aclose()
        await model.aclose()
    print("livekit test: all parts passed")


if __name__ == "__main__":
    asyncio.run(main())
