"""The firewall as a test found it, put back exactly: what a test that starts dockerd owes the machine.

`iptables-restore` alone is not enough. It only rewrites the tables named in its input, and
a fresh machine (a CI runner, a new network namespace) has no tables at all: `iptables-save`
prints nothing, so restoring that nothing leaves every chain and rule dockerd added. A table
that was absent is therefore emptied explicitly (no rules, no chains of its own, built-in
chains back to ACCEPT) and, on the nf_tables backend, deleted; on the legacy backend a table
cannot be deleted, and an empty all-ACCEPT table filters exactly as an absent one does, so the
two compare equal.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

#: Seconds for one iptables or nft command.
COMMAND_TIMEOUT_S = 30
#: The address families a firewall snapshot covers: (iptables tool prefix, nft family).
FAMILIES = (("iptables", "ip"), ("ip6tables", "ip6"))

_COUNTERS = re.compile(r"\s*\[\d+:\d+\]")
_BUILTIN_ACCEPT = re.compile(r"^:\S+ ACCEPT$")


def parse_tables(saved: str) -> dict[str, list[str]]:
    """`iptables-save` output as {table: its lines}, without comments, packet counters or COMMIT."""
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in saved.splitlines():
        line = _COUNTERS.sub("", raw).rstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif line == "COMMIT":
            current = None
        elif current is not None:
            current.append(line)
    return tables


def is_empty(lines: list[str]) -> bool:
    """True for a table that filters nothing: built-in chains with ACCEPT policies, nothing else.

    A user chain's line carries `-` where a built-in chain has its policy, so it never matches.
    """
    return all(_BUILTIN_ACCEPT.match(line) for line in lines)


def significant(tables: dict[str, list[str]]) -> dict[str, list[str]]:
    """The tables that do something: an empty table and an absent one are the same firewall."""
    return {name: lines for name, lines in tables.items() if not is_empty(lines)}


def empty_table(name: str, lines: list[str]) -> str:
    """An `iptables-restore` section that leaves table `name` holding only its built-in chains, accepting."""
    builtins = [line.split()[0] for line in lines if line.startswith(":") and not line.endswith(" -")]
    return "\n".join([f"*{name}", *(f"{chain} ACCEPT [0:0]" for chain in builtins), "COMMIT"]) + "\n"


@dataclass(frozen=True)
class FamilySnapshot:
    """One address family's tables, as `<tool>-save` printed them."""

    tool: str
    nft_family: str
    saved: str

    @property
    def tables(self) -> dict[str, list[str]]:
        return parse_tables(self.saved)


def _backend_is_nft(tool: str, prefix: tuple[str, ...] = ()) -> bool:
    version = subprocess.run([*prefix, tool, "--version"], capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT_S, check=False).stdout
    return "nf_tables" in version


class Firewall:
    """A snapshot of the packet filter, taken at construction, that `restore` puts back.

    `netns` runs every command inside that network namespace (how the tests of this module
    get a machine's fresh, table-less firewall without touching the machine's own).
    """

    def __init__(self, netns: str | None = None) -> None:
        self.prefix: tuple[str, ...] = ("ip", "netns", "exec", netns) if netns else ()
        self.before = self._save_all()

    def _run(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run([*self.prefix, *args], input=stdin, capture_output=True, text=True, check=True,
                              timeout=COMMAND_TIMEOUT_S).stdout

    def _save_all(self) -> list[FamilySnapshot]:
        return [FamilySnapshot(tool, nft_family, self._run(f"{tool}-save"))
                for tool, nft_family in FAMILIES if shutil.which(f"{tool}-save")]

    def restore(self) -> None:
        """Every table back as it was; a table that did not exist is emptied, and deleted where nft can."""
        for before, now in zip(self.before, self._save_all(), strict=True):
            found, current = before.tables, now.tables
            added = {name: lines for name, lines in current.items() if name not in found}
            script = before.saved + "".join(empty_table(name, lines) for name, lines in added.items())
            if script.strip():
                self._run(f"{before.tool}-restore", stdin=script)
            if added and _backend_is_nft(before.tool, self.prefix) and shutil.which("nft"):
                for name in added:
                    self._run("nft", "delete", "table", before.nft_family, name)

    def differences(self) -> list[str]:
        """What differs from the snapshot, one line per table; empty when the firewall is as found."""
        found: list[str] = []
        for before, now in zip(self.before, self._save_all(), strict=True):
            was, is_now = significant(before.tables), significant(now.tables)
            for name in sorted(set(was) | set(is_now)):
                if was.get(name) != is_now.get(name):
                    extra = [line for line in is_now.get(name, []) if line not in was.get(name, [])]
                    missing = [line for line in was.get(name, []) if line not in is_now.get(name, [])]
                    found.append(f"{before.tool} {name}: added {extra}, missing {missing}")
        return found
