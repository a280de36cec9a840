"""The API key a request presents, read from its Authorization header."""

from __future__ import annotations

# What HTTP allows around a header value (RFC 9110 §5.5: optional whitespace is SP and
# HTAB); str.strip() would also drop Unicode spaces such as U+00A0, and then a key with a
# no-break space after it would authenticate.
_OWS = " \t"


def bearer_token(authorization: str) -> str | None:
    """The token of a `Bearer <token>` header value, exactly as sent apart from SP/HTAB
    around it; None when the scheme is not Bearer or no token follows."""
    scheme, _, token = authorization.strip(_OWS).partition(" ")
    token = token.strip(_OWS)
    return token if scheme.lower() == "bearer" and token else None
