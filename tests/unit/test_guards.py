"""The body-limit guard on its own: a chunked body the client abandons is dropped quietly."""

import asyncio

from kiapi.http.guards import BodyLimit


def test_a_client_leaving_mid_chunked_body_reaches_nothing_and_raises_nothing():
    called = []

    async def app(scope, receive, send):
        called.append(scope)

    messages = iter(
        [{"type": "http.request", "body": b'{"te', "more_body": True}, {"type": "http.disconnect"}]
    )

    async def receive():
        return next(messages)

    async def send(message):
        raise AssertionError(f"nothing to send to a departed client: {message}")

    scope = {
        "type": "http",
        "path": "/v1/embedding",
        "headers": [(b"transfer-encoding", b"chunked"), (b"content-type", b"application/json")],
    }
    asyncio.run(BodyLimit(app, max_bytes=1000)(scope, receive, send))
    assert called == []
