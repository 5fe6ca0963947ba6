"""Our RFC 6455 client: the frame reader without sockets, then the client against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from bridge.wsclient import (
    CloseInfo,
    HandshakeFailed,
    HandshakeRefused,
    InlineWebSocket,
    build_upgrade_request,
    check_handshake_response,
    connect_inline,
    proxy_for,
)
from bridge.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    Control,
    FrameError,
    FrameReader,
    MaskKeys,
    Message,
    apply_mask,
    close_payload,
    frame_masked,
    frame_text,
)

from .test_call_e2e import wait_for

# ------------------------------------------------------------------ frames, no sockets


def server_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def test_reader_parses_every_length_form_split_at_every_byte() -> None:
    messages = [b"", b"a" * 125, b"b" * 126, b"c" * 65535, b"d" * 65536]
    wire = b"".join(frame_text(m) for m in messages)
    for step in (1, 7, 4096, len(wire)):
        reader = FrameReader(max_message_bytes=1 << 20)
        got: list[bytes] = []
        for pos in range(0, len(wire), step):
            got += [e.payload for e in reader.feed(wire[pos:pos + step]) if isinstance(e, Message)]
        assert got == messages, step
        assert reader.buffered == 0


def test_reader_reassembles_fragments_and_passes_control_frames_between_them() -> None:
    reader = FrameReader(max_message_bytes=100)
    wire = (server_frame(OP_TEXT, b"hel", fin=False) + server_frame(OP_PING, b"p")
            + server_frame(0x0, b"lo ", fin=False) + server_frame(0x0, b"world") + server_frame(OP_BINARY, b"\x00"))
    events = reader.feed(wire)
    assert events == [Control(OP_PING, b"p"), Message(OP_TEXT, b"hello world"), Message(OP_BINARY, b"\x00")]


def test_reader_parses_close_code_and_reason() -> None:
    (close,) = FrameReader(10).feed(server_frame(OP_CLOSE, close_payload(4000, "idle timeout")))
    assert isinstance(close, Control) and (close.code, close.reason) == (4000, "idle timeout")
    (empty,) = FrameReader(10).feed(server_frame(OP_CLOSE, b""))
    assert isinstance(empty, Control) and empty.code == 1005


@pytest.mark.parametrize(("wire", "code", "detail"), [
    (bytes((0x81, 0x81)) + b"mask" + b"x", 1002, "masked"),
    (server_frame(OP_TEXT, b"x", rsv=0x40), 1002, "reserved"),
    (server_frame(0x3, b"x"), 1002, "unknown opcode"),
    (server_frame(OP_PING, b"x" * 126), 1002, "control frame"),
    (server_frame(OP_PING, b"x", fin=False), 1002, "control frame"),
    (server_frame(0x0, b"x"), 1002, "continuation"),
    (server_frame(OP_TEXT, b"a", fin=False) + server_frame(OP_TEXT, b"b"), 1002, "inside a fragmented"),
    (server_frame(OP_TEXT, b"x" * 101), 1009, "over 100"),
    (server_frame(OP_TEXT, b"x" * 60, fin=False) + server_frame(0x0, b"x" * 41), 1009, "over 100"),
    (struct.pack("!BBQ", 0x81, 127, 1 << 40), 1009, "over 100"),  # refused from the header alone
    (server_frame(OP_CLOSE, b"\x03"), 1002, "1-byte"),
    (server_frame(OP_CLOSE, struct.pack("!H", 1005)), 1002, "not allowed"),
    (server_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1002, "UTF-8"),
])
def test_reader_refuses_what_a_server_must_not_send(wire: bytes, code: int, detail: str) -> None:
    with pytest.raises(FrameError, match=detail) as info:
        FrameReader(max_message_bytes=100).feed(wire)
    assert info.value.code == code


def test_large_frame_in_many_reads_is_joined_once_whole() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    wire = frame_text(payload)
    reader = FrameReader(max_message_bytes=2 << 20)
    pieces = [wire[i:i + 1000] for i in range(0, len(wire), 1000)]
    for piece in pieces[:-1]:
        assert reader.feed(piece) == []
    assert reader.buffered == len(wire) - len(pieces[-1])
    assert reader.feed(pieces[-1]) == [Message(OP_TEXT, payload)]
    assert reader.buffered == 0


def test_masked_frames_unmask_to_the_payload_and_keys_differ() -> None:
    keys = MaskKeys(block_bytes=8)
    drawn = [keys.next() for _ in range(6)]  # crosses two block refills
    assert all(len(k) == 4 for k in drawn) and len(set(drawn)) > 1
    for payload in (b"", b"hi", b"x" * 200, b"y" * 70000):
        mask = keys.next()
        wire = frame_masked(OP_TEXT, payload, mask)
        assert wire[0] == 0x81 and wire[1] & 0x80
        header = 2 + (2 if 126 <= len(payload) < 65536 else 8 if len(payload) >= 65536 else 0)
        assert wire[header:header + 4] == mask
        assert apply_mask(wire[header + 4:], mask) == payload


def test_handshake_response_checks() -> None:
    key = base64.b64encode(b"0123456789abcdef").decode()
    accept = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
    good = f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}"
    check_handshake_response(good.encode(), key)
    with pytest.raises(HandshakeRefused) as refused:
        check_handshake_response(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0", key)
    assert refused.value.status_code == 401
    for bad, why in [(good.replace(accept, "AAAA"), "Accept"), (good.replace("websocket", "h2c"), "Upgrade"),
                     (good + "\r\nSec-WebSocket-Extensions: permessage-deflate", "extension"),
                     ("SSH-2.0-OpenSSH", "not an HTTP"), (good + "\r\nno colon here", "malformed")]:
        with pytest.raises(HandshakeFailed, match=why):
            check_handshake_response(bad.encode(), key)
    with pytest.raises(ValueError, match="CR/LF"):
        build_upgrade_request("h", "/", key, {"Authorization": "Bearer x\r\nEvil: 1"})


def test_proxy_from_environment_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("wss://api.cartesia.ai/tts/websocket") is None
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    assert proxy_for("wss://api.cartesia.ai/tts/websocket") == "http://proxy.internal:3128"
    assert proxy_for("ws://127.0.0.1:9000/tts/websocket") is None  # ws:// goes by http_proxy
    monkeypatch.setenv("no_proxy", "api.cartesia.ai")
    assert proxy_for("wss://api.cartesia.ai/tts/websocket") is None


# ------------------------------------------------------------------ against real servers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_get("/ws", handler)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"ws://127.0.0.1:{runner.addresses[0][1]}/ws"

    yield start
    for runner in runners:
        await runner.cleanup()


async def connect(url: str, got: list[bytes], **options: float) -> InlineWebSocket:
    return await connect_inline(url, got.append, headers={"X-Test": "1"}, timeout_s=5,
                                max_message_bytes=options.pop("max_message_bytes", 1 << 20), **options)


async def test_echo_headers_and_a_close_with_reason(serve: Callable[[Handler], Awaitable[str]]) -> None:
    seen_headers: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen_headers.append(request.headers.get("X-Test", ""))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.data == "bye":
                await ws.close(code=4000, message=b"idle timeout")
                break
            await ws.send_str(f"echo {msg.data}")
            await ws.send_bytes(b"\x01\x02")
        return ws

    url = await serve(handler)
    got: list[bytes] = []
    sock = await connect(url, got)
    assert seen_headers == ["1"] and sock.is_open
    sock.send_text(("é" * 3000).encode())  # 16-bit length form, masked
    sock.send_text(b"short")
    assert await wait_for(lambda: len(got) == 4)
    assert got == [f"echo {'é' * 3000}".encode(), b"\x01\x02", b"echo short", b"\x01\x02"]
    sock.send_text(b"bye")
    info = await asyncio.wait_for(sock.closed, 5)
    assert info == CloseInfo(True, 4000, "idle timeout", "")
    assert not sock.is_open
    with pytest.raises(ConnectionResetError):
        sock.send_text(b"after close")


async def test_server_pings_are_answered_so_a_heartbeat_server_keeps_us(
        serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=0.1)  # closes the socket when a ping goes unanswered
        await ws.prepare(request)
        async for _msg in ws:
            pass
        return ws

    url = await serve(handler)
    sock = await connect(url, [])
    await asyncio.sleep(0.6)
    assert sock.is_open and not sock.closed.done()
    info = await sock.close()
    assert info.received and info.code == 1000


async def test_refused_handshake_raises_with_the_status(serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=401, text="no key")

    url = await serve(handler)
    with pytest.raises(HandshakeRefused) as info:
        await connect(url, [])
    assert info.value.status_code == 401


async def test_oversized_message_closes_with_1009_and_a_handler_error_loses_nothing_else(
        serve: Callable[[Handler], Awaitable[str]]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("boom")  # our handler raises on this one
        await ws.send_str("fine")
        await ws.send_str("x" * 2000)
        async for _msg in ws:
            pass
        close_codes.append(ws.close_code)
        return ws

    close_codes: list[int | None] = []
    url = await serve(handler)
    got: list[bytes] = []

    def on_message(data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("handler bug")
        got.append(data)

    sock = await connect_inline(url, on_message, headers={}, timeout_s=5, max_message_bytes=1000)
    info = await asyncio.wait_for(sock.closed, 5)
    assert got == [b"fine"]
    assert info.error.startswith("message over 1000")
    assert await wait_for(lambda: bool(close_codes))
    assert close_codes == [1009]  # what we told the server


async def test_silent_peer_is_dropped_after_ping_timeout() -> None:
    """A server that completes the handshake and then never answers anything (a dead path)."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + frame_text(b"hello"))
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    got: list[bytes] = []
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sock = await connect(f"ws://127.0.0.1:{port}/ws", got, ping_interval_s=0.2, ping_timeout_s=0.2)
        info = await asyncio.wait_for(sock.closed, 5)
        assert got == [b"hello"]  # a frame in the same segment as the 101 is delivered
        assert info.error == "keepalive_timeout" and not info.received
        assert 0.35 <= loop.time() - started < 3
    finally:
        server.close()


async def test_a_pong_frame_counts_as_life(serve: Callable[[Handler], Awaitable[str]]) -> None:
    """Our keepalive ping is answered by aiohttp's autoping: the connection outlives many intervals."""
    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _msg in ws:
            pass
        return ws

    url = await serve(handler)
    sock = await connect(url, [], ping_interval_s=0.05, ping_timeout_s=0.1)
    await asyncio.sleep(0.6)
    assert sock.is_open
    await sock.close()
