"""Alembic's entry point. The store runs it on its own connection (passed in
`config.attributes["connection"]`); the `alembic` command line, which has none, gets an
async engine on the configured URL, else on the one Tiered would use ($TIERED_STATE_URL
or the default file). From a checkout: an ini with `script_location =
deployments.state:migrations` and `alembic -c that.ini upgrade head`."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from deployments.state.config import StateSpec, resolve_state_spec
from deployments.state.schema import Base
from deployments.state.store import make_engine

config = context.config
target_metadata = Base.metadata


def do_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER much
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_on_new_engine(url: str) -> None:
    engine = make_engine(StateSpec(url=url))  # the store's engine: async driver, WAL, ...
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("the state store has no offline (SQL script) migrations")
    connection = config.attributes.get("connection")
    if connection is not None:
        do_migrations(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or resolve_state_spec(None).url
    asyncio.run(_run_on_new_engine(url))


main()
