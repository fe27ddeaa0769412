"""The project's exception tree; one middleware (``proxy.web.middleware``) maps it to HTTP.

Every failure a caller can cause or meet is one of these, so the HTTP surface answers with a JSON
error ``{"error": {"code": ..., "message": ...}}`` and a fitting status, never a traceback::

    HlsRelayError                      500 internal_error
    ├── BadRequest                     400 bad_request
    │   ├── MalformedToken             400 malformed_token
    │   └── InvalidHeader              400 invalid_header
    ├── Unauthorized                   401 unauthorized
    ├── Forbidden                      403 forbidden
    │   ├── BadSignature               403 bad_signature
    │   └── ForbiddenDestination       403 forbidden_destination
    ├── NotFound                       404 not_found
    ├── TokenExpired                   410 token_expired
    ├── UpstreamError                  502 upstream_error
    │   ├── UpstreamStatus             the upstream's 404/410 as such, other statuses 502
    │   ├── UpstreamUnreachable        502 upstream_unreachable
    │   ├── PlaylistTooLarge           502 playlist_too_large
    │   └── UpstreamTimeout            504 upstream_timeout
    └── ServiceUnavailable             503 service_unavailable (with Retry-After)

Messages are shown to clients: they never carry an upstream URL, a header value, a token payload
or a credential.
"""

from __future__ import annotations


class HlsRelayError(Exception):
    """Base of every error the proxy raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def headers(self) -> dict[str, str]:
        """Extra response headers this error calls for."""
        return {}


class BadRequest(HlsRelayError):
    status = 400
    code = "bad_request"


class MalformedToken(BadRequest):
    code = "malformed_token"


class InvalidHeader(BadRequest):
    code = "invalid_header"


class Unauthorized(HlsRelayError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="hlsrelay"'}


class Forbidden(HlsRelayError):
    status = 403
    code = "forbidden"


class BadSignature(Forbidden):
    code = "bad_signature"


class ForbiddenDestination(Forbidden):
    code = "forbidden_destination"


class NotFound(HlsRelayError):
    status = 404
    code = "not_found"


class TokenExpired(HlsRelayError):
    status = 410
    code = "token_expired"


class UpstreamError(HlsRelayError):
    status = 502
    code = "upstream_error"


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status.

    404 and 410 are passed on as such (a live segment that is not there yet must stay a
    short-lived 404 for players and edge caches); every other status becomes 502.
    """

    code = "upstream_status"

    def __init__(self, upstream_status: int) -> None:
        passed_on = upstream_status in (404, 410)
        super().__init__(
            f"upstream answered {upstream_status}", status=upstream_status if passed_on else 502
        )
        self.upstream_status = upstream_status


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class PlaylistTooLarge(UpstreamError):
    code = "playlist_too_large"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(HlsRelayError):
    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}
