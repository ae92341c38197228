"""The nat plugin's daemon-side half: the rules one VM gets, removing them by record and
by comment, and ``net.ipv4.ip_forward`` (switched on for the first NAT VM, restored after
the last), recorded durably in the plugin's own tables (``nat_vms``, ``nat_forwarding``).

Every firewall and sysctl operation goes through ``banger_core.hostnet``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from banger_core import hostnet
from banger_core.hostnet import Rule

if TYPE_CHECKING:
    import sqlite_utils

    from banger_core.runtime import Runtime
    from banger_core.store import Store

    from banger_nat import Settings

log = logging.getLogger("banger.plugin.nat")

FORWARD_KEY = "net.ipv4.ip_forward"
#: the chains banger's NAT rules live in (table, chain)
CHAINS: tuple[tuple[hostnet.Table, str], ...] = (("nat", "POSTROUTING"), ("filter", "FORWARD"))


# --------------------------------------------------------------------------- rules
#: ``<tag>:nat:<vm id>``: the network plugin's own rules say ``banger:<what>`` too
COMMENT_RE = re.compile(r"(?P<tag>[A-Za-z0-9_.-]{1,32}):nat:(?P<vm>[A-Za-z0-9_-]{1,64})")


def comment_for(tag: str, vm_id: str) -> str:
    """The iptables comment on every rule made for one VM: ``<tag>:nat:<vm id>``."""
    return f"{tag}:nat:{vm_id}"


def parse_comment(comment: str | None) -> tuple[str, str] | None:
    """(tag, vm id) of a comment this plugin writes, else None."""
    m = COMMENT_RE.fullmatch(comment or "")
    return (m["tag"], m["vm"]) if m else None


def vm_rules(comment: str, address: str, bridge: str, uplink: str) -> list[Rule]:
    """The three rules one NAT VM gets, in the order they read at the top of their chains.

    The FORWARD rules match the bridge and the guest's /32, not the TAP: a routed packet's
    input interface is the bridge (``-i TAP`` sees only bridged frames, and only with
    br_netfilter loaded), so the bridge plus the address leased to this VM is what names it.
    """
    tagged = ("-m", "comment", "--comment", comment)
    guest = f"{address}/32"
    replies = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED")
    return [
        Rule("nat", "POSTROUTING", ("-s", guest, "-o", uplink, *tagged, "-j", "MASQUERADE")),
        Rule("filter", "FORWARD", ("-i", bridge, "-o", uplink, "-s", guest, *tagged, "-j", "ACCEPT")),
        Rule("filter", "FORWARD", ("-i", uplink, "-o", bridge, "-d", guest, *replies, *tagged, "-j", "ACCEPT")),
    ]


def rule_to_json(rule: Rule) -> list[Any]:
    return [rule.table, rule.chain, list(rule.spec)]


def rule_from_json(raw: Any) -> Rule:
    table, chain, spec = raw
    if table not in ("filter", "nat"):
        raise ValueError(f"not a table banger writes: {table!r}")
    return Rule(table, str(chain), tuple(str(w) for w in spec))


def describe(rule: Rule) -> str:
    return f"-t {rule.table} {rule.chain} {' '.join(rule.spec)}"


def insert_rules(rules: list[Rule]) -> None:
    """Each rule at the top of its chain (ahead of a DROP policy's or a DROP rule's
    verdict), inserted last-first so that the chain then reads in the given order; a rule
    already there is left as it is (idempotent)."""
    for rule in reversed(rules):
        hostnet.insert_rule(rule, 1)


def comment_of(rule: Rule) -> str | None:
    spec = rule.spec
    for i, word in enumerate(spec[:-1]):
        if word == "--comment":
            return spec[i + 1]
    return None


def tagged_rules(tags: Iterable[str]) -> list[tuple[Rule, str]]:
    """Every rule in NAT's chains commented ``<tag>:nat:<vm id>`` for one of ``tags``:
    (rule, vm id)."""
    wanted = set(tags)
    found: list[tuple[Rule, str]] = []
    for table, chain in CHAINS:
        for rule in hostnet.list_rules(table, chain):
            parsed = parse_comment(comment_of(rule))
            if parsed and parsed[0] in wanted:
                found.append((rule, parsed[1]))
    return found


def remove_rules(recorded: Iterable[Rule], comments: set[str]) -> list[str]:
    """Delete the recorded rules, then every rule carrying one of ``comments`` (what a lost
    or partial record missed). Goes on past failures; returns them, one line each."""
    problems: list[str] = []
    for rule in recorded:
        try:
            hostnet.delete_rule(rule)
        except Exception as exc:
            problems.append(f"cannot delete {describe(rule)}: {exc}")
    if not comments:
        return problems
    if hostnet.iptables_binary() is None:
        return problems  # no iptables, no rules to find (recorded ones failed above, saying so)
    for table, chain in CHAINS:
        try:
            rules = [r for r in hostnet.list_rules(table, chain) if comment_of(r) in comments]
        except Exception as exc:
            problems.append(f"cannot list -t {table} {chain}: {exc}")
            continue
        for rule in rules:
            try:
                hostnet.delete_rule(rule)
            except Exception as exc:
                problems.append(f"cannot delete {describe(rule)}: {exc}")
    return problems


# --------------------------------------------------------------------------- tables
def migration_1(db: "sqlite_utils.Database") -> None:
    db["nat_vms"].create(  # type: ignore[union-attr]
        {"vm_id": str, "comment": str, "uplink": str, "address": str, "bridge": str, "tap": str, "at": float}, pk="vm_id"
    )
    db["nat_forwarding"].create({"key": str, "previous": str, "set_to": str, "at": float}, pk="key")  # type: ignore[union-attr]


# --------------------------------------------------------------------------- the service
class NatService:
    """The ``nat`` service (one per daemon; thread-safe): the user's own settings (what a
    project cannot override), the durable records, and ``ip_forward``."""

    def __init__(self, runtime: "Runtime", store: "Store") -> None:
        self.runtime = runtime
        self.store = store
        #: held while rules are made or removed and ip_forward decided, so that one VM's
        #: cleanup never restores ip_forward between another's check and its rules
        self.lock = threading.RLock()

    # settings ---------------------------------------------------------------------
    def user_settings(self) -> "Settings":
        """The ``[nat]`` table of the user's own config.toml, no project merged in."""
        settings: Settings = self.runtime.config.settings_for(self.runtime.host, "nat")  # type: ignore[assignment]
        return settings

    @property
    def user_config(self) -> Path:
        return Path(self.runtime.config.path)

    # per-VM records -----------------------------------------------------------------
    def remember_vm(self, vm_id: str, record: dict[str, Any]) -> None:
        row = {k: record.get(k) or "" for k in ("comment", "uplink", "address", "bridge", "tap")}
        with self.store.transaction() as db:
            db["nat_vms"].upsert({"vm_id": vm_id, **row, "at": time.time()}, pk="vm_id")  # type: ignore[union-attr]

    def forget_vm(self, vm_id: str) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM nat_vms WHERE vm_id = ?", [vm_id])

    def known_vms(self) -> dict[str, str]:
        """VM id -> the comment of its rules, for every VM whose rules may exist."""
        with self.store.transaction() as db:
            return {row[0]: row[1] for row in db.execute("SELECT vm_id, comment FROM nat_vms").fetchall()}

    def has_records(self) -> bool:
        with self.store.transaction() as db:
            vms = db.execute("SELECT COUNT(*) FROM nat_vms").fetchone()[0]
            fwd = db.execute("SELECT COUNT(*) FROM nat_forwarding").fetchone()[0]
        return bool(vms or fwd)

    def _forwarding_row(self) -> dict[str, Any] | None:
        with self.store.transaction() as db:
            row = db.execute("SELECT previous, set_to, at FROM nat_forwarding WHERE key = ?", [FORWARD_KEY]).fetchone()
        return {"previous": row[0], "set_to": row[1], "at": row[2]} if row else None

    # ip_forward -----------------------------------------------------------------------
    def ensure_forwarding(self, logger: Any = log) -> bool:
        """``net.ipv4.ip_forward`` on. When it was off, what it was is recorded first (so
        a crash cannot lose it), then it is set to 1; True when this call switched it."""
        with self.lock:
            current = hostnet.sysctl_get(FORWARD_KEY)
            if current == "1":
                return False
            with self.store.transaction() as db:
                if not db.execute("SELECT 1 FROM nat_forwarding WHERE key = ?", [FORWARD_KEY]).fetchone():
                    db["nat_forwarding"].insert(  # type: ignore[union-attr]
                        {"key": FORWARD_KEY, "previous": current, "set_to": "1", "at": time.time()}
                    )
            hostnet.sysctl_set(FORWARD_KEY, "1")
            logger.info("%s was %s: set to 1 for NAT (restored when the last NAT VM stops)", FORWARD_KEY, current)
            return True

    def release_forwarding(self, tags: Iterable[str], logger: Any = log) -> str | None:
        """Restore ``ip_forward`` when banger set it and no rule tagged with one of
        ``tags`` is left; the value restored, or None when nothing was done. A value
        someone changed since banger set it is left as it is (the record goes)."""
        with self.lock:
            row = self._forwarding_row()
            if row is None:
                return None
            if tagged_rules(tags):
                return None
            current = hostnet.sysctl_get(FORWARD_KEY)
            restored = None
            if current == row["set_to"]:
                hostnet.sysctl_set(FORWARD_KEY, row["previous"])
                restored = row["previous"]
                logger.info("the last NAT rule is gone: %s restored to %s", FORWARD_KEY, restored)
            else:
                logger.warning("%s is %s, not the %s banger set: left as it is", FORWARD_KEY, current, row["set_to"])
            with self.store.transaction() as db:
                db.execute("DELETE FROM nat_forwarding WHERE key = ?", [FORWARD_KEY])
            return restored

    # daemon status ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        row = self._forwarding_row()
        with self.store.transaction() as db:
            vms = db.execute("SELECT COUNT(*) FROM nat_vms").fetchone()[0]
        return {
            "nat_vms": vms,
            "ip_forward": f"set to {row['set_to']} by banger (was {row['previous']})" if row else "not changed by banger",
        }
