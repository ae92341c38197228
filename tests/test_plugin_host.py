"""The plugin host: registration, validation, ordering, stage runner (in-process)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from banger_core import hookimpl, hookspecs
from banger_core.context import StageContext
from banger_core.errors import BangerError, ErrorCode, MultiError
from banger_core.vm.stages import Lifecycle
from banger_core.models import Machine
from banger_core.plugins import PluginHost, PluginRecord
from banger_core.testing import sample_vm


def plugin(name: str, requires=(), provides=(), calls=None, fail_in=(), **extra):
    """A plugin module that records every lifecycle call into ``calls``."""
    mod: Any = types.ModuleType(f"plug_{name}", f"{name} test plugin")
    mod.requires = requires if isinstance(requires, str) else list(requires)
    mod.provides = list(provides)

    def make(stage):
        def record():
            calls.append((stage, name))
            if stage in fail_in:
                raise RuntimeError(f"{name} broke in {stage}")

        impl: Callable[..., None]
        if stage == "configure_machine":

            def impl(ctx, machine):
                record()
                machine.boot_args.append(f"{name}=1")

        elif stage == "vm_resumed":

            def impl(ctx, resumed):
                record()
                calls.append(("resumed-from", resumed.snapshot))

        else:

            def impl(ctx):
                record()

        return hookimpl(impl, specname=stage)

    if calls is not None:
        for stage in hookspecs.LIFECYCLE_STAGES:
            setattr(mod, stage, make(stage))
    for k, v in extra.items():
        setattr(mod, k, v)
    return mod


def host_with(*mods: types.ModuleType) -> PluginHost:
    host = PluginHost()
    for m in mods:
        host.add(m, m.__name__.removeprefix("plug_"))
    host.finish_loading()
    return host


def test_order_follows_requires_and_provides():
    host = host_with(
        plugin("nat", requires=["net"]),
        plugin("network", provides=["net"]),
        plugin("workspace", requires=["agent", "workdisk"]),
        plugin("vsock", provides=["agent"]),
        plugin("workdisk"),
    )
    order = host.order()
    assert order.index("network") < order.index("nat")
    assert order.index("vsock") < order.index("workspace")
    assert order.index("workdisk") < order.index("workspace")
    assert sorted(order) == sorted(host.enabled)


def test_missing_requirement_is_one_error_naming_both():
    host = host_with(plugin("nat", requires=["network"]), plugin("dns", requires=["network"]))
    with pytest.raises(BangerError) as ei:
        host.order()
    assert ei.value.code is ErrorCode.PLUGIN
    assert "nat requires network, which is not installed" in ei.value.message
    assert "dns requires network, which is not installed" in ei.value.message


def test_cycle_is_one_error_naming_the_cycle():
    host = host_with(plugin("a", requires=["b"]), plugin("b", requires=["c"]), plugin("c", requires=["a"]), plugin("d"))
    with pytest.raises(BangerError) as ei:
        host.order()
    msg = ei.value.message
    assert msg.startswith("plugin dependency cycle: ")
    assert all(n in msg for n in "abc") and "d" not in msg.split(": ", 1)[1]


def test_unknown_hook_marks_plugin_broken_others_fine():
    bad = plugin("bad")

    @hookimpl
    def prepare_hots(ctx):  # misspelt on purpose
        pass

    bad.prepare_hots = prepare_hots
    host = host_with(bad, plugin("good"))
    assert host.records["bad"].status == "broken"
    assert "unknown hook(s): prepare_hots" in host.records["bad"].reason
    assert host.enabled == ["good"]


def test_wrong_hook_signature_marks_plugin_broken():
    bad = plugin("bad")

    @hookimpl
    def prepare_host(ctx, nonsense):
        pass

    bad.prepare_host = prepare_host
    host = host_with(bad)
    assert host.records["bad"].status == "broken"
    assert "nonsense" in host.records["bad"].reason


def test_bad_requires_declaration_is_broken():
    host = host_with(plugin("bad", requires="network"))  # a str, not a list
    assert host.records["bad"].status == "broken"
    assert "requires" in host.records["bad"].reason


def test_strict_mode_raises_for_broken_plugin():
    host = PluginHost()
    with pytest.raises(BangerError, match="plugin 'bad' is broken"):
        host.add(plugin("bad", requires="x"), "bad", strict=True)


def test_requirement_on_broken_plugin_says_so():
    host = host_with(plugin("network", requires="oops"), plugin("nat", requires=["network"]))
    with pytest.raises(BangerError, match=r"nat requires network, which is broken \(invalid plugin"):
        host.order()


def _runtime_for(host, tmp_path):
    from banger_core.config import Config
    from banger_core.paths import Paths
    from banger_core.runtime import Runtime

    paths = Paths(tmp_path / "c", tmp_path / "s", tmp_path / "k", tmp_path / "r")
    return Runtime(paths=paths, config=Config(path=paths.config_file), host=host, order=host.order())


def test_whole_lifecycle_order_across_plugins(tmp_path):
    calls: list[tuple[str, str]] = []
    host = host_with(
        plugin("nat", requires=["network"], calls=calls),
        plugin("network", calls=calls),
        plugin("dns", requires=["network"], calls=calls),
    )
    rt = _runtime_for(host, tmp_path)
    vm = sample_vm()
    lc = Lifecycle(rt, vm, op_id="op-abcdef")
    machine = Machine(kernel="k", vcpus=1, memory_mib=128)
    booted = []
    lc.start(machine, boot=lambda m: (booted.append(list(m.boot_args)), calls.append(("boot", "-")))[-1])
    lc.cleanup()
    fwd = ["network", "dns", "nat"]
    assert calls == (
        [("prepare_host", n) for n in fwd]
        + [("configure_machine", n) for n in fwd]
        + [("boot", "-")]
        + [("post_boot", n) for n in fwd]
        + [("cleanup", n) for n in reversed(fwd)]
    )
    assert booted == [["network=1", "dns=1", "nat=1"]]


def test_failed_setup_runs_every_cleanup_and_reports_all_cleanup_errors(tmp_path):
    calls: list[tuple[str, str]] = []
    host = host_with(
        plugin("a", calls=calls, fail_in=("cleanup",)),
        plugin("b", requires=["a"], calls=calls, fail_in=("prepare_host", "cleanup")),
        plugin("c", requires=["b"], calls=calls),
    )
    rt = _runtime_for(host, tmp_path)
    lc = Lifecycle(rt, sample_vm(), op_id="op-abcdef")
    with pytest.raises(BangerError) as ei:
        lc.start(Machine(kernel="k", vcpus=1, memory_mib=128), boot=lambda m: calls.append(("boot", "-")))
    assert "b: prepare_host failed: RuntimeError: b broke in prepare_host" in ei.value.message
    assert ei.value.details["plugin"] == "b"
    # c never prepared, no boot, but every cleanup ran (reverse), past a's and b's failures
    assert calls == [("prepare_host", "a"), ("prepare_host", "b"), ("cleanup", "c"), ("cleanup", "b"), ("cleanup", "a")]
    assert [f["part"] for f in ei.value.details["cleanup_failures"]] == ["b", "a"]


def test_cleanup_collects_all_errors(tmp_path):
    calls: list[tuple[str, str]] = []
    host = host_with(plugin("a", calls=calls, fail_in=("cleanup",)), plugin("b", calls=calls, fail_in=("cleanup",)))
    rt = _runtime_for(host, tmp_path)
    lc = Lifecycle(rt, sample_vm(), op_id="op-abcdef")
    with pytest.raises(MultiError) as ei:
        lc.cleanup()
    assert "cleanup failed for 2 part(s)" in ei.value.message
    assert "a: a broke in cleanup" in ei.value.message and "b: b broke in cleanup" in ei.value.message
    # idempotent: a second run behaves the same and still runs both
    with pytest.raises(MultiError):
        lc.cleanup()
    assert calls.count(("cleanup", "a")) == 2 and calls.count(("cleanup", "b")) == 2


def test_teardown_slices_are_per_plugin_and_persisted(tmp_path):
    persisted = []

    mod = plugin("net")

    @hookimpl
    def prepare_host(ctx: StageContext):
        ctx.teardown["tap"] = "tap-x"
        ctx.persist()

    mod.prepare_host = prepare_host
    host = host_with(mod)
    rt = _runtime_for(host, tmp_path)
    vm = sample_vm()
    lc = Lifecycle(rt, vm, op_id="op-abcdef", persist=lambda v: persisted.append(dict(v.teardown)))
    lc.start(Machine(kernel="k", vcpus=1, memory_mib=128), boot=lambda m: None)
    assert vm.teardown == {"net": {"tap": "tap-x"}}
    assert persisted[0] == {"net": {"tap": "tap-x"}}  # persisted by the plugin itself, first


def test_settings_validated_before_any_hook_runs(tmp_path):
    from banger_core.config import Config

    calls: list = []

    class S(BaseModel):
        n: int = 1

    mod = plugin("p", calls=calls, config_model=hookimpl(lambda: S, specname="config_model"))
    host = host_with(mod)
    rt = _runtime_for(host, tmp_path)
    rt.config = Config(path=tmp_path / "config.toml", tables={"p": {"n": "many"}})
    with pytest.raises(BangerError, match=r"config.toml: \[p\] n: Input should be a valid integer"):
        Lifecycle(rt, sample_vm(), op_id="op-abcdef")
    assert calls == []


def test_trace_logs_each_hook_call(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("BANGER_TRACE_PLUGINS", "1")
    calls: list = []
    host = host_with(plugin("a", calls=calls))
    caplog.set_level("INFO", logger="banger.plugins")
    host.prepare_host(["a"], lambda _n: None)
    assert any("hook a.prepare_host took" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "opts,fn_async,expect",
    [
        ({"hookwrapper": True}, False, "hook wrappers are not supported"),
        ({"wrapper": True}, False, "hook wrappers are not supported"),
        ({"tryfirst": True}, False, "declare `requires` instead"),
        ({}, True, "hooks must be plain functions, not async"),
    ],
)
def test_unsupported_hookimpl_styles_are_refused(opts, fn_async, expect):
    mod = plugin("odd")
    post_boot: Callable[..., Any]
    if fn_async:

        async def post_boot(ctx):
            pass

    else:

        def post_boot(ctx):
            yield

    mod.post_boot = hookimpl(post_boot, **opts)
    host = host_with(mod)
    assert host.records["odd"].status == "broken" and expect in host.records["odd"].reason


def test_plugin_error_details_kept_and_op_id_set(tmp_path):
    mod = plugin("p")

    @hookimpl
    def prepare_host(ctx):
        raise BangerError(ErrorCode.NOT_FOUND, "no bridge", details={"bridge": "br0"})

    mod.prepare_host = prepare_host
    rt = _runtime_for(host_with(mod), tmp_path)
    with pytest.raises(BangerError) as ei:
        Lifecycle(rt, sample_vm(), op_id="op-123456").start(Machine(kernel="k", vcpus=1, memory_mib=1), lambda m: None)
    e = ei.value
    assert e.code is ErrorCode.NOT_FOUND and e.message == "p: prepare_host: no bridge" and e.op_id == "op-123456"
    assert e.details == {"bridge": "br0", "plugin": "p", "stage": "prepare_host"}


def test_vm_options_need_defaults_and_a_failing_one_breaks_only_its_plugin():
    from pydantic import BaseModel as Model

    class NoDefault(Model):
        level: int

    class Fine(Model):
        level: int = 1

    def boom():
        raise RuntimeError("no options today")

    host = host_with(
        plugin("strict", vm_options=hookimpl(lambda: NoDefault, specname="vm_options")),
        plugin("boom", vm_options=hookimpl(boom, specname="vm_options")),
        plugin("fine", vm_options=hookimpl(lambda: Fine, specname="vm_options")),
    )
    assert list(host.option_models()) == ["fine"]
    assert host.records["strict"].status == "broken"
    assert host.records["strict"].reason == "vm_options field(s) without a default: level"
    assert host.records["boom"].reason == "vm_options failed: RuntimeError: no options today"


def test_port_endpoint_first_answer_in_order_wins_and_a_raising_plugin_is_passed_over(tmp_path):
    from banger_core.models import Listener

    asked: list[str] = []

    def answer(name, result):
        def vm_port_endpoint(ctx, listener):
            asked.append(name)
            if isinstance(result, Exception):
                raise result
            return result(listener) if callable(result) else result

        return hookimpl(vm_port_endpoint)

    host = host_with(
        plugin(
            "dns", requires=["network"], vm_port_endpoint=answer("dns", lambda lst: f"{lst.port}.vm" if lst.port < 9000 else None)
        ),
        plugin("network", vm_port_endpoint=answer("network", RuntimeError("boom"))),
        plugin("fwd", requires=["dns"], vm_port_endpoint=answer("fwd", lambda lst: f"127.0.0.1:{lst.port + 1}")),
    )
    lc = Lifecycle(_runtime_for(host, tmp_path), sample_vm(), op_id="op-abcdef")
    web = Listener(proto="tcp", address="::", port=8080, family=6, scheme="http")
    assert lc.port_endpoint(web) == ("8080.vm", "dns")
    assert asked == ["network", "dns"]  # resolved order; network raised and was passed over
    assert lc.port_endpoint(web.model_copy(update={"port": 9100})) == ("127.0.0.1:9101", "fwd")
    assert host_with().order() == [] and Lifecycle(
        _runtime_for(host_with(), tmp_path), sample_vm(), op_id="op-abcdef"
    ).port_endpoint(web) == ("guest:8080", "")
    with pytest.raises(ValueError):
        Listener(proto="sctp", address="::", port=1, family=6)


def test_a_resumed_start_runs_vm_resumed_in_order_between_boot_and_post_boot(tmp_path):
    """A boot that says the VM continued from a snapshot gets every plugin's
    vm_resumed, in dependency order, after the VMM runs and before post_boot."""
    from datetime import datetime, timezone

    from banger_core.models import Resumed

    calls: list[tuple[str, str]] = []
    host = host_with(plugin("nat", requires=["network"], calls=calls), plugin("network", calls=calls))
    lc = Lifecycle(_runtime_for(host, tmp_path), sample_vm(), op_id="op-abcdef")
    resumed = Resumed(snapshot="s1", kind="restore", source_vm="src", new_identity=True, taken_at=datetime.now(timezone.utc))

    def boot(_m: Machine) -> Resumed:
        calls.append(("boot", "-"))
        return resumed

    lc.start(Machine(kernel="k", vcpus=1, memory_mib=128), boot=boot)
    stages = [c for c in calls if c[0] not in ("prepare_host", "configure_machine")]
    assert stages == [
        ("boot", "-"),
        ("vm_resumed", "network"),
        ("resumed-from", "s1"),
        ("vm_resumed", "nat"),
        ("resumed-from", "s1"),
        ("post_boot", "network"),
        ("post_boot", "nat"),
    ]


# --- top-level config keys a plugin claims (config_keys) ----------------------------------


class _Item(BaseModel):
    model_config = {"extra": "forbid"}
    name: str
    size: int = 1


class _Claiming(BaseModel):
    model_config = {"extra": "forbid"}
    greeting: str = "hi"
    items: list[_Item] = []
    limits: dict[str, int] = {}
    seen: list[tuple[str, bool]] = []  # (name, from the project), as SettingsSource said


def _claiming_plugin(name: str = "claimer", keys=("items", "limits")) -> types.ModuleType:
    from pydantic import ValidationInfo, field_validator

    from banger_core.config import SettingsSource

    class Model(_Claiming):
        @field_validator("items", mode="after")
        @classmethod
        def _note(cls, items: list[_Item], info: ValidationInfo) -> list[_Item]:
            source = SettingsSource.of(info)
            assert source is not None  # the core always says where the values come from
            for i, it in enumerate(items):
                if it.name == "banned" and source.from_project("items", i):
                    raise ValueError(f"item {i}: a project may not name 'banned'")
            return items

    mod = plugin(name, config_keys=list(keys))

    @hookimpl
    def config_model():
        return Model

    mod.config_model = config_model
    return mod


def test_config_keys_are_recorded_and_listed():
    host = host_with(_claiming_plugin())
    assert host.records["claimer"].config_keys == ("items", "limits")
    assert host.records["claimer"].to_dict()["config_keys"] == ["items", "limits"]
    assert host.claimant("items") == "claimer" and host.claimant("nope") is None


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ("items", "must be a list of plugin names"),  # a bare string, as for requires
        (["Items"], "'Items' is not a config key"),
        (["vmm"], "'vmm' is banger's own [vmm] table"),
        (["other"], "'other' is a plugin's name"),
        (["claimer"], "'claimer' is a plugin's name"),
        (["taken"], "'taken' is claimed by first"),
        (["a", "a"], "a key is named twice"),
    ],
)
def test_a_bad_or_conflicting_claim_marks_the_plugin_broken(keys, says):
    host = host_with(plugin("other"), plugin("first", config_keys=["taken"]), plugin("claimer", config_keys=keys))
    assert host.records["claimer"].status == "broken" and says in host.records["claimer"].reason, host.records["claimer"].reason
    assert host.records["first"].status == "enabled" and host.claimant("taken") == "first"


def test_a_plugin_named_as_a_claimed_key_is_broken():
    host = host_with(plugin("first", config_keys=["taken"]), plugin("taken"))
    assert host.records["taken"].status == "broken" and "its name is the config key first claims" in host.records["taken"].reason


def _config(tmp_path, user: str, project: str | None = None):
    from banger_core.config import Config, ProjectConfig

    (tmp_path / "config.toml").write_text(user)
    proj = None
    if project is not None:
        (tmp_path / "proj").mkdir(exist_ok=True)
        (tmp_path / "proj" / "banger.toml").write_text(project)
        proj = ProjectConfig.load(tmp_path / "proj")
    return Config.load(tmp_path / "config.toml"), proj


def test_claimed_keys_are_the_plugins_settings_and_a_project_adds_to_an_array(tmp_path):
    host = host_with(_claiming_plugin())
    cfg, proj = _config(
        tmp_path,
        "[claimer]\ngreeting = 'yo'\n[[items]]\nname = 'a'\n[[items]]\nname = 'b'\nsize = 2\n[limits]\nx = 1\ny = 2\n",
        "[[items]]\nname = 'c'\n[limits]\ny = 3\n",
    )
    cfg.check_claims(host)
    user = cfg.settings_for(host, "claimer")
    assert [i.name for i in user.items] == ["a", "b"] and user.limits == {"x": 1, "y": 2} and user.greeting == "yo"
    both = cfg.settings_for(host, "claimer", proj)
    assert [i.name for i in both.items] == ["a", "b", "c"]  # the project's items follow the user's
    assert both.limits == {"x": 1, "y": 3} and both.greeting == "yo"  # a claimed table merges key by key


def test_claimed_key_errors_name_the_file_and_the_index_in_that_file(tmp_path):
    host = host_with(_claiming_plugin())
    cfg, proj = _config(tmp_path, "[[items]]\nname = 'a'\n[[items]]\nname = 'b'\nsize = 'big'\n")
    with pytest.raises(BangerError) as ei:
        cfg.settings_for(host, "claimer")
    assert ei.value.message == f"{tmp_path / 'config.toml'}: items[1].size: Input should be a valid integer (got 'big')"

    cfg, proj = _config(tmp_path, "[[items]]\nname = 'a'\n", "[[items]]\nname = 'c'\n[[items]]\nname = 'd'\nextra = 1\n")
    with pytest.raises(BangerError) as ei:
        cfg.settings_for(host, "claimer", proj)
    # the project's second item: [1] in banger.toml, though [2] of the merged array
    assert ei.value.message == f"{tmp_path / 'proj' / 'banger.toml'}: items[1].extra: Extra inputs are not permitted (got 1)"


def test_a_validator_tells_the_projects_items_from_the_users(tmp_path):
    host = host_with(_claiming_plugin())
    cfg, proj = _config(tmp_path, "[[items]]\nname = 'banned'\n", "[[items]]\nname = 'ok'\n")
    assert [i.name for i in cfg.settings_for(host, "claimer", proj).items] == ["banned", "ok"]  # the user may
    cfg, proj = _config(tmp_path, "[[items]]\nname = 'a'\n", "[[items]]\nname = 'banned'\n")
    with pytest.raises(BangerError, match=r"proj/banger.toml: items: Value error, item 1: a project may not name 'banned'"):
        cfg.settings_for(host, "claimer", proj)


def test_a_claimed_key_inside_the_plugins_own_table_is_refused(tmp_path):
    host = host_with(_claiming_plugin())
    cfg, _ = _config(tmp_path, "[claimer]\nitems = [{name = 'a'}]\n")
    with pytest.raises(BangerError, match=r"\[claimer\] items: items is a top-level key of its own, not a key of \[claimer\]"):
        cfg.settings_for(host, "claimer")


def test_an_unclaimed_top_level_array_is_refused_saying_why(tmp_path):
    from banger_core.config import Config

    host = host_with(_claiming_plugin())
    cfg, proj = _config(tmp_path, "[[itemz]]\nname = 'a'\n", "[[things]]\nx = 1\n")
    with pytest.raises(BangerError) as ei:
        cfg.check_claims(host)
    assert ei.value.message.startswith(f"{tmp_path / 'config.toml'}: itemz: not a banger setting: no installed plugin claims it")
    with pytest.raises(BangerError, match=r"proj/banger.toml: things: not a banger setting"):
        cfg.enabled_for(host, proj)
    # the plugin that would claim it is broken (or disabled, never imported): the error says so
    broken = host_with(_claiming_plugin(keys=("items", "itemz")))
    broken.mark_broken("claimer", "a test broke it")
    with pytest.raises(BangerError, match=r"itemz: not a banger setting: claimer claims it, but is broken \(a test broke it\)"):
        cfg.check_claims(broken)
    host.records["off"] = PluginRecord("off", status="disabled")
    with pytest.raises(BangerError, match=r"no loaded plugin claims it \(not loaded, so not inspected: off\)"):
        cfg.check_claims(host)
    assert Config.load(tmp_path / "config.toml").arrays == {"itemz": [{"name": "a"}]}  # kept for the check, not refused at load


def test_a_scalar_top_level_key_is_still_refused_at_load(tmp_path):
    from banger_core.config import Config

    (tmp_path / "config.toml").write_text("items = 3\n")
    with pytest.raises(BangerError, match=r"items: expected a table \[items\], got int"):
        Config.load(tmp_path / "config.toml")


def test_a_plugins_warning_reaches_the_starts_progress_and_the_log(tmp_path, caplog):
    warner = plugin("warner")

    @hookimpl
    def post_boot(ctx):
        ctx.warn("/home/me/.aws: no such file: skipped")

    warner.post_boot = post_boot
    host = host_with(warner)
    lc = Lifecycle(_runtime_for(host, tmp_path), sample_vm("box"), op_id="op-abcdef")
    events: list[tuple[str, dict]] = []
    with caplog.at_level("WARNING", logger="banger.plugin.warner"):
        lc.start(Machine(kernel="k", vcpus=1, memory_mib=128), boot=lambda m: None, progress=lambda s, d: events.append((s, d)))
    assert events == [("warning", {"plugin": "warner", "msg": "/home/me/.aws: no such file: skipped"})]
    assert [(r.getMessage(), r.op_id) for r in caplog.records] == [("VM box: /home/me/.aws: no such file: skipped", "op-abcdef")]
