"""Inventory parsing (native and Ansible), discovery, and ``--hosts`` resolution."""

import copy
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ebpfdiag.errors import HostExpressionError, InventoryError, UsageError
from ebpfdiag.inventory import (
    ENV_VAR,
    Host,
    Inventory,
    find_inventory,
    load_inventory,
    parse_inventory,
    resolve_hosts,
    resolve_jump,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "inventory"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """A private HOME, so '~' expansion and discovery never see the real one."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    return home


def parse(text: str) -> Inventory:
    return parse_inventory(textwrap.dedent(text), Path("inv.yaml"))


def parse_error(text: str) -> InventoryError:
    with pytest.raises(InventoryError) as info:
        parse(text)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("inv.yaml:")
    return info.value


def names(hosts: list[Host]) -> list[str]:
    return [host.name for host in hosts]


# --- native format -----------------------------------------------------------------------


def test_example_inventory_parses_and_documents_every_key(_home):
    inv = load_inventory(str(REPO / "inventory.example.yaml"))
    assert inv.format == "native"
    assert list(inv.hosts) == ["bastion", "lb1", "web01", "web02", "web03", "db1"]
    assert inv.hosts["web02"].address == "198.18.1.2"
    assert inv.hosts["lb1"].jump == "bastion"
    assert inv.hosts["bastion"].jump is None  # the jump host does not jump through itself
    assert inv.hosts["db1"].jump is None  # `jump: null` drops the default
    assert inv.groups["frontends"] == ["lb1", "web01", "web02", "web03"]
    text = (REPO / "inventory.example.yaml").read_text()
    for key in [
        "defaults:",
        "hosts:",
        "groups:",
        "address:",
        "user:",
        "port:",
        "identity_file:",
        "sudo:",
        "python:",
        "connect_timeout:",
        "jump:",
        "known_hosts:",
        "labels:",
    ]:
        assert f"  {key}" in text or text.count(f"\n{key}") == 1, key
    db1 = inv.hosts["db1"]
    assert (db1.port, db1.user, db1.python, db1.connect_timeout) == (
        2222,
        "root",
        "/usr/bin/python3",
        5.5,
    )
    assert db1.identity_file == str(_home / ".ssh/lab_root")
    assert db1.known_hosts == str(_home / ".ssh/lab_known_hosts")
    assert dict(db1.labels) == {"site": "lab", "role": "db", "rack": "3"}


def test_defaults_apply_and_hosts_override(_home):
    inv = parse(
        """\
        defaults:
          user: ops
          port: 2200
          identity_file: ~/.ssh/k
          sudo: false
          python: /opt/py/bin/python3
          connect_timeout: 3
          known_hosts: ~/kh
          labels: {site: a, tier: x}
        hosts:
          a: {address: 198.18.0.1}
          b: {address: 198.18.0.2, user: root, port: 22, sudo: true, labels: {tier: y}}
          c: {port: null, user: null, identity_file: null}
        """
    )
    a, b, c = inv.hosts.values()
    assert a == Host(
        name="a",
        address="198.18.0.1",
        port=2200,
        user="ops",
        identity_file=str(_home / ".ssh/k"),
        sudo=False,
        python="/opt/py/bin/python3",
        connect_timeout=3.0,
        known_hosts=str(_home / "kh"),
        labels={"site": "a", "tier": "x"},
    )
    assert (b.user, b.port, b.sudo, dict(b.labels)) == (
        "root",
        22,
        True,
        {"site": "a", "tier": "y"},
    )
    assert c.address == "c"  # no address: the name is the address
    assert (c.port, c.user, c.identity_file, c.sudo) == (None, None, None, False)
    assert inv.defaults["user"] == "ops"


def test_builtin_defaults_without_defaults_section():
    host = parse("hosts:\n  h: {address: 198.18.0.1}\n").hosts["h"]
    assert host == Host(name="h", address="198.18.0.1")
    assert (host.sudo, host.python, host.connect_timeout, host.port) == (
        True,
        "python3",
        10.0,
        None,
    )


def test_address_range_expands_in_step_with_names():
    inv = parse('hosts:\n  "web[08-10]": {address: "198.18.1.[8-10]"}\n  "db[1-2]":\n')
    assert {n: h.address for n, h in inv.hosts.items()} == {
        "web08": "198.18.1.8",
        "web09": "198.18.1.9",
        "web10": "198.18.1.10",
        "db1": "db1",
        "db2": "db2",
    }


def test_groups_of_groups_are_flattened_in_order():
    inv = parse(
        """\
        hosts:
          lb1:
          "web[01-03]":
          db1:
        groups:
          everything: [front, db1, lb1]
          front: [lbs, web]
          lbs: [lb1]
          web:
            - web[01-02]
            - web03
          empty:
        """
    )
    assert inv.groups == {
        "everything": ["lb1", "web01", "web02", "web03", "db1"],
        "front": ["lb1", "web01", "web02", "web03"],
        "lbs": ["lb1"],
        "web": ["web01", "web02", "web03"],
        "empty": [],
    }
    assert inv.hosts["lb1"].groups == ("everything", "front", "lbs")
    assert inv.hosts["db1"].groups == ("everything",)


def test_empty_and_comment_only_files_are_empty_inventories():
    for text in ["", "# nothing yet\n", "---\n"]:
        inv = parse_inventory(text, None)
        assert (inv.hosts, inv.groups) == ({}, {})


def test_merge_keys_and_anchors_work():
    inv = parse(
        """\
        hosts:
          a: &base {address: 198.18.0.1, port: 2200, labels: {role: web}}
          b:
            <<: *base
            address: 198.18.0.2
          c:
            <<: *base
            port: 2203
        """
    )
    assert (inv.hosts["b"].address, inv.hosts["b"].port) == ("198.18.0.2", 2200)
    assert (inv.hosts["c"].address, inv.hosts["c"].port) == ("198.18.0.1", 2203)
    assert dict(inv.hosts["b"].labels) == {"role": "web"}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("hosts: {}\nextra: 1\n", 2, "unknown key 'extra' at the top level"),
        (
            "hosts:\n  h:\n    adress: x\n",
            3,
            "unknown key 'adress' in host h (did you mean: address?)",
        ),
        ("defaults:\n  address: x\n", 2, "unknown key 'address' in defaults"),
        ("defaults:\n  usr: x\n", 2, "(did you mean: user?)"),
        ("hosts:\n  h:\n    port: '22'\n", 3, "port: expected a port number 1-65535, got '22'"),
        ("hosts:\n  h:\n    port: 0\n", 3, "port: expected a port number"),
        ("hosts:\n  h:\n\n    port: 65536\n", 4, "port: expected a port number"),
        ("hosts:\n  h:\n    port: true\n", 3, "port: expected a port number"),
        ("hosts:\n  h:\n    port: [22]\n", 3, "port: expected a single value, got a sequence"),
        ("hosts:\n  h:\n    sudo: yes please\n", 3, "sudo: expected true or false"),
        ("hosts:\n  h:\n    sudo: 1\n", 3, "sudo: expected true or false"),
        ("hosts:\n  h:\n    connect_timeout: -1\n", 3, "connect_timeout: expected a positive"),
        ("hosts:\n  h:\n    connect_timeout: soon\n", 3, "connect_timeout: expected a positive"),
        ("hosts:\n  h:\n    user: ''\n", 3, "user: expected a non-empty string"),
        ("hosts:\n  h:\n    python: 3\n", 3, "python: expected a non-empty string, got int"),
        ("hosts:\n  h:\n    identity_file: {a: 1}\n", 3, "expected a single value"),
        ("hosts:\n  h:\n    known_hosts: 7\n", 3, "known_hosts: expected a non-empty string"),
        ("hosts:\n  h:\n    jump: 7\n", 3, "jump: expected a non-empty string"),
        ("hosts:\n  h:\n    address: null\n", 3, "address: expected a non-empty string"),
        ("hosts:\n  h:\n    labels: [a]\n", 3, "labels of host h must be a mapping"),
        ("hosts:\n  h:\n    labels: {a: [1]}\n", 3, "label a: expected a single value"),
        ("hosts:\n  h:\n    labels: {a: null}\n", 3, "label a: expected a value, got null"),
        ("hosts: [a, b]\n", 1, "hosts must be a mapping"),
        ("hosts:\n  h: 198.18.0.1\n", 2, "host h must be a mapping"),
        ("- a\n- b\n", 1, "the inventory must be a mapping"),
        ("hosts:\n  a:\n  a:\n", 3, "duplicate key 'a' (first at line 2)"),
        ('hosts:\n  "w[1-3]":\n  w2:\n', 3, "duplicate host 'w2' (first at line 2)"),
        ('hosts:\n  "w[3-1]":\n', 2, "bad range 'w[3-1]': 3 is after 1"),
        ('hosts:\n  "w[1-200000]":\n', 2, "expands to 200000 names"),
        ("hosts:\n  'a b':\n", 2, "bad name 'a b'"),
        ("hosts:\n  '!a':\n", 2, "bad name '!a'"),
        (
            'hosts:\n  "w[1-3]":\n    address: "198.18.0.[1-2]"\n',
            3,
            "2 address(es) for 3 host name(s)",
        ),
        ('hosts:\n  "w[1-3]":\n    address: 198.18.0.1\n', 3, "1 address(es) for 3 host name(s)"),
        ("hosts:\n  a:\ngroups:\n  g: [a, b]\n", 4, "group 'g': unknown host or group 'b'"),
        (
            "hosts:\n  web01:\ngroups:\n  g:\n    - wbe01\n",
            5,
            "unknown host or group 'wbe01' (did you mean: web01?)",
        ),
        ("hosts:\n  a:\ngroups:\n  g: a\n", 4, "group g must be a list"),
        ("hosts:\n  a:\ngroups:\n  a: []\n", 4, "group 'a' has the same name as a host"),
        (
            "hosts:\n  h:\ngroups:\n  a: [b]\n  b: [c]\n  c:\n    - h\n    - a\n",
            8,
            "group cycle: a -> b -> c -> a",
        ),
        ("hosts:\n  h:\ngroups:\n  a: [a]\n", 4, "group cycle: a -> a"),
        ("hosts:\n  h:\n    jump: h\n", 3, "host 'h' jumps through itself"),
        (
            "hosts:\n  a:\n    jump: b\n  b:\n    jump: a\n",
            3,
            "jump cycle: a -> b -> a",
        ),
        ("hosts:\n  a: {address: [1, 2\n", 3, "invalid YAML:"),
        ("hosts:\n\tb: 1\n", 2, "found character '\\t' that cannot start any token"),
        (
            "a: 1\n---\nb: 2\n",
            2,
            "invalid YAML: expected a single document in the stream: but found another",
        ),
        ("hosts:\n  a: !!python/object:os.system {}\n", 2, "host a must be a mapping"),
    ],
)
def test_native_errors_name_the_line(text, line, message):
    error = parse_error(text)
    assert error.line == line, str(error)
    assert message in str(error)
    assert str(error).startswith(f"inv.yaml:{line}: ")
    assert isinstance(error, UsageError)


def test_unsafe_tags_are_not_constructed():
    error = parse_error("hosts:\n  a:\n    user: !!python/name:os.system\n")
    assert error.line == 3
    assert "cannot read value" in str(error)


def test_host_is_frozen_hashable_and_serialisable():
    host = parse("hosts:\n  h: {address: 198.18.0.1, labels: {role: lb}}\n").hosts["h"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        host.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        host.labels["role"] = "web"  # type: ignore[index]
    assert {host: 1}[Host(name="h", address="198.18.0.1", labels={"role": "lb"})] == 1
    assert hash(host) != hash(dataclasses.replace(host, labels={"role": "web"}))
    assert pickle.loads(pickle.dumps(host)) == host
    assert copy.deepcopy(host) == host
    assert host.to_json() == {
        "name": "h",
        "address": "198.18.0.1",
        "port": None,
        "user": None,
        "identity_file": None,
        "sudo": True,
        "python": "python3",
        "connect_timeout": 10.0,
        "jump": None,
        "known_hosts": None,
        "labels": {"role": "lb"},
        "groups": [],
    }


# --- discovery ---------------------------------------------------------------------------


def _write(path: Path, host: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"hosts:\n  {host}:\n")
    return path


def test_discovery_order(tmp_path, monkeypatch, _home):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert find_inventory(None) is None
    assert load_inventory().hosts == {}

    user_file = _write(_home / ".config/ebpfdiag/inventory.yaml", "from_home")
    assert find_inventory(None) == user_file
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert find_inventory(None) is None
    xdg_file = _write(tmp_path / "xdg/ebpfdiag/inventory.yaml", "from_xdg")
    assert find_inventory(None) == xdg_file

    _write(work / "inventory.yaml", "from_cwd")
    assert list(load_inventory().hosts) == ["from_cwd"]

    env_file = _write(tmp_path / "env.yaml", "from_env")
    monkeypatch.setenv(ENV_VAR, str(env_file))
    assert list(load_inventory().hosts) == ["from_env"]

    explicit = _write(tmp_path / "explicit.yaml", "from_option")
    inv = load_inventory(str(explicit))
    assert list(inv.hosts) == ["from_option"]
    assert inv.path == explicit


def test_explicit_and_env_inventories_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "inventory.yaml", "fallback")
    with pytest.raises(InventoryError, match=r"nope\.yaml: no such inventory file$"):
        find_inventory(str(tmp_path / "nope.yaml"))
    with pytest.raises(InventoryError, match="no such inventory file"):
        find_inventory(str(tmp_path))  # a directory is not an inventory
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone.yaml"))
    with pytest.raises(InventoryError, match=r"gone\.yaml: .*from \$EBPFDIAG_INVENTORY"):
        load_inventory()


def test_explicit_tilde_is_expanded(_home):
    path = _write(_home / "inv.yaml", "mine")
    assert find_inventory("~/inv.yaml") == path


def test_load_reports_path_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hosts:\n  a:\n    port: x\n")
    with pytest.raises(InventoryError) as info:
        load_inventory(str(path))
    assert str(info.value).startswith(f"{path}:3: port:")
    path.write_bytes(b"hosts:\n  \xff:\n")
    with pytest.raises(InventoryError, match="cannot read"):
        load_inventory(str(path))


# --- Ansible inventories -----------------------------------------------------------------


@pytest.fixture
def ansible(_home) -> Inventory:
    return load_inventory(str(FIXTURES / "ansible.yaml"))


def test_ansible_hosts_ranges_and_groups(ansible):
    assert ansible.format == "ansible"
    assert list(ansible.hosts) == [
        "bastion",
        "lb1",
        "lb2",
        "web-e01",
        "web-e04",
        "web-e07",
        "web-e10",
        "web-wa",
        "web-wb",
        "web-wc",
        "web-w9",
        "db01.example.internal",
    ]
    groups = ansible.groups
    assert groups["all"] == list(ansible.hosts)
    assert groups["ungrouped"] == ["bastion"]
    assert groups["web_east"] == ["web-e01", "web-e04", "web-e07", "web-e10"]
    assert groups["webservers"] == groups["web_east"] + groups["web_west"]
    assert groups["monitoring"] == ["db01.example.internal", *groups["webservers"]]
    assert ansible.hosts["web-e04"].groups == ("all", "webservers", "web_east", "monitoring")


def test_ansible_connection_vars(ansible, _home):
    hosts = ansible.hosts
    assert hosts["bastion"].address == "198.18.0.2"
    assert hosts["bastion"].sudo is False
    assert hosts["lb1"].address == "lb1"
    assert (hosts["lb1"].port, hosts["lb2"].port) == (2222, 2222)
    assert (hosts["web-w9"].address, hosts["web-w9"].port) == ("198.18.3.9", 2200)
    assert all(h.user == "deploy" for h in hosts.values())
    assert all(h.identity_file == str(_home / ".ssh/deploy_ed25519") for h in hosts.values())
    assert hosts["web-e01"].sudo is True  # ansible_become: "yes" on the parent group
    assert hosts["lb1"].python == "python3"  # auto_silent: our default
    db = hosts["db01.example.internal"]
    assert (db.address, db.python, db.connect_timeout) == ("198.18.4.1", "/usr/bin/python3", 30.0)


def test_ansible_vars_become_labels_child_groups_win(ansible):
    east, west = ansible.hosts["web-e01"].labels, ansible.hosts["web-wa"].labels
    assert (east["http_port"], east["dc"], east["role"]) == ("8081", "east", "web")
    assert (west["http_port"], west["dc"]) == ("8080", "west")
    assert ansible.hosts["lb1"].labels["keepalived"] == '{"priority": 100, "vrid": 51}'
    assert ansible.hosts["db01.example.internal"].labels["ansible_connection"] == "ssh"
    for host in ansible.hosts.values():
        assert "ansible_user" not in host.labels
        assert "ansible_become_password" not in host.labels  # vault values are never kept
        assert "api_token" not in host.labels  # nor anything named like a secret
        assert host.labels["ntp_server"] == "198.18.0.1"


def test_ansible_all_vars_are_defaults_for_literal_hosts(ansible):
    [host] = resolve_hosts(ansible, "198.18.9.9")
    assert (host.user, host.address, host.port) == ("deploy", "198.18.9.9", None)
    assert host.labels["ntp_server"] == "198.18.0.1"


def test_ansible_top_level_groups_without_all():
    inv = parse(
        """\
        web:
          hosts:
            web[1:2]:
          vars:
            ansible_port: 2200
        db:
          hosts:
            db1:
              ansible_host: 198.18.0.5
              ansible_port: 2201
        """
    )
    assert inv.format == "ansible"
    assert inv.groups == {
        "all": ["web1", "web2", "db1"],
        "ungrouped": [],
        "web": ["web1", "web2"],
        "db": ["db1"],
    }
    assert [h.port for h in inv.hosts.values()] == [2200, 2200, 2201]


def test_ansible_host_vars_beat_group_vars_and_repeats_merge():
    inv = parse(
        """\
        all:
          vars: {ansible_user: a}
          children:
            g1:
              hosts:
                h: {ansible_user: host_user}
              vars: {ansible_user: g1_user, ansible_port: 2201}
            g2:
              hosts:
                h: {ansible_port: 2202}
              vars: {ansible_python_interpreter: /usr/bin/python3}
        """
    )
    host = inv.hosts["h"]
    assert (host.user, host.port, host.python) == ("host_user", 2202, "/usr/bin/python3")
    assert host.groups == ("all", "g1", "g2")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("all:\n  hosts:\n    a:\n  childs:\n", 4, "unknown key 'childs' in group all"),
        ("all:\n  hosts:\n    a:\n      ansible_port: http\n", 4, "ansible_port: expected a port"),
        ("all:\n  hosts:\n    a:\n      ansible_port: 99999\n", 4, "ansible_port: expected a port"),
        ("all:\n  hosts:\n    a:\n      ansible_become: maybe\n", 4, "ansible_become: expected"),
        (
            "all:\n  hosts:\n    a:\n      ansible_host: '{{ inventory_hostname }}.lab'\n",
            4,
            "ansible_host: templated values cannot be evaluated here",
        ),
        ("all:\n  hosts:\n    w[01:100]:\n", 3, "equal length"),
        ("all:\n  hosts:\n    a: 1\n", 3, "vars of a must be a mapping"),
        ("all:\n  hosts: [a]\n", 2, "hosts of all must be a mapping"),
        (
            "all:\n  children:\n    a:\n      children:\n        b:\n          children:\n"
            "            a:\n",
            7,
            "group cycle",
        ),
    ],
)
def test_ansible_errors_name_the_line(text, line, message):
    error = parse_error(text)
    assert error.line == line, str(error)
    assert message in str(error)


def test_ansible_unknown_vars_are_kept():
    inv = parse("all:\n  hosts:\n    a:\n      ansible_shell_type: sh\n      anything: [1]\n")
    assert dict(inv.hosts["a"].labels) == {"ansible_shell_type": "sh", "anything": "[1]"}


# --- host expressions --------------------------------------------------------------------


@pytest.fixture
def inv(_home) -> Inventory:
    return load_inventory(str(REPO / "inventory.example.yaml"))


@pytest.fixture
def racks() -> Inventory:
    return parse(
        """\
        defaults: {user: ops}
        hosts:
          "rack[1-3]-node[01-04]":
          "web[01-20]":
        groups:
          rack1: [rack1-node01, rack1-node02, rack1-node03, rack1-node04]
        """
    )


@pytest.mark.parametrize(
    ("expr", "selected"),
    [
        ("lb1", ["lb1"]),
        ("lb1,web02", ["lb1", "web02"]),
        ("web02,lb1", ["web02", "lb1"]),
        ("lbs", ["lb1"]),
        ("@web", ["web01", "web02", "web03"]),
        ("frontends", ["lb1", "web01", "web02", "web03"]),
        ("web[01-03]", ["web01", "web02", "web03"]),
        ("web[03,01]", ["web03", "web01"]),
        ("frontends,!web02", ["lb1", "web01", "web03"]),
        ("frontends,!web", ["lb1"]),
        ("frontends,!@lbs", ["web01", "web02", "web03"]),
        ("frontends,!web[01-02]", ["lb1", "web03"]),
        ("!web", ["bastion", "lb1", "db1"]),
        ("!frontends,!bastion", ["db1"]),
        ("all,!frontends", ["bastion", "db1"]),
        ("@all", ["bastion", "lb1", "web01", "web02", "web03", "db1"]),
        ("web01,web,web01,lb1,lbs", ["web01", "web02", "web03", "lb1"]),
        ("web01,!web01,web01", ["web01"]),
        (" lb1  web01 ,", ["lb1", "web01"]),
    ],
)
def test_expressions(inv, expr, selected):
    assert names(resolve_hosts(inv, expr)) == selected


def test_selected_hosts_are_the_inventory_records(inv):
    assert resolve_hosts(inv, "lb1") == [inv.hosts["lb1"]]


def test_cartesian_ranges_and_range_of_groups(racks):
    assert names(resolve_hosts(racks, "rack[1-2]-node[03-04]")) == [
        "rack1-node03",
        "rack1-node04",
        "rack2-node03",
        "rack2-node04",
    ]
    assert len(resolve_hosts(racks, "rack[1-3]-node[01-04],!rack2-node[01-04]")) == 8
    assert names(resolve_hosts(racks, "rack[1],!rack1-node0[2-4]")) == ["rack1-node01"]
    assert len(resolve_hosts(racks, "web[01-20],!web[05-20]")) == 4


def test_literal_hosts_get_defaults(inv):
    hosts = resolve_hosts(
        inv,
        "root@198.18.7.1,198.18.7.2:2200,[2001:db8::7]:2222,2001:db8::8,ops@[2001:db8::9],me@gw.lab",
    )
    assert [(h.name, h.user, h.address, h.port) for h in hosts] == [
        ("root@198.18.7.1", "root", "198.18.7.1", 22),
        ("198.18.7.2:2200", "ops", "198.18.7.2", 2200),
        ("[2001:db8::7]:2222", "ops", "2001:db8::7", 2222),
        ("2001:db8::8", "ops", "2001:db8::8", 22),
        ("ops@[2001:db8::9]", "ops", "2001:db8::9", 22),
        ("me@gw.lab", "me", "gw.lab", 22),
    ]
    assert all(h.jump == "bastion" and h.labels == {"site": "lab"} for h in hosts)
    assert all(h.groups == () for h in hosts)


def test_literal_naming_an_inventory_host_reuses_its_settings(inv):
    [host] = resolve_hosts(inv, "admin@web02:2022")
    assert (host.name, host.address, host.user, host.port) == (
        "admin@web02:2022",
        "198.18.1.2",
        "admin",
        2022,
    )
    assert host.labels["role"] == "web"


def test_literal_ranges_expand():
    empty = Inventory(path=None, hosts={}, groups={})
    hosts = resolve_hosts(empty, "ops@198.18.1.[1-3]:2200,!ops@198.18.1.2:2200")
    assert [(h.name, h.address, h.port) for h in hosts] == [
        ("ops@198.18.1.1:2200", "198.18.1.1", 2200),
        ("ops@198.18.1.3:2200", "198.18.1.3", 2200),
    ]
    assert hosts[0] == Host(name="ops@198.18.1.1:2200", address="198.18.1.1", port=2200, user="ops")


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("wbe01", "unknown host or group 'wbe01' (did you mean: web01, web02, web03?)"),
        ("lb1,fronends", "unknown host or group 'fronends' (did you mean: frontends?)"),
        ("zzzz", "unknown host or group 'zzzz'"),
        ("!wbe01", "unknown host or group 'wbe01' (did you mean"),
        ("web[01-05]", "unknown host or group 'web04' (did you mean"),
        ("@lb1", "unknown group 'lb1'"),
        ("@frontend", "unknown group 'frontend' (did you mean: frontends?)"),
        ("web[03-01]", "bad range 'web[03-01]': 03 is after 01"),
        ("web[01-03", "unbalanced '['"),
        ("web[1-200000]", "expands to 200000 names (limit 100000)"),
        ("web01,!web01", "no hosts selected by 'web01,!web01'"),
        ("", "no hosts selected by ''"),
        ("!all", "no hosts selected by '!all'"),
        ("lb1,!", "empty exclusion"),
        ("ops@198.18.0.1:70000", "port 70000 out of range 1-65535"),
        ("[2001:db8::1]:0", "port 0 out of range"),
        ("198.18.0.1:ssh", "bad port 'ssh'"),
    ],
)
def test_expression_errors(inv, expr, message):
    with pytest.raises(HostExpressionError) as info:
        resolve_hosts(inv, expr)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


def test_unknown_name_without_inventory_explains_literals():
    empty = Inventory(path=None, hosts={}, groups={})
    with pytest.raises(HostExpressionError, match="no inventory loaded: write user@address"):
        resolve_hosts(empty, "server")


def test_resolve_jump(inv):
    assert resolve_jump(inv, inv.hosts["lb1"]) == inv.hosts["bastion"]
    assert resolve_jump(inv, inv.hosts["bastion"]) is None
    outside = dataclasses.replace(inv.hosts["lb1"], jump="gate@198.18.0.3:2022")
    jump = resolve_jump(inv, outside)
    assert jump is not None
    assert (jump.name, jump.address, jump.user, jump.port, jump.jump) == (
        "gate@198.18.0.3:2022",
        "198.18.0.3",
        "gate",
        2022,
        None,
    )
    alias = resolve_jump(inv, dataclasses.replace(outside, jump="gw-alias"))
    assert alias is not None and (alias.address, alias.user) == ("gw-alias", "ops")
    with pytest.raises(InventoryError, match="bad jump: port 0 out of range"):
        resolve_jump(inv, dataclasses.replace(outside, jump="gw:0"))


# --- parses kept between commands --------------------------------------------------------

LOAD_TWICE = """
import json, sys
from ebpfdiag.inventory import load_inventory
inv = load_inventory(sys.argv[1])
print(json.dumps({"yaml": "yaml" in sys.modules, "hosts": [h.to_json() for h in inv.hosts.values()],
                  "groups": inv.groups, "defaults": {k: (dict(v) if k == "labels" else v)
                  for k, v in inv.defaults.items()}, "format": inv.format}))
"""


def load_in_new_process(path: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOAD_TWICE, str(path)], capture_output=True,
                          text=True, env=env, check=True, timeout=60)  # fmt: skip
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    "name", ["inventory.example.yaml", "tests/fixtures/inventory/ansible.yaml"]
)
def test_an_unchanged_inventory_is_read_again_without_yaml(tmp_path, name, _home):
    """The second command reads the kept parse (PyYAML is not even imported) and gets the
    very same inventory; an edit, or another HOME (~ in paths), parses again."""
    path = tmp_path / "inv.yaml"
    path.write_text((REPO / name).read_text())
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = load_in_new_process(path, env)
    second = load_in_new_process(path, env)
    assert (first.pop("yaml"), second.pop("yaml")) == (True, False)
    assert second == first and first["hosts"]
    path.write_text(path.read_text() + "\n# edited\n")
    assert load_in_new_process(path, env)["yaml"] is True
    other_home = tmp_path / "elsewhere"
    other_home.mkdir()
    assert load_in_new_process(path, {**env, "HOME": str(other_home)})["yaml"] is True


def test_a_kept_parse_of_other_text_is_not_taken(tmp_path, monkeypatch):
    """The kept file's name is a checksum only: its text is compared in full."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "inv.yaml"
    path.write_text("hosts:\n  a: {address: 198.18.0.1}\n")
    assert list(load_inventory(str(path)).hosts) == ["a"]
    [kept] = (tmp_path / "cache" / "ebpfdiag" / "inventory").glob("*.json")
    data = json.loads(kept.read_text())
    data["text"] = "hosts:\n  b: {address: 198.18.0.2}\n"
    data["hosts"][0]["name"] = "b"
    kept.write_text(json.dumps(data))
    assert list(load_inventory(str(path)).hosts) == ["a"]
