"""Bearer-token authentication with two roles. Tokens are compared in constant time and never
logged. Health checks and reflection need no token."""

import hmac

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
WRITER_METHODS = {"SubmitUpdate", "CancelJob", "Rollback", "Republish", "DeleteKnowledgeBase"}


def role_of(tokens: dict[str, str], presented: str) -> str | None:
    role = None
    for token, token_role in tokens.items():  # no early exit: timing says nothing
        if hmac.compare_digest(token.encode(), presented.encode()):
            role = token_role
    return role


def _deny(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` (unary or streaming) that refuses the call."""

    def refuse(request, context):
        context.abort(code, message)

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        refuse, handler.request_deserializer, handler.response_serializer
    )


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens

    def intercept_service(self, continuation, details):
        method = details.method
        if not self.tokens or method.startswith(OPEN_SERVICES):
            return continuation(details)
        header = dict(details.invocation_metadata).get("authorization", "")
        scheme, _, presented = header.partition(" ")
        role = role_of(self.tokens, presented) if scheme.lower() == "bearer" else None
        handler = continuation(details)
        if handler is None:
            return None
        if role is None:
            return _deny(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown bearer token (metadata 'authorization: Bearer ...')",
            )
        if method.rsplit("/", 1)[-1] in WRITER_METHODS and role != "writer":
            return _deny(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"a read-only token cannot call {method.rsplit('/', 1)[-1]}",
            )
        return handler
