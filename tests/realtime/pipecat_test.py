"""Drives `lfm2d serve --listen` with pipecat-ai's OpenAI Realtime LLM service in a pipeline.

Run by tests/realtime_openai.rs against the tiny-c fixture model (random weights: the words are
noise, the pipeline is real), with LFM2D_FORCE_REPLY set so that the first reply of a session
with tools calls get_weather(city="Paris").

Two pipelines: a text turn answered with speech, and a tool call that pipecat runs (the function
registered here) and answers, after which lfm2d replies again.

Usage: pipecat_test.py PORT
"""

import asyncio
import sys

from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMRunFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService

TIMEOUT = 60.0


def check(cond, message):
    if not cond:
        raise AssertionError(message)


class Collector(FrameProcessor):
    """Counts what flows downstream of the LLM; tells when a reply has ended."""

    def __init__(self):
        super().__init__()
        self.audio_bytes = 0
        self.text = []
        self.starts = 0
        self.ends = 0
        self.errors = []
        self.ended = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio_bytes += len(frame.audio)
        elif isinstance(frame, TTSTextFrame):
            self.text.append(frame.text)
        elif isinstance(frame, LLMFullResponseStartFrame):
            self.starts += 1
        elif isinstance(frame, LLMFullResponseEndFrame):
            self.ends += 1
            self.ended.set()
        elif isinstance(frame, ErrorFrame):
            self.errors.append(frame.error)
            self.ended.set()
        await self.push_frame(frame, direction)

    async def wait_replies(self, n):
        async def wait():
            while self.ends < n and not self.errors:
                self.ended.clear()
                await self.ended.wait()

        await asyncio.wait_for(wait(), TIMEOUT)
        check(not self.errors, f"pipecat reported errors: {self.errors}")


def service(port, tools):
    session = events.SessionProperties(
        instructions="Answer briefly.",
        audio=events.AudioConfiguration(
            input=events.AudioInput(turn_detection=False),
        ),
        max_output_tokens=30,
        tools=tools,
    )
    return OpenAIRealtimeLLMService(
        api_key="any-key",
        base_url=f"ws://127.0.0.1:{port}/v1/realtime",
        settings=OpenAIRealtimeLLMService.Settings(session_properties=session),
    )


async def run(llm, context, collector, replies):
    pair = LLMContextAggregatorPair(context)
    pipeline = Pipeline([pair.user(), llm, collector, pair.assistant()])
    task = PipelineTask(pipeline, params=PipelineParams(), idle_timeout_secs=None)
    runner = PipelineRunner(handle_sigint=False)
    running = asyncio.create_task(runner.run(task))
    try:
        await task.queue_frames([LLMRunFrame()])
        await collector.wait_replies(replies)
    finally:
        await task.cancel()
        await running


async def text_turn(port):
    llm = service(port, None)
    context = LLMContext(messages=[{"role": "user", "content": "Say hello."}])
    collector = Collector()
    await run(llm, context, collector, 1)
    check(collector.starts >= 1, "pipecat saw the reply begin (conversation.item.added)")
    check(collector.audio_bytes > 0, "pipecat received the reply's speech")
    print(f"pipecat text turn: {collector.audio_bytes / 48000:.2f} s of speech, text {''.join(collector.text)[:40]!r}")


async def tool_call(port):
    weather = FunctionSchema(
        name="get_weather",
        description="The weather in a city",
        properties={"city": {"type": "string"}},
        required=["city"],
    )
    llm = service(port, ToolsSchema(standard_tools=[weather]))
    calls = []

    async def get_weather(params):
        calls.append(dict(params.arguments))
        await params.result_callback({"sky": "clear", "celsius": 21})

    llm.register_function("get_weather", get_weather)
    context = LLMContext(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=ToolsSchema(standard_tools=[weather]),
    )
    collector = Collector()
    await run(llm, context, collector, 2)
    check(calls == [{"city": "Paris"}], f"pipecat ran get_weather once with the model's arguments: {calls}")
    results = [m for m in context.get_messages() if m.get("role") == "tool"]
    check(len(results) == 1 and "clear" in str(results[0].get("content")), f"the result in pipecat's context: {context.get_messages()}")
    check(collector.ends >= 2, "a reply after the tool's result")
    print(f"pipecat tool call: get_weather({calls[0]}) ran; {collector.ends} replies")


async def main():
    port = int(sys.argv[1])
    await text_turn(port)
    await tool_call(port)
    print("pipecat test: all parts passed")


if __name__ == "__main__":
    asyncio.run(main())
