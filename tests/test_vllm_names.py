"""The vLLM names lylm relies on: all present in the installed vLLM, and a missing one
named clearly, with the version found and the range lylm supports."""

from __future__ import annotations

import logging

import pytest

from lylm import EngineSpec, UnsupportedVLLMError
from lylm.engines import _internals
from lylm.engines._internals import REQUIRED, SUPPORTED_TEXT, Name, check_vllm, installed_version, supported

pytest.importorskip("vllm")


def test_the_installed_vllm_has_every_name_lylm_needs() -> None:
    assert _internals.missing_names() == []
    assert supported(installed_version()), installed_version()


def test_the_supported_range() -> None:
    assert SUPPORTED_TEXT == "0.26 through 0.32"
    assert [supported(v) for v in ("0.26.0", "0.32.0", "0.32.1+cpu", "0.25.9", "0.33.0", "1.0", "dev")] == [
        True, True, True, False, False, False, False,
    ]


@pytest.mark.parametrize(
    ("missing", "described"),
    [
        (Name("vllm.v1.engine.utils", "launch_core_engines", "starts cores"), "vllm.v1.engine.utils.launch_core_engines"),
        (Name("vllm.engine.arg_utils", "AsyncEngineArgs._no_such_field", "x", "field"),
         "vllm.engine.arg_utils.AsyncEngineArgs._no_such_field (a field)"),
        (Name("vllm.v1.engine.async_llm", "AsyncLLM.__init__.no_such_keyword", "x", "keyword"),
         "vllm.v1.engine.async_llm.AsyncLLM.__init__.no_such_keyword (a keyword argument)"),
        (Name("vllm.no_such_module", "Thing", "x"), "vllm.no_such_module.Thing"),
    ],
)
def test_a_missing_name_is_named_with_the_version_and_the_range(
    monkeypatch: pytest.MonkeyPatch, missing: Name, described: str
) -> None:
    if missing.chain == "launch_core_engines":  # a real name, removed from the installed vLLM
        import vllm.v1.engine.utils

        monkeypatch.delattr(vllm.v1.engine.utils, "launch_core_engines")
    with pytest.raises(UnsupportedVLLMError) as caught:
        check_vllm((*REQUIRED[:2], missing))
    message = str(caught.value)
    assert f"vLLM {installed_version()} lacks what lylm needs of it: {described}" in message
    assert "lylm supports vLLM 0.26 through 0.32" in message


def test_an_engine_start_fails_on_a_missing_name_before_any_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.v1.engine.utils

    from lylm.engines._local import engine_args_of

    monkeypatch.setattr(_internals, "_checked", False)
    monkeypatch.delattr(vllm.v1.engine.utils, "EngineZmqAddresses")
    with pytest.raises(UnsupportedVLLMError, match=r"vllm\.v1\.engine\.utils\.EngineZmqAddresses\.inputs"):
        engine_args_of(EngineSpec(model="m", engine_args={"model": "/m"}))


def test_a_version_outside_the_range_with_every_name_only_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_internals, "_checked", False)
    monkeypatch.setattr(_internals, "installed_version", lambda: "0.33.0")
    with caplog.at_level(logging.WARNING, logger="lylm"):
        check_vllm()
    assert "vLLM 0.33.0 is outside the versions lylm has run with (0.26 through 0.32)" in caplog.text


def test_an_engine_ends_its_output_task_before_vllm_closes_the_core_client() -> None:
    """vLLM's ``AsyncLLM.shutdown()`` closes the client's sockets before it cancels the
    output task; the task, still reading, could log the closed socket as an
    ``EngineDeadError`` traceback on a clean exit. lylm ends the task first."""
    import asyncio

    from lylm import VLLMEngine

    class Link:
        async def close(self) -> None:
            return None

        async def release(self) -> None:
            return None

    class FrontEnd:
        output_handler: asyncio.Task[None]
        handler_done_at_shutdown: bool | None = None

        def shutdown(self) -> None:  # in a worker thread, as lylm calls it
            self.handler_done_at_shutdown = self.output_handler.done()

    async def main() -> FrontEnd:
        front = FrontEnd()
        front.output_handler = asyncio.create_task(asyncio.Event().wait())
        engine = VLLMEngine(EngineSpec(model="m", engine_args={"model": "/m"}), link=Link())  # type: ignore[arg-type]
        engine._llm = front
        await engine.shutdown()
        assert front.output_handler.cancelled()
        return front

    assert asyncio.run(main()).handler_done_at_shutdown is True


def test_the_argument_names_read_from_source_are_async_engine_args_fields() -> None:
    """Read without importing vLLM (for mistakes named at once), they must be exactly the
    fields vLLM's class has: a name missing here would refuse a right argument."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    assert _internals.argument_names_from_source() == {f.name for f in dataclasses.fields(AsyncEngineArgs)}
