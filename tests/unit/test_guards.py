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


def test_media_types_reach_routing_in_lower_case_with_their_parameters_as_sent():
    """Connexion picks a body's validator by the header's exact text: ``Application/JSON``
    went unvalidated to the handler (a 500) before the guard lowered it."""
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["headers"])

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    def call(content_type: bytes) -> list:
        headers = [(b"content-length", b"2"), (b"content-type", content_type), (b"x-other", b"A")]
        scope = {"type": "http", "path": "/v1/embedding", "headers": headers}
        asyncio.run(BodyLimit(app, max_bytes=1000)(scope, receive, None))
        return seen[-1]

    assert (b"content-type", b"application/json; charset=UTF-8") in call(
        b"Application/JSON; charset=UTF-8"
    )
    assert (b"x-other", b"A") in seen[-1]
    assert (b"content-type", b"application/json") in call(b"application/json")
