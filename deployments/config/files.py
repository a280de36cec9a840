"""Reading a YAML (or JSON) file a user wrote: every failure is one ConfigError line that
names the file, and for a syntax error the line and column, never a traceback."""

from __future__ import annotations

from pathlib import Path

import yaml

from deployments.config.models import ConfigError


def yaml_problem(source: str, exc: yaml.YAMLError) -> str:
    """`source:LINE:COLUMN: problem` (1-based, where the parser stopped)."""
    mark = getattr(exc, "problem_mark", None)
    at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or "not valid YAML"
    return f"{source}{at}: not valid YAML/JSON ({problem})"


def read_yaml(path: str | Path, source: str | None = None) -> object:
    """The parsed document; ConfigError naming `source` (the path by default) on a missing
    or unreadable file and on bad YAML."""
    source = source or str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a text file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_problem(source, exc)) from None
