"""The ``[agent]`` table (its own module: the CLI's fast path imports the plugin without
pydantic when a command needs no settings)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wait_timeout_s: float = Field(default=180.0, gt=0, le=3600, description="how long vm create/start waits for the agent")
