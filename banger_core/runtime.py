"""Everything a process of banger (CLI or daemon) knows at start: paths, config, plugins."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from banger_core.config import Config, ProjectConfig
from banger_core.errors import BangerError
from banger_core.paths import Paths
from banger_core.plugins import PluginHost


@dataclass
class Runtime:
    paths: Paths
    config: Config
    host: PluginHost
    # A problem with the plugin set as a whole (cycle, missing requirement): reported
    # by `plugins list` and `doctor`, raised by anything that runs lifecycle stages.
    order_error: BangerError | None = None
    order: list[str] | None = None

    @classmethod
    def load(cls, paths: Paths | None = None, strict: bool | None = None) -> "Runtime":
        paths = paths or Paths.from_env()
        config = Config.load(paths.config_file)
        from importlib.metadata import entry_points

        names = sorted({ep.name for ep in entry_points(group="banger.plugins")})
        host = PluginHost()
        host.load_builtins(disabled=config.core.plugins.disable)
        host.load_entry_points(disabled=config.globally_disabled(names), strict=strict)
        host.finish_loading()
        config.check_claims(host)  # a top-level array no plugin claims: refused, as a core key would be
        rt = cls(paths=paths, config=config, host=host)
        rt.resolve()
        return rt

    def resolve(self) -> None:
        """(Re)compute the plugin order, e.g. after a plugin broke while registering."""
        try:
            self.order, self.order_error = self.host.order(), None
        except BangerError as exc:
            self.order, self.order_error = None, exc

    def require_order(self) -> list[str]:
        if self.order_error is not None:
            raise self.order_error
        assert self.order is not None
        return self.order

    def plugins_for(self, project_dir: Path | None) -> tuple[list[str], ProjectConfig | None]:
        """Ordered plugins acting on VMs made from ``project_dir``, and its banger.toml."""
        self.require_order()
        project = ProjectConfig.load(project_dir) if project_dir else None
        return self.config.enabled_for(self.host, project), project
