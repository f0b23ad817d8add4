"""What every section of the run config shares: the pydantic base that forbids unknown keys, and
the error a config that cannot be used raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the offending key."""


class Section(BaseModel):
    """A config section: an unknown key is an error (a typo never becomes a silently ignored
    setting), and an assignment is validated like a loaded value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
