"""``[[file_sync]]`` entries: what they may say, checked at config load.

Each rule is a class of strings matched whole (``re.fullmatch``), not a list of bad
examples; when a value does not match, ``why_not`` only picks the words of the error.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

#: one path component: not "." or "..", no "/", no NUL or other control character
_PART = r"(?!\.\.?(?:/|\Z))[^/\x00-\x1f\x7f]+"
#: a host path as written: absolute, or under the user's home (``~/``)
HOST_RE = re.compile(rf"(?:/|~/){_PART}(?:/{_PART})*")
#: a guest path as written: below the guest user's home, ``~/...`` or ``/root/...``
GUEST_RE = re.compile(rf"(?:~|/root)/{_PART}(?:/{_PART})*")
#: a file's permission bits as an octal string: "600", "0600", "0755"
MODE_RE = re.compile(r"0?[0-7]{3}")

DEFAULT_MODE = "0600"
GUEST_HOME = "/root"


def why_not(value: str, guest: bool) -> str:
    """Why ``value`` is not a path an entry may name (it failed the class's match)."""
    home = "~/... or /root/..." if guest else "an absolute path or one under your home (~/...)"
    parts = value.split("/")
    if not value:
        return f"an empty path: expected {home}"
    if value.startswith("~") and not (value == "~" or value.startswith("~/")):
        return f"~user paths are not taken: expected {home}"
    if not value.startswith(("/", "~")):
        return f"a relative path: expected {home}"
    if ".." in parts:
        return "'..' components are not taken: name the path itself"
    if "." in parts:
        return "'.' components are not taken: name the path itself"
    if re.search(r"[\x00-\x1f\x7f]", value):
        return "control characters are not taken in a path"
    if guest and value in ("~", GUEST_HOME, "~/", GUEST_HOME + "/"):
        return "the home directory itself: name a path below it (~/NAME)"
    if not guest and value in ("/", "~", "~/"):
        return "the root or home directory itself: name a file or directory below it"
    if "" in parts[1:]:
        return "empty components ('//' or a trailing '/') are not taken"
    if guest:
        return "the guest path must lie under ~ (the guest's /root): ~/... or /root/..."
    return f"expected {home}"


def _fits(path: str) -> str:
    if len(path.encode()) >= 4096 or any(len(p.encode()) > 255 for p in path.split("/")):
        raise ValueError("path too long (4095 bytes at most, 255 per component)")
    return path


def _host(value: str) -> str:
    """A host path: ``~`` expanded against this user's $HOME; absolute after that."""
    if not HOST_RE.fullmatch(value):
        raise ValueError(why_not(value, guest=False))
    expanded = os.path.expanduser(value)
    if not os.path.isabs(expanded):  # $HOME itself is relative (or unset and unknown)
        raise ValueError(f"~ expands to {expanded!r}, not an absolute path: set $HOME")
    return _fits(expanded)


def _guest(value: str) -> str:
    """A guest path, ``~`` being the guest user's home (root's: /root)."""
    if not GUEST_RE.fullmatch(value):
        raise ValueError(why_not(value, guest=True))
    return _fits(GUEST_HOME + value[1:] if value.startswith("~") else value)


def _mode(value: str | None) -> str | None:
    if value is not None and not MODE_RE.fullmatch(value):
        raise ValueError('expected a file mode as an octal string: "0600", "600" or "0755" (permission bits only)')
    return value


class Entry(BaseModel):
    """One ``[[file_sync]]`` table: a host file or directory, copied to the guest."""

    model_config = ConfigDict(extra="forbid")

    host: Annotated[str, AfterValidator(_host)] = Field(
        description="a file or directory on this host: absolute, or ~/... (your $HOME); a directory is copied whole"
    )
    guest: Annotated[str, AfterValidator(_guest)] = Field(description="where it lands in the guest: ~/... or /root/...")
    mode: Annotated[str | None, AfterValidator(_mode)] = Field(
        default=None,
        description=f"a file's mode in the guest, an octal string (default \"{DEFAULT_MODE}\"); a directory's files keep theirs",
    )
    #: the real path of the project whose banger.toml named this entry (None: the user's)
    _project: str | None = PrivateAttr(default=None)

    @property
    def file_mode(self) -> int:
        return int(self.mode or DEFAULT_MODE, 8)

    @property
    def project(self) -> str | None:
        return self._project

    def describe(self) -> str:
        return f"{self.host} -> {self.guest}"


def inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_sync: list[Entry] = Field(
        default_factory=list,
        description="[[file_sync]] (a top-level array): host files and directories copied into the guest at every start",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict) and "entries" in data:
            raise ValueError(
                "[filesync] entries is gone: write each entry as a top-level [[file_sync]] table "
                '(host, guest, and mode: an octal string such as "0600"; copy/once no longer exist)'
            )
        return data

    @field_validator("file_sync", mode="wrap")
    @classmethod
    def _projects_stay_inside(cls, value: Any, handler: Any, info: ValidationInfo) -> list[Entry]:
        """A project's banger.toml comes with a repository someone cloned: its entries may
        only name host paths inside that project (symlinks followed), or it could copy
        ~/.ssh or ~/.aws into a VM that may have egress. The user's own may name any."""
        from banger_core.config import SettingsSource

        entries: list[Entry] = handler(value)
        source = SettingsSource.of(info)
        if source is None or source.project_dir is None:
            return entries
        project = os.path.realpath(source.project_dir)
        errors = []
        for i, e in enumerate(entries):
            if not source.from_project("file_sync", i):
                continue
            e._project = project
            real = os.path.realpath(e.host)
            if not inside(real, project):
                shown = e.host if real == e.host else f"{e.host} (which is {real})"
                errors.append(
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "outside_project",
                            "a project's banger.toml may only copy paths inside its project {project}: {shown} is outside it "
                            "(put this entry in your own config.toml if you mean it)",
                            {"project": project, "shown": shown},
                        ),
                        loc=(i, "host"),
                        input=e.host,
                    )
                )
        if errors:
            raise ValidationError.from_exception_data("Settings", errors)
        return entries
