"""Where the state lives (`state:` in the Tiered config) and how its URL is checked.

Only two drivers are supported, both async: aiosqlite (the embedded default, a file
under the state directory) and psycopg 3 (PostgreSQL on clusters). Every message here
is built from the parsed URL with the password hidden, never from the raw input.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

STATE_DIR_ENV = "TIERED_STATE_DIR"
STATE_URL_ENV = "TIERED_STATE_URL"
HINT = "use sqlite+aiosqlite:///path or postgresql+psycopg://user:***@host/db"
# Accepted driver names -> the async driver Tiered runs them on.
DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


def state_dir() -> Path:
    """$TIERED_STATE_DIR, else ~/.local/state/tiered (XDG's state home for this user)."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".local" / "state" / "tiered"


def default_state_url() -> str:
    return f"sqlite+aiosqlite:///{state_dir() / 'tiered.db'}"


def parse_url(raw: str) -> URL:
    """The URL on its async driver; ValueError (without the input) when it is not one."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError, TypeError):
        raise ValueError(f"state.url is not a database URL; {HINT}") from None
    driver = DRIVERS.get(url.drivername)
    if driver is None:
        raise ValueError(f"unsupported database driver {url.drivername!r}; {HINT}")
    url = url.set(drivername=driver)
    if driver == "postgresql+psycopg" and not url.database:
        raise ValueError(f"state.url names no database; {HINT}")
    return url


def normalise_url(raw: str) -> str:
    return parse_url(raw).render_as_string(hide_password=False)


def redact(url: str | URL) -> str:
    """The URL with its password replaced by ***, for logs and messages."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return "<not a database URL>"
    return parsed.render_as_string(hide_password=True)


class StateSpec(BaseModel):
    """`state:` in the Tiered config. `hide_input_in_errors`: a rejected URL may carry a
    password, and pydantic would otherwise print the input in its error."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    url: str = Field(default_factory=default_state_url)
    migrate: bool = True  # apply pending migrations at start; False: refuse to start
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return normalise_url(value)


def resolve_state_spec(spec: StateSpec | None) -> StateSpec:
    """The spec to run with: $TIERED_STATE_URL, when set, overrides `spec.url`."""
    spec = spec or StateSpec()
    env = os.environ.get(STATE_URL_ENV)
    if not env:
        return spec
    try:
        url = normalise_url(env)
    except ValueError as exc:
        raise ValueError(f"{STATE_URL_ENV}: {exc}") from None
    return spec.model_copy(update={"url": url})
